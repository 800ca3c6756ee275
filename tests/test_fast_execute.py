"""pyflyte-fast-execute end to end: bundles fetched, verified, extracted safely and cached (real processes)."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from flyteidl.core import errors_pb2, literals_pb2

from executor.bundle.archive import build
from tests.helpers import DEFAULT_RESOLVER, env_with, write_inputs

TASK_SOURCE = "def add(a: int, b: int) -> int:\n    return a + b\n"


def _bundle(tmp_path: Path, source: str = TASK_SOURCE, name: str = "src") -> Path:
    src = tmp_path / name / "wf"
    src.mkdir(parents=True)
    (src / "tasks.py").write_text(source)
    return Path(build(str(tmp_path / name), str(tmp_path / f"{name}-out")))


def _fast_args(bundle_uri: str, inputs: Path, prefix: Path | str, dest: Path, extra: list[str] | None = None):
    return ["pyflyte-fast-execute", "--additional-distribution", bundle_uri, "--dest-dir", str(dest), *(extra or []), "--",
            "pyflyte-execute", "--inputs", str(inputs), "--output-prefix", str(prefix), "--raw-output-data-prefix",
            f"{prefix}/raw", "--resolver", DEFAULT_RESOLVER, "--", "task-module", "wf.tasks", "task-name", "add"]


def _run(args, cache: Path, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "executor", *args], capture_output=True, text=True, timeout=120,
                          env=env_with({"EXECUTOR_CACHE_DIR": str(cache), **(env or {})}), cwd=str(cwd or "/"))


def _error(prefix: Path) -> errors_pb2.ContainerError:
    doc = errors_pb2.ErrorDocument()
    doc.ParseFromString((prefix / "error.pb").read_bytes())
    return doc.error


def _o0(prefix: Path) -> int:
    m = literals_pb2.LiteralMap()
    m.ParseFromString((prefix / "outputs.pb").read_bytes())
    return m.literals["o0"].scalar.primitive.integer


@pytest.fixture
def inputs(tmp_path):
    return write_inputs(tmp_path / "inputs.pb", {"a": 40, "b": 2}, {"a": int, "b": int})


def test_miss_then_hit(tmp_path, inputs):
    bundle = _bundle(tmp_path)
    cache, dest = tmp_path / "cache", tmp_path / "root"
    first = _run(_fast_args(str(bundle), inputs, tmp_path / "o1", dest), cache)
    assert first.returncode == 0, first.stderr
    assert _o0(tmp_path / "o1") == 42 and "cache=miss" in first.stderr and 'verified="name digest"' in first.stderr
    bundle.unlink()  # a hit must not need the archive at all
    second = _run(_fast_args(str(bundle), inputs, tmp_path / "o2", dest), cache)
    assert second.returncode == 0, second.stderr
    assert _o0(tmp_path / "o2") == 42 and "cache=hit" in second.stderr
    assert (dest / "wf").is_symlink() and (dest / "wf" / "tasks.py").read_text() == TASK_SOURCE


def test_bundle_wins_over_installed_module(tmp_path, inputs):
    # An older copy of the module in the working directory must not shadow the bundle's.
    bundle = _bundle(tmp_path)
    stale = tmp_path / "cwd" / "wf"
    stale.mkdir(parents=True)
    (stale / "tasks.py").write_text("def add(a: int, b: int) -> int:\n    return -1\n")
    run = _run(_fast_args(str(bundle), inputs, tmp_path / "o", tmp_path / "root"), tmp_path / "cache", cwd=tmp_path / "cwd")
    assert run.returncode == 0, run.stderr
    assert _o0(tmp_path / "o") == 42


def test_tampered_archive_is_refused_and_nothing_runs(tmp_path, inputs):
    bundle = _bundle(tmp_path, source="def add(a: int, b: int) -> int:\n    open('/tmp/ran-tampered', 'w')\n    return 0\n")
    evil = _bundle(tmp_path, source="def add(a: int, b: int) -> int:\n    return 666\n", name="evil")
    os.replace(evil, bundle)  # same name, other content
    prefix = tmp_path / "o"
    run = _run(_fast_args(str(bundle), inputs, prefix, tmp_path / "root"), tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    err = _error(prefix)
    assert err.code == "BUNDLE_INTEGRITY" and err.kind == 0 and "phase: bundle" in err.message
    assert bundle.name[4:36] in err.message  # names the expected digest
    assert not (prefix / "outputs.pb").exists()
    assert not list((tmp_path / "cache" / "entries").glob("*.complete"))


def test_explicit_md5_mismatch(tmp_path, inputs):
    bundle = _bundle(tmp_path)
    prefix = tmp_path / "o"
    run = _run(_fast_args(str(bundle), inputs, prefix, tmp_path / "root", ["--bundle-md5", "0" * 32]), tmp_path / "cache")
    err = _error(prefix)
    assert err.code == "BUNDLE_INTEGRITY" and "0" * 32 in err.message


def test_strict_policy_refuses_unverifiable_bundle(tmp_path, inputs):
    bundle = _bundle(tmp_path)
    plain_name = bundle.with_name("code.tar.gz")
    os.replace(bundle, plain_name)
    prefix = tmp_path / "o"
    run = _run(_fast_args(str(plain_name), inputs, prefix, tmp_path / "root"), tmp_path / "cache",
               env={"EXECUTOR_BUNDLE_VERIFY": "strict"})
    assert _error(prefix).code == "BUNDLE_INTEGRITY"
    ok = _run(_fast_args(str(plain_name), inputs, tmp_path / "o2", tmp_path / "root"), tmp_path / "cache")
    assert ok.returncode == 0 and _o0(tmp_path / "o2") == 42 and "unverified=" in ok.stderr


def test_unsafe_bundle(tmp_path, inputs):
    path = tmp_path / "fast" f"{'1' * 32}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.py")
        data = b"x = 1\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    prefix = tmp_path / "o"
    _run(_fast_args(str(path), inputs, prefix, tmp_path / "root"), tmp_path / "cache")
    err = _error(prefix)
    assert err.code == "BUNDLE_UNSAFE" and "../escape.py" in err.message
    assert not (tmp_path / "cache" / "escape.py").exists()


def test_missing_bundle_is_bundle_fetch(tmp_path, inputs):
    prefix = tmp_path / "o"
    _run(_fast_args(str(tmp_path / f"fast{'2' * 32}.tar.gz"), inputs, prefix, tmp_path / "root"), tmp_path / "cache")
    err = _error(prefix)
    assert err.code == "BUNDLE_FETCH" and "does not exist" in err.message and err.kind == 0


def test_truncated_archive(tmp_path, inputs):
    bundle = _bundle(tmp_path)
    data = bundle.read_bytes()
    bundle.write_bytes(data[: len(data) // 2])
    prefix = tmp_path / "o"
    _run(_fast_args(str(bundle), inputs, prefix, tmp_path / "root"), tmp_path / "cache")
    assert _error(prefix).code == "BUNDLE_INTEGRITY"


def _s3_bundle(tmp_path, moto_s3) -> str:
    bundle = _bundle(tmp_path)
    bucket = moto_s3.make_bucket()
    moto_s3.put(bucket, f"fast/{bundle.name}", bundle.read_bytes())
    return f"s3://{bucket}/fast/{bundle.name}"


def test_from_s3_verifies_store_md5(tmp_path, inputs, moto_s3):
    run = _run(_fast_args(_s3_bundle(tmp_path, moto_s3), inputs, tmp_path / "o", tmp_path / "root"),
               tmp_path / "cache", env=moto_s3.env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "o" / "outputs.pb").exists(), run.stderr[-3000:]
    assert _o0(tmp_path / "o") == 42 and "store md5" in run.stderr


def test_sixteen_cold_starts_download_once(tmp_path, inputs, moto_s3, fault_proxy):
    uri, proxy, env = _s3_bundle_behind_proxy(tmp_path, moto_s3, fault_proxy)
    procs = [subprocess.Popen([sys.executable, "-m", "executor", *_fast_args(
        uri, inputs, tmp_path / f"o{i}", tmp_path / "root")],
        env=env_with({"EXECUTOR_CACHE_DIR": str(tmp_path / "cache"), **env}), cwd="/",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(16)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 16, [r[1][-500:] for r in results]
    assert all(_o0(tmp_path / f"o{i}") == 42 for i in range(16))
    gets = [r for r in proxy.requests if r.method == "GET" and uri.rsplit("/", 1)[1] in r.path]
    assert len(gets) == 1, proxy.requests
    assert sum("cache=miss" in r[1] for r in results) == 1


def test_killed_extraction_is_repaired(tmp_path, inputs):
    """A process killed mid-build leaves staging and a partial entry; the next run rebuilds cleanly."""
    bundle = _bundle(tmp_path)
    cache = tmp_path / "cache"
    key = bundle.name[4:36]
    # What kill -9 between rename and marker leaves behind: an entry without .complete, plus staging debris.
    (cache / "entries" / key / "wf").mkdir(parents=True)
    (cache / "entries" / key / "wf" / "tasks.py").write_text("def add(a, b):\n    return 'half-written'\n")
    (cache / "staging" / f"{key}.dead").mkdir(parents=True)
    run = _run(_fast_args(str(bundle), inputs, tmp_path / "o", tmp_path / "root"), cache)
    assert run.returncode == 0, run.stderr
    assert _o0(tmp_path / "o") == 42 and "cache=miss" in run.stderr
    assert (cache / "entries" / f"{key}.complete").exists()


def test_kill_9_during_extraction(tmp_path, inputs):
    """SIGKILL a real process while it extracts a large bundle; the next run succeeds."""
    src = tmp_path / "big" / "wf"
    src.mkdir(parents=True)
    (src / "tasks.py").write_text(TASK_SOURCE)
    for i in range(400):
        (src / f"data{i}.bin").write_bytes(os.urandom(64 << 10))
    bundle = Path(build(str(tmp_path / "big"), str(tmp_path / "big-out")))
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "executor", *_fast_args(str(bundle), inputs, tmp_path / "o1", tmp_path / "root")],
                            env=env_with({"EXECUTOR_CACHE_DIR": str(cache)}), cwd="/", stderr=subprocess.PIPE)
    staging = cache / "staging"
    import time

    deadline = time.time() + 60
    while time.time() < deadline and not (staging.exists() and any(staging.iterdir())):
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    run = _run(_fast_args(str(bundle), inputs, tmp_path / "o2", tmp_path / "root"), cache)
    assert run.returncode == 0, run.stderr
    assert _o0(tmp_path / "o2") == 42


def test_usage_errors(tmp_path):
    run = _run(["pyflyte-fast-execute", "--additional-distribution", "x"], tmp_path / "cache")
    assert run.returncode == 2 and "--" in run.stderr
    run = _run(["pyflyte-fast-execute", "--", "ls"], tmp_path / "cache")
    assert run.returncode == 2 and "pyflyte-execute" in run.stderr


# --- bundles from other stores, other builders, and unreliable networks -----------------------------

def test_from_gcs_verifies_store_md5(tmp_path, inputs, gcs_emulator):
    bundle = _bundle(tmp_path)
    bucket = gcs_emulator.make_bucket()
    gcs_emulator.put(bucket, f"fast/{bundle.name}", bundle.read_bytes())
    run = _run(_fast_args(f"gs://{bucket}/fast/{bundle.name}", inputs, tmp_path / "o", tmp_path / "root"),
               tmp_path / "cache", env=gcs_emulator.env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "o" / "outputs.pb").exists(), run.stderr[-3000:]
    assert _o0(tmp_path / "o") == 42 and "store md5" in run.stderr and "name digest" in run.stderr


def _s3_bundle_behind_proxy(tmp_path, moto_s3, fault_proxy):
    uri = _s3_bundle(tmp_path, moto_s3)
    proxy = fault_proxy(moto_s3.host, moto_s3.port)
    env = {**moto_s3.env, "FLYTE_AWS_ENDPOINT": proxy.endpoint, "EXECUTOR_STORAGE_RETRY_BASE_DELAY": "0.05"}
    return uri, proxy, env


def test_slowdown_storm_then_success(tmp_path, inputs, moto_s3, fault_proxy):
    from tests.rig.object_stores import SLOWDOWN

    uri, proxy, env = _s3_bundle_behind_proxy(tmp_path, moto_s3, fault_proxy)
    proxy.rule = lambda request: SLOWDOWN if request.method == "GET" and proxy.count <= 3 else None
    run = _run(_fast_args(uri, inputs, tmp_path / "o", tmp_path / "root"), tmp_path / "cache", env=env)
    assert run.returncode == 0, run.stderr
    assert _o0(tmp_path / "o") == 42
    assert "retry" in run.stderr.lower()


def test_dropped_and_truncated_downloads_are_retried(tmp_path, inputs, moto_s3, fault_proxy):
    from tests.rig.object_stores import DROP, truncate

    uri, proxy, env = _s3_bundle_behind_proxy(tmp_path, moto_s3, fault_proxy)
    proxy.enqueue(DROP, truncate(0.5))  # the body of the second attempt is cut in half
    run = _run(_fast_args(uri, inputs, tmp_path / "o", tmp_path / "root"), tmp_path / "cache", env=env)
    assert run.returncode == 0, run.stderr
    assert _o0(tmp_path / "o") == 42 and proxy.count >= 3
    # Extraction followed the cut attempt, then took the retried download whole: nothing left behind.
    assert [os.listdir(tmp_path / "cache" / sub) for sub in ("staging", "downloads")] == [[], []]


def test_bytes_damaged_in_transit_are_the_store_md5_mismatch_and_nothing_is_kept(tmp_path, inputs, moto_s3, fault_proxy):
    """Extraction runs while the archive downloads; the archive md5 is checked once it is complete, so
    a body damaged on the way (whole length, one byte flipped) is refused naming both digests, and the
    staging tree it was extracted into is gone."""
    from tests.rig.object_stores import CORRUPT

    uri, proxy, env = _s3_bundle_behind_proxy(tmp_path, moto_s3, fault_proxy)
    proxy.rule = lambda request: CORRUPT if request.method == "GET" else None
    prefix = tmp_path / "o"
    run = _run(_fast_args(uri, inputs, prefix, tmp_path / "root"), tmp_path / "cache", env=env)
    assert run.returncode == 0, run.stderr
    err = _error(prefix)
    assert err.code == "BUNDLE_INTEGRITY" and "the store says" in err.message, err.message
    assert not (prefix / "outputs.pb").exists()
    cache = tmp_path / "cache"
    kept = [n for sub in ("entries", "staging", "downloads") for n in os.listdir(cache / sub) if not n.endswith(".inuse")]
    assert kept == []


def test_persistent_storm_gives_bundle_fetch(tmp_path, inputs, moto_s3, fault_proxy):
    from tests.rig.object_stores import SLOWDOWN

    uri, proxy, env = _s3_bundle_behind_proxy(tmp_path, moto_s3, fault_proxy)
    proxy.default = SLOWDOWN
    env.update({"EXECUTOR_STORAGE_RETRY_ATTEMPTS": "3", "EXECUTOR_STORAGE_RETRY_DEADLINE": "5",
                "FLYTE_AWS_ENDPOINT": proxy.endpoint})
    prefix = tmp_path / "o"
    run = _run(_fast_args(uri, inputs, prefix, tmp_path / "root"), tmp_path / "cache", env=env)
    assert run.returncode == 0, run.stderr
    err = _error(prefix)
    assert err.code == "BUNDLE_FETCH" and err.kind == 1
    # s3fs names the S3 error code; obstore's first request is a HEAD, whose 503 has no body.
    assert "SlowDown" in err.message or "HEAD answered 503" in err.message
    assert "Traceback" not in err.message  # a storage failure is its message, not library frames


@pytest.mark.oracle
def test_bundle_built_by_flytekit_fast_package(tmp_path, flytekit_oracle, inputs):
    src = tmp_path / "src" / "wf"
    src.mkdir(parents=True)
    (src / "tasks.py").write_text(TASK_SOURCE)
    (src / "__init__.py").write_text("")
    out = tmp_path / "fk-out"
    out.mkdir()
    script = (
        "import sys\n"
        "from flytekit.tools.fast_registration import fast_package, FastPackageOptions\n"
        "from flytekit.constants import CopyFileDetection\n"
        "print(fast_package(sys.argv[1], sys.argv[2], options=FastPackageOptions(ignores=[], copy_style=CopyFileDetection.ALL)))\n"
    )
    proc = subprocess.run([flytekit_oracle.python, "-c", script, str(tmp_path / "src"), str(out)],
                          capture_output=True, text=True, env=flytekit_oracle.env())
    assert proc.returncode == 0, proc.stderr
    fk_bundle = Path(proc.stdout.strip().splitlines()[-1].strip("'"))
    ours = Path(build(str(tmp_path / "src"), str(tmp_path / "ours-out")))
    assert fk_bundle.name == ours.name, "same files must give the same fast<digest> name"
    assert fk_bundle.read_bytes() == ours.read_bytes(), "the archives must be byte-identical"
    run = _run(_fast_args(str(fk_bundle), inputs, tmp_path / "o", tmp_path / "root"), tmp_path / "cache")
    assert run.returncode == 0, run.stderr
    assert _o0(tmp_path / "o") == 42 and 'verified="name digest"' in run.stderr


def test_unwritable_cache_falls_back_to_a_private_one(tmp_path, inputs):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    bundle = _bundle(tmp_path)
    run = _run(_fast_args(str(bundle), inputs, tmp_path / "o", tmp_path / "root"), blocker / "cache",
               env={"TMPDIR": str(tmp_path / "tmp")})
    assert run.returncode == 0, run.stderr
    assert _o0(tmp_path / "o") == 42
    assert "bundle cache is not writable" in run.stderr and "chown" in run.stderr
    assert list((tmp_path / "tmp").glob("executor-bundles-*/entries/*.complete"))
