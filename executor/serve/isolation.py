"""What one invocation sees: its own environment, working directory, temp directory and secrets.

    environment(env, tmpdir)  for the fork server's own short steps on an invocation's behalf
                              (reading its TaskTemplate and secrets, writing its error.pb): the
                              process's env is swapped for the invocation's, then restored
    prepare(view, invocation) the "spec" phase under the invocation's env: what its process will
                              see (TaskTemplate env, secrets) and which secrets to redact
    enter(view)               in the process that runs the task: os.environ *replaced* by the
                              invocation's (not merged), a fresh cwd and TMPDIR, only its own
                              secrets known for redaction
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass, field

from executor import logs

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class View:
    """Everything an invocation's process is given."""

    invocation_id: str
    env: dict[str, str]
    cwd: str
    tmpdir: str
    redactions: list[str] = field(default_factory=list)
    bundle_root: str | None = None  # linked into cwd, as flytekit extracts the bundle into the working dir

    @classmethod
    def in_root(cls, invocation_id: str, env: dict[str, str], root: str, bundle_root: str | None = None) -> "View":
        """The view of an invocation given its own root directory (work/, tmp/, checkpoint/ in it):
        its env as given, plus TMPDIR."""
        tmpdir = os.path.join(root, "tmp")
        return cls(invocation_id, {**env, "TMPDIR": tmpdir}, os.path.join(root, "work"), tmpdir, bundle_root=bundle_root)


def checkpoint_dir(root: str) -> str:
    """The local checkpoint directory in an invocation's root."""
    return os.path.join(root, "checkpoint")


@contextlib.contextmanager
def environment(env: dict[str, str], tmpdir: str | None = None):
    """os.environ as the invocation's, for Python code in this process, until the block ends.

    Only the mapping behind os.environ is swapped (no putenv per variable: the fork server does this
    twice per invocation); the C-level environment stays the fork server's, which is fine for its own
    Python steps and never reaches a task (children call enter(), which sets the real one).
    """
    data = os.environ._data
    saved, saved_tempdir = data.copy(), tempfile.tempdir
    start = _encoded(env)
    data.clear()
    data.update(start)
    tempfile.tempdir = tmpdir
    try:
        yield
    finally:
        after = data.copy()
        data.clear()
        data.update(saved)
        tempfile.tempdir = saved_tempdir
        # What the block set or deleted (the spec's env, secrets) also went to the C-level environment
        # through putenv/unsetenv: put that back, or later children would inherit it. A key may have been
        # set to the value it already had, or set and deleted again: every key whose C value may differ
        # from the saved one is reset (a putenv costs ~0.2 us).
        for key in after.keys() | start.keys() | saved.keys():
            value = saved.get(key)
            if value is None:
                os.unsetenv(key)
            elif after.get(key) != value or key not in start:
                os.putenv(key, value)


def prepare(view: View, invocation, diagnostics):
    """The spec phase for `view` (its env as given, plus TMPDIR), exactly as the one-shot path runs
    it: returns the spec; view.env becomes what the task sees (the TaskTemplate's env, secrets) and
    view.redactions its secrets (also on failure: the TaskFailure raised may quote them)."""
    from executor import supervisor

    saved = logs._redactions
    logs._redactions = []
    try:
        with environment(view.env, view.tmpdir):
            spec = supervisor.load_spec(invocation, diagnostics)
            view.env = _decoded(os.environ._data)
    finally:
        view.redactions = logs._redactions
        logs._redactions = saved
    return spec


def enter(view: View) -> None:
    """In the process about to run the invocation's attempt."""
    _replace_environ(view.env)
    from executor import storage

    storage.forget_other_credentials()  # an in-process runner's clients of its previous invocation
    os.chdir(view.cwd)
    tempfile.tempdir = view.tmpdir
    logs._redactions[:] = view.redactions
    logs._context = {"invocation": view.invocation_id}
    if view.bundle_root:
        from executor.bundle.inject import _link_into

        _link_into(view.bundle_root, view.cwd)


def _replace_environ(env: dict[str, str]) -> None:
    data = os.environ._data
    target = _encoded(env)
    for name in [k for k in data if k not in target]:
        os.unsetenv(name)
        del data[name]
    for name, value in target.items():
        if data.get(name) != value:
            os.putenv(name, value)
            data[name] = value


# os.environ's own mapping holds bytes, and goes through a Python call per key and value to convert;
# an invocation's env (the server's, ~40 variables) is converted several times per invocation.
_FS_ENCODING = sys.getfilesystemencoding()


def _encoded(env: dict[str, str]) -> dict[bytes, bytes]:
    """As os.environ stores it (POSIX)."""
    encoding = _FS_ENCODING
    return {k.encode(encoding, "surrogateescape"): v.encode(encoding, "surrogateescape") for k, v in env.items()}


def _decoded(data: dict[bytes, bytes]) -> dict[str, str]:
    encoding = _FS_ENCODING
    return {k.decode(encoding, "surrogateescape"): v.decode(encoding, "surrogateescape") for k, v in data.items()}


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that forked it exits (never an orphaned task)."""
    parent = os.getppid()
    _prctl(_PR_SET_PDEATHSIG, 9)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(70)


def become_subreaper() -> None:
    """Linux: orphans of our descendants are re-parented to us (and reaped by us), not to PID 1."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


_libc = None


def _prctl(option: int, value: int) -> None:
    global _libc
    if not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(option, value, 0, 0, 0)
    except Exception:
        pass


_statm: tuple[int, int] = (0, -1)  # (pid, fd of its /proc/<pid>/statm): read once per invocation, opened once
_PAGE = os.sysconf("SC_PAGE_SIZE")


def current_rss() -> int:
    global _statm
    pid, fd = _statm
    try:
        if pid != os.getpid():  # first call in this process: an inherited fd would read the parent's (and
            # was closed after the fork with the forker's other descriptors, see own_fds)
            _statm = (os.getpid(), -1)
            fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
            _statm = (os.getpid(), fd)
        return int(os.pread(fd, 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def own_fds() -> list[int]:
    """Descriptors this module keeps open (a forked child closes them)."""
    return [_statm[1]] if _statm[1] >= 0 else []
