"""pyflyte-fast-execute end to end: bundles fetched, verified, extracted safely and cached (real processes)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from flyteidl.core import errors_pb2, literals_pb2

from executor.bundle.archive import build
from tests.helpers import DEFAULT_RESOLVER, MAP_RESOLVER, env_with, write_inputs
from tests.rig.object_stores import Fault, FaultProxy

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


def _run(args, cache: Path, env: dict | None = None, cwd: Path | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "executor", *args], capture_output=True, text=True, timeout=timeout,
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


class _StallingProxy(FaultProxy):
    """A fault proxy that also knows Fault("stall", keep=f): forward the request, send the response's
    head and the first fraction f of its body, then send nothing more (the connection stays open
    until the proxy stops). The client waits for the rest, so whatever follows those bytes is stuck."""

    def _apply(self, fault, client, first_line, headers, body):
        if fault.kind != "stall":
            return super()._apply(fault, client, first_line, headers, body)
        response = self._forward(first_line, headers, body)
        head, _, content = response.partition(b"\r\n\r\n")
        client.sendall(head + b"\r\n\r\n" + content[: int(len(content) * fault.keep)])
        self._stopped.wait()


def test_kill_9_during_extraction(tmp_path, inputs, moto_s3):
    """SIGKILL a real process in the middle of extracting a large bundle; the next run rebuilds it.

    Deterministic: the bundle streams from S3 through a proxy that delivers half of it and then
    stalls, so extraction (which follows the download) has written the first half's files into
    staging and cannot go further when the process is killed."""
    src = tmp_path / "big" / "wf"
    src.mkdir(parents=True)
    (src / "tasks.py").write_text(TASK_SOURCE)
    for i in range(64):
        (src / f"data{i:02}.bin").write_bytes(os.urandom(64 << 10))
    bundle = Path(build(str(tmp_path / "big"), str(tmp_path / "big-out")))
    with tarfile.open(bundle) as tar:
        assert tar.getnames()[-1] == "wf/tasks.py"  # the last member: it cannot have arrived
    bucket = moto_s3.make_bucket()
    moto_s3.put(bucket, f"fast/{bundle.name}", bundle.read_bytes())
    uri = f"s3://{bucket}/fast/{bundle.name}"
    key = bundle.name[4:36]
    cache = tmp_path / "cache"
    proxy = _StallingProxy(moto_s3.host, moto_s3.port).start()
    stalled: list[str] = []

    def rule(request):
        if request.method == "GET" and bundle.name in request.path and not stalled:
            stalled.append(request.path)
            return Fault("stall", keep=0.5)
        return None

    proxy.rule = rule
    try:
        with open(tmp_path / "killed.log", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "executor", *_fast_args(uri, inputs, tmp_path / "o1", tmp_path / "root")],
                env=env_with({"EXECUTOR_CACHE_DIR": str(cache), **moto_s3.env, "FLYTE_AWS_ENDPOINT": proxy.endpoint}),
                cwd="/", stderr=log)
        try:
            hang_guard = time.monotonic() + 120  # only so that a broken build cannot hang the suite
            while not any(p.is_file() for p in (cache / "staging").glob(f"{key}.*/wf/*")):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < hang_guard, "extraction never started"
                time.sleep(0.01)
        finally:
            proc.kill()
            proc.wait()
    finally:
        proxy.stop()
    assert stalled, "the bundle was never fetched through the stalling proxy"
    # What the kill left: a staging tree holding part of the bundle; no entry, no marker.
    (partial,) = (cache / "staging").glob(f"{key}.*")
    extracted = sorted(p.name for p in (partial / "wf").iterdir())
    assert extracted and "tasks.py" not in extracted and len(extracted) < 64
    assert not (cache / "entries" / key).exists() and not (cache / "entries" / f"{key}.complete").exists()
    killed_at = time.time()

    run = _run(_fast_args(uri, inputs, tmp_path / "o2", tmp_path / "root"), cache, env=moto_s3.env)
    assert run.returncode == 0, run.stderr
    assert _o0(tmp_path / "o2") == 42
    assert "cache=miss" in run.stderr and "cache=hit" not in run.stderr  # rebuilt, not taken as it was
    marker = json.loads((cache / "entries" / f"{key}.complete").read_text())
    assert marker["created"] > killed_at and marker["files"] == 65
    assert sorted(p.name for p in (cache / "entries" / key / "wf").iterdir()) == sorted(p.name for p in src.iterdir())


def _map_fast_args(bundle_uri: str, inputs: Path, prefix: Path, dest: Path, bound: str = ""):
    # The argv flytekit writes for an ArrayNode map task under fast registration.
    return ["pyflyte-fast-execute", "--additional-distribution", bundle_uri, "--dest-dir", str(dest), "--",
            "pyflyte-map-execute", "--inputs", str(inputs), "--output-prefix", str(prefix), "--raw-output-data-prefix",
            f"{prefix}/raw", "--checkpoint-path", f"{prefix}/ck", "--prev-checkpoint", '""', "--resolver", MAP_RESOLVER,
            "--", "vars", bound, "resolver", DEFAULT_RESOLVER, "task-module", "wf.tasks", "task-name", "add"]


def test_map_task_from_a_bundle(tmp_path):
    bundle = _bundle(tmp_path)
    inputs = write_inputs(tmp_path / "map-inputs.pb", {"a": [10, 20, 30], "b": 5}, {"a": list[int], "b": int})
    cache, dest = tmp_path / "cache", tmp_path / "root"
    outputs = {}
    for index in (2, 0):  # two elements of one map task, on one node: the second finds the bundle cached
        env = {"BATCH_JOB_ARRAY_INDEX_VAR_NAME": "FLYTE_K8S_ARRAY_INDEX", "FLYTE_K8S_ARRAY_INDEX": str(index)}
        run = _run(_map_fast_args(str(bundle), inputs, tmp_path / f"m{index}", dest, bound="b"), cache, env=env)
        assert run.returncode == 0, run.stderr
        assert not (tmp_path / f"m{index}" / "error.pb").exists(), _error(tmp_path / f"m{index}").message
        outputs[index] = (_o0(tmp_path / f"m{index}"), "cache=hit" in run.stderr)
    assert outputs == {2: (35, False), 0: (15, True)}
    assert (dest / "wf").is_symlink()


DYNAMIC_SOURCE = """from flytekit import dynamic, task


@task(container_image="registry.local/app:v1")  # no serialization context in this test's "pod"
def add(a: int, b: int) -> int:
    return a + b


@dynamic(container_image="registry.local/app:v1")
def fan(a: int, b: int) -> int:
    return add(a=a, b=b)
"""


@pytest.mark.oracle
def test_dynamic_task_from_a_bundle_passes_the_distribution_on(tmp_path, flytekit_oracle, inputs):
    """A dynamic task compiles its sub-tasks with flytekit's fast serialization settings: their
    containers must fetch the same bundle into the same dest dir (flytekit learns both from
    --dynamic-addl-distro/--dynamic-dest-dir, which pyflyte-fast-execute passes on)."""
    from flyteidl.core import dynamic_job_pb2

    bundle = _bundle(tmp_path, source=DYNAMIC_SOURCE)
    prefix, dest = tmp_path / "o", tmp_path / "root"
    args = _fast_args(str(bundle), inputs, prefix, dest)
    args[-1] = "fan"
    proc = subprocess.run([flytekit_oracle.python, "-m", "executor", *args], capture_output=True, text=True, timeout=300,
                          cwd="/", env=flytekit_oracle.env({"EXECUTOR_CACHE_DIR": str(tmp_path / "cache")}))
    assert proc.returncode == 0, proc.stderr
    assert not (prefix / "error.pb").exists(), _error(prefix).message
    spec = dynamic_job_pb2.DynamicJobSpec()
    spec.ParseFromString((prefix / "futures.pb").read_bytes())
    (sub,) = [t for t in spec.tasks if t.id.name.endswith("add")]
    argv = list(sub.container.args)
    assert argv[:6] == ["pyflyte-fast-execute", "--additional-distribution", str(bundle), "--dest-dir", str(dest), "--"]
    assert argv[6] == "pyflyte-execute" and argv[-4:] == ["task-module", "wf.tasks", "task-name", "add"], argv


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


def _flytekit_fast_package(tmp_path, flytekit_oracle) -> Path:
    """A bundle built by flytekit's own fast_package (what `pyflyte register` uploads), checked to be
    byte-identical to ours."""
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
    return fk_bundle


def _gcs_bundle_behind_proxy(tmp_path, gcs_emulator, fault_proxy):
    bundle = _bundle(tmp_path)
    bucket = gcs_emulator.make_bucket()
    gcs_emulator.put(bucket, f"fast/{bundle.name}", bundle.read_bytes())
    proxy = fault_proxy(gcs_emulator.host, gcs_emulator.port)
    env = {**gcs_emulator.env, "EXECUTOR_GCS_ENDPOINT": proxy.endpoint, "STORAGE_EMULATOR_HOST": proxy.endpoint,
           "EXECUTOR_STORAGE_RETRY_BASE_DELAY": "0.05"}
    return f"gs://{bucket}/fast/{bundle.name}", bundle.name, proxy, env


def test_gcs_429_storm_then_success(tmp_path, inputs, gcs_emulator, fault_proxy):
    from tests.rig.object_stores import TOO_MANY_REQUESTS

    uri, name, proxy, env = _gcs_bundle_behind_proxy(tmp_path, gcs_emulator, fault_proxy)
    answered_429 = []

    def rule(request):  # the first two requests for the bundle are told to back off
        if name in request.path and len(answered_429) < 2:
            answered_429.append(request.path)
            return TOO_MANY_REQUESTS
        return None

    proxy.rule = rule
    run = _run(_fast_args(uri, inputs, tmp_path / "o", tmp_path / "root"), tmp_path / "cache", env=env)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "o" / "error.pb").exists(), _error(tmp_path / "o").message
    assert _o0(tmp_path / "o") == 42 and "cache=miss" in run.stderr and "store md5" in run.stderr
    assert len(answered_429) == 2
    assert len([r for r in proxy.requests if name in r.path]) > 2  # asked again after the 429s, and got it


def test_gcs_429_past_the_deadline_gives_bundle_fetch(tmp_path, inputs, gcs_emulator, fault_proxy):
    from tests.rig.object_stores import TOO_MANY_REQUESTS

    uri, name, proxy, env = _gcs_bundle_behind_proxy(tmp_path, gcs_emulator, fault_proxy)
    proxy.default = TOO_MANY_REQUESTS
    env["EXECUTOR_STORAGE_RETRY_DEADLINE"] = "2"
    prefix = tmp_path / "o"
    run = _run(_fast_args(uri, inputs, prefix, tmp_path / "root"), tmp_path / "cache", env=env)
    assert run.returncode == 0, run.stderr
    err = _error(prefix)
    assert err.code == "BUNDLE_FETCH" and err.kind == 1, err.message  # transient: worth a retry of the task
    # gcsfs retries the 429s by itself, within each attempt's bound: what the message can say is that
    # the attempts timed out, and why that happens.
    assert uri in err.message and "timed out" in err.message and "429" in err.message, err.message
    assert "EXECUTOR_STORAGE_RETRY_DEADLINE" in err.message, err.message
    assert "Traceback" not in err.message
    assert not (prefix / "outputs.pb").exists()
    assert len([r for r in proxy.requests if name in r.path]) >= 2  # asked again before giving up
    assert not list((tmp_path / "cache" / "entries").glob("*.complete"))


def test_gcs_429_bundle_download_stops_at_the_deadline(tmp_path, inputs, gcs_emulator, fault_proxy):
    from tests.rig.object_stores import TOO_MANY_REQUESTS

    uri, _, proxy, env = _gcs_bundle_behind_proxy(tmp_path, gcs_emulator, fault_proxy)
    proxy.default = TOO_MANY_REQUESTS
    env["EXECUTOR_STORAGE_RETRY_DEADLINE"] = "2"
    # Generous for a 2 s deadline (interpreter start, one attempt's last request), as test_storage's read test.
    run = _run(_fast_args(uri, inputs, tmp_path / "o", tmp_path / "root"), tmp_path / "cache", env=env, timeout=20)
    assert run.returncode == 0, run.stderr
    assert _error(tmp_path / "o").code == "BUNDLE_FETCH"


@pytest.mark.oracle
@pytest.mark.parametrize("where", ["local", "s3", "gs"])
def test_bundle_built_by_flytekit_fast_package(tmp_path, flytekit_oracle, inputs, where, request):
    fk_bundle = _flytekit_fast_package(tmp_path, flytekit_oracle)
    uri, env, verified = str(fk_bundle), {}, "name digest"
    if where != "local":  # served as registration leaves it: uploaded whole, under its own name
        server = request.getfixturevalue("moto_s3" if where == "s3" else "gcs_emulator")
        bucket = server.make_bucket()
        server.put(bucket, f"proj/dev/{fk_bundle.name}", fk_bundle.read_bytes())
        uri, env, verified = f"{where}://{bucket}/proj/dev/{fk_bundle.name}", server.env, "store md5,name digest"
    run = _run(_fast_args(uri, inputs, tmp_path / "o", tmp_path / "root"), tmp_path / "cache", env=env)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "o" / "error.pb").exists(), _error(tmp_path / "o").message
    assert _o0(tmp_path / "o") == 42 and f'verified="{verified}"' in run.stderr and "cache=miss" in run.stderr
    assert sorted(p.name for p in (tmp_path / "root" / "wf").iterdir()) == ["__init__.py", "tasks.py"]


# A source tree for every rule of flytekit's default ignore group: {path: (kept in git-repo scenario, content)}.
# A content of ("->", target) is a symlink; None an empty directory.
_IGNORE_TREE = {
    "wf/__init__.py": (True, ""),
    "wf/tasks.py": (True, TASK_SOURCE),
    # .gitignore (GitIgnore: `git ls-files -io --exclude-standard`, untracked files only)
    ".gitignore": (True, "*.log\n!keep.log\nbuild/\n/secret.txt\nwf/generated/\n"),
    "lib/.gitignore": (True, "local_*\n"),
    "app.log": (False, "x"),
    "keep.log": (True, "negated"),
    "wf/debug.log": (False, "x"),
    "wf/keep.log": (True, "negated"),
    "build/out.bin": (False, "x"),
    "build/sub/x.py": (False, "x"),
    "secret.txt": (False, "anchored"),
    "wf/secret.txt": (True, "not anchored here"),
    "wf/generated/a.py": (False, "x"),
    "lib/local_conf.py": (False, "nested .gitignore"),
    "lib/util.py": (True, "x"),
    "tracked.log": (True, "tracked, so .gitignore does not apply"),
    "ignored-\u00e9.log": (True, "git quotes the name; flytekit compares it unquoted, so it stays"),
    "linked.log": (False, ("->", "keep.log")),
    # .dockerignore (docker-py's PatternMatcher)
    ".dockerignore": (True, "# a comment\n\ndocs\n!docs/keep.md\n**/*.tmp\n*.BAK\n/notes/*.txt\n../outside\n"),
    "docs/index.md": (False, "x"),
    "docs/keep.md": (True, "re-included"),
    "docs/sub/deep.md": (False, "x"),
    "top.tmp": (False, "x"),
    "wf/scratch.tmp": (False, "x"),
    "Old.bak": (False, "case-insensitive"),
    "wf/old.bak": (True, "`*` stays in one component"),
    "notes/a.txt": (False, "x"),
    "notes/sub/b.txt": (True, "x"),
    "outside": (False, "`..` dropped"),
    # .flyteignore (same matcher)
    ".flyteignore": (True, "notes.md\n"),
    "notes.md": (False, "x"),
    # StandardIgnore (fnmatch on the whole relative path) and the .git directories never walked
    "__pycache__/top.cpython-311.pyc": (False, "x"),
    "wf/__pycache__/tasks.cpython-311.pyc": (False, "x"),
    "wf/__pycache__/README": (False, "x"),
    "wf/stale.pyc": (False, "x"),
    ".cache/c": (False, "x"),
    "wf/.cache/d": (True, "only a top-level .cache is standard-ignored"),
    "misc/__pycache__": (True, "a file, not a directory"),
    "sub/.git/config": (False, "x"),
    # links and directories: only regular files and links to existing files are packaged
    "link-to-file": (True, ("->", "wf/tasks.py")),
    "link-to-dir": (False, ("->", "wf")),
    "broken": (False, ("->", "nowhere")),
    "empty": (False, None),
}


def _fast_package(flytekit_oracle, src: Path, out: Path, env: dict | None = None) -> Path:
    """flytekit's own fast_package (copy_style ALL, default ignores) over src, in the oracle venv."""
    out.mkdir()
    script = (
        "import sys\n"
        "from flytekit.tools.fast_registration import fast_package, FastPackageOptions\n"
        "from flytekit.constants import CopyFileDetection\n"
        "print(fast_package(sys.argv[1], sys.argv[2], options=FastPackageOptions(ignores=[], copy_style=CopyFileDetection.ALL)))\n"
    )
    proc = subprocess.run([flytekit_oracle.python, "-c", script, str(src), str(out)],
                          capture_output=True, text=True, env=flytekit_oracle.env(env))
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1].strip("'"))


@pytest.mark.oracle
@pytest.mark.parametrize("scenario", ["git-repo", "not-a-repo", "no-git"])
def test_bundle_build_leaves_out_what_flytekit_fast_package_leaves_out(tmp_path, flytekit_oracle, monkeypatch, scenario):
    """.gitignore (through git, as flytekit asks it), .dockerignore, .flyteignore, the standard
    patterns, .git directories, links and empty directories: our archive has flytekit's name, members
    and bytes. Outside a repository, or without git on PATH, .gitignore counts for nothing, as in flytekit."""
    import shutil

    src = tmp_path / "src"
    for rel, (_, content) in _IGNORE_TREE.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        elif isinstance(content, tuple):
            path.symlink_to(content[1])
        else:
            path.write_text(content)
    # Never look for a repository above the source (tmp_path might sit in one).
    env = {"GIT_CEILING_DIRECTORIES": str(tmp_path)}
    if scenario == "git-repo":
        git = shutil.which("git")
        assert git, "this test needs git (.ci/run installs it)"
        for args in (["init", "-q"], ["add", "-f", "tracked.log"]):
            subprocess.run([git, *args], cwd=src, check=True, capture_output=True, env={**os.environ, **env})
    elif scenario == "no-git":
        (tmp_path / "bin").mkdir()
        env["PATH"] = str(tmp_path / "bin")  # no git there
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    fk_bundle = _fast_package(flytekit_oracle, src, tmp_path / "fk-out", env)
    ours = Path(build(str(src), str(tmp_path / "ours-out")))
    with tarfile.open(fk_bundle) as fk_tar, tarfile.open(ours) as our_tar:
        fk_members, our_members = fk_tar.getnames(), our_tar.getnames()
    assert our_members == fk_members
    assert ours.name == fk_bundle.name, "same files must give the same fast<digest> name"
    assert ours.read_bytes() == fk_bundle.read_bytes(), "the archives must be byte-identical"
    # ...and flytekit left out what the table says (so the comparison above is not vacuous)
    git_rules = {".gitignore", "lib/.gitignore", "tracked.log", "ignored-\u00e9.log"}
    expected = {rel for rel, (kept, content) in _IGNORE_TREE.items() if kept}
    if scenario != "git-repo":
        expected |= {rel for rel, (_, content) in _IGNORE_TREE.items()
                     if rel.endswith(".log") or rel.startswith(("build/", "wf/generated/", "lib/"))
                     or rel == "secret.txt"}
    assert set(fk_members) == expected, set(fk_members) ^ expected
    assert git_rules <= set(fk_members)


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
