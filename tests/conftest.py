"""Shared fixtures. Each rig lives in its own plugin module."""
import pytest

pytest_plugins = [
    "tests.rig.object_stores",
    "tests.oracle.flytekit_env",
    "tests.oracle.flyte_env",
]


@pytest.fixture(params=["threads", "inline"])
def extraction_threads(request, monkeypatch):
    """Bundle extraction pipelined across threads (as archives from 2 MiB are) and in the calling
    thread alone (as smaller ones are): tests that use it run both ways."""
    from executor.bundle import archive

    monkeypatch.setattr(archive, "THREADS_FROM_BYTES", 0 if request.param == "threads" else 1 << 40)
    return request.param
