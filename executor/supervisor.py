"""Runs each attempt of an invocation in a supervised child process, and always says what happened.

The parent applies the runtime spec (TaskTemplate env, secrets, thread counts), fetches the bundle,
then forks one child per attempt. The child runs the ordinary pipeline (execute.run_attempt) and
reports its outcome over a pipe; the parent enforces the timeout, forwards signals, notices an OOM
kill (all three in executor.watch, shared with the warm server), retries recoverable failures in
place, and writes the one error document.

Signals the supervisor handles (as gunicorn's arbiter, one table):
"""
from __future__ import annotations

import dataclasses
import os
import random
import signal
import time

from executor import execute, logs, storage, watch
from executor.errors import Diagnostics, TaskFailure
from executor.invocation import Invocation, Result

SIGNALS = {
    signal.SIGTERM: "forward to the task, give it the grace period, then report PREEMPTED",
    signal.SIGINT: "same as SIGTERM (Ctrl-C while debugging)",
    signal.SIGCHLD: "wake the loop; as PID 1 also reap orphaned grandchildren",
}
__doc__ += "\n".join(f"    {signal.Signals(s).name:<8} {what}" for s, what in SIGNALS.items())

# Failures worth another attempt in the same container. TIMEOUT, OOM and PREEMPTED are
# recoverable for the backend (a new pod may fare better) but not here.
INPLACE_RETRYABLE = {"USER", "SYSTEM", "OUTPUT_UPLOAD", "BUNDLE_FETCH"}
ChildOutcome = watch.ChildOutcome  # (moved to executor.watch)


def should_retry(failure: TaskFailure | None, attempt_no: int, spec, stopping: bool) -> bool:
    """The in-place retry policy: recoverable, retryable here, retries left, nobody asked us to stop."""
    retries = spec.retries if spec.inplace_retries else 0
    return (
        failure is not None and failure.kind.name == "RECOVERABLE" and failure.code in INPLACE_RETRYABLE
        and attempt_no < retries and not stopping
    )


def retry_delay(attempt_no: int, environ=None) -> float:
    """Exponential backoff (EXECUTOR_RETRY_BASE_DELAY, doubling, capped at 30 s) with jitter."""
    environ = os.environ if environ is None else environ
    delay = min(30.0, float(environ.get("EXECUTOR_RETRY_BASE_DELAY", "1")) * 2**attempt_no)
    return delay * random.uniform(0.5, 1.0)


def preempted_hint(spec) -> str:
    kind = "an interruptible (spot) task, preempted as expected" if spec is not None and spec.interruptible else "eviction or preemption"
    return f"{kind}; the backend retries this attempt, and a saved checkpoint lets it resume"


def log_retry(failure: TaskFailure, attempt_no: int, spec, delay: float) -> None:
    logs.warning(
        "recoverable failure, retrying in this container",
        code=failure.code, attempt=attempt_no + 1, of=spec.retries + 1, delay_s=round(delay, 2),
        reason=failure.message[:200],
    )


def supervise(invocation: Invocation) -> Result:
    diagnostics = Diagnostics()
    task_name = " ".join(invocation.resolver_args)
    forking = os.environ.get("EXECUTOR_ISOLATION", "fork") != "none"
    if forking:
        storage.forks_children()
    try:
        spec = load_spec(invocation, diagnostics)
        execute.prepare_bundle(invocation, diagnostics)
        invocation = dataclasses.replace(invocation, bundle=None)  # children inherit sys.path
    except TaskFailure as failure:
        return execute.finish(invocation, execute.Attempt("failure", task_name, failure), diagnostics)
    if not forking:
        if spec.timeout_seconds:
            logs.warning("EXECUTOR_ISOLATION=none: the timeout is not enforced", timeout_s=spec.timeout_seconds)
        attempt = execute.run_attempt(invocation, diagnostics)
        diagnostics.peak_rss_bytes = execute.peak_rss_bytes()
        return execute.finish(invocation, attempt, diagnostics)
    return _Supervisor(invocation, spec, diagnostics).run()


def load_spec(invocation: Invocation, diagnostics: Diagnostics):
    """Read the runtime spec and apply it to os.environ: env, thread counts, secrets (the "spec" phase)."""
    from executor import spec as spec_module

    with execute.phase("spec", diagnostics, default_code="TEMPLATE_INVALID"):
        template = None
        if invocation.task_template:
            from executor import storage

            try:
                template = storage.read_bytes(invocation.task_template)
            except storage.StorageError as e:
                raise TaskFailure("TEMPLATE_INVALID", f"cannot read --task-template: {e}") from None
        spec = spec_module.from_template(template, invocation.task_template or "", invocation.grace_seconds)
        spec_module.apply_environment(spec)
        if spec.secrets:
            from executor import secrets

            secrets.provide(spec.secrets, invocation.secrets_dir)
    return spec


_load_spec = load_spec


def save_local_checkpoint(invocation: Invocation, local_dir: str) -> None:
    """Upload what the task left in its local checkpoint directory (after a timeout or a stop)."""
    from executor import checkpoint

    try:
        if checkpoint.upload_local_dir(invocation.checkpoint_path, local_dir):
            logs.info("uploaded the task's local checkpoint", dest=invocation.checkpoint_path)
    except Exception as e:
        logs.error("could not upload the task's local checkpoint", reason=str(e))


class _Supervisor:
    def __init__(self, invocation: Invocation, spec, diagnostics: Diagnostics):
        self.invocation = invocation
        self.spec = spec
        self.diagnostics = diagnostics
        self.stop_requested: int | None = None  # the signal that asked us to stop
        self.task_name = " ".join(invocation.resolver_args)
        self.checkpoint_local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"executor-checkpoint-{os.getpid()}")
        os.makedirs(self.checkpoint_local, exist_ok=True)
        # As PID 1 every orphan in the container is re-parented to us: reap them all.
        self.reaps_all = os.getpid() == 1

    # --- attempts ---------------------------------------------------------------------------

    def run(self) -> Result:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        old_wakeup = signal.set_wakeup_fd(wake_w)
        self.wake_r = wake_r
        try:
            return self._attempts()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)
            os.close(wake_r)
            os.close(wake_w)

    def _on_signal(self, signum, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT) and self.stop_requested is None:
            self.stop_requested = signum

    def _attempts(self) -> Result:
        prev_checkpoint = self.invocation.prev_checkpoint
        attempt_no = 0
        while True:
            outcome = self._run_child(attempt_no, prev_checkpoint)
            self.diagnostics.peak_rss_bytes = max(self.diagnostics.peak_rss_bytes, outcome.peak_rss_bytes)
            failure = outcome.attempt.failure
            if not should_retry(failure, attempt_no, self.spec, self.stop_requested is not None):
                return execute.finish(self.invocation, outcome.attempt, self.diagnostics)
            delay = retry_delay(attempt_no)
            log_retry(failure, attempt_no, self.spec, delay)
            if self.invocation.checkpoint_path and has_objects(self.invocation.checkpoint_path):
                prev_checkpoint = self.invocation.checkpoint_path  # resume from what this attempt saved
            self._sleep(delay)
            attempt_no += 1

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.stop_requested is None and (left := deadline - time.monotonic()) > 0:
            watch.wait_readable([self.wake_r], left)
            self._drain_wakeups()

    # --- one child --------------------------------------------------------------------------

    def _run_child(self, attempt_no: int, prev_checkpoint: str | None) -> ChildOutcome:
        oom_before = watch.oom_kills()
        proc = watch.fork_attempt(self.invocation, attempt_no=attempt_no, prev_checkpoint=prev_checkpoint,
                                  checkpoint_local=self.checkpoint_local, relay=logs.has_redactions())
        attempt = watch.AttemptWatch(proc, timeout=self.spec.timeout_seconds, grace=self.spec.grace_seconds,
                                     task_name=self.task_name, diagnostics=self.diagnostics, oom_before=oom_before)
        try:
            while True:
                now = time.monotonic()
                if self.stop_requested is not None and not attempt.stopping:
                    name = signal.Signals(self.stop_requested).name
                    if not proc.exited:
                        logs.warning("asked to stop: forwarding SIGTERM to the task", signal=name,
                                     grace_s=self.spec.grace_seconds)
                    attempt.stop(f"the pod was asked to stop ({name})", preempted_hint(self.spec), now)
                attempt.tick(now)
                if attempt.finished(now):
                    break
                wakeup = attempt.next_wakeup()
                timeout = min(0.5, wakeup - now) if wakeup is not None else 0.5
                for fd in watch.wait_readable([self.wake_r] + attempt.fds(), timeout):
                    if fd == self.wake_r:
                        self._drain_wakeups()
                    else:
                        attempt.on_readable(fd, time.monotonic())
                if not proc.exited:
                    status, rusage = self._reap(proc.pid)
                    if status is not None:
                        attempt.on_exit(status, rusage, time.monotonic())
        finally:
            proc.close()
        outcome = attempt.outcome(time.monotonic())
        self.task_name = outcome.attempt.task_name
        if outcome.timed_out or outcome.stopped:
            save_local_checkpoint(self.invocation, self.checkpoint_local)
        return outcome

    # --- process plumbing -------------------------------------------------------------------

    def _reap(self, pid: int):
        """Our child's status and rusage once it is gone; as PID 1, reap every orphan too."""
        while True:
            try:
                got, status, rusage = os.wait4(-1 if self.reaps_all else pid, os.WNOHANG)
            except ChildProcessError:
                return watch.LOST, None  # someone else reaped it (SIGCHLD ignored by a parent?): status unknown
            if got == 0:
                return None, None
            if got == pid:
                return status, rusage
            # an orphan reparented to us (PID 1): reaped, keep looking

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass


def has_objects(uri: str) -> bool:
    from executor import storage

    try:
        return bool(storage._list_files(uri))
    except Exception:
        return False
