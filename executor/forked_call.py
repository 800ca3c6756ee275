"""Run one function in a forked child and get its result (or its exception) back over a pipe.

For work that must not leave state behind in the calling process: obstore's tokio runtime, which
the caller's own forked workers could not use (executor/obstore_s3.py).
"""
from __future__ import annotations

import os
import pickle


class ChildDied(ConnectionError):
    """The child ended without an answer (killed, or crashed in native code): transient."""


def call_in_child(fn, *args):
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, then leave without running the parent's exit handlers
        try:
            os.close(read_fd)
            try:
                answer = ("value", fn(*args))
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
                answer = ("error", e)
            try:
                data = pickle.dumps(answer)
            except Exception:
                data = pickle.dumps(("error", RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))
            with os.fdopen(write_fd, "wb") as out:
                out.write(data)
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
    finally:
        _, status = os.waitpid(pid, 0)
    if not data:
        raise ChildDied(f"the forked worker ended without an answer (wait status {status})")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise value
    return value
