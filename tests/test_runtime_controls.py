"""Runtime controls with real processes and signals: timeout, SIGTERM, OOM, retries, secrets, templates, checkpoints."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flyteidl.core import errors_pb2, literals_pb2, security_pb2, tasks_pb2

from tests.helpers import env_with, pyflyte_execute_args, write_inputs

M = "tests.sample_tasks.runtime"
SECRET = "s3cr3t-value-9f8e7d"


def template(path: Path, *, timeout: float | None = None, retries: int = 0, env: dict | None = None,
             secrets: list[security_pb2.Secret] | None = None, cpu: str | None = None) -> Path:
    t = tasks_pb2.TaskTemplate()
    t.id.name = "sample"
    if timeout:
        t.metadata.timeout.FromNanoseconds(int(timeout * 1e9))
    t.metadata.retries.retries = retries
    for k, v in (env or {}).items():
        t.container.env.add(key=k, value=v)
    if cpu:
        t.container.resources.limits.add(name=tasks_pb2.Resources.CPU, value=cpu)
    t.security_context.secrets.extend(secrets or [])
    path.write_bytes(t.SerializeToString())
    return path


class Pod:
    """One executor process, started like the backend starts it."""

    def __init__(self, tmp_path: Path, task: str, values: dict, annotations: dict, *, env: dict | None = None,
                 extra: list[str] | None = None, prefix: Path | None = None, wrap: list[str] | None = None):
        self.scratch = tmp_path / "scratch"
        self.scratch.mkdir(exist_ok=True)
        self.prefix = prefix or tmp_path / "out"
        inputs = write_inputs(tmp_path / "inputs.pb", values, annotations)
        args = pyflyte_execute_args(inputs, self.prefix, M, task, extra=extra)
        self.proc = subprocess.Popen(
            [*(wrap or []), sys.executable, "-m", "executor", *args],
            env=env_with({"SCRATCH": str(self.scratch), "EXECUTOR_RETRY_BASE_DELAY": "0.05", **(env or {})}),
            cwd=str(Path(__file__).resolve().parent.parent), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def wait_started(self, name: str = "started", timeout: float = 60) -> None:
        end = time.time() + timeout
        while not (self.scratch / name).exists():
            assert time.time() < end, "the task never started"
            assert self.proc.poll() is None, self.proc.communicate()
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def error(self) -> errors_pb2.ContainerError:
        doc = errors_pb2.ErrorDocument()
        doc.ParseFromString((self.prefix / "error.pb").read_bytes())
        return doc.error

    def output(self) -> literals_pb2.Literal:
        if not (self.prefix / "outputs.pb").exists() and (self.prefix / "error.pb").exists():
            raise AssertionError(f"the task failed:\n{self.error().message}")
        m = literals_pb2.LiteralMap()
        m.ParseFromString((self.prefix / "outputs.pb").read_bytes())
        return m.literals["o0"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- timeout ------------------------------------------------------------------------------------------

def test_timeout_dumps_user_stacks_and_reports(tmp_path):
    pod = Pod(tmp_path, "sleepy", {"seconds": 120}, {"seconds": int},
              extra=["--task-template", str(template(tmp_path / "t.pb", timeout=1.5)), "--grace-period", "5"])
    code, _, err = pod.finish()
    assert code == 0, err
    e = pod.error()
    assert e.code == "TIMEOUT" and e.kind == errors_pb2.ContainerError.RECOVERABLE and e.origin == 1
    assert "timeout of 1.5 s" in e.message and "phase: run" in e.message
    assert "runtime.py" in e.message and "in sleepy" in e.message  # the user's frame, from the stack dump
    assert "executor/" not in e.message.split("timings:")[1]
    assert not (pod.prefix / "outputs.pb").exists()


def test_task_ignoring_sigterm_is_killed_after_grace(tmp_path):
    pod = Pod(tmp_path, "stubborn", {"seconds": 300}, {"seconds": int},
              env={"EXECUTOR_TIMEOUT_SECONDS": "1", "EXECUTOR_GRACE_SECONDS": "1"})
    code, _, err = pod.finish()
    assert code == 0, err
    assert pod.error().code == "TIMEOUT"
    assert "grace period over" in err
    assert not _alive(int((pod.scratch / "started").read_text()))


def test_timeout_kills_the_whole_process_tree(tmp_path):
    pod = Pod(tmp_path, "forks_grandchildren", {"seconds": 300}, {"seconds": int},
              env={"EXECUTOR_TIMEOUT_SECONDS": "2", "EXECUTOR_GRACE_SECONDS": "2"})
    pod.wait_started("grandchildren")
    pids = [int(p) for p in (pod.scratch / "grandchildren").read_text().split()]
    assert all(_alive(p) for p in pids)
    code, _, err = pod.finish()
    assert pod.error().code == "TIMEOUT"
    time.sleep(0.2)
    assert [p for p in pids if _alive(p)] == [], "grandchildren (even one in its own session) must be killed"


def test_background_processes_do_not_outlive_a_successful_task(tmp_path):
    pod = Pod(tmp_path, "leaves_background_process", {"x": 3}, {"x": int})
    code, _, err = pod.finish()
    assert code == 0, err
    assert pod.output().scalar.primitive.integer == 3
    time.sleep(0.2)
    assert not _alive(int((pod.scratch / "grandchildren").read_text()))


# --- SIGTERM --------------------------------------------------------------------------------------------

def test_sigterm_is_forwarded_and_reported_as_preempted(tmp_path):
    t = tasks_pb2.TaskTemplate()
    t.metadata.interruptible = True
    (tmp_path / "t.pb").write_bytes(t.SerializeToString())
    pod = Pod(tmp_path, "sleepy", {"seconds": 300}, {"seconds": int}, extra=["--task-template", str(tmp_path / "t.pb")])
    pod.wait_started()
    pod.proc.send_signal(signal.SIGTERM)
    code, _, err = pod.finish()
    assert code == 0, err
    e = pod.error()
    assert e.code == "PREEMPTED" and e.kind == errors_pb2.ContainerError.RECOVERABLE and e.origin == 2
    assert "SIGTERM" in e.message and "phase: run" in e.message and "interruptible (spot)" in e.message


def test_sigterm_grace_then_kill_for_a_stubborn_task(tmp_path):
    pod = Pod(tmp_path, "stubborn", {"seconds": 300}, {"seconds": int}, extra=["--grace-period", "1"])
    pod.wait_started()
    pod.proc.send_signal(signal.SIGTERM)
    code, _, err = pod.finish()
    assert pod.error().code == "PREEMPTED" and "grace period over" in err
    assert not _alive(int((pod.scratch / "started").read_text()))


def test_sigterm_uploads_the_local_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    pod = Pod(tmp_path, "saves_locally_then_sleeps", {"seconds": 300}, {"seconds": int},
              extra=["--checkpoint-path", str(ckpt)])
    pod.wait_started()
    pod.proc.send_signal(signal.SIGTERM)
    code, _, err = pod.finish()
    assert pod.error().code == "PREEMPTED"
    assert (ckpt / "state.txt").read_text() == "halfway"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is not installed")
def test_as_pid_1_reaps_orphans_and_handles_sigterm(tmp_path):
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    pod = Pod(tmp_path, "orphan_reaped", {"x": 1}, {"x": int}, wrap=["unshare", "--pid", "--fork", "--mount-proc"])
    code, _, err = pod.finish()
    assert code == 0, err
    assert pod.output().scalar.primitive.boolean is True, "the orphan's zombie was not reaped by PID 1"

    (tmp_path / "b").mkdir()
    pod = Pod(tmp_path / "b", "sleepy", {"seconds": 300}, {"seconds": int}, wrap=["unshare", "--pid", "--fork", "--mount-proc"])
    pod.wait_started()
    import psutil

    init = [c for c in psutil.Process(pod.proc.pid).children() if "executor" in " ".join(c.cmdline())][0]
    os.kill(init.pid, signal.SIGTERM)  # what the kubelet sends to the container's PID 1
    code, _, err = pod.finish()
    assert pod.error().code == "PREEMPTED", err


# --- OOM ---------------------------------------------------------------------------------------------

def _limit_address_space(megabytes: int):
    import resource

    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))

    return apply


def test_allocating_past_rlimit_as_is_oom(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    inputs = write_inputs(tmp_path / "inputs.pb", {"megabytes": 4096}, {"megabytes": int})
    proc = subprocess.run([sys.executable, "-m", "executor", *pyflyte_execute_args(inputs, tmp_path / "out", M, "hog")],
                          env=env_with({"SCRATCH": str(scratch)}), capture_output=True, text=True,
                          preexec_fn=_limit_address_space(1024), cwd=str(Path(__file__).resolve().parent.parent))
    assert proc.returncode == 0, proc.stderr
    doc = errors_pb2.ErrorDocument()
    doc.ParseFromString((tmp_path / "out" / "error.pb").read_bytes())
    assert doc.error.code == "OOM" and "RLIMIT_AS 1024 MiB" in doc.error.message


def test_sigkill_from_outside_is_reported_as_oom(tmp_path):
    pod = Pod(tmp_path, "killed_by_kernel", {"x": 1}, {"x": int})
    code, _, err = pod.finish()
    assert code == 0, err
    e = pod.error()
    assert e.code == "OOM" and "SIGKILL" in e.message and "peak RSS" in e.message


def test_native_crash_is_explained(tmp_path):
    pod = Pod(tmp_path, "segfault", {"x": 1}, {"x": int})
    code, _, err = pod.finish()
    assert code == 0, err
    assert pod.error().code == "USER" and "SIGSEGV" in pod.error().message


# --- retries -------------------------------------------------------------------------------------------

def test_recoverable_error_twice_then_success(tmp_path):
    pod = Pod(tmp_path, "flaky", {"failures": 2}, {"failures": int},
              extra=["--task-template", str(template(tmp_path / "t.pb", retries=2))])
    code, _, err = pod.finish()
    assert code == 0, err
    assert pod.output().scalar.primitive.integer == 3
    assert (pod.scratch / "attempts").read_text() == "3"
    assert err.count("retrying in this container") == 2
    assert not (pod.prefix / "error.pb").exists()


def test_retries_run_out(tmp_path):
    pod = Pod(tmp_path, "flaky", {"failures": 5}, {"failures": int}, env={"EXECUTOR_RETRIES": "1"})
    pod.finish()
    assert (pod.scratch / "attempts").read_text() == "2"
    e = pod.error()
    assert e.code == "USER" and e.kind == errors_pb2.ContainerError.RECOVERABLE and "#2" in e.message


def test_non_recoverable_is_never_retried(tmp_path):
    pod = Pod(tmp_path, "always_fails", {"x": 1}, {"x": int}, env={"EXECUTOR_RETRIES": "3"})
    pod.finish()
    assert (pod.scratch / "attempts").read_text() == "1"
    assert pod.error().code == "USER"


def test_inplace_retries_can_be_turned_off(tmp_path):
    pod = Pod(tmp_path, "flaky", {"failures": 1}, {"failures": int},
              env={"EXECUTOR_RETRIES": "3", "EXECUTOR_INPLACE_RETRIES": "off"})
    pod.finish()
    assert (pod.scratch / "attempts").read_text() == "1"


def test_retry_resumes_from_the_checkpoint_it_saved(tmp_path):
    ckpt = tmp_path / "ckpt"
    pod = Pod(tmp_path, "flaky_with_checkpoint", {"x": 1}, {"x": int}, env={"EXECUTOR_RETRIES": "1"},
              extra=["--checkpoint-path", str(ckpt)])
    code, _, err = pod.finish()
    assert code == 0, err
    assert pod.output().scalar.primitive.string_value == "progress from attempt 1"


# --- secrets ---------------------------------------------------------------------------------------------

def _token_secret(**kwargs) -> security_pb2.Secret:
    return security_pb2.Secret(group="api", key="token", env_var="MY_TOKEN", **kwargs)


def _all_bytes_written(pod: Pod, out: str, err: str) -> bytes:
    blobs = [out.encode(), err.encode()]
    for path in pod.prefix.rglob("*"):
        if path.is_file():
            blobs.append(path.read_bytes())
    return b"".join(blobs)


def test_missing_secret_stops_before_user_code(tmp_path):
    pod = Pod(tmp_path, "uses_secret", {"x": 1}, {"x": int},
              extra=["--task-template", str(template(tmp_path / "t.pb", secrets=[_token_secret()]))])
    code, _, err = pod.finish()
    assert code == 0, err
    e = pod.error()
    assert e.code == "SECRET_MISSING" and "group='api'" in e.message and "key='token'" in e.message
    assert "phase: spec" in e.message
    assert not (pod.scratch / "ran").exists()


@pytest.mark.parametrize("source", ["env", "file", "secrets-dir"])
def test_secret_delivered_and_redacted_everywhere(tmp_path, source):
    env, extra = {}, ["--task-template", str(template(tmp_path / "t.pb", secrets=[_token_secret()]))]
    if source == "env":
        env["_FSEC_API_TOKEN"] = SECRET
    else:
        d = tmp_path / "secrets"
        (d / "api").mkdir(parents=True)
        (d / "api" / "token").write_text(SECRET + "\n")
        if source == "file":
            env["FLYTE_SECRETS_DEFAULT_DIR"] = str(d)
        else:
            extra += ["--secrets-dir", str(d)]
    pod = Pod(tmp_path, "uses_secret", {"x": -1}, {"x": int}, env=env, extra=extra)
    code, out, err = pod.finish()
    assert code == 0, err
    assert (pod.scratch / "ran").exists()
    e = pod.error()
    assert e.code == "USER" and "[redacted]" in e.message
    everything = _all_bytes_written(pod, out, err)
    assert SECRET.encode() not in everything
    assert "stdout says the token is [redacted]" in out and "logging says [redacted]" in err


def test_secret_file_mount_is_served(tmp_path):
    secret = security_pb2.Secret(group="db", key="password", mount_requirement=security_pb2.Secret.FILE)
    pod = Pod(tmp_path, "reads_secret_file", {"x": 1}, {"x": int}, env={"_FSEC_DB_PASSWORD": "hunter22"},
              extra=["--task-template", str(template(tmp_path / "t.pb", secrets=[secret]))])
    code, _, err = pod.finish()
    assert code == 0, err
    assert pod.output().scalar.primitive.string_value == "file:8"


# --- TaskTemplate env and CPU -------------------------------------------------------------------------

def test_template_env_wins_and_cpu_sets_thread_counts(tmp_path):
    t = template(tmp_path / "t.pb", env={"GREETING": "from-template"}, cpu="2500m")
    pod = Pod(tmp_path, "env_report", {"x": 1}, {"x": int}, env={"GREETING": "from-image", "IMAGE_ONLY": "kept",
                                                                   "MKL_NUM_THREADS": "7"},
              extra=["--task-template", str(t)])
    code, _, err = pod.finish()
    assert code == 0, err
    import msgpack

    report = msgpack.unpackb(pod.output().scalar.binary.value)
    assert report == {"GREETING": "from-template", "IMAGE_ONLY": "kept", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "7"}


def test_unrendered_template_env_is_an_error(tmp_path):
    t = template(tmp_path / "t.pb", env={"BUCKET": "{{ .Values.bucket }}"})
    pod = Pod(tmp_path, "env_report", {"x": 1}, {"x": int}, extra=["--task-template", str(t)])
    pod.finish()
    e = pod.error()
    assert e.code == "TEMPLATE_INVALID" and "BUCKET" in e.message and e.kind == 0


def test_corrupt_template(tmp_path):
    (tmp_path / "t.pb").write_bytes(b"\xff\xfe not a template")
    pod = Pod(tmp_path, "env_report", {"x": 1}, {"x": int}, extra=["--task-template", str(tmp_path / "t.pb")])
    pod.finish()
    assert pod.error().code == "TEMPLATE_INVALID"


# --- checkpoints -----------------------------------------------------------------------------------------

def test_checkpoint_restored_from_flytekit_layout_and_saved(tmp_path):
    prev, ckpt = tmp_path / "prev", tmp_path / "ckpt"
    prev.mkdir()
    (prev / "_dst_cp").write_bytes(b"step 4")  # what flytekit's SyncCheckpoint.write leaves
    pod = Pod(tmp_path, "checkpointer", {"step": 5}, {"step": int},
              extra=["--checkpoint-path", str(ckpt), "--prev-checkpoint", str(prev)])
    code, _, err = pod.finish()
    assert code == 0, err
    assert pod.output().scalar.primitive.string_value == "step 4"
    assert (ckpt / "_dst_cp").read_bytes() == b"step 5"


def test_previous_attempt_that_saved_nothing_is_fine(tmp_path):
    pod = Pod(tmp_path, "checkpointer", {"step": 1}, {"step": int},
              extra=["--checkpoint-path", str(tmp_path / "ckpt"), "--prev-checkpoint", str(tmp_path / "never-written")])
    code, _, err = pod.finish()
    assert code == 0, err
    assert pod.output().scalar.primitive.string_value == "none"


def test_summary_and_error_carry_timings_and_child_rss(tmp_path):
    pod = Pod(tmp_path, "hog", {"megabytes": 200}, {"megabytes": int}, env={"LOG_FORMAT": "json"})
    code, _, err = pod.finish()
    import json

    summary = [json.loads(l) for l in err.splitlines() if '"invocation finished"' in l][0]
    assert summary["peak_rss_mib"] > 200  # the task's memory, measured on the child
    for name in ("spec_ms", "load_ms", "inputs_ms", "run_ms", "outputs_ms", "upload_ms"):
        assert name in summary


# --- flytekit tasks get the same controls ------------------------------------------------------------

def _fk_pod(tmp_path, flytekit_oracle, task, values, *, env=None, extra=None):
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    inputs = write_inputs(tmp_path / "inputs.pb", values, {k: type(v) for k, v in values.items()})
    prefix = tmp_path / "out"
    args = pyflyte_execute_args(inputs, prefix, "tests.sample_tasks.fk_runtime", task, extra=extra)
    proc = subprocess.run([flytekit_oracle.python, "-m", "executor", *args], capture_output=True, text=True,
                          env=flytekit_oracle.env({"SCRATCH": str(scratch), "EXECUTOR_RETRY_BASE_DELAY": "0.05", **(env or {})}),
                          cwd=str(Path(__file__).resolve().parent.parent), timeout=300)
    return proc, prefix, scratch


def _o0(prefix: Path) -> literals_pb2.Literal:
    m = literals_pb2.LiteralMap()
    m.ParseFromString((prefix / "outputs.pb").read_bytes())
    return m.literals["o0"]


@pytest.mark.oracle
def test_flytekit_task_reads_secret_through_flytekit_and_it_is_redacted(tmp_path, flytekit_oracle):
    secret = security_pb2.Secret(group="api", key="token")
    proc, prefix, _ = _fk_pod(tmp_path, flytekit_oracle, "secret_length", {"x": 1}, env={"_FSEC_API_TOKEN": SECRET},
                              extra=["--task-template", str(template(tmp_path / "t.pb", secrets=[secret]))])
    assert proc.returncode == 0, proc.stderr
    assert _o0(prefix).scalar.primitive.integer == len(SECRET) + 1
    assert "flytekit task sees [redacted]" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr


@pytest.mark.oracle
def test_flytekit_sync_checkpoint_round_trip(tmp_path, flytekit_oracle):
    prev, ckpt = tmp_path / "prev", tmp_path / "ckpt"
    prev.mkdir()
    (prev / "_dst_cp").write_bytes(b"saved by x=1")
    proc, prefix, _ = _fk_pod(tmp_path, flytekit_oracle, "resumes", {"x": 2},
                              extra=["--checkpoint-path", str(ckpt), "--prev-checkpoint", str(prev)])
    assert proc.returncode == 0, proc.stderr
    assert _o0(prefix).scalar.primitive.string_value == "saved by x=1"
    assert (ckpt / "_dst_cp").read_bytes() == b"saved by x=2"


@pytest.mark.oracle
def test_flytekit_recoverable_exception_is_retried_in_place(tmp_path, flytekit_oracle):
    proc, prefix, scratch = _fk_pod(tmp_path, flytekit_oracle, "flaky", {"x": 0}, env={"EXECUTOR_RETRIES": "2"})
    assert proc.returncode == 0, proc.stderr
    assert _o0(prefix).scalar.primitive.integer == 2
    assert (scratch / "attempts").read_text() == "2" and not (prefix / "error.pb").exists()
