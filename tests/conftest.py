"""Shared fixtures. Each rig lives in its own plugin module."""
pytest_plugins = [
    "tests.rig.object_stores",
    "tests.oracle.flytekit_env",
    "tests.oracle.flyte_env",
]
