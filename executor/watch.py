"""Watching a supervised attempt: the part of supervision the one-shot path and the warm server share.

A supervised process runs execute.run_attempt and reports on two pipes, one JSON line per event:
its journal (phase starts and ends, the task's name; read only when needed, so a phase costs the
supervisor no wake-up) and its report (exactly one "done", or a "crash" if our own code failed).
fork_attempt() makes one such process per attempt; the warm server's in-process runners are the
same thing running many attempts in turn.

An AttemptWatch turns what happens to that process into one execute.Attempt. It never blocks: its
owner's loop select()s on watch.fds(), calls on_readable(), on_exit() (after reaping), stop() and
tick(), and reads outcome() once finished() is true. What it does, and how it classifies deaths:

    timeout       dump the task's thread stacks (faulthandler on SIGUSR1), SIGTERM its process
                  group and every descendant, SIGKILL after the grace period  -> TIMEOUT
    stop(reason)  SIGTERM now, SIGKILL after the grace period  -> PREEMPTED (the pod's SIGTERM,
                  a cancel, a draining server)
    death by a SIGKILL nobody here sent, or a higher cgroup oom_kill count  -> OOM
    SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT  -> USER, naming the signal
    exit without a report  -> USER (os._exit?); our own code failing in the child, or an exit
    status someone else collected  -> SYSTEM
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import select
import signal
import sys
import time

from executor import execute, logs
from executor.errors import Diagnostics, TaskFailure, format_stack_dump, memory_limit_text
from executor.invocation import Invocation

CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT}
CRASH_HINT = "a native extension failed; run with PYTHONFAULTHANDLER=1 for a stack"
LOST = -1  # an exit status that could not be collected (another process reaped the child)
STACK_DUMP_WAIT = 2.0  # at most this long for faulthandler's dump ...
STACK_DUMP_QUIET = 0.15  # ... which is complete once the pipe has been quiet this long
DRAIN_AFTER_EXIT = 2.0  # after the process is gone, how long its pipes may still deliver
_NEVER = float("inf")


class ChildOutcome:
    """What a watched attempt came to (a plain class: the cold start pays for every dataclass)."""

    def __init__(self, attempt: execute.Attempt, peak_rss_bytes: int = 0, timed_out: bool = False, stopped: bool = False):
        self.attempt = attempt
        self.peak_rss_bytes = peak_rss_bytes
        self.timed_out = timed_out
        self.stopped = stopped


# --- the supervised process --------------------------------------------------------------------


class Supervised:
    """A process we forked: its pid, its report and journal pipes, its stack-dump pipe, its relayed output."""

    def __init__(self, pid: int, report_r: int, journal_r: int, dump_r: int, relay: "OutputRelay | None" = None):
        self.pid = pid
        self.report_r = report_r
        self.journal_r = journal_r
        self.dump_r = dump_r
        self.relay = relay
        self.report_open = True
        self.status: int | None = None
        self.rusage = None
        self.drain_until: float | None = None  # once exited: how long its pipes may still deliver
        self._buffer = b""
        self._journal = b""
        self._closed = False
        os.set_blocking(journal_r, False)

    @property
    def exited(self) -> bool:
        return self.status is not None

    @property
    def draining(self) -> bool:
        """Its pipes may still hold output."""
        return self.report_open or bool(self.relay and self.relay.open)

    def fds(self) -> list[int]:
        return ([self.report_r] if self.report_open else []) + (self.relay.fds() if self.relay else [])

    def read_report(self) -> list[dict]:
        chunk = _read(self.report_r)
        if not chunk:
            self.report_open = False
            return []
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines if line]

    def read_journal(self) -> list[tuple[str, float, float, str]]:
        """Every journal line written so far, as (event, ms, time, name); never blocks."""
        while True:
            try:
                chunk = os.read(self.journal_r, 65536)
            except (BlockingIOError, InterruptedError, OSError):
                break
            if not chunk:
                break
            self._journal += chunk
        *lines, self._journal = self._journal.split(b"\n")
        entries = []
        for line in lines:
            event, ms, t, name = line.decode(errors="replace").split(" ", 3)
            entries.append((event, float(ms), float(t), name))
        return entries

    def exited_at(self, status: int, rusage, now: float) -> None:
        self.status, self.rusage = status, rusage
        # Nothing the task started outlives it (and a forked grandchild holding our pipes cannot
        # keep us waiting): kill what is left of its process group, then drain.
        _killpg_quietly(self.pid, signal.SIGKILL)
        self.drain_until = now + DRAIN_AFTER_EXIT

    def drained(self, now: float) -> bool:
        return self.exited and (not self.draining or now >= self.drain_until)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self.report_r, self.journal_r, self.dump_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.report_open = False
        if self.relay:
            self.relay.close()


class Reporter:
    """The supervised side of the report and journal pipes."""

    def __init__(self, report_fd: int, journal_fd: int):
        self.report_fd = report_fd
        self.journal_fd = journal_fd

    def send(self, message: dict) -> None:
        os.write(self.report_fd, (json.dumps(message) + "\n").encode())

    def phase(self, event: str, name: str, ms: float) -> None:
        # "<event> <ms> <monotonic time> <name>": a few lines per attempt, so the pipe's 64 KiB never
        # fills (a runner's journal is read after each attempt).
        line = f"{event} {ms!r} {time.monotonic()!r} {name.replace(chr(10), ' ')}\n"
        os.write(self.journal_fd, line.encode())

    def done(self, attempt: execute.Attempt, **extra) -> None:
        self.send({
            "done": attempt.outcome, "task": attempt.task_name, "written": attempt.written,
            "failure": attempt.failure.to_dict() if attempt.failure else None,
            "peak_rss": execute.peak_rss_bytes(), **extra,
        })


def become_supervised(dump_w: int, relay: "OutputRelay | None") -> None:
    """In a freshly forked process: its own process group, default signals, stacks on SIGUSR1."""
    import _signal  # signal.signal without its enum wrapping: in a forked child that costs ~40 page copies

    os.setpgid(0, 0)  # its own process group: the whole tree can be signalled at once
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        _signal.signal(s, _signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    import faulthandler

    faulthandler.register(signal.SIGUSR1, file=dump_w, all_threads=True, chain=False)
    if relay:
        relay.child_side()


def run_reported_attempt(reporter: Reporter, invocation: Invocation, *, attempt_no: int,
                         prev_checkpoint: str | None, checkpoint_local: str, extra=None,
                         diagnostics: Diagnostics | None = None) -> execute.Attempt:
    """One attempt in this (supervised) process, every phase and the outcome reported.

    `extra()`, if given, adds fields to the "done" report (an in-process runner's memory);
    `diagnostics`, if given, receives the attempt's phase times."""
    os.environ.update({
        "EXECUTOR_ATTEMPT": str(attempt_no),
        "EXECUTOR_CHECKPOINT_LOCAL_DIR": checkpoint_local,
        **({"EXECUTOR_CHECKPOINT_PATH": invocation.checkpoint_path} if invocation.checkpoint_path else {}),
        **({"EXECUTOR_PREV_CHECKPOINT": prev_checkpoint} if prev_checkpoint else {}),
    })
    if invocation.prev_checkpoint != prev_checkpoint:
        invocation = dataclasses.replace(invocation, prev_checkpoint=prev_checkpoint)
    execute.phase_listener = reporter.phase
    attempt = execute.run_attempt(invocation, Diagnostics() if diagnostics is None else diagnostics)
    for stream in (sys.stdout, sys.stderr):  # the task's output is in the pipes before its report
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    reporter.done(attempt, **(extra() if extra else {}))
    return attempt


class Pipes:
    """The pipes of one supervised process, made before the fork; each side then keeps its ends."""

    def __init__(self, relay: bool):
        self.report_r, self.report_w = os.pipe()
        self.journal_r, self.journal_w = os.pipe()
        self.dump_r, self.dump_w = os.pipe()  # faulthandler writes the child's stacks here on SIGUSR1
        self.relay = OutputRelay() if relay else None

    def child_side(self) -> Reporter:
        for fd in (self.report_r, self.journal_r, self.dump_r):
            os.close(fd)
        become_supervised(self.dump_w, self.relay)
        return Reporter(self.report_w, self.journal_w)

    def parent_side(self, pid: int) -> Supervised:
        for fd in (self.report_w, self.journal_w, self.dump_w):
            os.close(fd)
        if self.relay:
            self.relay.parent_side()
        return Supervised(pid, self.report_r, self.journal_r, self.dump_r, self.relay)


def report_crash(reporter_fd: int, error: BaseException) -> None:
    try:
        os.write(reporter_fd, (json.dumps({"crash": f"{type(error).__name__}: {error}"}) + "\n").encode())
    except OSError:
        pass


def fork_attempt(invocation: Invocation, *, attempt_no: int, prev_checkpoint: str | None, checkpoint_local: str,
                 relay: bool, prepare=None) -> Supervised:
    """Fork a child that runs one attempt and exits. `prepare()` runs in the child first (isolation)."""
    pipes = Pipes(relay)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 70
        try:
            reporter = pipes.child_side()
            if prepare is not None:
                prepare()
            run_reported_attempt(reporter, invocation, attempt_no=attempt_no,
                                 prev_checkpoint=prev_checkpoint, checkpoint_local=checkpoint_local)
            code = 0
        except BaseException as e:  # even SystemExit: the parent must hear about it
            report_crash(pipes.report_w, e)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return pipes.parent_side(pid)


# --- the watch -----------------------------------------------------------------------------------


class AttemptWatch:
    """One attempt of a supervised process, from its first phase to its outcome."""

    def __init__(self, proc: Supervised, *, timeout: float | None, grace: float, task_name: str,
                 diagnostics: Diagnostics, oom_before: int | None = None, finish_on_report: bool = False):
        now = time.monotonic()
        self.proc = proc
        self.timeout = timeout
        self.grace = grace
        self.task_name = task_name
        self.diagnostics = diagnostics
        self.oom_before = oom_before
        # True: the attempt is over with its report (an in-process runner lives on; the warm server
        # reaps an attempt child later). False: also wait for the process to exit (its rusage).
        self.finish_on_report = finish_on_report
        self.deadline = now + timeout if timeout else None
        self.current_phase: str | None = "load"
        self.phase_started = now
        self.messages: list[dict] = []
        self.done: dict | None = None
        self.timed_out = False
        self.stop_reason: tuple[str, str] | None = None  # (message, hint) of the PREEMPTED failure
        self.kill_at: float | None = None
        self._dump: bytearray | None = None  # collecting a stack dump
        self._dump_until = self._dump_quiet_at = _NEVER
        self.stacks = ""

    # --- inputs --------------------------------------------------------------------------------

    def fds(self) -> list[int]:
        return self.proc.fds() + ([self.proc.dump_r] if self._dump is not None else [])

    def on_readable(self, fd: int, now: float) -> None:
        if fd == self.proc.report_r:
            for message in self.proc.read_report():
                self._on_message(message, now)
            if self.done is not None or not self.proc.report_open:
                self._read_journal()
        elif fd == self.proc.dump_r:
            chunk = _read(fd)
            if chunk and self._dump is not None:
                self._dump += chunk
                self._dump_quiet_at = now + STACK_DUMP_QUIET
            elif not chunk:
                self._dump_until = now
        elif self.proc.relay:
            self.proc.relay.pump(fd)

    def on_exit(self, status: int, rusage, now: float) -> None:
        if not self.proc.exited:
            self.proc.exited_at(status, rusage, now)
        self._read_journal()

    def stop(self, message: str, hint: str, now: float, grace: float | None = None) -> None:
        """Ask the task to stop (SIGTERM), kill it after the grace period; it ends as PREEMPTED."""
        if self.stop_reason is not None or (self.finish_on_report and self.done is not None):
            return
        self.stop_reason = (message, hint)
        if self.proc.exited:
            return
        signal_tree(self.proc.pid, signal.SIGTERM)
        self.kill_at = min(self.kill_at or _NEVER, now + (self.grace if grace is None else grace))

    def tick(self, now: float) -> None:
        if self.proc.exited or (self.finish_on_report and self.done is not None):
            return
        if self._dump is not None:
            if now >= self._dump_until or (self._dump and now >= self._dump_quiet_at):
                self._stop_after_timeout(now)
        elif self.deadline is not None and not self.timed_out and now >= self.deadline:
            self.timed_out = True
            try:
                os.kill(self.proc.pid, signal.SIGUSR1)
                self._dump = bytearray()
                self._dump_until = now + STACK_DUMP_WAIT
            except ProcessLookupError:
                self._stop_after_timeout(now)
        if self.kill_at is not None and now >= self.kill_at:
            logs.error("grace period over: killing the task's process tree", pid=self.proc.pid)
            signal_tree(self.proc.pid, signal.SIGKILL)
            self.kill_at = _NEVER

    def _stop_after_timeout(self, now: float) -> None:
        self.stacks = format_stack_dump(bytes(self._dump or b"").decode(errors="replace"))
        self._dump = None
        self._read_journal()
        logs.error("timeout: stopping the task", timeout_s=self.timeout, phase=self.current_phase)
        signal_tree(self.proc.pid, signal.SIGTERM)
        self.kill_at = min(self.kill_at or _NEVER, now + self.grace)

    def _on_message(self, message: dict, now: float) -> None:
        self.messages.append(message)
        if "done" in message:
            self.done = message

    def _read_journal(self) -> None:
        for event, ms, t, name in self.proc.read_journal():
            if event == "task":
                self.task_name = name
            elif event == "start":
                self.current_phase, self.phase_started = name, t
            else:
                self.diagnostics.phases_ms[name] = ms
                self.current_phase = None

    # --- state ---------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def finished(self, now: float) -> bool:
        if self.finish_on_report and self.done is not None:
            return True
        return self.proc.drained(now)

    def next_wakeup(self) -> float | None:
        """The next moment tick() has something to do (None: only when a file descriptor is ready)."""
        times = [self.kill_at, self.proc.drain_until]
        if self._dump is not None:
            times += [self._dump_until, self._dump_quiet_at]
        elif not self.timed_out:
            times.append(self.deadline)
        times = [t for t in times if t is not None and t != _NEVER]
        return min(times) if times else None

    def outcome(self, now: float) -> ChildOutcome:
        self._read_journal()
        if self.current_phase is not None and self.done is None:  # the phase it died in: how long it had been in it
            self.diagnostics.phases_ms[self.current_phase] = (now - self.phase_started) * 1000
        rusage = self.proc.rusage
        peak = max(rusage.ru_maxrss * 1024 if rusage else 0, int((self.done or {}).get("peak_rss", 0)))
        return ChildOutcome(self._classify(peak), peak, self.timed_out, self.stopping)

    # --- classification ---------------------------------------------------------------------------

    def _classify(self, peak: int) -> execute.Attempt:
        done = self.done
        task = (done or {}).get("task") or self.task_name
        if done is not None:
            failure = TaskFailure.from_dict(done["failure"]) if done["failure"] else None
            return execute.Attempt(done["done"], task, failure, done.get("written", []))
        phase = self.current_phase or "upload"
        failure = self._death_failure(phase, peak)
        failure.phase = failure.phase or phase
        return execute.Attempt("failure", task, failure)

    def _death_failure(self, phase: str, peak: int) -> TaskFailure:
        peak_text = f"peak RSS {peak / 2**20:.1f} MiB"
        if self.timed_out:
            failure = TaskFailure(
                "TIMEOUT", f"the task ran past its timeout of {self.timeout:g} s (in phase {phase})",
                hint="raise the task's timeout, or make it checkpoint and resume",
            )
            failure.traceback_text = self.stacks
            return failure
        if self.stop_reason is not None:
            message, hint = self.stop_reason
            return TaskFailure("PREEMPTED", f"{message} while the task was in phase {phase}", hint=hint)
        status = self.proc.status
        if status == LOST:
            return TaskFailure("SYSTEM", f"the task process ended in phase {phase} without reporting, and its exit "
                                         "status was collected by another process (is SIGCHLD ignored?)")
        signum = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
        oom_after = oom_kills()
        if signum == signal.SIGKILL or (self.oom_before is not None and oom_after is not None and oom_after > self.oom_before):
            return TaskFailure(
                "OOM",
                f"the task process was killed (SIGKILL) by the kernel's OOM killer ({peak_text}; limit: {memory_limit_text()})",
                hint="raise the task's memory limit, or process the data in smaller pieces",
            )
        crash = next((m["crash"] for m in self.messages if "crash" in m), None)
        if signum in CRASH_SIGNALS:
            return TaskFailure("USER", f"the task process crashed with {signal.Signals(signum).name} ({peak_text})",
                               hint=CRASH_HINT)
        if signum is not None:
            return TaskFailure("SYSTEM", f"the task process was killed by {signal.Signals(signum).name} ({peak_text})")
        code = os.WEXITSTATUS(status) if status is not None else None
        if crash:
            return TaskFailure("SYSTEM", f"the supervised process failed: {crash}")
        return TaskFailure("USER", f"the task process exited with code {code} without reporting a result (os._exit?)",
                           hint="return from the task, or raise an exception that says what went wrong")


# --- process plumbing ------------------------------------------------------------------------------


def signal_tree(pid: int, signum: int) -> None:
    """The process group led by pid, plus any descendant that left it (psutil)."""
    targets = set()
    try:
        import psutil  # only on timeout and stop: the happy path never pays for it

        targets = {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except Exception:
        pass
    _killpg_quietly(pid, signum)
    for target in targets:
        try:
            os.kill(target, signum)
        except (ProcessLookupError, PermissionError):
            pass


def exited_children():
    """(pid, wait status, rusage) of each child that has exited, without waiting for any."""
    while True:
        try:
            pid, status, rusage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status, rusage


def wait_readable(fds: list[int], timeout: float) -> list[int]:
    """The descriptors that are readable (or at end of file) within `timeout` seconds. poll, not
    select: a warm server's descriptors may number beyond select's 1024."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN | select.POLLPRI)
    try:
        return [fd for fd, _ in poller.poll(max(0, math.ceil(timeout * 1000)))]
    except InterruptedError:
        return []


def oom_kills() -> int | None:
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


class OutputRelay:
    """A supervised process's stdout/stderr through its supervisor, with known secret values redacted."""

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
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            raise
        except OSError:
            chunk = b""
        if not chunk:
            self._emit(fd, self.partial[fd])
            self.open_fds.discard(fd)
            os.close(fd)
            return
        data = self.partial[fd] + chunk
        *lines, self.partial[fd] = data.split(b"\n")
        for line in lines:
            self._emit(fd, line + b"\n")

    def drain(self) -> None:
        """Relay whatever is in the pipes now, without waiting for more."""
        for fd in list(self.open_fds):
            os.set_blocking(fd, False)
            try:
                while fd in self.open_fds:
                    self.pump(fd)
            except BlockingIOError:
                pass
            finally:
                if fd in self.open_fds:
                    os.set_blocking(fd, True)

    def close(self) -> None:
        for fd in list(self.open_fds):
            self._emit(fd, self.partial[fd])
            os.close(fd)
        self.open_fds.clear()

    def _emit(self, fd: int, data: bytes) -> None:
        if not data:
            return
        stream = self.targets[fd]
        try:
            stream.write(logs.redact(data.decode(errors="replace")))
            stream.flush()
        except (OSError, ValueError):
            pass
