"""Runs each attempt of an invocation in a supervised child process, and always says what happened.

The parent applies the runtime spec (TaskTemplate env, secrets, thread counts), fetches the bundle,
then forks one child per attempt. The child runs the ordinary pipeline (execute.run_attempt) and
reports its outcome over a pipe; the parent enforces the timeout, forwards signals, notices an OOM
kill, retries recoverable failures in place, and writes the one error document.

Signals the supervisor handles (as gunicorn's arbiter, one table):
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import sys
import time

from executor import execute, logs
from executor.errors import Diagnostics, TaskFailure, format_stack_dump, memory_limit_text
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
LOST = -1  # the child's exit status could not be collected
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT}


@dataclasses.dataclass
class ChildOutcome:
    attempt: execute.Attempt
    peak_rss_bytes: int = 0


def supervise(invocation: Invocation) -> Result:
    diagnostics = Diagnostics()
    task_name = " ".join(invocation.resolver_args)
    try:
        spec = _load_spec(invocation, diagnostics)
        execute.prepare_bundle(invocation, diagnostics)
        invocation = dataclasses.replace(invocation, bundle=None)  # children inherit sys.path
    except TaskFailure as failure:
        return execute.finish(invocation, execute.Attempt("failure", task_name, failure), diagnostics)
    if os.environ.get("EXECUTOR_ISOLATION", "fork") == "none":
        if spec.timeout_seconds:
            logs.warning("EXECUTOR_ISOLATION=none: the timeout is not enforced", timeout_s=spec.timeout_seconds)
        attempt = execute.run_attempt(invocation, diagnostics)
        diagnostics.peak_rss_bytes = execute.peak_rss_bytes()
        return execute.finish(invocation, attempt, diagnostics)
    return _Supervisor(invocation, spec, diagnostics).run()


def _load_spec(invocation: Invocation, diagnostics: Diagnostics):
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
        retries = self.spec.retries if self.spec.inplace_retries else 0
        attempt_no = 0
        while True:
            outcome = self._run_child(attempt_no, prev_checkpoint)
            self.diagnostics.peak_rss_bytes = max(self.diagnostics.peak_rss_bytes, outcome.peak_rss_bytes)
            failure = outcome.attempt.failure
            retryable = (
                failure is not None and failure.kind.name == "RECOVERABLE" and failure.code in INPLACE_RETRYABLE
                and attempt_no < retries and self.stop_requested is None
            )
            if not retryable:
                return execute.finish(self.invocation, outcome.attempt, self.diagnostics)
            import random

            delay = min(30.0, float(os.environ.get("EXECUTOR_RETRY_BASE_DELAY", "1")) * 2**attempt_no)
            delay *= random.uniform(0.5, 1.0)  # jitter
            logs.warning(
                "recoverable failure, retrying in this container",
                code=failure.code, attempt=attempt_no + 1, of=retries + 1, delay_s=round(delay, 2),
                reason=failure.message[:200],
            )
            if self.invocation.checkpoint_path and _has_objects(self.invocation.checkpoint_path):
                prev_checkpoint = self.invocation.checkpoint_path  # resume from what this attempt saved
            self._sleep(delay)
            attempt_no += 1

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.stop_requested is None and (left := deadline - time.monotonic()) > 0:
            self._wait_readable([self.wake_r], left)
            self._drain_wakeups()

    # --- one child --------------------------------------------------------------------------

    def _run_child(self, attempt_no: int, prev_checkpoint: str | None) -> ChildOutcome:
        report_r, report_w = os.pipe()
        dump_r, dump_w = os.pipe()  # faulthandler writes the child's stacks here on SIGUSR1
        relay = _OutputRelay() if logs.has_redactions() else None
        oom_before = _oom_kills()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(report_r)
            os.close(dump_r)
            self._child(report_w, dump_w, relay, attempt_no, prev_checkpoint)
        os.close(report_w)
        os.close(dump_w)
        if relay:
            relay.parent_side()
        try:
            return self._watch(pid, report_r, dump_r, relay, oom_before)
        finally:
            os.close(dump_r)

    def _child(self, report_w: int, dump_w: int, relay, attempt_no: int, prev_checkpoint: str | None) -> None:
        try:
            os.setpgid(0, 0)  # its own process group: the whole tree can be signalled at once
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(s, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            import faulthandler

            faulthandler.register(signal.SIGUSR1, file=dump_w, all_threads=True, chain=False)
            if relay:
                relay.child_side()
            os.environ.update({
                "EXECUTOR_ATTEMPT": str(attempt_no),
                "EXECUTOR_CHECKPOINT_LOCAL_DIR": self.checkpoint_local,
                **({"EXECUTOR_CHECKPOINT_PATH": self.invocation.checkpoint_path} if self.invocation.checkpoint_path else {}),
                **({"EXECUTOR_PREV_CHECKPOINT": prev_checkpoint} if prev_checkpoint else {}),
            })
            invocation = dataclasses.replace(self.invocation, prev_checkpoint=prev_checkpoint)

            def send(message: dict) -> None:
                os.write(report_w, (json.dumps(message) + "\n").encode())

            execute.phase_listener = lambda event, name, ms: send({"phase": name, "event": event, "ms": ms})
            diagnostics = Diagnostics()
            attempt = execute.run_attempt(invocation, diagnostics)
            send({
                "done": attempt.outcome, "task": attempt.task_name, "written": attempt.written,
                "failure": attempt.failure.to_dict() if attempt.failure else None,
            })
            code = 0
        except BaseException as e:  # even SystemExit: the parent must hear about it
            try:
                os.write(report_w, (json.dumps({"crash": f"{type(e).__name__}: {e}"}) + "\n").encode())
            except OSError:
                pass
            code = 70
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

    def _watch(self, pid: int, report_r: int, dump_r: int, relay, oom_before: int | None) -> ChildOutcome:
        buffer = b""
        messages: list[dict] = []
        current_phase, phase_started = "load", time.monotonic()
        status = rusage = None
        deadline = time.monotonic() + self.spec.timeout_seconds if self.spec.timeout_seconds else None
        timed_out = forwarded = False
        kill_at: float | None = None
        drain_until: float | None = None
        stacks = ""
        report_open = True
        while status is None or ((report_open or (relay and relay.open)) and time.monotonic() < drain_until):
            now = time.monotonic()
            if status is None:
                if deadline and now >= deadline and not timed_out:
                    timed_out = True
                    stacks = self._dump_stacks(pid, dump_r)
                    logs.error("timeout: stopping the task", timeout_s=self.spec.timeout_seconds, phase=current_phase)
                    self._signal_tree(pid, signal.SIGTERM)
                    kill_at = now + self.spec.grace_seconds
                if self.stop_requested is not None and not forwarded:
                    forwarded = True
                    logs.warning("asked to stop: forwarding SIGTERM to the task",
                                 signal=signal.Signals(self.stop_requested).name, grace_s=self.spec.grace_seconds)
                    self._signal_tree(pid, signal.SIGTERM)
                    kill_at = min(kill_at or float("inf"), now + self.spec.grace_seconds)
                if kill_at is not None and now >= kill_at:
                    logs.error("grace period over: killing the task's process tree", pid=pid)
                    self._signal_tree(pid, signal.SIGKILL)
                    kill_at = float("inf")
            pending = [t - now for t in (None if timed_out else deadline, kill_at) if t is not None and t != float("inf")]
            timeout = max(0.0, min(pending + [0.5]))
            fds = [self.wake_r] + ([report_r] if report_open else []) + (relay.fds() if relay else [])
            for fd in self._wait_readable(fds, timeout):
                if fd == self.wake_r:
                    self._drain_wakeups()
                elif fd == report_r:
                    chunk = _read(fd)
                    if not chunk:
                        report_open = False
                        continue
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        message = json.loads(line)
                        if "phase" not in message:
                            messages.append(message)
                        elif message["event"] == "task":
                            self.task_name = message["phase"]
                        elif message["event"] == "start":
                            current_phase, phase_started = message["phase"], time.monotonic()
                        else:
                            self.diagnostics.phases_ms[message["phase"]] = message["ms"]
                            current_phase = None
                elif relay:
                    relay.pump(fd)
            if status is None:
                status, rusage = self._reap(pid)
                if status is not None:
                    # Nothing the task started outlives it (and a forked grandchild holding our pipes
                    # cannot keep us waiting): kill what is left of its process group, then drain.
                    _killpg_quietly(pid, signal.SIGKILL)
                    drain_until = time.monotonic() + 2.0
        os.close(report_r)
        if relay:
            relay.close()
        if current_phase is not None:  # the phase the child died in: how long it had been in it
            self.diagnostics.phases_ms[current_phase] = (time.monotonic() - phase_started) * 1000
        if timed_out or self.stop_requested is not None:
            self._save_local_checkpoint()
        peak = rusage.ru_maxrss * 1024 if rusage else 0
        attempt = self._classify(status, messages, current_phase, timed_out, stacks, oom_before, peak)
        return ChildOutcome(attempt, peak)

    def _classify(self, status, messages, phase, timed_out, stacks, oom_before, peak) -> execute.Attempt:
        done = next((m for m in messages if "done" in m), None)
        task = (done or {}).get("task") or self.task_name
        if done is not None:
            failure = TaskFailure.from_dict(done["failure"]) if done["failure"] else None
            return execute.Attempt(done["done"], task, failure, done.get("written", []))
        failure = self._death_failure(status, messages, phase or "upload", timed_out, stacks, oom_before, peak)
        failure.phase = failure.phase or phase or "upload"
        return execute.Attempt("failure", task, failure)

    def _death_failure(self, status, messages, phase, timed_out, stacks, oom_before, peak) -> TaskFailure:
        peak_text = f"peak RSS {peak / 2**20:.1f} MiB"
        if timed_out:
            failure = TaskFailure(
                "TIMEOUT", f"the task ran past its timeout of {self.spec.timeout_seconds:g} s (in phase {phase})",
                hint="raise the task's timeout, or make it checkpoint and resume",
            )
            failure.traceback_text = stacks
            return failure
        if self.stop_requested is not None:
            kind = "an interruptible (spot) task, preempted as expected" if self.spec.interruptible else "eviction or preemption"
            return TaskFailure(
                "PREEMPTED",
                f"the pod was asked to stop ({signal.Signals(self.stop_requested).name}) while the task was in phase {phase}",
                hint=f"{kind}; the backend retries this attempt, and a saved checkpoint lets it resume",
            )
        if status == LOST:
            return TaskFailure("SYSTEM", f"the task process ended in phase {phase} without reporting, and its exit "
                                         "status was collected by another process (is SIGCHLD ignored?)")
        signum = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
        oom_after = _oom_kills()
        if signum == signal.SIGKILL or (oom_before is not None and oom_after is not None and oom_after > oom_before):
            return TaskFailure(
                "OOM",
                f"the task process was killed (SIGKILL) by the kernel's OOM killer ({peak_text}; limit: {memory_limit_text()})",
                hint="raise the task's memory limit, or process the data in smaller pieces",
            )
        crash = next((m["crash"] for m in messages if "crash" in m), None)
        if signum in CRASH_SIGNALS:
            return TaskFailure("USER", f"the task process crashed with {signal.Signals(signum).name} ({peak_text})",
                               hint="a native extension failed; run with PYTHONFAULTHANDLER=1 for a stack")
        if signum is not None:
            return TaskFailure("SYSTEM", f"the task process was killed by {signal.Signals(signum).name} ({peak_text})")
        code = os.WEXITSTATUS(status) if status is not None else None
        if crash:
            return TaskFailure("SYSTEM", f"the supervised process failed: {crash}")
        return TaskFailure("USER", f"the task process exited with code {code} without reporting a result (os._exit?)",
                           hint="return from the task, or raise an exception that says what went wrong")

    # --- process plumbing -------------------------------------------------------------------

    def _reap(self, pid: int):
        """Our child's status and rusage once it is gone; as PID 1, reap every orphan too."""
        while True:
            try:
                got, status, rusage = os.wait4(-1 if self.reaps_all else pid, os.WNOHANG)
            except ChildProcessError:
                return LOST, None  # someone else reaped it (SIGCHLD ignored by a parent?): status unknown
            if got == 0:
                return None, None
            if got == pid:
                return status, rusage
            # an orphan reparented to us (PID 1): reaped, keep looking

    def _signal_tree(self, pid: int, signum: int) -> None:
        """The child's process group, plus any descendant that left it (psutil)."""
        targets = set()
        try:
            import psutil  # only on timeout and preemption: the happy path never pays for it

            targets = {p.pid for p in psutil.Process(pid).children(recursive=True)}
        except Exception:
            pass
        _killpg_quietly(pid, signum)
        for target in targets:
            try:
                os.kill(target, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def _dump_stacks(self, pid: int, dump_r: int) -> str:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            return ""
        data = b""
        end = time.monotonic() + 2.0
        # faulthandler writes from a signal handler: read until it has been quiet for a moment
        while time.monotonic() < end:
            if not self._wait_readable([dump_r], 0.15 if data else end - time.monotonic()):
                if data:
                    break
                continue
            chunk = _read(dump_r)
            if not chunk:
                break
            data += chunk
        return format_stack_dump(data.decode(errors="replace"))

    def _save_local_checkpoint(self) -> None:
        from executor import checkpoint

        try:
            if checkpoint.upload_local_dir(self.invocation.checkpoint_path, self.checkpoint_local):
                logs.info("uploaded the task's local checkpoint", dest=self.invocation.checkpoint_path)
        except Exception as e:
            logs.error("could not upload the task's local checkpoint", reason=str(e))

    def _wait_readable(self, fds: list[int], timeout: float) -> list[int]:
        try:
            readable, _, _ = select.select(fds, [], [], timeout)
            return readable
        except InterruptedError:
            return []

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""


def _killpg_quietly(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _has_objects(uri: str) -> bool:
    from executor import storage

    try:
        return bool(storage._list_files(uri))
    except Exception:
        return False


def _oom_kills() -> int | None:
    """cgroup v2 memory.events oom_kill counter of this container, if visible."""
    try:
        with open("/sys/fs/cgroup/memory.events") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


class _OutputRelay:
    """The child's stdout/stderr through the parent, with known secret values redacted."""

    def __init__(self):
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe()
        self.partial = {self.out_r: b"", self.err_r: b""}
        self.targets = {self.out_r: sys.stdout, self.err_r: sys.stderr}
        self.open_fds = {self.out_r, self.err_r}

    @property
    def open(self) -> bool:
        return bool(self.open_fds)

    def fds(self) -> list[int]:
        return list(self.open_fds)

    def child_side(self) -> None:
        os.dup2(self.out_w, 1)
        os.dup2(self.err_w, 2)
        for fd in (self.out_r, self.err_r, self.out_w, self.err_w):
            os.close(fd)

    def parent_side(self) -> None:
        os.close(self.out_w)
        os.close(self.err_w)

    def pump(self, fd: int) -> None:
        chunk = _read(fd)
        if not chunk:
            self._emit(fd, self.partial[fd], final=True)
            self.open_fds.discard(fd)
            os.close(fd)
            return
        data = self.partial[fd] + chunk
        *lines, self.partial[fd] = data.split(b"\n")
        for line in lines:
            self._emit(fd, line + b"\n")

    def close(self) -> None:
        for fd in list(self.open_fds):
            self._emit(fd, self.partial[fd])
            os.close(fd)
        self.open_fds.clear()

    def _emit(self, fd: int, data: bytes, final: bool = False) -> None:
        if not data:
            return
        stream = self.targets[fd]
        try:
            stream.write(logs.redact(data.decode(errors="replace")))
            stream.flush()
        except (OSError, ValueError):
            pass
