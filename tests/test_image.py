"""The image, built with podman and run as a Flyte pod would run it (tests/image/podman.py).

Skipped, with the reason printed, only where podman genuinely cannot run a container here.
The first run makes a debootstrap base and builds the image (a few minutes); later runs reuse
both from .cache/image/ unless the Dockerfile, entrypoint, pyproject or source changed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from flyteidl.core import errors_pb2, literals_pb2

from executor.literals import Context, to_literal
from tests.helpers import DEFAULT_RESOLVER
from tests.image import podman as rig

pytestmark = pytest.mark.slow

TASKS = '''\
import os
import sys
import time


def add(a: int, b: int) -> int:
    return a + b


def whoami(a: int, b: int) -> str:
    return f"uid={os.getuid()} cwd={os.getcwd()}"


def boom(a: int, b: int) -> int:
    raise ValueError(f"refusing {a} and {b}: the ledger does not balance")


def nap(a: int, b: int) -> int:
    print("napping", flush=True)
    time.sleep(600)
    return a + b
'''


@pytest.fixture(scope="session")
def podman():
    runner = rig.Podman()
    try:
        rig.ensure_tools()
        rig.probe_runtime(runner)
    except rig.Unavailable as e:
        rig.say(f"SKIPPING the image tests: {e}")
        pytest.skip(f"podman cannot run here: {e}")
    return runner


@pytest.fixture(scope="session")
def image(podman) -> str:
    return rig.ensure_image(podman)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """A fast-registration bundle built with `executor bundle build`, as a user's CI would."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "src" / "wf").mkdir(parents=True)
    (root / "src" / "wf" / "tasks.py").write_text(TASKS)
    out = subprocess.run([sys.executable, "-m", "executor", "bundle", "build", str(root / "src"), str(root / "out")],
                         capture_output=True, text=True, timeout=60, check=True)
    path = Path(out.stdout.strip())
    assert path.name.startswith("fast") and path.name.endswith(".tar.gz") and path.exists()
    return path


def _inputs(a: int, b: int) -> bytes:
    m = literals_pb2.LiteralMap()
    m.literals["a"].CopyFrom(to_literal(a, int, Context()))
    m.literals["b"].CopyFrom(to_literal(b, int, Context()))
    return m.SerializeToString()


def _pod_args(bundle_uri: str, node: str, task: str) -> list[str]:
    """Exactly the args a Flyte 1 backend gives a fast-registered task's pod (CONTRACT.md §1)."""
    prefix = f"{node}/data/0"
    return [
        "pyflyte-fast-execute", "--additional-distribution", bundle_uri, "--dest-dir", "/root", "--",
        "pyflyte-execute", "--inputs", f"{node}/data/inputs.pb", "--output-prefix", prefix,
        "--raw-output-data-prefix", f"{node}/raw", "--checkpoint-path", f"{prefix}/_flytecheckpoints",
        "--prev-checkpoint", '""', "--resolver", DEFAULT_RESOLVER, "--", "task-module", "wf.tasks", "task-name", task,
    ]


@pytest.fixture
def pod(moto_s3, bundle):
    """A bucket holding the bundle and one node's inputs; `pod.args(task)` is the pod's argv."""
    bucket = moto_s3.make_bucket()
    moto_s3.put(bucket, f"fast/{bundle.name}", bundle.read_bytes())

    class Pod:
        def __init__(self):
            self.bucket = bucket
            self.node = f"s3://{bucket}/metadata/exec-{uuid.uuid4().hex[:6]}/n0"
            self.key = self.node[len(f"s3://{bucket}/"):]
            moto_s3.put(bucket, f"{self.key}/data/inputs.pb", _inputs(40, 2))

        def args(self, task: str) -> list[str]:
            return _pod_args(f"s3://{bucket}/fast/{bundle.name}", self.node, task)

        def get(self, name: str) -> bytes | None:
            return moto_s3.get(bucket, f"{self.key}/data/0/{name}")

        def keys(self) -> list[str]:
            listed = moto_s3.client.list_objects_v2(Bucket=bucket, Prefix=f"{self.key}/data/0/")
            return sorted(o["Key"] for o in listed.get("Contents", []))

    return Pod()


def _shared_dir(path: Path) -> Path:
    """A host directory the image's non-root user may write to (a hostPath, a debug mount)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def _outputs(data: bytes | None) -> literals_pb2.LiteralMap:
    assert data is not None, "outputs.pb is missing"
    m = literals_pb2.LiteralMap()
    m.ParseFromString(data)
    return m


def _error(data: bytes | None) -> errors_pb2.ContainerError:
    assert data is not None, "error.pb is missing"
    doc = errors_pb2.ErrorDocument()
    doc.ParseFromString(data)
    return doc.error


def test_executor_help(podman, image):
    run = podman.run(image, "executor", "--help")
    assert run.returncode == 0, run.stderr
    assert "pyflyte-fast-execute" in run.stdout and "replay" in run.stdout
    default = podman.run(image)  # CMD: the help as well
    assert default.returncode == 0 and default.stdout == run.stdout


def test_other_commands_pass_through(podman, image):
    run = podman.run(image, "bash", "-c", "echo hi; id -u; cat /proc/1/comm")
    assert run.returncode == 0, run.stderr
    hi, uid, pid1 = run.stdout.split()
    assert hi == "hi"
    assert uid != "0", "the image must run as a non-root user"
    assert pid1 == "tini", "tini must be PID 1 (reaps zombies, forwards signals)"
    exit_code = podman.run(image, "sh", "-c", "exit 7")
    assert exit_code.returncode == 7, "a passed-through command's exit code must be the container's"


def _prepare_hostpath_as_the_manifest_does(podman, image, cache: Path) -> None:
    """Run deploy/k8s/task-pod.yaml's init container on a fresh root-owned dir, as the kubelet would."""
    import yaml

    pod = yaml.safe_load((rig.REPO / "deploy" / "k8s" / "task-pod.yaml").read_text())
    (init,) = pod["spec"]["initContainers"]
    (mount,) = init["volumeMounts"]
    security = init["securityContext"]
    cache.mkdir(mode=0o755)  # hostPath DirectoryOrCreate: root-owned, 0755
    flags = ["--user", str(security["runAsUser"]), "--cap-drop", "ALL",
             *sum((["--cap-add", cap] for cap in security["capabilities"]["add"]), []),
             "--security-opt", "no-new-privileges", "--entrypoint", init["command"][0]]
    run = podman.run(image, *init["command"][1:], volumes={cache: mount["mountPath"]}, extra=tuple(flags))
    assert run.returncode == 0, run.stderr
    assert cache.stat().st_uid == pod["spec"]["securityContext"]["runAsUser"]


def test_fast_execute_pod_against_s3(podman, image, pod, moto_s3, tmp_path):
    cache = tmp_path / "node-cache"  # a hostPath shared by the pods of a node
    _prepare_hostpath_as_the_manifest_does(podman, image, cache)
    volumes = {cache: "/var/cache/executor/bundles"}
    first = podman.run(image, *pod.args("add"), env=moto_s3.env, volumes=volumes)
    assert first.returncode == 0, first.stderr
    assert _outputs(pod.get("outputs.pb")).literals["o0"].scalar.primitive.integer == 42
    assert pod.get("error.pb") is None
    assert "cache=miss" in first.stderr
    assert list((cache / "entries").glob("*.complete")), "the bundle was not cached in the mounted cache dir"

    second = podman.run(image, *pod.args("whoami"), env=moto_s3.env, volumes=volumes)
    assert second.returncode == 0, second.stderr
    assert "cache=hit" in second.stderr, "the second pod on the node must reuse the cached bundle"
    who = _outputs(pod.get("outputs.pb")).literals["o0"].scalar.primitive.string_value
    assert who.startswith("uid=") and who != "uid=0" and who.endswith("cwd=/root"), who


def test_failure_then_inspect_and_replay_as_documented(podman, image, pod, moto_s3, tmp_path):
    # The pod fails: error.pb in the bucket, exit 0 as flytekit.
    run = podman.run(image, *pod.args("boom"), env=moto_s3.env)
    assert run.returncode == 0, run.stderr
    error = _error(pod.get("error.pb"))
    assert error.code == "USER" and "the ledger does not balance" in error.message
    before = pod.keys()

    # docs/debugging.md: read the error in the image, then replay the pod's argv into a local dir.
    inspect = podman.run(image, "executor", "inspect", f"{pod.node}/data/0/error.pb", "--values-only", env=moto_s3.env)
    assert inspect.returncode == 0, inspect.stderr
    assert "the ledger does not balance" in inspect.stdout

    debug = _shared_dir(tmp_path / "debug")
    (debug / "argv.json").write_text(json.dumps(pod.args("boom")))
    replay = podman.run(image, "executor", "replay", f"{pod.node}/data/0", "--argv-file", "/debug/argv.json",
                        "--out", "/debug/replay", env=moto_s3.env, volumes={debug: "/debug"})
    assert replay.returncode == 1, replay.stderr
    assert "refusing 40 and 2: the ledger does not balance" in replay.stdout
    replayed = errors_pb2.ErrorDocument()
    replayed.ParseFromString((debug / "replay" / "outputs" / "error.pb").read_bytes())
    assert replayed.error.code == "USER"
    assert pod.keys() == before, "replay must never write under the original prefix"

    # The same invocation with the working task: decoded outputs, exit 0.
    (debug / "argv-add.json").write_text(json.dumps(pod.args("add")))
    fixed = podman.run(image, "executor", "replay", "--argv-file", "/debug/argv-add.json", "--out", "/debug/replay-add",
                       env=moto_s3.env, volumes={debug: "/debug"})
    assert fixed.returncode == 0, fixed.stderr
    assert json.loads(fixed.stdout) == {"o0": 42}


def test_sigterm_reaches_the_executor(podman, image, pod, moto_s3):
    """`podman stop` (the kubelet's SIGTERM) must reach the executor: no SIGKILL after the grace period."""
    name = f"executor-test-{uuid.uuid4().hex[:8]}"
    env = {**moto_s3.env, "EXECUTOR_GRACE_SECONDS": "1"}
    flags = ["run", "-d", "--name", name, *rig.RUN_FLAGS, *sum((["-e", f"{k}={v}"] for k, v in env.items()), [])]
    podman(*flags, image, *pod.args("nap"), timeout=120)
    try:
        deadline = time.monotonic() + 120
        while "napping" not in podman("logs", name, check=False, timeout=60).stdout:
            state = podman("inspect", "--format", "{{.State.Status}}", name, timeout=60).stdout.strip()
            assert state == "running", f"the task container ended before the task started: {podman('logs', name, check=False).stderr}"
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.2)
        podman("stop", "--time", "60", name, timeout=120)
        state = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name, timeout=60).stdout.split()
        assert state[0] == "exited"
        assert int(state[1]) != 137, "SIGTERM did not reach the executor: it was SIGKILLed after the stop timeout"
        error = _error(pod.get("error.pb"))  # and the executor said why the task stopped
        assert error.code == "PREEMPTED", error.message
    finally:
        podman("rm", "-f", name, check=False, timeout=120)
