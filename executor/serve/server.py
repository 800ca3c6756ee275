"""The server's core: admission, dispatch to warm pools, results, cancel and drain. No sockets here;
api.py speaks HTTP and JSON lines to it, arbiter.py drives it from signals.

Admission: up to --concurrency invocations run at once; up to --backlog more wait, in order; beyond
that a POST is refused as busy (HTTP 429). While draining every POST is refused (HTTP 503).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import sys
import threading
import time

from executor import logs
from executor.serve.metrics import Metrics
from executor.serve.pool import Pools, Worker, pool_key
from executor.serve.registry import DONE, QUEUED, RUNNING, Record, Registry, fingerprint

SERVING, CLOSING, DRAINING = "serving", "closing", "draining"  # closing: no new work, the queue still runs

CANCELLED = ("PREEMPTED", "cancelled by the caller (DELETE /invocations/{id})",
             "the invocation was cancelled through the executor's API; nothing to fix")
SHUTDOWN = ("PREEMPTED", "the warm server was asked to stop ({signal})", None)  # hint: the one-shot path's
WORKER_DIED = ("SYSTEM", "the warm worker running this invocation died (exit code {code})",
               "a bug or a kill from outside; the backend retries this attempt")


def worker_death(worker: Worker, code: int) -> tuple:
    """What the invocations a dead worker held are told. Killed while it imported the task module:
    the module's fault, as the one-shot path would say (a user error of phase load)."""
    what, message, hint = WORKER_DIED
    message = message.format(code=code)
    if worker.loading is None or worker.warm:
        return what, message, hint
    import signal

    from executor.watch import CRASH_HINT, CRASH_SIGNALS  # judged as a task process's death is

    if code >= 0:
        return ("USER", f"the warm worker exited with code {code} while it imported {worker.loading} (os._exit?)",
                "a module must not end the process when it is imported", "load")
    if -code in CRASH_SIGNALS:
        return ("USER", f"the task process crashed with {signal.Signals(-code).name} while it imported {worker.loading}",
                CRASH_HINT, "load")
    return what, f"{message} while it imported {worker.loading}", hint


class RequestError(Exception):
    """An unusable request: HTTP 400, nothing runs, nothing is written."""


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int  # the HTTP status it maps to
    body: dict
    record: Record | None = None


class Server:
    def __init__(self, settings):
        self.settings = settings
        self.lock = threading.RLock()
        self.registry = Registry(settings.history)
        self.metrics = Metrics()
        self.work_dir = settings.work_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"executor-serve-{os.getpid()}")
        config = {
            "sys_path": list(sys.path),
            "work_dir": self.work_dir,
            "max_invocations_per_worker": settings.max_invocations_per_worker,
            "max_worker_rss": settings.max_worker_rss_mib * 2**20,
            "runner_spin": settings.runner_spin_us / 1e6,
        }
        self.pools = Pools(settings, config, self._on_worker_message, self._on_worker_exit)
        self.queue: collections.deque[Record] = collections.deque()
        self.running = 0
        self.state = SERVING
        self.stop_signal = "SIGTERM"
        self.listeners: list = []  # called with each finished Record (the JSON-lines front-end)
        self.last_activity = time.monotonic()
        self.base_env = settings.passed_env(os.environ)
        self.changed = threading.Condition(self.lock)  # notified when anything finishes

    # --- the API -----------------------------------------------------------------------------------

    def submit(self, body: dict) -> Answer:
        invocation_id, argv, env, isolation = _validate(body, self.settings.isolation)
        digest = fingerprint(argv, env, body.get("isolation"))
        invocation = _parse_argv(argv, {**self.base_env, **env})
        with self.lock:
            existing = self.registry.get(invocation_id)
            if existing is not None:
                if existing.fingerprint != digest:
                    return Answer(409, {"error": "conflict", "reason": f"invocation {invocation_id!r} exists with a different body"}, existing)
                return Answer(200 if existing.state == DONE else 202, existing.to_json(), existing)
            if self.state != SERVING:
                self.metrics.count("rejected", "draining")
                return Answer(503, {"error": "draining", "reason": f"the server is shutting down ({self.stop_signal}); send it elsewhere"})
            if self.running >= self.settings.slots and len(self.queue) >= self.settings.backlog:
                self.metrics.count("rejected", "busy")
                return Answer(429, {"error": "busy", "reason": f"{self.running} running and {len(self.queue)} queued "
                                    f"(--concurrency {self.settings.slots}, --backlog {self.settings.backlog}); retry later"})
            record = Record(invocation_id, digest, invocation, {**self.base_env, **env}, isolation, pool_key(invocation))
            self.registry.add(record)
            self.last_activity = time.monotonic()
            if self.running < self.settings.slots and not self.queue:
                self._dispatch(record)
            else:
                self.queue.append(record)
            return Answer(202, record.to_json(), record)

    def get(self, invocation_id: str) -> Answer:
        with self.lock:
            record = self.registry.get(invocation_id)
            if record is None:
                return Answer(404, {"error": "not found", "reason": f"no invocation {invocation_id!r} (or it is older than --history)"})
            return Answer(200, record.to_json(), record)

    def cancel(self, invocation_id: str) -> Answer:
        with self.lock:
            record = self.registry.get(invocation_id)
            if record is None:
                return Answer(404, {"error": "not found", "reason": f"no invocation {invocation_id!r}"})
            if record.state == DONE:
                return Answer(409, {"error": "finished", "reason": "the invocation has already finished", **record.to_json()}, record)
            if not record.cancel_requested:
                record.cancel_requested = True
                self.metrics.cancels += 1
                code, message, hint = CANCELLED
                message = message.format(id=invocation_id)
                if record.state == QUEUED:
                    self.queue.remove(record)
                    self._dispatch(record, failure=(code, message + " before it started", hint))
                else:
                    worker = self._worker_of(record)
                    held = worker.unhold(record) if worker is not None else None
                    if held is not None:  # the fork server has not heard of it: it only reports this
                        worker.post({**held, "failure": (code, message + " before it started", hint)})
                    elif worker is not None:
                        worker.post({"op": "cancel", "id": record.id, "message": message, "hint": hint})
            return Answer(202, record.to_json(), record)

    def wait(self, record: Record, seconds: float, on_done=None) -> Answer:
        """The record once it is done, or as it is after `seconds`. `on_done(answer)`, if given, is
        called by the thread that learns of the end, before this returns: a caller can answer from there
        without waiting for its own thread to wake."""
        callback = None
        if on_done is not None:
            with self.lock:
                if record.state != DONE:
                    callback = lambda r: on_done(Answer(200, r.to_json(), r))  # noqa: E731
                    record.on_done.append(callback)
        if seconds > 0:
            record.done_event.wait(min(seconds, 3600.0))
        with self.lock:
            if callback is not None and record.state != DONE:
                record.on_done.remove(callback)  # a caller polling with short waits leaves nothing behind
            return Answer(200 if record.state == DONE else 202, record.to_json(), record)

    @property
    def ready(self) -> bool:
        return self.state == SERVING

    def idle(self) -> bool:
        with self.lock:
            return self.running == 0 and not self.queue

    # --- dispatch ------------------------------------------------------------------------------------

    def _dispatch(self, record: Record, failure: tuple | None = None) -> None:
        """Send to the record's pool (under the lock). With a failure: only its error.pb is written."""
        worker, hit = self.pools.worker_for(record.pool)
        if failure is None:
            self.metrics.count("pool_requests", "hit" if hit else "miss")
        record.state = RUNNING
        record.started = time.monotonic()
        record.worker = worker
        worker.in_flight.add(record.id)
        worker.served += 1
        self.running += 1
        record.token = os.urandom(8).hex()  # what a runner's direct result must carry to be believed
        message = {"op": "run", "id": record.id, "invocation": record.invocation, "env": record.env,
                   "isolation": record.isolation, "failure": failure, "token": record.token}
        if failure is not None or record.isolation != "inprocess":
            worker.post(message)
        elif not worker.hold(record, message):
            self._send_inprocess(worker, record, message)

    def _send_inprocess(self, worker: Worker, record: Record, message: dict) -> None:
        """Straight to a runner lent to us if there is one (the fork server is told), else through the fork server."""
        lease = _send_to_leased_runner(worker, record) if worker.leases else None
        if lease is not None:
            message["lease"] = {"pid": lease["pid"], "root": lease["root"]}  # the fork server watches it
        self.metrics.count("inprocess_dispatch", "leased" if lease is not None else "worker")
        worker.post(message)

    def _send_held(self, worker: Worker) -> None:
        """Held invocations, each once a lease came for it or once no lease is expected for it any more."""
        while worker.held and (worker.leases or len(worker.held) > len(worker.lease_expected)):
            record, message = worker.held.popleft()
            self._send_inprocess(worker, record, message)

    def _fill_slots(self) -> None:
        while self.queue and self.running < self.settings.slots and self.state != DRAINING:
            self._dispatch(self.queue.popleft())

    def _worker_of(self, record: Record) -> Worker | None:
        return record.worker

    def _on_worker_message(self, worker: Worker, message: dict) -> None:
        event = message["event"]
        finished = None
        with self.lock:
            if event == "result":  # an in-process runner's success, ahead of its fork server's report
                record = self.registry.get(message.get("id"))
                if _believable(message, record, worker):
                    worker.in_flight.discard(record.id)
                    worker.lease_expected.add((record.id, record.token))
                    record.worker_pid = message.get("pid")
                    finished = self._finish(record, message["result"])
                    self._fill_slots()
            elif event == "done":
                worker.lease_expected.discard((message["id"], message.get("token", "")))
                record = self.registry.get(message["id"])
                if record is not None and message.get("token", record.token) != record.token:
                    record = None  # a report of an earlier invocation with this id (since forgotten)
                else:
                    worker.in_flight.discard(message["id"])
                worker.rss = message.get("rss", worker.rss)
                if record is not None and record.state != DONE:
                    record.worker_pid = message.get("pid")
                    finished = self._finish(record, message["result"])
                self.pools.after_done(worker)
                self._send_held(worker)
                self._fill_slots()
            elif event == "reclaim":  # its usual path needs a runner back: an unused lease, if we have one
                lease = worker.take_lease()
                if lease is not None:
                    os.close(lease["fd"])
                worker.post({"op": "released", "pid": lease and lease["pid"]})
            elif event == "revoke":  # a leased runner died: its lease, if still unused, is void
                for lease in [lease for lease in worker.leases if lease["pid"] == message["pid"]]:
                    worker.leases.remove(lease)
                    os.close(lease["fd"])
                worker.post({"op": "revoked", "pid": message["pid"]})
            elif event == "lease":
                if message["fd"] < 0:  # its descriptor did not reach us: the fork server stops lending
                    worker.post({"op": "returned", "pid": message["pid"]})
                elif worker.retiring:
                    os.close(message["fd"])
                else:
                    worker.leases.append({"pid": message["pid"], "root": message["root"], "fd": message["fd"],
                                          "capacity": message.get("capacity", 0)})
                    self._send_held(worker)
            elif event == "loading":
                worker.loading = message["module"]
            elif event == "warm":
                worker.warm = True
                worker.rss = message.get("rss", worker.rss)
                if message.get("bundle_cache"):
                    self.metrics.count("bundle_cache", message["bundle_cache"])
                logs.info("warm worker ready", pool=worker.key, pid=worker.pid, warm_ms=round(message["warm_ms"], 1),
                          bundle_cache=message.get("bundle_cache") or "-")
        if finished is not None:
            self._announce(finished)

    def _finish(self, record: Record, result: dict) -> Record:
        self.registry.finish(record, result)
        record.worker = None
        self.running -= 1
        self.last_activity = time.monotonic()
        error = result.get("error") or {}
        self.metrics.finished(result["outcome"], error.get("code"), record.isolation, record.latency_s)
        return record

    def _announce(self, record: Record) -> None:
        for callback in record.on_done:  # first: a caller waiting on an HTTP connection is answered now
            try:
                callback(record)
            except Exception as e:  # the caller's thread still answers when it wakes
                logs.warning("answering a waiting caller failed", id=record.id, reason=f"{type(e).__name__}: {e}")
        record.on_done.clear()
        record.done_event.set()
        for listener in list(self.listeners):
            listener(record)
        with self.lock:
            self.changed.notify_all()

    def _on_worker_exit(self, worker: Worker, code: int) -> None:
        """A worker's channel closed. Whatever it still ran is reported by a fresh worker of its pool."""
        with self.lock:
            self.pools.forget(worker)
            lost = [self.registry.get(i) for i in worker.in_flight]
            worker.in_flight.clear()
            lost = [r for r in lost if r is not None and r.state != DONE]
            if worker.retiring and not lost:
                logs.info("warm worker exited", pool=worker.key, pid=worker.pid, code=code)
            else:
                logs.error("a warm worker exited unexpectedly", pool=worker.key, pid=worker.pid, code=code,
                           invocations=len(lost))
            failure = worker_death(worker, code)
            for record in lost:
                self.running -= 1
                self._dispatch(record, failure=failure)
            self.changed.notify_all()

    # --- shutdown ------------------------------------------------------------------------------------

    def close_intake(self) -> None:
        """Refuse new work; what is queued still runs (end of input in JSON-lines mode)."""
        with self.lock:
            if self.state == SERVING:
                self.state = CLOSING

    def close_if_idle_since(self, seconds: float) -> bool:
        """Refuse new work if nothing ran or arrived for `seconds`: checked and closed under the lock
        that submit takes, so no invocation can slip in between (the idle TTL's exit)."""
        with self.lock:
            if self.state != SERVING or self.running or self.queue:
                return False
            if time.monotonic() - self.last_activity < seconds:
                return False
            self.state = CLOSING
            return True

    def drain(self, signal_name: str) -> None:
        """Refuse new work; what is queued is reported PREEMPTED at once; what runs may finish."""
        with self.lock:
            self.stop_signal = signal_name
            self.state = DRAINING
            code, message, hint = SHUTDOWN
            while self.queue:
                self._dispatch(self.queue.popleft(), failure=(code, message.format(signal=signal_name) + " before it started", hint))

    def stop_running(self, grace: float) -> None:
        """Stop whatever still runs: SIGTERM, SIGKILL after `grace`, PREEMPTED with its error.pb."""
        with self.lock:
            code, message, hint = SHUTDOWN
            for worker in self.pools.all():
                while worker.held:  # not started: reported as such, ahead of the stop
                    _, held = worker.held.popleft()
                    worker.post({**held, "failure": (code, message.format(signal=self.stop_signal) + " before it started", hint)})
                if worker.in_flight:
                    worker.post({"op": "stop_all", "message": message.format(signal=self.stop_signal), "hint": hint,
                                 "grace": grace})

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.running or self.queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 0.5))
            return True

    def close(self, timeout: float = 10.0) -> None:
        """Every worker exits (after what it still runs); the work directory goes."""
        with self.lock:
            workers = self.pools.all()
            for worker in workers:
                worker.retiring = True
                worker.post({"op": "exit"})
        deadline = time.monotonic() + timeout
        for worker in workers:
            try:
                worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                worker.kill()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # --- observation ---------------------------------------------------------------------------------

    def metrics_text(self) -> str:
        with self.lock:
            workers = self.pools.all()
            gauges = {
                "in_flight": ("Invocations running now.", self.running),
                "queued": ("Invocations accepted and waiting for a slot.", len(self.queue)),
                "concurrency": ("Invocations that may run at once (--concurrency).", self.settings.slots),
                "pools": ("Warm pools (one per bundle digest and task module).", len(self.pools.current)),
                "workers": ("Warm worker processes, retiring ones included.", len(workers)),
                "leased_runners": ("Idle in-process runners lent to the server: the next in-process invocations "
                                   "go straight to them.", sum(len(w.leases) for w in workers)),
                "ready": ("1 while new invocations are accepted.", 1 if self.ready else 0),
            }
            recycled = dict(self.pools.recycled)
            pids = [w.pid for w in workers]
        gauges["workers_resident_bytes"] = ("Resident memory of the warm workers and everything they run.", _tree_rss(pids))
        gauges["process_resident_memory_bytes"] = ("Resident memory of the server process.", _tree_rss([os.getpid()], children=False))
        return self.metrics.render(gauges, recycled)

    def memory(self) -> dict:
        """Resident bytes of the server and of each worker tree (for tests and benchmarks)."""
        with self.lock:
            pids = [w.pid for w in self.pools.all()]
        return {"server": _tree_rss([os.getpid()], children=False), "workers": _tree_rss(pids)}


MAX_LEASED_FRAME = 48 << 10


def _send_to_leased_runner(worker: Worker, record: Record) -> dict | None:
    """The invocation straight into the job pipe of an idle runner the worker lent us, as the fork
    server would send it but unprepared (the runner prepares it itself). The lease used, or None:
    it could not go (too large, or the runner died), and the fork server's usual path runs it."""
    from executor.serve.channel import frame, write_frame

    lease = worker.leases[-1]  # its pipe is empty: a frame within its capacity is written at once, never blocking the lock
    data = frame({"id": record.id, "root": lease["root"], "env": record.env, "invocation": record.invocation,
                  "attempt_no": 0, "prev_checkpoint": record.invocation.prev_checkpoint,
                  "direct": {"id": record.id, "token": record.token, "attempts": 1, "phases_ms": {}, "peak_rss": 0}})
    if len(data) > min(MAX_LEASED_FRAME, lease["capacity"]) or worker.take_lease() is not lease:
        return None
    try:
        write_frame(lease["fd"], data)
        return lease
    except OSError:  # it died: the fork server reaps it and forgets the lease
        return None
    finally:
        os.close(lease["fd"])


def _believable(message: dict, record: Record | None, worker: Worker) -> bool:
    """A runner's direct result: for an invocation this worker runs now, with its token, a success."""
    result = message.get("result")
    return (record is not None and record.state != DONE and record.worker is worker
            and message.get("token") == record.token and isinstance(result, dict)
            and result.get("outcome") == "success" and result.get("error") is None)


def _tree_rss(pids: list[int], children: bool = True) -> int:
    import psutil

    total = 0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs = [proc] + (proc.children(recursive=True) if children else [])
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
    return total


def _validate(body, default_isolation: str) -> tuple[str, list[str], dict, str]:
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    invocation_id = body.get("id")
    if not isinstance(invocation_id, str) or not invocation_id or len(invocation_id) > 256 or "/" in invocation_id:
        raise RequestError('"id" must be a non-empty string of at most 256 characters, without "/"')
    argv = body.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise RequestError('"argv" must be a non-empty list of strings (the one-shot argv, e.g. ["pyflyte-execute", ...])')
    env = body.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise RequestError('"env" must be an object of strings')
    isolation = body.get("isolation") or default_isolation
    if isolation not in ("fork", "inprocess"):
        raise RequestError('"isolation" must be "fork" or "inprocess"')
    unknown = set(body) - {"id", "argv", "env", "isolation"}
    if unknown:
        raise RequestError(f"unknown fields: {', '.join(sorted(unknown))}")
    return invocation_id, argv, env, isolation


def _parse_argv(argv: list[str], env: dict):
    """The one-shot front-ends, as the pod would run them; a0 reads its env fallbacks from the invocation's env."""
    from executor import cli

    if argv[0] in ("executor", "python -m executor"):
        argv = argv[1:]
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    try:
        if command == "pyflyte-fast-execute":
            return cli.parse_fast_execute(rest)
        if command in ("pyflyte-execute", "pyflyte-map-execute"):
            return cli.parse_flyte1(command, rest)
        if command == "a0" and hasattr(cli, "parse_a0"):
            return cli.parse_a0(rest, env)
    except cli.UsageError as e:
        raise RequestError(str(e)) from None
    raise RequestError(f"argv[0] must be pyflyte-fast-execute, pyflyte-execute, pyflyte-map-execute or a0, got {command!r}")
