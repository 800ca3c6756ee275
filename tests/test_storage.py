"""executor.storage against real stores on loopback: local files, memory://, moto S3, GCS emulator.

Faults come from tests.rig.object_stores.FaultProxy placed between the executor and the store.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from executor import storage
from executor.storage import StorageError, StorageNotFound
from tests.rig.object_stores import DROP, FORBIDDEN, RESET, SLOWDOWN, TOO_MANY_REQUESTS, delay, truncate

GENEROUS = 30.0  # upper bound for anything that should stop at a few seconds; the box is noisy


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("EXECUTOR_STORAGE_RETRY_BASE_DELAY", "0.01")


# ---------------------------------------------------------------------------------------------
# Round trips on every kind of store


@pytest.fixture(params=["path", "file", "memory", "s3", "gs"])
def prefix(request, tmp_path) -> str:
    kind = request.param
    if kind == "path":
        return str(tmp_path / "store")
    if kind == "file":
        return f"file://{tmp_path}/store"
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}/store"
    if kind == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/store"
    return f"gs://{request.getfixturevalue('gcs_bucket')}/store"


def test_write_then_read(prefix):
    uri = storage.join(prefix, "run", "outputs.pb")
    storage.write_bytes(uri, b"\x00first")
    storage.write_bytes(uri, b"\x00second")  # overwrite
    assert storage.read_bytes(uri) == b"\x00second"
    assert storage.exists(uri)
    assert not storage.exists(storage.join(prefix, "run", "absent.pb"))


def test_missing_object_is_not_found(prefix):
    with pytest.raises(StorageNotFound) as info:
        storage.read_bytes(storage.join(prefix, "absent.pb"))
    assert info.value.transient is False
    assert "absent.pb" in str(info.value)


def test_upload_then_download_file(prefix, tmp_path):
    src = tmp_path / "src.bin"
    payload = os.urandom(300_000)
    src.write_bytes(payload)
    uri = storage.join(prefix, "blob.bin")
    storage.upload_file(str(src), uri)
    dst = tmp_path / "out" / "dst.bin"
    storage.download_file(uri, str(dst))
    assert dst.read_bytes() == payload
    assert sorted(os.listdir(dst.parent)) == ["dst.bin"]  # no temp left behind


def test_upload_then_download_dir(prefix, tmp_path):
    src = tmp_path / "ckpt"
    (src / "nested" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a")
    (src / "nested" / "b.txt").write_bytes(b"b")
    (src / "nested" / "deeper" / "c.txt").write_bytes(b"c")
    storage.upload_dir(str(src), storage.join(prefix, "ckpt"))

    out = tmp_path / "restored"
    storage.download_dir(storage.join(prefix, "ckpt"), str(out))
    got = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert got == {"a.txt": b"a", "nested/b.txt": b"b", "nested/deeper/c.txt": b"c"}


def test_download_dir_of_empty_prefix_is_not_found(prefix, tmp_path):
    with pytest.raises(StorageNotFound):
        storage.download_dir(storage.join(prefix, "nothing-here"), str(tmp_path / "out"))


def test_download_dir_refuses_keys_escaping_the_target(tmp_path):
    root = f"memory://{uuid.uuid4().hex}/ckpt"
    storage.write_bytes(f"{root}/../../escaped.txt", b"x")
    with pytest.raises(StorageError, match="outside"):
        storage.download_dir(root, str(tmp_path / "out"))
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))


def test_s3_objects_are_what_we_wrote(s3_bucket, moto_s3, tmp_path):
    storage.write_bytes(f"s3://{s3_bucket}/k/out.pb", b"written")
    assert moto_s3.get(s3_bucket, "k/out.pb") == b"written"
    moto_s3.put(s3_bucket, "k/in.pb", b"from boto")
    assert storage.read_bytes(f"s3://{s3_bucket}/k/in.pb") == b"from boto"


def test_gcs_objects_are_what_we_wrote(gcs_bucket, gcs_emulator):
    storage.write_bytes(f"gs://{gcs_bucket}/k/out.pb", b"written")
    assert gcs_emulator.get(gcs_bucket, "k/out.pb") == b"written"
    gcs_emulator.put(gcs_bucket, "k/in.pb", b"from http")
    assert storage.read_bytes(f"gs://{gcs_bucket}/k/in.pb") == b"from http"


# ---------------------------------------------------------------------------------------------
# Configuration from env


def test_flyte_aws_settings_become_s3fs_options(monkeypatch):
    monkeypatch.setenv("FLYTE_AWS_ENDPOINT", "http://minio:9000")
    monkeypatch.setenv("FLYTE_AWS_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("FLYTE_AWS_SECRET_ACCESS_KEY", "SECRET")
    monkeypatch.setenv("FLYTE_AWS_ADDRESSING_STYLE", "virtual")
    options = storage._s3_options()
    assert options["client_kwargs"] == {"endpoint_url": "http://minio:9000"}
    assert (options["key"], options["secret"]) == ("AKID", "SECRET")
    assert options["config_kwargs"]["s3"] == {"addressing_style": "virtual"}
    assert options["config_kwargs"]["retries"]["total_max_attempts"] == 1


def test_standard_aws_endpoint_variable_works_without_flyte_ones(s3_bucket, moto_s3, monkeypatch):
    for name in ("FLYTE_AWS_ENDPOINT", "FLYTE_AWS_ACCESS_KEY_ID", "FLYTE_AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    moto_s3.put(s3_bucket, "x", b"via AWS_ENDPOINT_URL")
    assert storage.read_bytes(f"s3://{s3_bucket}/x") == b"via AWS_ENDPOINT_URL"


def test_path_addressing_style_works(s3_bucket, monkeypatch):
    monkeypatch.setenv("FLYTE_AWS_ADDRESSING_STYLE", "path")
    storage.write_bytes(f"s3://{s3_bucket}/p", b"path style")
    assert storage.read_bytes(f"s3://{s3_bucket}/p") == b"path style"


def test_storage_emulator_host_alone_reaches_gcs(gcs_bucket, gcs_emulator, monkeypatch):
    monkeypatch.delenv("EXECUTOR_GCS_ENDPOINT")
    gcs_emulator.put(gcs_bucket, "y", b"via STORAGE_EMULATOR_HOST")
    assert storage.read_bytes(f"gs://{gcs_bucket}/y") == b"via STORAGE_EMULATOR_HOST"


def test_invalid_retry_setting_is_reported_by_name(monkeypatch):
    monkeypatch.setenv("EXECUTOR_STORAGE_RETRY_ATTEMPTS", "lots")
    with pytest.raises(StorageError, match="EXECUTOR_STORAGE_RETRY_ATTEMPTS"):
        storage.read_bytes(f"memory://{uuid.uuid4().hex}")


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(StorageError, match="unsupported URI scheme 'nosuch://'"):
        storage.read_bytes("nosuch://bucket/key")


# ---------------------------------------------------------------------------------------------
# Retries, through the fault proxy


@pytest.fixture
def s3_proxy(s3_bucket, moto_s3, fault_proxy, monkeypatch):
    proxy = fault_proxy(moto_s3.host, moto_s3.port)
    monkeypatch.setenv("FLYTE_AWS_ENDPOINT", proxy.endpoint)
    return proxy


@pytest.fixture
def gcs_proxy(gcs_bucket, gcs_emulator, fault_proxy, monkeypatch):
    proxy = fault_proxy(gcs_emulator.host, gcs_emulator.port)
    monkeypatch.setenv("EXECUTOR_GCS_ENDPOINT", proxy.endpoint)
    return proxy


def test_not_found_is_not_retried_s3(s3_proxy, s3_bucket):
    with pytest.raises(StorageNotFound):
        storage.read_bytes(f"s3://{s3_bucket}/absent")
    assert s3_proxy.count == 1


def test_not_found_is_not_retried_gcs(gcs_proxy, gcs_bucket):
    with pytest.raises(StorageNotFound):
        storage.read_bytes(f"gs://{gcs_bucket}/absent")
    assert gcs_proxy.count == 1


def test_access_denied_is_not_retried(s3_proxy, s3_bucket):
    s3_proxy.enqueue(FORBIDDEN)
    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"s3://{s3_bucket}/k")
    assert not isinstance(info.value, StorageNotFound)
    assert info.value.transient is False
    assert "credentials" in str(info.value)
    assert s3_proxy.count == 1


def test_read_and_write_are_one_request_each(s3_proxy, s3_bucket):
    storage.write_bytes(f"s3://{s3_bucket}/one", b"x")
    assert s3_proxy.count == 1
    assert storage.read_bytes(f"s3://{s3_bucket}/one") == b"x"
    assert s3_proxy.count == 2
    assert [r.method for r in s3_proxy.requests] == ["PUT", "GET"]


def test_two_slowdowns_then_success(s3_proxy, s3_bucket, moto_s3, capfd):
    moto_s3.put(s3_bucket, "k", b"payload")
    s3_proxy.enqueue(SLOWDOWN, SLOWDOWN)
    assert storage.read_bytes(f"s3://{s3_bucket}/k") == b"payload"
    assert s3_proxy.count == 3
    retry_lines = [line for line in capfd.readouterr().err.splitlines() if f"s3://{s3_bucket}/k" in line]
    assert len(retry_lines) == 2


def test_write_retried_after_429(s3_proxy, s3_bucket, moto_s3):
    s3_proxy.enqueue(TOO_MANY_REQUESTS)
    storage.write_bytes(f"s3://{s3_bucket}/w", b"eventually")
    assert s3_proxy.count == 2
    assert moto_s3.get(s3_bucket, "w") == b"eventually"


@pytest.mark.parametrize("fault", [DROP, RESET, truncate(0.5)], ids=["drop", "reset", "truncate"])
def test_broken_connection_then_success(s3_proxy, s3_bucket, moto_s3, fault):
    payload = os.urandom(64_000)
    moto_s3.put(s3_bucket, "k", payload)
    s3_proxy.enqueue(fault)
    assert storage.read_bytes(f"s3://{s3_bucket}/k") == payload
    assert s3_proxy.count == 2


def test_download_retried_after_truncated_body(s3_proxy, s3_bucket, moto_s3, tmp_path):
    payload = os.urandom(200_000)
    moto_s3.put(s3_bucket, "big", payload)
    s3_proxy.enqueue(truncate(0.3))
    storage.download_file(f"s3://{s3_bucket}/big", str(tmp_path / "big"))
    assert (tmp_path / "big").read_bytes() == payload
    assert os.listdir(tmp_path) == ["big"]


def test_attempt_limit_is_exact(s3_proxy, s3_bucket, monkeypatch):
    # Proves botocore's and s3fs's own retries are off: each of our attempts is one request.
    monkeypatch.setenv("EXECUTOR_STORAGE_RETRY_ATTEMPTS", "3")
    s3_proxy.default = SLOWDOWN
    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"s3://{s3_bucket}/k")
    assert info.value.transient is True
    assert "EXECUTOR_STORAGE_RETRY_DEADLINE" in str(info.value)
    assert s3_proxy.count == 3


def test_persistent_slowdown_stops_at_the_deadline(s3_proxy, s3_bucket, monkeypatch):
    monkeypatch.setenv("EXECUTOR_STORAGE_RETRY_ATTEMPTS", "100000")
    monkeypatch.setenv("EXECUTOR_STORAGE_RETRY_DEADLINE", "1.5")
    s3_proxy.default = SLOWDOWN
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"s3://{s3_bucket}/k")
    assert time.monotonic() - started < GENEROUS
    assert info.value.transient is True
    assert s3_proxy.count >= 2


def test_slow_store_is_cut_off_at_the_deadline(s3_proxy, s3_bucket, moto_s3, monkeypatch):
    moto_s3.put(s3_bucket, "k", b"late")
    monkeypatch.setenv("EXECUTOR_STORAGE_RETRY_DEADLINE", "1")
    s3_proxy.default = delay(60)
    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"s3://{s3_bucket}/k")
    assert info.value.transient is True


def test_gcs_recovers_from_slowdowns(gcs_proxy, gcs_bucket, gcs_emulator):
    # gcsfs retries 5xx inside each of our attempts (about 1 s, then 2 s of backoff).
    gcs_emulator.put(gcs_bucket, "k", b"payload")
    gcs_proxy.enqueue(SLOWDOWN, SLOWDOWN)
    assert storage.read_bytes(f"gs://{gcs_bucket}/k") == b"payload"
    assert gcs_proxy.count == 3


def test_gcs_persistent_slowdown_stops_at_the_deadline(gcs_proxy, gcs_bucket, monkeypatch):
    monkeypatch.setenv("EXECUTOR_STORAGE_RETRY_DEADLINE", "2")
    gcs_proxy.default = SLOWDOWN
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"gs://{gcs_bucket}/k")
    # Without the per-attempt bound, gcsfs's own retries alone would take over 30 s.
    assert time.monotonic() - started < 20
    assert info.value.transient is True


# ---------------------------------------------------------------------------------------------
# Atomic local writes


@pytest.mark.parametrize("broken", ["replace", "fsync"])
def test_failed_local_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch, broken):
    target = tmp_path / "outputs.pb"
    storage.write_bytes(str(target), b"old")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, broken, fail)
    with pytest.raises(StorageError, match="No space left"):
        storage.write_bytes(str(target), b"new and longer")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["outputs.pb"]


def test_failed_first_local_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(StorageError):
        storage.write_bytes(str(tmp_path / "new.pb"), b"data")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_failed_download_keeps_existing_local_file(s3_bucket, tmp_path):
    target = tmp_path / "inputs.pb"
    target.write_bytes(b"previous")
    with pytest.raises(StorageNotFound):
        storage.download_file(f"s3://{s3_bucket}/absent", str(target))
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["inputs.pb"]


# ---------------------------------------------------------------------------------------------
# Lazy imports (in a fresh interpreter, so nothing is imported already)


def _run(code: str, env: dict | None = None) -> dict:
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_local_io_imports_no_fsspec(tmp_path):
    (tmp_path / "in.pb").write_bytes(b"local")
    result = _run(f"""
        import json, sys
        from executor import storage
        data = storage.read_bytes({str(tmp_path / 'in.pb')!r})
        storage.write_bytes("file://{tmp_path}/out.pb", data)
        print(json.dumps({{"data": data.decode(),
                          "loaded": [m for m in ("fsspec", "s3fs", "gcsfs", "tenacity") if m in sys.modules]}}))
    """)
    assert result == {"data": "local", "loaded": []}
    assert (tmp_path / "out.pb").read_bytes() == b"local"


def test_s3_imports_s3fs_but_not_gcsfs(s3_bucket, moto_s3):
    moto_s3.put(s3_bucket, "k", b"remote")
    result = _run(f"""
        import json, sys
        from executor import storage
        data = storage.read_bytes("s3://{s3_bucket}/k")
        print(json.dumps({{"data": data.decode(),
                          "loaded": [m for m in ("s3fs", "gcsfs", "tenacity") if m in sys.modules]}}))
    """, moto_s3.env)
    assert result == {"data": "remote", "loaded": ["s3fs"]}


def test_gcs_turns_off_gcsfs_grpc_probe_unless_set(gcs_bucket, gcs_emulator):
    gcs_emulator.put(gcs_bucket, "k", b"remote")
    env = {k: v for k, v in gcs_emulator.env.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    code = f"""
        import json, os
        os.environ.pop("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", None)
        from executor import storage
        data = storage.read_bytes("gs://{gcs_bucket}/k")
        print(json.dumps({{"data": data.decode(), "flag": os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}}))
    """
    assert _run(code, env) == {"data": "remote", "flag": "false"}


@pytest.mark.parametrize("module, uri, hint", [
    ("s3fs", "s3://bucket/key", "pip install 'executor[s3]'"),
    ("gcsfs", "gs://bucket/key", "pip install 'executor[gcs]'"),
])
def test_missing_backend_names_the_package(module, uri, hint):
    result = _run(f"""
        import json, sys
        sys.modules[{module!r}] = None  # as if it were not installed
        from executor import storage
        try:
            storage.read_bytes({uri!r})
        except storage.StorageError as e:
            print(json.dumps({{"message": str(e), "transient": e.transient}}))
    """)
    assert hint in result["message"]
    assert uri in result["message"]
    assert result["transient"] is False


def test_exists_raises_rather_than_guessing_when_the_store_fails(s3_proxy, s3_bucket, monkeypatch):
    monkeypatch.setenv("EXECUTOR_STORAGE_RETRY_ATTEMPTS", "2")
    s3_proxy.default = SLOWDOWN
    with pytest.raises(StorageError) as info:
        storage.exists(f"s3://{s3_bucket}/k")
    assert info.value.transient is True


def test_gave_up_message_says_what_to_do(s3_proxy, s3_bucket, monkeypatch):
    monkeypatch.setenv("EXECUTOR_STORAGE_RETRY_ATTEMPTS", "2")
    s3_proxy.default = SLOWDOWN
    with pytest.raises(StorageError) as info:
        storage.write_bytes(f"s3://{s3_bucket}/out.pb", b"x")
    message = str(info.value)
    assert message.startswith(f"s3://{s3_bucket}/out.pb: gave up after 2 attempts")
    assert "HTTP 503" in message and "EXECUTOR_STORAGE_RETRY_ATTEMPTS (now 2)" in message


# --- one-pass hashed downloads (code bundles) ------------------------------------------------------

def test_download_hashed_local(tmp_path):
    import hashlib

    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(300_000))
    md5, stored = storage.download_hashed(str(src), str(tmp_path / "b.bin"))
    assert md5 == hashlib.md5(src.read_bytes()).hexdigest() and stored is None
    assert (tmp_path / "b.bin").read_bytes() == src.read_bytes()


def test_download_hashed_parallel_ranges_on_s3(tmp_path, moto_s3, fault_proxy, monkeypatch):
    import hashlib

    bucket = moto_s3.make_bucket()
    data = os.urandom(1_000_000)
    moto_s3.put(bucket, "big.bin", data)
    proxy = fault_proxy(moto_s3.host, moto_s3.port)
    for k, v in {**moto_s3.env, "FLYTE_AWS_ENDPOINT": proxy.endpoint,
                 "EXECUTOR_PARALLEL_DOWNLOAD_BYTES": "1", "EXECUTOR_DOWNLOAD_PART_BYTES": str(128 << 10)}.items():
        monkeypatch.setenv(k, v)
    md5, stored = storage.download_hashed(f"s3://{bucket}/big.bin", str(tmp_path / "big.bin"))
    assert md5 == hashlib.md5(data).hexdigest() == stored  # single-part put: the ETag is the md5
    assert (tmp_path / "big.bin").read_bytes() == data
    ranged = [r for r in proxy.requests if r.method == "GET" and "range" in {k.lower() for k in r.headers}]
    assert len(ranged) == 8  # ceil(1_000_000 / 131072)


def test_download_hashed_retries_a_truncated_range(tmp_path, moto_s3, fault_proxy, monkeypatch):
    import hashlib

    bucket = moto_s3.make_bucket()
    data = os.urandom(400_000)
    moto_s3.put(bucket, "big.bin", data)
    proxy = fault_proxy(moto_s3.host, moto_s3.port)
    for k, v in {**moto_s3.env, "FLYTE_AWS_ENDPOINT": proxy.endpoint, "EXECUTOR_STORAGE_RETRY_BASE_DELAY": "0.01",
                 "EXECUTOR_PARALLEL_DOWNLOAD_BYTES": "1", "EXECUTOR_DOWNLOAD_PART_BYTES": str(100_000)}.items():
        monkeypatch.setenv(k, v)
    from tests.rig.object_stores import PASS, truncate

    proxy.enqueue(PASS, truncate(10))  # the HEAD passes, the first range is cut short
    md5, _ = storage.download_hashed(f"s3://{bucket}/big.bin", str(tmp_path / "big.bin"))
    assert md5 == hashlib.md5(data).hexdigest()
    assert (tmp_path / "big.bin").read_bytes() == data
