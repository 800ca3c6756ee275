"""Invocations by id: what each was asked to do, where it is, and what came of it.

An id names one invocation for as long as the server remembers it (every unfinished one, plus the
last --history finished ones): POSTing the same id and body again returns that invocation instead
of running it again; the same id with a different body is a conflict.
"""
from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field

QUEUED, RUNNING, DONE = "queued", "running", "done"


def fingerprint(argv: list[str], env: dict, isolation: str | None) -> str:
    canonical = json.dumps({"argv": argv, "env": env, "isolation": isolation}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(eq=False)
class Record:
    id: str
    fingerprint: str
    invocation: object
    env: dict
    isolation: str
    pool: str
    state: str = QUEUED
    accepted_at: float = field(default_factory=time.time)
    accepted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    worker_pid: int | None = None
    cancel_requested: bool = False
    result: dict | None = None
    worker: object = field(default=None, repr=False)  # the pool.Worker running it
    token: str = field(default="", repr=False)  # given with each dispatch; a runner's direct result carries it
    done_event: threading.Event = field(default_factory=threading.Event)
    on_done: list = field(default_factory=list, repr=False)  # called with the record as it finishes

    def to_json(self) -> dict:
        body = {
            "id": self.id,
            "state": self.state,
            "isolation": self.isolation,
            "pool": self.pool,
            "cancel_requested": self.cancel_requested,
            "accepted_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.accepted_at))
            + f".{int(self.accepted_at % 1 * 1000):03d}Z",
            "timings_ms": self.timings_ms(),
        }
        if self.worker_pid is not None:
            body["worker_pid"] = self.worker_pid
        if self.result is not None:
            body["result"] = self.result
        return body

    def timings_ms(self) -> dict:
        now = time.monotonic()
        timings = {"queued": round(((self.started or now) - self.accepted) * 1000, 3)}
        if self.started is not None:
            timings["running"] = round(((self.finished or now) - self.started) * 1000, 3)
        if self.finished is not None:
            timings["total"] = round((self.finished - self.accepted) * 1000, 3)
        return timings

    @property
    def latency_s(self) -> float:
        return (self.finished or time.monotonic()) - self.accepted


class Registry:
    """Not thread-safe by itself: the server calls it under its lock."""

    def __init__(self, history: int):
        self.history = max(0, history)
        self._records: dict[str, Record] = {}
        self._finished: collections.deque[str] = collections.deque()

    def get(self, invocation_id: str) -> Record | None:
        return self._records.get(invocation_id)

    def add(self, record: Record) -> None:
        self._records[record.id] = record

    def finish(self, record: Record, result: dict) -> None:
        record.state = DONE
        record.result = result
        record.finished = time.monotonic()
        self._finished.append(record.id)
        while len(self._finished) > self.history:
            self._records.pop(self._finished.popleft(), None)

    def unfinished(self) -> list[Record]:
        return [r for r in self._records.values() if r.state != DONE]

    def __len__(self) -> int:
        return len(self._records)
