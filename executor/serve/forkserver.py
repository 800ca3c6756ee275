"""The fork server: one warm process per pool (bundle digest, task module).

The server starts it as `python -m executor.serve.forkserver FD`. It imports the executor, then (on
its first invocation) fetches the pool's bundle and imports the task module and its SDK once. Each
invocation is then

  1. prepared in the "spec" phase, under the invocation's own environment: TaskTemplate, env vars,
     thread counts, secrets (supervisor.load_spec, exactly as the one-shot path);
  2. run as one attempt: isolation "fork" forks a fresh child that takes the invocation's view
     (isolation.enter: env replaced, fresh cwd and TMPDIR, its own secrets) and runs
     execute.run_attempt; isolation "inprocess" hands it to a warm runner child that runs attempt
     after attempt in itself (or the server already did, through a runner leased to it: the runner
     then prepares it itself, and this process attaches to the attempt it started);
  3. watched with executor.watch, the same watcher as the one-shot path (timeout with stack dump,
     cancel and shutdown as PREEMPTED, OOM, crashes, process-group kill, redacted output), and
     retried in place under the same policy;
  4. finished with execute.finish (the one error document, the summary line), then reported.

Messages (executor.serve.channel) from the server: run (with "lease": the server already sent it to
that runner), cancel, stop_all, exit. To the server: warm, done, lease (an idle in-process runner's
job pipe and a fresh root for one invocation; see executor.serve.runner).

Signals (one table):
"""
from __future__ import annotations

import collections
import dataclasses
import faulthandler  # noqa: F401 - every child registers it (watch.become_supervised): imported once, here
import fcntl
import gc
import itertools
import os
import shutil
import signal
import sys
import time

from executor import execute, logs, watch
from executor.errors import Diagnostics, TaskFailure
from executor.serve import isolation
from executor.serve import runner as runner_module
from executor.serve.channel import Channel, Closed
from executor.serve.runner import Runner
from executor.serve.zygote import Zygote

SIGNALS = {
    signal.SIGCHLD: "wake the loop and reap: attempt children, runners, and (as a subreaper) orphans of tasks",
    signal.SIGTERM: "stop every invocation now (PREEMPTED, error.pb written), then exit",
    signal.SIGINT: "ignored: Ctrl-C reaches the server, which decides",
}
__doc__ += "\n".join(f"    {signal.Signals(s).name:<8} {what}" for s, what in SIGNALS.items())

LOST_SERVER = ("the executor server went away", None)
MAX_SPARES = 8  # isolated children kept forked ahead of need, at most


def task_module(invocation) -> str | None:
    """The module the pool imports once: `task-module M` in the resolver arguments (map tasks too),
    or flyte 2's `mod M`."""
    args = list(invocation.resolver_args)
    for i, arg in enumerate(args[:-1]):
        if arg == "task-module" or (arg == "mod" and i == 0):
            return args[i + 1]
    return None


@dataclasses.dataclass
class Job:
    """One invocation inside the fork server."""

    id: str
    invocation: object
    env: dict
    isolation: str
    view: isolation.View
    root: str
    diagnostics: Diagnostics = dataclasses.field(default_factory=Diagnostics)
    task_name: str = ""
    spec: object = None
    attempt_no: int = 0
    prev_checkpoint: str | None = None
    attempt: watch.AttemptWatch | None = None
    runner: "Runner | None" = None
    retry_at: float | None = None
    last_failure: TaskFailure | None = None
    pid: int | None = None  # of the process that ran its last attempt
    token: str = ""  # the server's, for a runner's direct result
    stop_reason: tuple[str, str, float | None] | None = None
    prepare_failure: TaskFailure | None = None  # leased: its spec phase failed here (the runner says so too)

    @property
    def checkpoint_local(self) -> str:
        return isolation.checkpoint_dir(self.root)


class ForkServer:
    def __init__(self, channel: Channel, config: dict, results_fd: int = -1):
        self.channel = channel
        self.results_fd = results_fd  # the server's results socket: handed to in-process runners only
        self.work_dir = config["work_dir"]
        self.max_runner_invocations = config.get("max_invocations_per_worker", 0)
        self.max_runner_rss = config.get("max_worker_rss", 0)
        self.runner_spin = config.get("runner_spin", 0.0)  # seconds an idle in-process runner polls its job pipe
        self.jobs: dict[str, Job] = {}
        self.procs: dict[int, watch.Supervised] = {}  # every child until its pipes are closed
        self.busy: dict[int, Job] = {}  # pid -> the job whose attempt runs in it now
        self.runners: dict[int, Runner] = {}
        self.spares: list[Runner] = []
        self.zygote: Zygote | None = None  # forks the spares (executor.serve.zygote)
        self.awaiting: list[Job] = []  # isolated jobs waiting for the zygote's next spare
        self.awaiting_runner: list[str] = []  # ids of in-process jobs waiting for a runner forked by the loop
        self.leased: dict[int, str] = {}  # pid of an idle runner leased to the server -> the root made for it
        self.lending = True  # False once a lease's descriptor failed to reach the server
        self.awaiting_reclaim: list[str] = []  # ids of in-process jobs waiting for the server to give a lease back
        self._inbox: collections.deque[dict] = collections.deque()  # the server's messages, not yet handled
        self._to_tick: collections.deque[str] = collections.deque()  # ids of the jobs _tick_all has yet to tick
        self.template = None  # the last invocation launched: what a spare rehearses
        self.warm = False
        self.bundle_root: str | None = None
        self.exiting = False
        self.server_lost = False
        self.sigterm = False
        self._redaction_refs: dict[str, int] = {}
        self.wake_r, self.wake_w = os.pipe()
        self._numbers = itertools.count(1)  # makes each invocation's directory name unique in this pool
        self._spare_roots: list[str] = []  # invocation directories made ahead of need (work, tmp, checkpoint)

    # --- the loop --------------------------------------------------------------------------------

    def serve(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.set_wakeup_fd(self.wake_w)
        isolation.become_subreaper()
        self._inbox.extend(self.channel.buffered())  # what arrived with the configuration
        self._handle()
        # Each step is a method of its own, so that no local of this frame holds an invocation when a
        # child is forked: a child inherits this stack, and a task could walk up to it (frame.f_back).
        while not (self.exiting and not self.jobs):
            now = time.monotonic()
            self._tick_all(now)
            if self.exiting and not self.jobs:
                break
            self._lease_idle_runners()  # before the wait: a runner whose attempt just ended is lent at once
            self._wait_and_dispatch(now)
            self._start_awaiting_runners()
            self._reap()
            self._refill_spares()
            self._refill_roots()
        for runner in self.runners.values():
            runner.retire()
        if self.zygote is not None:
            self.zygote.close()
        for spare in self._spare_roots + list(self.leased.values()):
            shutil.rmtree(spare, ignore_errors=True)

    def _tick_all(self, now: float) -> None:
        # One id at a time off a queue kept on this object (which a forked child forgets): a list
        # here would sit on the stack of a retry's fork, every invocation's id in it.
        self._to_tick.extend(self.jobs)
        while self._to_tick:
            self._tick_by_id(self._to_tick.popleft(), now)
        self._close_drained(now)

    def _tick_by_id(self, job_id: str, now: float) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            self._tick(job, now)

    def _wait_and_dispatch(self, now: float) -> None:
        owners = self._fd_owners()
        readable = watch.wait_readable(list(owners), self._timeout(now))
        from_server = False
        for fd in readable:
            owner = owners[fd]
            if owner == "channel":
                from_server = True  # read last, below
            elif owner == "wake":
                self._drain_wakeups()
            elif owner == "zygote":
                self._read_zygote()
            else:
                self._on_proc_readable(owner, fd)
        if from_server:  # read now, handled after the finished attempts: their runners may be for it
            self._pump_channel()
        self._finish_reported()  # now, not at the next turn: its runner is lent again before anything else
        self._handle()

    def _finish_reported(self) -> None:
        """Attempts whose report came in with the server's message: finished first, so that a runner
        that reported straight to the server is free for the invocation the server sent next."""
        now = time.monotonic()
        for job_id in list(self.jobs):
            job = self.jobs.get(job_id)
            if job is not None and job.attempt is not None and job.attempt.finished(now):
                self._tick(job, now)

    def _start_awaiting_runners(self) -> None:
        """In-process jobs that found no idle runner: runners forked for them first, from frames that
        hold nothing of any invocation (not even an id), then the jobs launched."""
        if not self.awaiting_runner:
            return
        error = self._fork_idle_runners(len(self.awaiting_runner))
        waiting, self.awaiting_runner = self.awaiting_runner, []
        for job_id in waiting:
            self._launch_awaiting_runner(job_id, error)

    def _fork_idle_runners(self, count: int) -> OSError | None:
        idle = sum(1 for pid, r in self.runners.items() if self._is_idle_runner(pid, r))
        try:
            for _ in range(count - idle):
                self._fork_runner(one_shot=False, relay=True)
        except OSError as e:
            return e
        return None

    def _launch_awaiting_runner(self, job_id: str, fork_error: OSError | None) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.attempt is not None:
            return
        if fork_error is None or self._idle_runner() is not None:
            try:
                return self._launch_awaiting(job)
            except Exception as e:  # a bug of ours: still one error document, never a lost invocation
                failure = TaskFailure("SYSTEM", f"internal error in the warm worker: {type(e).__name__}: {e}", cause=e)
        else:
            failure = TaskFailure("SYSTEM", f"the warm worker could not start a runner: {fork_error}", cause=fork_error)
        failure.phase = "queue"
        self._finish(job, execute.Attempt("failure", job.task_name, failure))

    def _idle_runner(self) -> Runner | None:
        return next((r for pid, r in self.runners.items() if self._is_idle_runner(pid, r)), None)

    def _is_idle_runner(self, pid: int, runner: Runner) -> bool:
        """An in-process runner that can take an invocation now (from us: a leased one is the server's)."""
        return (not runner.one_shot and pid not in self.busy and pid not in self.leased and not runner.retiring
                and not runner.proc.exited)

    def _lease_idle_runners(self) -> None:
        """Idle in-process runners lent to the server, each for one invocation: the server writes it
        straight into the runner's job pipe (and tells us), so the caller does not wait on this process.
        A lease is given back only by its use; a runner is leased again once its attempt is over here."""
        if (not self.warm or not self.lending or self.results_fd < 0 or self.exiting or self.server_lost
                or self.awaiting_runner or self.awaiting_reclaim or self._inbox_awaits_runner()):
            return  # a runner that is free now goes to the jobs waiting for one
        for pid, runner in list(self.runners.items()):
            if not self._is_idle_runner(pid, runner):
                continue
            root = self._spare_roots.pop() if self._spare_roots else None
            try:
                if root is None:
                    root = os.path.join(self.work_dir, f".lease-{os.getpid()}-{next(self._numbers)}")
                    _make_dirs(root)
                capacity = fcntl.fcntl(runner.job_w, fcntl.F_GETPIPE_SZ)  # what the server may write without blocking
                self.channel.send_with_fd({"event": "lease", "pid": pid, "root": root, "capacity": capacity},
                                          runner.job_w)
            except Closed:
                shutil.rmtree(root, ignore_errors=True)
                return self._lose_server()
            except OSError:
                if root is not None:
                    shutil.rmtree(root, ignore_errors=True)
                return
            self.leased[pid] = root

    def _end_lease(self, pid: int | None) -> None:
        """A lease that will not be used (given back, lost, or its runner gone): the root made for it goes."""
        root = self.leased.pop(pid, None)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def _reclaim_for(self, job: Job) -> None:
        """An in-process job came our usual way while our idle runners are lent out (the server sent it
        before our lease reached it): ask for one back rather than fork another runner, whose module
        state would then split from the warm one's."""
        self.awaiting_reclaim.append(job.id)
        self._send({"event": "reclaim"})

    def _released(self, pid: int | None) -> None:
        """The server's answer to a reclaim: a lease given back unused, or None (all were in use: a
        runner is forked for the job)."""
        self._end_lease(pid)
        if self.awaiting_reclaim:
            self.awaiting_runner.append(self.awaiting_reclaim.pop(0))  # launched by the loop, on it or a new one

    def _on_sigterm(self, signum, frame) -> None:
        self.sigterm = True  # acted on in the loop (the wakeup fd woke it)

    def _fd_owners(self) -> dict:
        """What to wait on: the server, signals, each running attempt's pipes, and the relayed output
        of idle children (a spare or a finished child is otherwise only heard of when it is reaped)."""
        owners: dict = {} if self.server_lost else {self.channel.fileno(): "channel"}
        owners[self.wake_r] = "wake"
        if self.zygote is not None:
            owners[self.zygote.fileno()] = "zygote"
        for pid, proc in self.procs.items():
            job = self.busy.get(pid)
            if job is not None:
                for fd in job.attempt.fds():
                    owners[fd] = (proc, True)  # not the job, nor its id: what forks while these are read sees neither
            elif proc.relay and pid not in self.leased:  # a leased one's output is read once we know its secrets
                for fd in proc.relay.fds():
                    owners[fd] = (proc, False)
        return owners

    def _timeout(self, now: float) -> float:
        if self.awaiting_runner:  # launched right after this wait: it must not block
            return 0.0
        times = [1.0]
        for job in self.jobs.values():
            if job.attempt is not None and (t := job.attempt.next_wakeup()) is not None:
                times.append(t - now)
            if job.retry_at is not None:
                times.append(job.retry_at - now)
        return max(0.0, min(times))

    def _pump_channel(self) -> None:
        try:
            self._inbox.extend(self.channel.pump())
        except Closed:
            self._lose_server()

    def _inbox_awaits_runner(self) -> bool:
        """An in-process invocation the server sent our usual way, not yet handled: an idle runner is its."""
        return any(m["op"] == "run" and m.get("isolation") == "inprocess" and not m.get("lease")
                   and not m.get("failure") for m in self._inbox)

    def _handle(self) -> None:
        """The server's messages, one at a time off the inbox (a child forked for one of them is not
        handed the others, env and all, in a local of this frame)."""
        while self._inbox:
            message = self._inbox.popleft()
            op = message["op"]
            if op == "run":
                self._start(message)
            elif op == "cancel":
                job = self.jobs.get(message["id"])
                if job is not None:
                    self._stop(job, message["message"], message["hint"], message.get("grace"))
            elif op == "stop_all":
                for job in list(self.jobs.values()):
                    self._stop(job, message["message"], message["hint"], message.get("grace"))
            elif op == "released":
                self._released(message["pid"])
            elif op == "returned":  # never reached the server
                self.lending = False
                self._end_lease(message["pid"])
            elif op == "revoked":  # a leased runner that died: unused (else its invocation came first)
                if message["pid"] in self.leased and message["pid"] in self.procs:
                    self._forget_proc(message["pid"])
            elif op == "exit":
                self.exiting = True

    def _lose_server(self) -> None:
        self.server_lost = True
        self._stop_everything(*LOST_SERVER)

    def _stop_everything(self, message: str, hint: str | None, grace: float = 5.0) -> None:
        self.exiting = True
        for job in list(self.jobs.values()):
            self._stop(job, message, hint, grace)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except OSError:
            pass
        if self.sigterm:
            self.sigterm = False
            self._stop_everything("the warm worker was asked to stop (SIGTERM)", None)

    def _send(self, message: dict) -> None:
        if self.server_lost:
            return
        try:
            self.channel.send(message)
        except Closed:
            self._lose_server()

    # --- children --------------------------------------------------------------------------------

    def _on_proc_readable(self, owner, fd: int) -> None:
        proc, busy = owner
        job = self.busy.get(proc.pid) if busy else None
        if job is not None and job.attempt is not None:
            job.attempt.on_readable(fd, time.monotonic())
        elif fd == proc.report_r:
            proc.read_report()  # after its report (or an idle runner's stray line): nothing to act on
        elif proc.relay:
            proc.relay.pump(fd)

    def _reap(self) -> None:
        for pid, status, rusage in watch.exited_children():
            self._on_exit(pid, status, rusage)

    def _on_exit(self, pid: int, status: int, rusage) -> None:
        """A child of ours (or of the zygote) was reaped."""
        proc = self.procs.get(pid)
        if proc is None:
            return  # an orphan of some task, re-parented to us (subreaper), or the zygote: reaped
        job = self.busy.get(pid)
        if job is not None and job.attempt is not None:
            job.attempt.on_exit(status, rusage, time.monotonic())
        else:  # a child whose attempt is over, a spare, an idle runner: gone, with its last output
            proc.exited_at(status, rusage, time.monotonic())
            if pid in self.leased:  # the server may have sent it an invocation already: it says which
                return self._send({"event": "revoke", "pid": pid})
            self._forget_proc(pid)

    def _read_zygote(self) -> None:
        event = self.zygote.receive()
        if event is None:
            self._lose_zygote()
        elif event[0] == "spare":
            runner = event[1]
            self.procs[runner.proc.pid] = runner.proc
            self.runners[runner.proc.pid] = runner
            if self.exiting and not self.awaiting:
                runner.retire()
            else:
                self.spares.append(runner)
                if self.awaiting:
                    self._launch_awaiting(self.awaiting.pop(0))
        else:
            _, pid, status, rusage = event
            self._on_exit(pid, status, rusage)

    def _launch_awaiting(self, job: Job) -> None:
        logs._context = {"invocation": job.id}
        try:
            self._launch(job)
        finally:
            logs._context = {}

    def _lose_zygote(self) -> None:
        """Its children were killed with it and re-parented to us: we reap them. One it had reaped but not
        yet reported has an exit status nobody can tell us."""
        self.zygote.close()
        self.zygote = None
        for pid, proc in list(self.procs.items()):
            if not proc.exited and not _exists(pid):
                self._on_exit(pid, watch.LOST, None)
        while self.awaiting:  # forked here instead (the zygote being gone, none is queued again)
            self._launch_awaiting(self.awaiting.pop(0))

    def _close_drained(self, now: float) -> None:
        """Children that are gone and run nothing now: their last output relayed, their pipes closed."""
        for pid, proc in list(self.procs.items()):
            if pid not in self.busy and pid not in self.leased and proc.exited:
                self._forget_proc(pid)

    def _forget_proc(self, pid: int) -> None:
        self._end_lease(pid)  # a leased runner that died idle
        proc = self.procs.pop(pid)
        if proc.relay:
            proc.relay.drain()
        proc.close()
        runner = self.runners.pop(pid, None)
        if runner is not None:
            runner.retire()

    # --- one invocation ----------------------------------------------------------------------------

    def _start(self, message: dict) -> None:
        invocation = message["invocation"]
        lease = message.get("lease")  # {"pid", "root"}: the server already sent it to that runner
        root = lease["root"] if lease else os.path.join(self.work_dir, f"{_safe(message['id'])}-{os.getpid()}-{next(self._numbers)}")
        view = isolation.View.in_root(message["id"], message["env"], root)
        job = Job(message["id"], invocation, view.env, message["isolation"], view, root,
                  task_name=" ".join(invocation.resolver_args), prev_checkpoint=invocation.prev_checkpoint,
                  token=message.get("token", ""))
        self.jobs[job.id] = job
        logs._context = {"invocation": job.id}
        try:
            if lease is None:
                self._make_root(root)
            if message.get("failure"):  # decided by the server: report it, run nothing
                code, text, hint, *phase = message["failure"]
                if hint is None:
                    from executor import supervisor

                    hint = supervisor.preempted_hint(None)
                failure = TaskFailure(code, text, hint=hint)
                failure.phase = phase[0] if phase else "queue"
            else:
                failure = self._prepare(job)
            if lease is not None:
                job.prepare_failure = failure
                failure = self._attach(job, lease["pid"])
            elif failure is None:
                self._launch(job)
        except Exception as e:  # a bug of ours: still one error document, never a lost invocation
            failure = TaskFailure("SYSTEM", f"internal error in the warm worker: {type(e).__name__}: {e}", cause=e)
            failure.phase = failure.phase or "spec"
            if lease is not None and job.attempt is None and lease["pid"] in self.leased:
                job.prepare_failure = failure  # the runner has it: watched (and stopped) like any other
                failure = self._attach(job, lease["pid"])
        try:
            if failure is not None and job.id in self.jobs:
                self._finish(job, execute.Attempt("failure", job.task_name, failure))
        finally:
            logs._context = {}

    def _prepare(self, job: Job) -> TaskFailure | None:
        """Warm the pool (first time), then the invocation's spec phase under its own environment."""
        try:
            if not self.warm:
                self._warm_up(job)
            job.invocation = runner_module.without_bundle(job.invocation)  # the pool's sys.path has it
            try:
                job.spec = isolation.prepare(job.view, job.invocation, job.diagnostics)
            finally:
                self._add_redactions(job.view.redactions)
            job.env = job.view.env
            job.view.bundle_root = self.bundle_root
            return None
        except TaskFailure as failure:
            return failure

    def _warm_up(self, job: Job) -> None:
        started = time.perf_counter()
        cache = None
        bundle = job.invocation.bundle
        if bundle is not None:
            with isolation.environment(job.env, job.view.tmpdir):
                with execute.phase("bundle", job.diagnostics):
                    from executor.bundle.inject import inject

                    prepared = inject(bundle.uri, bundle.dest_dir, bundle.archive_md5)
            self.bundle_root, cache = prepared.root, "hit" if prepared.hit else "miss"
        module = task_module(job.invocation)
        self._send({"event": "loading", "module": module or " ".join(job.invocation.resolver_args)})
        gc.disable()
        try:
            _preload(job.invocation)
        except (Exception, SystemExit) as e:  # each invocation will report it, with its own traceback
            logs.warning("the task does not load; every invocation will say why", module=module or "-",
                         reason=(getattr(e, "message", None) or f"{type(e).__name__}: {e}")[:200])
        finally:
            gc.enable()
        gc.freeze()  # what the imports built lives as long as the pool: keep it out of every collection
        self.warm = True
        self._send({"event": "warm", "bundle_cache": cache, "module": module,
                    "warm_ms": (time.perf_counter() - started) * 1000, "rss": isolation.current_rss()})

    def _launch(self, job: Job) -> None:
        if job.isolation == "inprocess":
            runner = self._idle_runner()
            if runner is None and self.leased and not self.server_lost:
                return self._reclaim_for(job)
            if runner is None:
                # Forked by the loop, not from here: a runner serves invocation after invocation, and
                # would inherit this stack, which holds this one's env and secrets.
                self.awaiting_runner.append(job.id)
                return
        elif job.view.redactions:  # its output is relayed (redacted): a child made for it
            runner = self._fork_runner(one_shot=True, relay=True)
        else:
            runner = self._take_spare()
            if runner is None and self.zygote is not None:  # one is on its way: cheaper than forking here
                self.awaiting.append(job)
                self.template = job.invocation
                return
            runner = runner or self._fork_runner(one_shot=True, relay=False)
        message = {"view": job.view, "invocation": job.invocation, "attempt_no": job.attempt_no,
                   "prev_checkpoint": job.prev_checkpoint, "checkpoint_local": job.checkpoint_local}
        if not runner.one_shot and self.results_fd >= 0 and job.stop_reason is None:
            # A success is told to the server by the runner itself: one hop fewer for the caller.
            message["direct"] = {"id": job.id, "token": job.token, "attempts": job.attempt_no + 1,
                                 "phases_ms": dict(job.diagnostics.phases_ms), "peak_rss": job.diagnostics.peak_rss_bytes}
        try:
            runner.send(message)
        except OSError:  # it died before its reaping was noticed: a fresh one made for this attempt
            runner.retire()
            if not runner.one_shot:
                self.awaiting_runner.append(job.id)
                return
            runner = self._fork_runner(one_shot=True, relay=True)
            runner.send(message)
        self.template = job.invocation
        self._watch(job, runner)  # after the send: the runner starts meanwhile

    def _attach(self, job: Job, pid: int) -> TaskFailure | None:
        """A leased runner's invocation, sent to it by the server: watched from now on."""
        root = self.leased.pop(pid, None)
        runner = self.runners.get(pid)
        if root is None or runner is None or pid in self.busy:  # never given, or gone and forgotten
            failure = TaskFailure("SYSTEM", "the warm runner this invocation was sent to is gone",
                                  hint="a bug or a kill from outside; the backend retries this attempt")
            failure.phase = "queue"
            return failure
        if runner.proc.exited:  # reaped while lent: its pipes, unread since, still hold what it said
            runner.proc.drain_until = time.monotonic() + watch.DRAIN_AFTER_EXIT
        self._watch(job, runner)  # died meanwhile: the watch says how, as for any attempt
        if job.prepare_failure is not None:
            self._stop_unless_reported(job)
        return None

    def _stop_unless_reported(self, job: Job) -> None:
        """A leased job whose preparation failed here: the runner, which prepared it too, should have
        failed the same way. Unless it says so soon, it may be running the task with what we could not
        read (its secrets unknown here for redaction, its timeout unknown): it is stopped now."""
        proc = job.attempt.proc
        if proc.report_open and not proc.exited:
            for fd in watch.wait_readable([proc.report_r], 0.05):
                job.attempt.on_readable(fd, time.monotonic())
        if job.attempt.done is None:
            job.attempt.stop("its spec phase failed in the warm worker", job.prepare_failure.hint or "",
                             time.monotonic(), 0.0)

    def _watch(self, job: Job, runner: Runner) -> None:
        job.runner = runner
        oom_before = watch.oom_kills()
        proc = runner.proc
        self.busy[proc.pid] = job
        if job.spec is None:  # leased, and its spec phase failed here: the runner only reports that
            from executor.spec import RuntimeSpec

            job.spec = RuntimeSpec()
        spec = job.spec
        # The attempt is over with its report: a child's exit is reaped later, off the invocation's path.
        job.attempt = watch.AttemptWatch(proc, timeout=spec.timeout_seconds, grace=spec.grace_seconds,
                                         task_name=job.task_name, diagnostics=job.diagnostics,
                                         oom_before=oom_before, finish_on_report=True)
        if job.stop_reason is not None:
            message, hint, grace = job.stop_reason
            job.attempt.stop(message, hint, time.monotonic(), grace)
        job.pid = proc.pid

    def _stop(self, job: Job, message: str, hint: str | None, grace: float | None) -> None:
        """Stop the invocation: PREEMPTED with `message` and `hint` (None: the one-shot path's hint
        for a preemption, which says whether the task is interruptible)."""
        if hint is None:
            from executor import supervisor

            hint = supervisor.preempted_hint(job.spec)
        logs._context = {"invocation": job.id}
        try:
            job.stop_reason = (message, hint, grace)
            if job.attempt is not None:
                if not job.attempt.proc.exited:
                    logs.warning("asked to stop: sending SIGTERM to the task", reason=message,
                                 grace_s=job.spec.grace_seconds if grace is None else grace)
                job.attempt.stop(message, hint, time.monotonic(), grace)
            elif job in self.awaiting or job.id in self.awaiting_runner or job.id in self.awaiting_reclaim:
                # waiting for a process: it never starts
                if job in self.awaiting:
                    self.awaiting.remove(job)
                elif job.id in self.awaiting_runner:
                    self.awaiting_runner.remove(job.id)
                else:  # the lease still comes back (or not): the next waiting job, or the next lease, gets it
                    self.awaiting_reclaim.remove(job.id)
                failure = TaskFailure("PREEMPTED", f"{message} before it started", hint=hint)
                failure.phase = "queue"
                self._finish(job, execute.Attempt("failure", job.task_name, failure))
            elif job.retry_at is not None:  # waiting to retry: stop here
                job.retry_at = None
                failure = TaskFailure("PREEMPTED", f"{message} while waiting to retry "
                                      f"(attempt {job.attempt_no} failed with {job.last_failure.code})", hint=hint)
                failure.phase = job.last_failure.phase
                self._finish(job, execute.Attempt("failure", job.task_name, failure))
        finally:
            logs._context = {}

    def _tick(self, job: Job, now: float) -> None:
        logs._context = {"invocation": job.id}
        try:
            if job.attempt is not None:
                job.attempt.tick(now)
                if job.attempt.finished(now):
                    self._attempt_done(job, now)
            elif job.retry_at is not None and now >= job.retry_at:
                job.retry_at = None
                self._launch(job)
        finally:
            logs._context = {}

    def _attempt_done(self, job: Job, now: float) -> None:
        attempt = job.attempt
        if attempt.proc.relay:  # relayed (and redacted) while this invocation's secrets are still known
            attempt.proc.relay.drain()
        outcome = attempt.outcome(now)
        job.attempt = None
        self.busy.pop(attempt.proc.pid, None)
        runner, job.runner = job.runner, None
        runner.served += 1
        runner.rss = int((attempt.done or {}).get("rss", 0))
        if runner.one_shot:
            runner.retire()
        elif not runner.proc.exited and (
                (self.max_runner_invocations and runner.served >= self.max_runner_invocations)
                or (self.max_runner_rss and runner.rss > self.max_runner_rss)):
            logs.info("recycling an in-process runner", pid=runner.proc.pid, served=runner.served,
                      rss_mib=round(runner.rss / 2**20, 1))
            runner.retire()
        job.diagnostics.peak_rss_bytes = max(job.diagnostics.peak_rss_bytes, outcome.peak_rss_bytes)
        job.task_name = outcome.attempt.task_name
        if job.prepare_failure is not None and outcome.attempt.failure is not None:
            # Leased, and the spec phase failed here as in the runner: ours is the one reported (no retry).
            return self._finish(job, execute.Attempt("failure", job.task_name, job.prepare_failure))
        from executor import supervisor

        if outcome.timed_out or outcome.stopped:
            with isolation.environment(job.env, job.view.tmpdir):
                supervisor.save_local_checkpoint(job.invocation, job.checkpoint_local)
        failure = outcome.attempt.failure
        if supervisor.should_retry(failure, job.attempt_no, job.spec, job.stop_reason is not None):
            delay = supervisor.retry_delay(job.attempt_no, job.env)
            supervisor.log_retry(failure, job.attempt_no, job.spec, delay)
            if job.invocation.checkpoint_path:
                with isolation.environment(job.env, job.view.tmpdir):
                    if supervisor.has_objects(job.invocation.checkpoint_path):
                        job.prev_checkpoint = job.invocation.checkpoint_path
            job.last_failure = failure
            job.attempt_no += 1
            job.retry_at = now + delay
            return
        self._finish(job, outcome.attempt)

    def _finish(self, job: Job, attempt: execute.Attempt) -> None:
        if attempt.failure is not None:
            with isolation.environment(job.env, job.view.tmpdir):
                result = execute.report(job.invocation, attempt, job.diagnostics)
        else:
            result = execute.report(job.invocation, attempt, job.diagnostics)
        # Its runner, idle now, is lent before the report goes: a server holding an invocation back for
        # that runner's lease (Server._dispatch) knows, once it has the report, that no lease follows.
        self._lease_idle_runners()
        self._send({
            "event": "done", "id": job.id, "token": job.token, "rss": isolation.current_rss(), "pid": job.pid,
            "result": runner_module.result_json(result, attempt, job.attempt_no + 1, job.diagnostics.phases_ms,
                                                job.diagnostics.peak_rss_bytes),
        })
        # The rest is off the caller's path: the answer went out first.
        execute.log_summary(result, attempt, job.diagnostics)
        self._remove_redactions(job.view.redactions)
        _remove_tree(job.root)
        del self.jobs[job.id]

    # --- directories ------------------------------------------------------------------------------

    def _make_root(self, root: str) -> None:
        """An invocation's fresh root with its empty work, tmp and checkpoint directories: one made
        ahead of need, renamed (one rename instead of four mkdirs on the invocation's path)."""
        while self._spare_roots:
            spare = self._spare_roots.pop()
            try:
                os.rename(spare, root)
                return
            except FileNotFoundError:
                continue  # removed from under us: the next, or a new one
            except OSError:
                shutil.rmtree(spare, ignore_errors=True)
                raise
        _make_dirs(root)

    def _refill_roots(self) -> None:
        if self.exiting or len(self._spare_roots) >= 2:
            return
        spare = os.path.join(self.work_dir, f".spare-{os.getpid()}-{next(self._numbers)}")
        try:
            _make_dirs(spare)
        except OSError:
            return
        self._spare_roots.append(spare)

    # --- runners ----------------------------------------------------------------------------------

    def _take_spare(self) -> Runner | None:
        while self.spares:
            runner = self.spares.pop()
            if not runner.proc.exited:
                return runner
        return None

    def _refill_spares(self) -> None:
        """Keep isolated children forked ahead of need, two more than run now: the fork, its set-up and a
        rehearsal of the attempt's code leave the invocation's path. The zygote forks them.

        While attempts run and a spare is still in hand, the refill waits for them: a fork and a
        rehearsal would take the CPU from the attempts (on a small machine, from the very invocation
        a caller waits for), and the spare in hand serves the next invocation meanwhile."""
        self.spares = [r for r in self.spares if not r.proc.exited]
        if not self.warm or self.template is None or (self.exiting and not self.awaiting):
            return
        if self.zygote is None:
            self.zygote = Zygote(close=self._own_fds(), forget=lambda: self._forget_everything_but(None))
        running = sum(1 for job in self.busy.values() if job.runner is not None and job.runner.one_shot)
        if running and self.spares and not self.awaiting:
            return
        want = (0 if self.exiting else min(MAX_SPARES, 2 + running)) + len(self.awaiting)
        missing = want - len(self.spares) - self.zygote.pending
        if missing > 0:
            # A spare someone already waits for skips the rehearsal: it would only make them wait longer.
            template = None if self.awaiting else runner_module.rehearsal_copy(self.template)
            for _ in range(missing):
                self.zygote.request_spare(template, self.work_dir)

    def _fork_runner(self, one_shot: bool, relay: bool, rehearse=None) -> Runner:
        results_fd = -1 if one_shot else self.results_fd
        runner = runner_module.fork(one_shot=one_shot, relay=relay,
                                    close=[fd for fd in self._own_fds() if fd != results_fd],
                                    forget=lambda: self._forget_everything_but(None),
                                    rehearse=rehearse, scratch_dir=self.work_dir, results_fd=results_fd,
                                    bundle_root=self.bundle_root, spin=0.0 if one_shot else self.runner_spin)
        self.procs[runner.proc.pid] = runner.proc
        self.runners[runner.proc.pid] = runner
        return runner

    # --- bookkeeping -------------------------------------------------------------------------------

    def _own_fds(self) -> list[int]:
        """Descriptors of this fork server that no task may hold (a task holding the channel would
        keep the server from noticing this process is gone)."""
        fds = [self.channel.fileno(), self.wake_r, self.wake_w, self.results_fd] + isolation.own_fds()
        for proc in self.procs.values():
            fds += [proc.report_r, proc.journal_r, proc.dump_r] + (proc.relay.fds() if proc.relay else [])
        fds += [runner.job_w for runner in self.runners.values()]
        if self.zygote is not None:
            fds.append(self.zygote.fileno())
        return [fd for fd in set(fds) if fd >= 0]

    def _forget_everything_but(self, job: Job | None) -> None:
        """In a new child: drop every reference to other invocations (their env, their secrets). The
        fork server's stack, which the child inherits, holds none either (see serve)."""
        self.jobs = {job.id: job} if job is not None else {}
        self.procs = {}
        self.busy = {}
        self.runners = {}
        self.spares = []
        self.awaiting = []
        self.awaiting_runner = []
        self.awaiting_reclaim = []
        self.leased = {}
        self.template = None
        self._inbox = collections.deque()
        self._to_tick = collections.deque()
        self._redaction_refs = {}
        self.channel.discard_buffers()

    def _add_redactions(self, values: list[str]) -> None:
        for value in values:
            self._redaction_refs[value] = self._redaction_refs.get(value, 0) + 1
            logs.add_redaction(value)

    def _remove_redactions(self, values: list[str]) -> None:
        for value in values:
            left = self._redaction_refs.get(value, 0) - 1
            if left <= 0:
                self._redaction_refs.pop(value, None)
                logs.remove_redaction(value)
            else:
                self._redaction_refs[value] = left


def _preload(invocation) -> None:
    """Import once, in the pool, everything an attempt of this task imports: the executor's runtime,
    the task module, its SDK. Only module-level code runs; the task itself never does here."""
    import importlib

    from executor import loader
    from executor.protocol import for_invocation

    for_invocation(invocation)
    importlib.import_module("executor.protocol.offload")
    runnable = loader.load(invocation)
    if "flytekit" in sys.modules:
        importlib.import_module("flytekit.bin.entrypoint")  # what a flytekit task's session imports
    if hasattr(runnable, "output_literal_types"):
        runnable.output_literal_types()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _make_dirs(root: str) -> None:
    os.mkdir(root)
    for sub in ("work", "tmp", "checkpoint"):  # the View's cwd and TMPDIR, Job.checkpoint_local
        os.mkdir(os.path.join(root, sub))


def _remove_tree(root: str) -> None:
    """An invocation's directories: usually empty, so three rmdirs; else the whole tree."""
    try:
        for sub in ("work", "tmp", "checkpoint", ""):
            os.rmdir(os.path.join(root, sub) if sub else root)
    except OSError:
        shutil.rmtree(root, ignore_errors=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    channel = Channel.from_fd(int(argv[0]))
    results_fd = int(argv[1]) if len(argv) > 1 else -1
    config = channel.recv()
    sys.path[:] = config["sys_path"]
    from executor import loader

    loader._put_cwd_on_path()  # as the one-shot path: the working directory is importable
    from executor import storage

    storage.forks_children()  # its children use storage too: keep obstore's runtime out of here
    os.makedirs(config["work_dir"], exist_ok=True)
    server = ForkServer(channel, config, results_fd)
    server.serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

