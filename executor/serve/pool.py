"""Warm pools, one per (bundle digest, task module): each is a fork server process, seen from the server.

Workers are replaced rather than repaired (as gunicorn's): one that has taken
--max-invocations-per-worker invocations, or whose memory is above --max-worker-rss-mib, is retired
(it takes no new work and exits once its last invocation is done) and the pool's next invocation
starts a fresh one. At most --max-pools pools stay warm; the least recently used idle one is retired
first; a busy one never is, nor the one used last (while every older pool is busy, the limit waits).
"""
from __future__ import annotations

import collections
import os
import select
import subprocess
import sys
import threading

from executor import logs
from executor.serve.channel import Closed, pair, receive_results, results_pair


_keys: dict = {}  # pool keys of recent invocations' (bundle, pickle, resolver, arguments): one per pool, mostly


def pool_key(invocation) -> str:
    """`<bundle digest or "image">:<task module or resolver>`."""
    bundle = invocation.bundle
    pickled = getattr(getattr(invocation, "flyte2", None), "pkl_uri", None)
    cache_key = (bundle, pickled, invocation.resolver, tuple(invocation.resolver_args))
    key = _keys.get(cache_key)
    if key is None:
        if len(_keys) >= 1024:
            _keys.clear()
        key = _keys[cache_key] = _pool_key(invocation, bundle, pickled)
    return key


def _pool_key(invocation, bundle, pickled) -> str:
    from executor.serve.forkserver import task_module

    if pickled:  # a0 --pkl: the task is the pickle (loaded by each invocation)
        return f"pkl:{_short_hash(pickled)}"
    if bundle is None:
        digest = "image"
    else:
        from executor.bundle.digest import digest_from_name

        digest = digest_from_name(bundle.uri) or bundle.archive_md5 or _short_hash(bundle.uri)
    return f"{digest}:{task_module(invocation) or invocation.resolver}"


def _short_hash(text: str) -> str:
    import hashlib

    return "uri-" + hashlib.sha256(text.encode()).hexdigest()[:16]


class Worker:
    """A fork server process and the channel to it; a reader thread hands its messages to on_message."""

    _numbers = iter(range(1, 1 << 62))

    def __init__(self, key: str, config: dict, on_message, on_exit):
        self.key = key
        self.number = next(self._numbers)
        self.in_flight: set[str] = set()
        self.served = 0
        self.rss = 0
        self.warm = False
        self.loading: str | None = None  # the task module it is importing before it is warm
        self.retiring = False
        self.leases: list[dict] = []  # idle in-process runners lent to us: {"pid", "root", "fd", "capacity"} (runner.py)
        # (id, token) of invocations whose runner told us of its success and whose report from the fork
        # server has not come yet: that runner is idle, and its lease (if it is lent again) comes before
        # that report. The token tells a re-POST of a forgotten id from the invocation that report is about.
        self.lease_expected: set[tuple[str, str]] = set()
        self.held: collections.deque = collections.deque()  # (record, message): in-process ones waiting for such a lease
        self.channel, fd = pair()
        self.results, results_fd = results_pair()  # in-process runners' successes, straight to us
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "executor.serve.forkserver", str(fd), str(results_fd)],
                pass_fds=(fd, results_fd), stdin=subprocess.DEVNULL, start_new_session=True,  # stdout/stderr: the server's
            )
        finally:
            os.close(fd)
            os.close(results_fd)
        self.channel.send({**config, "work_dir": os.path.join(config["work_dir"], f"pool-{self.number}")})
        self._on_message = on_message
        self._on_exit = on_exit
        self._reader = threading.Thread(target=self._read, name=f"worker-{self.number}", daemon=True)
        self._reader.start()
        logs.info("warm worker started", pool=key, pid=self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def post(self, message: dict) -> None:
        try:
            self.channel.send(message)
        except Closed:
            pass  # its reader reports the exit

    def _read(self) -> None:
        try:
            while True:
                try:
                    readable, _, _ = select.select([self.channel.sock, self.results], [], [])
                    if self.results in readable:  # a runner's result first: the fork server's report may follow
                        self._deliver({**m, "event": "result"} for m in receive_results(self.results))
                    if self.channel.sock in readable:
                        self._deliver(self.channel.pump())
                except Closed:
                    break
                except (OSError, ValueError):
                    break
        finally:
            self.results.close()
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
            self.channel.close()
            self._on_exit(self, code)

    def _deliver(self, messages) -> None:
        for message in messages:
            try:
                self._on_message(self, message)
            except Exception as e:  # a bug, or a malformed message: never the end of this reader
                logs.error("a warm worker's message could not be handled", pool=self.key, pid=self.pid,
                           event=str(message.get("event")), reason=f"{type(e).__name__}: {e}")

    def hold(self, record, message: dict) -> bool:
        """Hold an in-process invocation back for a lease on its way (True), rather than send it through
        the fork server, whose runners are all lent or busy: it would have to ask for one back."""
        if self.leases or self.retiring or len(self.held) >= len(self.lease_expected):
            return False
        self.held.append((record, message))
        return True

    def unhold(self, record) -> dict | None:
        """Its message, if that invocation is held back (no longer)."""
        for entry in self.held:
            if entry[0] is record:
                self.held.remove(entry)
                return entry[1]
        return None

    def take_lease(self) -> dict | None:
        """An idle runner to send one in-process invocation to, if one was lent (under the server's lock)."""
        return self.leases.pop() if self.leases and not self.retiring else None

    def close_leases(self) -> None:
        while self.leases:
            try:
                os.close(self.leases.pop()["fd"])
            except OSError:
                pass

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except (ProcessLookupError, PermissionError):
            pass


class Pools:
    """Not thread-safe by itself: the server calls it under its lock."""

    def __init__(self, settings, config: dict, on_message, on_exit):
        self.settings = settings
        self.config = config
        self.on_message = on_message
        self.on_exit = on_exit
        self.current: collections.OrderedDict[str, Worker] = collections.OrderedDict()  # LRU first
        self.retiring: set[Worker] = set()
        self.recycled: collections.Counter = collections.Counter()

    def worker_for(self, key: str) -> tuple[Worker, bool]:
        """The pool's worker (True: it was already there, warm or warming) or a new one (False)."""
        worker = self.current.get(key)
        if worker is not None:
            self.current.move_to_end(key)
            return worker, True
        worker = Worker(key, self.config, self.on_message, self.on_exit)
        self.current[key] = worker
        self._evict()
        return worker, False

    def after_done(self, worker: Worker) -> None:
        """An invocation of this worker finished: recycle it if it is due."""
        limit_rss = self.settings.max_worker_rss_mib * 2**20
        reason = None
        if self.settings.max_invocations_per_worker and worker.served >= self.settings.max_invocations_per_worker:
            reason = "max_invocations"
        elif limit_rss and worker.rss > limit_rss:
            reason = "rss"
        if reason and not worker.retiring:
            logs.info("recycling a warm worker", pool=worker.key, pid=worker.pid, reason=reason, served=worker.served,
                      rss_mib=round(worker.rss / 2**20, 1))
            self.recycled[reason] += 1
            self._retire(worker)
        elif worker.retiring and not worker.in_flight:
            worker.post({"op": "exit"})
        self._evict()

    def _retire(self, worker: Worker) -> None:
        worker.retiring = True
        worker.close_leases()
        if self.current.get(worker.key) is worker:
            del self.current[worker.key]
        self.retiring.add(worker)
        if not worker.in_flight:
            worker.post({"op": "exit"})

    def _evict(self) -> None:
        while len(self.current) > self.settings.max_pools:
            # Never the pool used last: it is about to get (or just ran) an invocation, and retiring it
            # while an older pool is busy would make each of its invocations start a fresh worker.
            *older, _ = self.current.values()
            idle = next((w for w in older if not w.in_flight), None)
            if idle is None:
                return  # every pool is busy: the limit is a target, not a reason to stop work
            logs.info("retiring the least recently used warm pool", pool=idle.key, pid=idle.pid)
            self.recycled["lru"] += 1
            self._retire(idle)

    def forget(self, worker: Worker) -> None:
        worker.close_leases()
        if self.current.get(worker.key) is worker:
            del self.current[worker.key]
        self.retiring.discard(worker)

    def all(self) -> list[Worker]:
        return list(self.current.values()) + list(self.retiring)
