"""Runners: the processes a fork server forks to run attempts, seen from both sides.

A runner is told what to run over a pipe (one pickled message per attempt: the invocation and its
isolation.View) and reports like any supervised process (executor.watch: report, journal, stack
dump, relayed output). A one-shot runner runs exactly one attempt and exits: isolation "fork". Spares
are one-shot runners forked ahead of need, which first rehearse the attempt's code so that its
copy-on-write page faults are paid before an invocation waits on them. An in-process runner
(isolation "inprocess") runs attempt after attempt in itself, restoring sys.path and its cwd after
each.

An idle in-process runner may be leased to the server: the server then writes one invocation
straight into its job pipe, as the server got it (no view: the runner prepares it itself, with
isolation.prepare, exactly as the fork server would), and tells the fork server, which watches
the attempt as if it had launched it. The fork server stays out of the caller's path.
"""
from __future__ import annotations

import os
import pickle
import sys
import time

from executor import execute, logs, watch
from executor.errors import Diagnostics
from executor.serve import isolation
from executor.serve.channel import frame, write_frame


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
        write_frame(self.job_w, frame(message))

    def retire(self) -> None:
        """It exits at the end of its input."""
        if self.job_w >= 0:
            os.close(self.job_w)
            self.job_w = -1


def fork(*, one_shot: bool, relay: bool, close: list[int], forget, rehearse=None, scratch_dir: str = "",
         results_fd: int = -1, bundle_root: str | None = None, spin: float = 0.0) -> Runner:
    """Fork a runner. In the child: supervised set-up, the fork server's descriptors closed and its
    other invocations forgotten (`forget`), a rehearsal if asked, then the runner loop. An in-process
    runner given `results_fd` (the server's results socket) reports its successes there too; it
    links `bundle_root` into the working directory of the invocations it prepares itself. Idle, it
    polls its job pipe for `spin` seconds before it sleeps on it (await_job)."""
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
            _loop(job_r, reporter, one_shot, results_fd, bundle_root, spin)
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


def _loop(job_r: int, reporter: watch.Reporter, one_shot: bool, results_fd: int = -1,
          bundle_root: str | None = None, spin: float = 0.0) -> None:
    """One attempt (one-shot), or attempt after attempt in this process, each with its own view."""
    base_path, base_cwd = list(sys.path), os.getcwd()
    results = None
    if results_fd >= 0:
        import socket

        results = socket.socket(fileno=results_fd)
    while _run_next(job_r, reporter, one_shot, results, bundle_root, spin) and not one_shot:
        sys.path[:] = base_path
        os.chdir(base_cwd)
        logs._context = {}
        execute.phase_listener = None


def _run_next(job_r: int, reporter: watch.Reporter, one_shot: bool, results, bundle_root: str | None,
              spin: float = 0.0) -> bool:
    """Read and run one attempt (False at the end of input). A frame of its own: once it returns,
    nothing of this invocation is left in the runner's locals for the next one to find."""
    if spin > 0:
        await_job(job_r, spin)
    message = _read_frame(job_r)
    if message is None:
        return False
    diagnostics = Diagnostics()
    if "view" not in message:  # leased: sent by the server as it got it
        failure = _prepare_leased(message, diagnostics, bundle_root)
        if failure is not None:  # the fork server, preparing it too, reports the same failure
            reporter.done(execute.Attempt("failure", " ".join(message["invocation"].resolver_args), failure),
                          **_runner_memory())
            return True
    isolation.enter(message["view"])
    attempt = watch.run_reported_attempt(
        reporter, message["invocation"], attempt_no=message["attempt_no"],
        prev_checkpoint=message["prev_checkpoint"], checkpoint_local=message["checkpoint_local"],
        extra=None if one_shot else _runner_memory, diagnostics=diagnostics,
    )
    direct = message.get("direct")
    if results is not None and direct and attempt.outcome == "success" and attempt.failure is None:
        _send_direct(results, direct, message["invocation"], attempt, diagnostics)
    return True


def _prepare_leased(message: dict, diagnostics: Diagnostics, bundle_root: str | None):
    """What the fork server does for an invocation before it hands it to a runner (its view, the spec
    phase), done here for one the server sent straight to this runner. Its directories were made
    when the lease was given. Returns the spec phase's TaskFailure, if any."""
    from executor.errors import TaskFailure

    view = isolation.View.in_root(message["id"], message["env"], message["root"], bundle_root)
    invocation = without_bundle(message["invocation"])
    message.update(view=view, invocation=invocation, checkpoint_local=isolation.checkpoint_dir(message["root"]))
    try:
        isolation.prepare(view, invocation, diagnostics)
    except TaskFailure as failure:
        return failure
    return None


def without_bundle(invocation):
    """An invocation of a pool: the pool's sys.path already has its bundle."""
    if invocation.bundle is None:
        return invocation
    import dataclasses

    return dataclasses.replace(invocation, bundle=None)


def _send_direct(results, direct: dict, invocation, attempt, diagnostics: Diagnostics) -> None:
    """A success, told to the server at once: after the report (so that the fork server already
    knows this runner is free when the server sends it the next invocation), before anything else."""
    from executor.serve.channel import send_result

    try:
        phases = {**direct["phases_ms"], **diagnostics.phases_ms}
        peak = max(direct["peak_rss"], _runner_memory()["peak_rss"])  # as its report to the fork server says
        result = result_json(execute.report(invocation, attempt, diagnostics), attempt, direct["attempts"], phases, peak)
        send_result(results, {"id": direct["id"], "token": direct["token"], "pid": os.getpid(), "result": result})
    except Exception:  # never fails the runner: the fork server's report of it follows anyway
        pass


def result_json(result, attempt, attempts: int, phases_ms: dict, peak_rss: int) -> dict:
    """What the server answers for a finished invocation."""
    failure = attempt.failure
    return {
        "outcome": result.outcome,
        "exit_code": result.exit_code,
        "files": list(result.written),
        "error": None if failure is None else {
            "code": failure.code, "message": logs.redact(failure.message), "phase": failure.phase,
            "kind": failure.kind.name, "origin": failure.origin.name,
        },
        "task": attempt.task_name,
        "attempts": attempts,
        "phases_ms": {k: round(v, 3) for k, v in phases_ms.items()},
        "peak_rss_mib": round(peak_rss / 2**20, 1),
    }


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


def rehearsal_copy(invocation):
    """What a spare may rehearse of an invocation: its task, none of its own data (its id is in its
    paths; its run's identity). A spare serves another invocation, which must not find this one's."""
    import dataclasses

    flyte2 = invocation.flyte2
    if flyte2 is not None:
        flyte2 = dataclasses.replace(flyte2, run_base_dir="", run_name="", action_name="", run_start_time=None)
    return dataclasses.replace(
        invocation, inputs_uri="", output_prefix="", raw_output_prefix=None, checkpoint_path=None,
        prev_checkpoint=None, dynamic_addl_distro=None, dynamic_dest_dir=None, task_template=None,
        secrets_dir=None, flyte2=flyte2,
    )


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


def await_job(fd: int, seconds: float) -> bool:
    """Poll `fd` for up to `seconds`, yielding the CPU between polls: True once it is readable (or
    closed), False when the time is up (the caller then sleeps on it as usual).

    A steady caller's next invocation comes a few hundred microseconds after this runner's answer, and
    waking a sleeping process can cost ~70 us on a VM (measured on a 2-vCPU one: a pipe round trip to a
    sleeping process took 6 us after the caller had slept too, 78 us after it had been busy, the wakee
    then going to the other, idle vCPU). In-process p50 in warm.py: 0.95 -> 0.86 ms.
    sched_yield hands the CPU to anything runnable, so the poll mostly takes time nothing else wanted
    (with 8 concurrent callers, warm.py's throughput did not drop)."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN)
    end = time.perf_counter() + seconds
    while not poller.poll(0):
        if time.perf_counter() >= end:
            return False
        os.sched_yield()
    return True


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
