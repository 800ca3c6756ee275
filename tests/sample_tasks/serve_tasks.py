"""Tasks for the warm server's tests: they report what they can see of their environment."""
import asyncio
import json
import os
import signal
import sys
import tempfile
import time

from tests.sample_tasks.runtime import mark_started

_calls = 0  # module state: must not carry over between isolated invocations


def _scratch(name: str) -> str:
    return os.path.join(os.environ["SCRATCH"], name)


def add(a: int, b: int) -> int:
    return a + b


def fail(x: int) -> int:
    raise ValueError(f"no good: {x}")


def env_of(names: str) -> dict:
    """The values of the comma-separated variables, and how many variables there are."""
    return {"values": {n: os.environ.get(n, "<unset>") for n in names.split(",")}, "count": len(os.environ)}


def env_of_a_child(names: str) -> dict:
    """The values of the comma-separated variables as a program the task starts sees them: the
    process's C-level environment, which os.environ may not show."""
    import subprocess

    seen = dict(line.split("=", 1) for line in subprocess.run(["env"], capture_output=True, text=True, check=True)
                .stdout.splitlines() if "=" in line)
    return {"values": {n: seen.get(n, "<unset>") for n in names.split(",")}}


def count_calls(x: int) -> int:
    global _calls
    _calls += 1
    return _calls


def where(content: str) -> dict:
    """Its cwd and temp dir, what it found there, and a file it leaves behind in each."""
    cwd, tmp = os.getcwd(), tempfile.gettempdir()
    found = {"cwd": sorted(os.listdir(cwd)), "tmp": sorted(n for n in os.listdir(tmp) if n != "executor-checkpoint")}
    with open("left-behind.txt", "w") as f:
        f.write(content)
    with open(os.path.join(tmp, "left-behind.txt"), "w") as f:
        f.write(content)
    return {"cwd": cwd, "tmp": tmp, "TMPDIR": os.environ.get("TMPDIR", ""), "found": found}


def record_run(x: int) -> int:
    """Appends one line per execution: lets a test count how often it really ran."""
    with open(_scratch("runs"), "a") as f:
        f.write(f"{x}\n")
    time.sleep(0.3)
    return x


def sleepy(seconds: float) -> float:
    mark_started()
    time.sleep(seconds)
    return seconds


def until_released(seconds: float) -> float:
    """Runs until the test creates $SCRATCH/release (at most `seconds`): holds its invocation open
    exactly as long as a test needs, on a slow machine too."""
    mark_started()
    deadline = time.monotonic() + seconds
    while not os.path.exists(_scratch("release")) and time.monotonic() < deadline:
        time.sleep(0.01)
    return seconds


def stubborn(seconds: float) -> float:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    mark_started()
    time.sleep(seconds)
    return seconds


def killed_by_kernel(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def segfault(x: int) -> int:
    import ctypes

    ctypes.string_at(0)
    return x


class FlyteRecoverableException(RuntimeError):
    """Named like flytekit's: recognised without the SDK."""


def flaky(failures: int) -> int:
    path = _scratch("attempts")
    count = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(count + 1))
    if count < failures:
        raise FlyteRecoverableException(f"transient trouble #{count + 1}")
    return count + 1


def shout_secret(x: int) -> int:
    token = os.environ.get("MY_TOKEN", "")
    print(f"stdout has {token}", flush=True)
    print(f"stderr has {token}", file=sys.stderr, flush=True)
    if x < 0:
        raise RuntimeError(f"failed holding {token}")
    return len(token)


def secrets_visible(x: int) -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("_FSEC_") or k == "MY_TOKEN"}


def hog(megabytes: int) -> int:
    global _kept
    _kept = [bytearray(1 << 20) for _ in range(megabytes)]  # kept: an in-process runner's memory grows
    return os.getpid()


_kept: list = []


def pid(x: int) -> int:
    return os.getpid()


def prints(x: int) -> int:
    print("a line on the task's stdout")
    print(json.dumps({"looks": "like json"}))
    return x


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def sleep_then_add(a: int, b: int) -> int:
    time.sleep(float(os.environ.get("SLEEP_SECONDS", "0")))
    return a + b


def mark(x: int) -> str:
    """Runs at most once per invocation (an exclusive marker file), and says whose it is."""
    me = os.environ["MARK"]
    fd = os.open(os.path.join(os.environ["SCRATCH"], me), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(fd)
    if x % 13 == 0:
        raise ValueError(f"{me} fails on purpose")
    seconds = float(os.environ.get("SLEEP_SECONDS", "0"))
    if seconds:
        time.sleep(seconds)
    return f"{x}:{me}"


def subprocess_env(x: int) -> str:
    """The environment a subprocess of the task inherits (the C-level one, not os.environ)."""
    import subprocess

    return subprocess.run(["env"], capture_output=True, text=True, env=None).stdout


def pick(values: int, factor: int) -> int:
    """A map task's element function: `values` is one element of the mapped list."""
    return values * factor


def forge_results(x: int) -> int:
    """Sends forged results on every datagram socket it holds (an in-process runner holds the server's
    results socket): one for the invocation named by $VICTIM, one for itself with a made-up token,
    and messages of the wrong shape. Returns how many such sockets it found."""
    import socket
    import stat

    found = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with sock:
            if sock.type != socket.SOCK_DGRAM:
                continue
            found += 1
            for target in (os.environ["VICTIM"], os.environ["SELF"]):
                forged = {"outcome": "success", "exit_code": 0, "files": ["forged"], "error": None, "task": "forged",
                          "attempts": 1, "phases_ms": {}, "peak_rss_mib": 0.0}
                sock.send(json.dumps({"id": target, "token": "0" * 16, "pid": 1, "result": forged}).encode())
            for junk in (b"not json", b"[1, 2]", json.dumps({"id": [], "token": 1}).encode(),
                         json.dumps({"id": os.environ["VICTIM"], "token": "0" * 16, "result": []}).encode()):
                sock.send(junk)
    return found + x


def find_marker_on_retry(head: str, tail: str) -> dict:
    """Fails its first attempt (recoverably); the retry scans as find_marker does."""
    path = _scratch("attempts")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("1")
        raise FlyteRecoverableException("the first attempt fails; the retry scans")
    return find_marker(head, tail)


def find_marker(head: str, tail: str) -> dict:
    """Where this process holds a string (or bytes) containing head + tail: every object reachable
    from the modules, from each thread's frames (their locals, up the whole stack this process
    inherited), and every object the collector tracks; each with the way to it. Another
    invocation's env and secrets must be nowhere."""
    import gc
    import types

    marker = head + tail
    encoded = marker.encode()
    roots: list = [sys.modules, gc.get_objects()]
    for frame in sys._current_frames().values():
        while frame is not None:
            roots.append(frame)
            frame = frame.f_back
    found, parent, keep = [], {id(r): None for r in roots}, list(roots)
    stack = list(roots)

    def way(obj) -> str:
        steps = []
        while obj is not None and len(steps) < 12:
            name = obj.f_code.co_name if isinstance(obj, types.FrameType) else ""
            steps.append(f"{type(obj).__name__}{' ' + name if name else ''}")
            obj = parent.get(id(obj))
        return " <- ".join(steps)

    while stack:
        obj = stack.pop()
        if isinstance(obj, str):
            if marker in obj and obj is not marker:
                found.append(way(obj))
            continue
        if isinstance(obj, (bytes, bytearray, memoryview)):
            if encoded in bytes(obj):
                found.append(way(obj))
            continue
        referents = gc.get_referents(obj)
        if isinstance(obj, types.FrameType):  # an executing frame's locals are not among its referents
            if obj.f_code.co_name == "find_marker":
                continue
            referents.append(obj.f_locals)
        for ref in referents:
            if id(ref) not in parent:
                parent[id(ref)] = obj
                keep.append(ref)  # alive until the end: an id is never reused during the walk
                stack.append(ref)
    return {"found": found}


def session(x: int) -> int:
    """The session this process is in: its fork server's pid (a fork server leads its session; the
    processes under it only make process groups of their own)."""
    return os.getsid(0)


# Module-level code runs once per pool, in the fork server, with the server's env: this much resident
# memory (touched, not just reserved) makes the fork server itself large.
_ballast = b"\x01" * (int(os.environ.get("SERVE_TASKS_BALLAST_MIB", "0") or 0) << 20)
