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
from tests.rig.object_stores import DROP, FORBIDDEN, PASS, RESET, SLOWDOWN, TOO_MANY_REQUESTS, delay, truncate

GENEROUS = 30.0  # upper bound for anything that should stop at a few seconds; the box is noisy


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("EXECUTOR_STORAGE_RETRY_BASE_DELAY", "0.01")


# ---------------------------------------------------------------------------------------------
# Round trips on every kind of store


S3_CLIENTS = ["obstore", "s3fs"]  # both serve s3:// (executor/obstore_s3.py picks one)


@pytest.fixture(params=S3_CLIENTS)
def s3_client(request, monkeypatch) -> str:
    monkeypatch.setenv("EXECUTOR_S3_CLIENT", request.param)
    return request.param


@pytest.fixture(params=["path", "file", "memory", "s3-obstore", "s3-s3fs", "gs"])
def prefix(request, tmp_path, monkeypatch) -> str:
    kind = request.param
    if kind == "path":
        return str(tmp_path / "store")
    if kind == "file":
        return f"file://{tmp_path}/store"
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}/store"
    if kind.startswith("s3-"):
        monkeypatch.setenv("EXECUTOR_S3_CLIENT", kind[3:])
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


def test_s3_objects_are_what_we_wrote(s3_client, s3_bucket, moto_s3, tmp_path):
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


def test_flyte_aws_settings_become_obstore_settings(monkeypatch):
    from executor import obstore_s3

    monkeypatch.setenv("FLYTE_AWS_ENDPOINT", "http://minio:9000")
    monkeypatch.setenv("FLYTE_AWS_ACCESS_KEY_ID", "AKID")
    monkeypatch.setenv("FLYTE_AWS_SECRET_ACCESS_KEY", "SECRET")
    monkeypatch.setenv("FLYTE_AWS_ADDRESSING_STYLE", "virtual")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    settings = obstore_s3.settings(request_timeout=60)
    assert settings["config"] == {
        "endpoint": "http://minio:9000", "access_key_id": "AKID", "secret_access_key": "SECRET",
        "region": "eu-west-3", "virtual_hosted_style_request": True,
    }
    assert settings["retry_config"] == {"max_retries": 0}
    assert settings["client_options"]["allow_http"] is True
    assert settings["client_options"]["timeout"] == "60.000s"


def test_a_forked_child_drops_the_parents_clients_without_closing_them(monkeypatch):
    # Closing an inherited s3fs client waits on the parent's event loop thread, which the fork did
    # not copy (about 1 s, in every child that used storage or collected garbage).
    import weakref

    monkeypatch.setattr(storage, "_filesystems", {})
    for name, value in {"EXECUTOR_S3_CLIENT": "s3fs", "FLYTE_AWS_ENDPOINT": "http://127.0.0.1:9",
                        "FLYTE_AWS_ACCESS_KEY_ID": "a", "FLYTE_AWS_SECRET_ACCESS_KEY": "b"}.items():
        monkeypatch.setenv(name, value)
    fs = storage._filesystem("s3://bucket/key")
    fs.connect()  # what registers s3fs's closing finalizer
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            live = [f for f in list(weakref.finalize._registry) if (p := f.peek()) is not None and p[0] is fs]
            os.write(w, f"{len(storage._filesystems)} {len(live)}".encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 100) == b"0 0"  # no client inherited, and nothing left to close one
    assert [f for f in list(weakref.finalize._registry) if (p := f.peek()) is not None and p[0] is fs]  # the parent's still is


def test_aws_keys_in_os_environ_become_obstore_settings(monkeypatch):
    # obstore would read AWS_* from the C-level environment, which isolation.environment() (a warm
    # worker acting for an invocation) does not change: the keys are taken from os.environ instead.
    from executor import obstore_s3
    from executor.serve import isolation

    for name in ("FLYTE_AWS_ACCESS_KEY_ID", "FLYTE_AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    invocation_env = {"AWS_ACCESS_KEY_ID": "AKID-of-it", "AWS_SECRET_ACCESS_KEY": "its-secret", "AWS_SESSION_TOKEN": "tok"}
    with isolation.environment(invocation_env):
        config = obstore_s3.settings(request_timeout=60)["config"]
    assert (config["access_key_id"], config["secret_access_key"], config["session_token"]) == ("AKID-of-it", "its-secret", "tok")
    assert "access_key_id" not in obstore_s3.settings(request_timeout=60)["config"]


@pytest.mark.parametrize("env, expected", [
    ({}, "obstore"),
    ({"AWS_PROFILE": "dev"}, "s3fs"),  # profiles are botocore's; obstore cannot read them
    ({"AWS_PROFILE": "dev", "AWS_ACCESS_KEY_ID": "AKID"}, "obstore"),
    ({"AWS_CONFIG_FILE": "/etc/aws/config"}, "s3fs"),
    ({"AWS_PROFILE": "dev", "EXECUTOR_S3_CLIENT": "obstore"}, "obstore"),
    ({"EXECUTOR_S3_CLIENT": "s3fs"}, "s3fs"),
])
def test_s3_client_choice(monkeypatch, tmp_path, env, expected):
    from executor import obstore_s3

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws here
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ACCESS_KEY_ID",
                 "FLYTE_AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE", "EXECUTOR_S3_CLIENT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert obstore_s3.client() == expected


def test_a_credentials_file_in_home_means_s3fs(monkeypatch, tmp_path):
    from executor import obstore_s3

    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[default]\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("AWS_ACCESS_KEY_ID", "FLYTE_AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE", "EXECUTOR_S3_CLIENT"):
        monkeypatch.delenv(name, raising=False)
    assert obstore_s3.client() == "s3fs"


def test_invalid_s3_client_is_reported_by_name(monkeypatch):
    monkeypatch.setenv("EXECUTOR_S3_CLIENT", "boto")
    with pytest.raises(StorageError, match="EXECUTOR_S3_CLIENT='boto' is invalid"):
        storage.read_bytes("s3://bucket/key")


def test_standard_aws_endpoint_variable_works_without_flyte_ones(s3_client, s3_bucket, moto_s3, monkeypatch):
    for name in ("FLYTE_AWS_ENDPOINT", "FLYTE_AWS_ACCESS_KEY_ID", "FLYTE_AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    moto_s3.put(s3_bucket, "x", b"via AWS_ENDPOINT_URL")
    assert storage.read_bytes(f"s3://{s3_bucket}/x") == b"via AWS_ENDPOINT_URL"


def test_path_addressing_style_works(s3_client, s3_bucket, monkeypatch):
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
def s3_proxy(s3_client, s3_bucket, moto_s3, fault_proxy, monkeypatch):
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
    # Warm the client first: on a loaded machine s3fs's first request (botocore loading its
    # service model) alone can outlast a 1.5 s deadline.
    assert not storage.exists(f"s3://{s3_bucket}/warm-up")
    before = s3_proxy.count
    s3_proxy.default = SLOWDOWN
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"s3://{s3_bucket}/k")
    assert time.monotonic() - started < GENEROUS
    assert info.value.transient is True
    assert s3_proxy.count - before >= 2


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


@pytest.mark.parametrize("durable, flushes", [(True, 2), (False, 0)])
def test_local_write_is_flushed_file_and_directory_unless_not_durable(tmp_path, monkeypatch, durable, flushes):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    storage.write_bytes(str(tmp_path / "outputs.pb"), b"data", durable=durable)
    assert len(synced) == flushes
    assert (tmp_path / "outputs.pb").read_bytes() == b"data" and os.listdir(tmp_path) == ["outputs.pb"]


def test_failed_first_local_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(StorageError):
        storage.write_bytes(str(tmp_path / "new.pb"), b"data")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_failed_download_keeps_existing_local_file(s3_client, s3_bucket, tmp_path):
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


@pytest.mark.parametrize("client, loaded", [
    ("obstore", ["obstore"]),  # and no fsspec, botocore or aiohttp: ≈ 5 ms instead of ≈ 400
    ("s3fs", ["fsspec", "s3fs", "botocore"]),
])
def test_s3_imports_only_its_client(s3_bucket, moto_s3, client, loaded):
    moto_s3.put(s3_bucket, "k", b"remote")
    result = _run(f"""
        import json, sys
        from executor import storage
        data = storage.read_bytes("s3://{s3_bucket}/k")
        modules = ("obstore", "fsspec", "s3fs", "botocore", "gcsfs", "tenacity")
        print(json.dumps({{"data": data.decode(), "loaded": [m for m in modules if m in sys.modules]}}))
    """, {**moto_s3.env, "EXECUTOR_S3_CLIENT": client})
    assert result == {"data": "remote", "loaded": loaded}


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


@pytest.mark.parametrize("module, uri, hint, client", [
    ("s3fs", "s3://bucket/key", "pip install 'executor[s3]'", "s3fs"),
    ("obstore", "s3://bucket/key", "pip install 'executor[s3]'", "obstore"),
    ("gcsfs", "gs://bucket/key", "pip install 'executor[gcs]'", "auto"),
])
def test_missing_backend_names_the_package(module, uri, hint, client):
    result = _run(f"""
        import json, os, sys
        os.environ["EXECUTOR_S3_CLIENT"] = {client!r}
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


def test_download_hashed_parallel_ranges_on_s3(s3_client, tmp_path, moto_s3, fault_proxy, monkeypatch):
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


@pytest.mark.parametrize("client, ranges", [("obstore", 4), ("s3fs", 1)])
def test_download_hashed_default_parts(client, ranges, tmp_path, moto_s3, fault_proxy, monkeypatch):
    """obstore streams each range into the file, so by default it takes one large range per worker;
    s3fs holds each range in memory, so it keeps them at 16 MiB."""
    import hashlib

    bucket = moto_s3.make_bucket()
    data = os.urandom(3_000_001)
    moto_s3.put(bucket, "big.bin", data)
    proxy = fault_proxy(moto_s3.host, moto_s3.port)
    for k, v in {**moto_s3.env, "FLYTE_AWS_ENDPOINT": proxy.endpoint, "EXECUTOR_S3_CLIENT": client,
                 "EXECUTOR_PARALLEL_DOWNLOAD_BYTES": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("EXECUTOR_DOWNLOAD_PART_BYTES", raising=False)
    md5, _ = storage.download_hashed(f"s3://{bucket}/big.bin", str(tmp_path / "big.bin"))
    assert md5 == hashlib.md5(data).hexdigest()
    assert (tmp_path / "big.bin").read_bytes() == data
    ranged = [r for r in proxy.requests if r.method == "GET" and "range" in {k.lower() for k in r.headers}]
    assert len(ranged) == ranges


# (s3fs: botocore itself retries a reset connection, so only a refusal fails its download)
@pytest.mark.parametrize("client, fault", [("obstore", "FORBIDDEN"), ("obstore", "RESET"), ("s3fs", "FORBIDDEN")])
def test_a_failing_range_stops_the_others_and_says_why(client, fault, tmp_path, moto_s3, fault_proxy, monkeypatch):
    from tests.rig import object_stores

    monkeypatch.setenv("EXECUTOR_S3_CLIENT", client)
    bucket = moto_s3.make_bucket()
    moto_s3.put(bucket, "big.bin", os.urandom(400_000))
    proxy = fault_proxy(moto_s3.host, moto_s3.port)
    for k, v in {**moto_s3.env, "FLYTE_AWS_ENDPOINT": proxy.endpoint, "EXECUTOR_STORAGE_RETRY_BASE_DELAY": "0.01",
                 "EXECUTOR_STORAGE_RETRY_ATTEMPTS": "1", "EXECUTOR_PARALLEL_DOWNLOAD_BYTES": "1",
                 "EXECUTOR_DOWNLOAD_PART_BYTES": str(100_000)}.items():
        monkeypatch.setenv(k, v)
    proxy.enqueue(object_stores.PASS, object_stores.PASS, getattr(object_stores, fault))  # the second range fails
    with pytest.raises(storage.StorageError) as failure:
        storage.download_hashed(f"s3://{bucket}/big.bin", str(tmp_path / "big.bin"))
    assert ("403" in str(failure.value) or "denied" in str(failure.value).lower()) if fault == "FORBIDDEN" else True
    assert not (tmp_path / "big.bin").exists() and os.listdir(tmp_path) == []


def test_download_hashed_retries_a_truncated_range(s3_client, tmp_path, moto_s3, fault_proxy, monkeypatch):
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


# Under SSE-KMS AWS answers an ETag of 32 hex digits that is not the md5 (moto answers the md5):
# the proxy rewrites it as AWS would, on every HEAD and GET of the object.
NOT_THE_MD5 = '"0123456789abcdef0123456789abcdef"'


@pytest.mark.parametrize("sse, trusted", [(None, True), ("AES256", True), ("aws:kms", False), ("aws:kms:dsse", False)])
def test_bundle_etag_is_its_md5_only_without_kms(s3_client, sse, trusted, tmp_path, moto_s3, fault_proxy, monkeypatch):
    import io
    import tarfile

    from executor.bundle.cache import BundleCache, BundleRef
    from executor.errors import TaskFailure
    from tests.rig.object_stores import set_headers

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("main.py")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"x=1\n"))
    bucket = moto_s3.make_bucket()
    moto_s3.client.put_object(Bucket=bucket, Key="bundle.tar.gz", Body=buf.getvalue(),
                              **({"ServerSideEncryption": sse} if sse else {}))
    proxy = fault_proxy(moto_s3.host, moto_s3.port)
    proxy.rule = lambda r: set_headers(ETag=NOT_THE_MD5) if r.path.split("?")[0].endswith("/bundle.tar.gz") else None
    for k, v in {**moto_s3.env, "FLYTE_AWS_ENDPOINT": proxy.endpoint}.items():
        monkeypatch.setenv(k, v)

    md5, stored = storage.download_hashed(f"s3://{bucket}/bundle.tar.gz", str(tmp_path / "b.tar.gz"))
    assert stored == (NOT_THE_MD5.strip('"') if trusted else None) and md5 != NOT_THE_MD5.strip('"')
    if s3_client == "obstore":  # its GET does not say; the HEAD it sends on a mismatch does
        fs = storage._filesystem(f"s3://{bucket}/bundle.tar.gz")
        assert fs.encryption(f"{bucket}/bundle.tar.gz", GENEROUS) == {"ServerSideEncryption": sse, "SSECustomerAlgorithm": None}
    ref = BundleRef(f"s3://{bucket}/bundle.tar.gz", policy="auto")
    if trusted:  # the ETag is the md5 here: a different one is a damaged download
        with pytest.raises(TaskFailure, match="the store says") as failure:
            BundleCache(str(tmp_path / "cache")).ensure(ref)
        assert failure.value.code == "BUNDLE_INTEGRITY"
    else:  # not checked, and said so
        prepared = BundleCache(str(tmp_path / "cache")).ensure(ref)
        assert "store md5" not in prepared.verified
        assert any(u.startswith("store md5") for u in prepared.unverified)


@pytest.mark.parametrize("head, trusted", [
    ({}, True),
    ({"ServerSideEncryption": "AES256"}, True),
    ({"ServerSideEncryption": "aws:kms"}, False),
    ({"ServerSideEncryption": "aws:kms:dsse"}, False),
    ({"SSECustomerAlgorithm": "AES256"}, False),  # SSE-C (moto does not answer its headers)
    ({"ServerSideEncryption": None, "SSECustomerAlgorithm": None}, True),  # s3fs's head, nothing encrypted
])
def test_md5_from_info_trusts_the_etag_only_in_the_clear_or_under_sse_s3(head, trusted):
    etag = '"0123456789ABCDEF0123456789ABCDEF"'
    assert storage.md5_from_info({"size": 1, "ETag": etag, **head}) == ("0123456789abcdef" * 2 if trusted else None)
    assert storage.md5_from_info({"size": 1, "ETag": '"0123456789abcdef0123456789abcdef-2"', **head}) is None
    assert storage.md5_from_info({"md5Hash": "ASNFZ4mrze8BI0VniavN7w=="}) == "0123456789abcdef" * 2  # GCS

# --- obstore and fork() ------------------------------------------------------------------------
# obstore's tokio runtime does not survive fork(): a child of a process that has used it hangs on
# its first request. The supervisor and serve fork workers after using storage themselves.

_FORK_THEN_READ = """
    import json, os, signal, sys
    from executor import storage
    if {forks_children}:
        storage.forks_children()
    parent = storage.read_bytes("s3://{bucket}/k").decode()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # a hang shows up as SIGALRM, not as a stuck test
        data = storage.read_bytes("s3://{bucket}/k").decode()
        os.write(w, json.dumps({{"child": data, "s3fs": "s3fs" in sys.modules}}).encode())
        os._exit(0)
    os.close(w)
    answer = os.read(r, 4096)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({{"parent": parent, "status": status, **(json.loads(answer) if answer else {{}})}}))
"""


def test_a_forking_process_keeps_obstore_usable_for_its_children(s3_bucket, moto_s3):
    moto_s3.put(s3_bucket, "k", b"shared")
    result = _run(_FORK_THEN_READ.format(forks_children=True, bucket=s3_bucket),
                  {**moto_s3.env, "EXECUTOR_S3_CLIENT": "auto"})
    assert result == {"parent": "shared", "status": 0, "child": "shared", "s3fs": False}


def test_a_child_that_inherited_obstore_falls_back_to_s3fs(s3_bucket, moto_s3):
    moto_s3.put(s3_bucket, "k", b"shared")
    result = _run(_FORK_THEN_READ.format(forks_children=False, bucket=s3_bucket),
                  {**moto_s3.env, "EXECUTOR_S3_CLIENT": "auto"})
    assert result == {"parent": "shared", "status": 0, "child": "shared", "s3fs": True}


def test_a_forked_attempt_brings_failures_back_classified(s3_bucket, moto_s3, fault_proxy):
    proxy = fault_proxy(moto_s3.host, moto_s3.port)
    proxy.enqueue(PASS, FORBIDDEN, SLOWDOWN, SLOWDOWN)  # GET absent, GET k, two PUT attempts
    result = _run(f"""
        import json, os
        from executor import obstore_s3, storage
        storage.forks_children()
        seen = {{}}
        try:
            storage.read_bytes("s3://{s3_bucket}/absent")
        except storage.StorageNotFound:
            seen["absent"] = "not found"
        try:
            storage.read_bytes("s3://{s3_bucket}/k")
        except storage.StorageError as e:
            seen["refused"] = [e.transient, "denied" in str(e)]
        try:
            storage.write_bytes("s3://{s3_bucket}/k", b"x")
        except storage.StorageError as e:
            seen["overloaded"] = [e.transient, "gave up after 2 attempts" in str(e), "HTTP 503" in str(e)]
        seen["runtime_started_here"] = obstore_s3._runtime_pid is not None
        print(json.dumps(seen))
    """, {**moto_s3.env, "FLYTE_AWS_ENDPOINT": proxy.endpoint, "EXECUTOR_S3_CLIENT": "obstore",
          "EXECUTOR_STORAGE_RETRY_ATTEMPTS": "2", "EXECUTOR_STORAGE_RETRY_BASE_DELAY": "0.01"})
    assert result == {"absent": "not found", "refused": [False, True], "overloaded": [True, True, True],
                      "runtime_started_here": False}
    assert proxy.count == 4
