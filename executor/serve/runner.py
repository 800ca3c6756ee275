"""Runners: the processes a fork server forks to run attempts, seen from both sides.

A runner is told what to run over a pipe (one pickled message per attempt: the invocation and its
isolation.View) and reports like any supervised process (executor.watch: report, journal, stack
dump, relayed output). A one-shot runner runs exactly one attempt and exits: isolation "fork". Spares
are one-shot runners forked ahead of need, which first rehearse the attempt's code so that its
copy-on-write page faults are paid before an invocation waits on them. An in-process runner
(isolation "inprocess") runs attempt after attempt in itself, restoring sys.path and its cwd after
each.
"""
from __future__ import annotations

import os
import pickle
import sys
import time

from executor import execute, logs, watch
from executor.errors import Diagnostics
from executor.serve import isolation


class Runner:
    """The fork server's handle on a runner."""

    def __init__(self, proc: watch.Supervised, job_w: int, one_shot: bool):
        self.proc = proc
        self.job_w = job_w
        self.one_shot = one_shot
        self.served = 0
        self.rss = 0

    @property
    def retiring(self) -> bool:
        return self.job_w < 0

    def send(self, message: dict) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        os.write(self.job_w, len(data).to_bytes(4, "big") + data)  # small; the runner reads promptly

    def retire(self) -> None:
        """It exits at the end of its input."""
        if self.job_w >= 0:
            os.close(self.job_w)
            self.job_w = -1


def fork(*, one_shot: bool, relay: bool, close: list[int], forget, rehearse=None, scratch_dir: str = "") -> Runner:
    """Fork a runner. In the child: supervised set-up, the fork server's descriptors closed and its
    other invocations forgotten (`forget`), a rehearsal if asked, then the runner loop."""
    pipes = watch.Pipes(relay=relay)
    job_r, job_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            reporter = pipes.child_side()
            isolation.die_with_parent()
            for fd in close + [job_w]:
                try:
                    os.close(fd)
                except OSError:
                    pass
            forget()
            if rehearse is not None:
                _rehearse(rehearse, scratch_dir)
            _loop(job_r, reporter, one_shot)
            code = 0
        except BaseException as e:
            watch.report_crash(pipes.report_w, e)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(job_r)
    return Runner(pipes.parent_side(pid), job_w, one_shot)


def _loop(job_r: int, reporter: watch.Reporter, one_shot: bool) -> None:
    """One attempt (one-shot), or attempt after attempt in this process, each with its own view."""
    base_path, base_cwd = list(sys.path), os.getcwd()
    while True:
        message = _read_frame(job_r)
        if message is None:
            return
        view: isolation.View = message["view"]
        isolation.enter(view)
        extra = None if one_shot else _runner_memory
        try:
            watch.run_reported_attempt(
                reporter, message["invocation"], attempt_no=message["attempt_no"],
                prev_checkpoint=message["prev_checkpoint"], checkpoint_local=message["checkpoint_local"], extra=extra,
            )
        finally:
            if not one_shot:
                sys.path[:] = base_path
                os.chdir(base_cwd)
                logs._context = {}
                execute.phase_listener = None
        if one_shot:
            return


def _runner_memory() -> dict:
    rss = isolation.current_rss()
    return {"rss": rss, "peak_rss": rss}


WARM_UP_REHEARSALS = 16


def warm_up(invocation, scratch_dir: str) -> None:
    """In the zygote, before its first fork: rehearse a few times, so that every spare inherits the
    attempt's code already specialized by the interpreter (PEP 659) instead of specializing it, and
    copying the pages that writes, itself."""
    for _ in range(WARM_UP_REHEARSALS):
        _rehearse(invocation, scratch_dir)


def _rehearse(invocation, scratch_dir: str) -> None:
    """Before a spare has an invocation: walk the code an attempt walks (load the task, a phase,
    protobuf and the literal types, an atomic write, a report line), so that the copy-on-write page
    faults are paid now. Nothing of the task itself runs."""
    try:
        import json

        from flyteidl.core import literals_pb2

        from executor import loader, storage

        with execute.phase("load", Diagnostics()):
            runnable = loader.load(invocation)
        if hasattr(runnable, "output_literal_types"):
            runnable.output_literal_types()
        literals_pb2.LiteralMap.FromString(literals_pb2.LiteralMap().SerializeToString())
        path = os.path.join(scratch_dir, f".rehearsal-{os.getpid()}")
        storage.write_bytes(path, b"rehearsal", durable=False)  # the same code, without a disk flush per spare
        storage.read_bytes(path)
        os.unlink(path)
        json.dumps({"done": "success", "written": [path], "failure": None})
        f"{time.monotonic()!r} {0.0!r}".encode()
    except BaseException:  # a rehearsal never fails the spare
        pass


def _read_frame(fd: int):
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    data = _read_exactly(fd, int.from_bytes(header, "big"))
    return None if data is None else pickle.loads(data)


def _read_exactly(fd: int, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
