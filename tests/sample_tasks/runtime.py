"""Tasks that exercise the supervisor: sleepers, signal ignorers, forkers, memory hogs, flaky ones."""
import os
import signal
import subprocess
import sys
import time


class FlyteRecoverableException(RuntimeError):
    """Named like flytekit's: recognised without the SDK."""


def scratch(name: str) -> str:
    return os.path.join(os.environ["SCRATCH"], name)


def mark(name: str, text: str) -> None:
    """$SCRATCH/<name> holding text, whole once it exists: a test reads it as soon as it appears."""
    path = scratch(name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


def mark_started() -> None:
    mark("started", str(os.getpid()))


def sleepy(seconds: int) -> int:
    mark_started()
    time.sleep(seconds)
    return seconds


def stubborn(seconds: int) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    mark_started()
    time.sleep(seconds)
    return seconds


def forks_grandchildren(seconds: int) -> int:
    pids = []
    for _ in range(2):
        pids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid)
    detached = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True).pid
    mark("grandchildren", " ".join(map(str, pids + [detached])))
    time.sleep(seconds)
    return seconds


def leaves_background_process(x: int) -> int:
    pid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid
    mark("grandchildren", str(pid))
    return x


def hog(megabytes: int) -> int:
    blocks = [bytearray(1 << 20) for _ in range(megabytes)]
    return len(blocks)


def killed_by_kernel(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return x


def segfault(x: int) -> int:
    import ctypes

    ctypes.string_at(0)
    return x


def flaky(failures: int) -> int:
    path = scratch("attempts")
    count = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(count + 1))
    if count < failures:
        raise FlyteRecoverableException(f"transient trouble #{count + 1}")
    return count + 1


def always_fails(x: int) -> int:
    path = scratch("attempts")
    count = int(open(path).read()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(count + 1))
    raise ValueError("permanent")


def uses_secret(x: int) -> int:
    value = os.environ["MY_TOKEN"]
    with open(scratch("ran"), "w") as f:
        f.write("yes")
    print(f"stdout says the token is {value}")
    print(f"stderr says the token is {value}", file=sys.stderr)
    import logging

    logging.basicConfig()
    logging.getLogger("task").warning("logging says %s", value)
    if x < 0:
        raise RuntimeError(f"failed while holding {value}")
    return len(value)


def reads_secret_file(x: int) -> str:
    directory = os.environ["FLYTE_SECRETS_DEFAULT_DIR"]
    with open(os.path.join(directory, "db", "password")) as f:
        return "file:" + str(len(f.read()))


def env_report(x: int) -> dict:
    return {k: os.environ.get(k, "") for k in ("GREETING", "IMAGE_ONLY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def checkpointer(step: int) -> str:
    from executor.checkpoint import current

    cp = current()
    previous = cp.read()
    cp.write(f"step {step}".encode())
    return (previous or b"none").decode()


def saves_locally_then_sleeps(seconds: int) -> int:
    from executor.checkpoint import current

    with open(os.path.join(current().local_dir, "state.txt"), "w") as f:
        f.write("halfway")
    mark_started()
    time.sleep(seconds)
    return seconds


def flaky_with_checkpoint(x: int) -> str:
    from executor.checkpoint import current

    cp = current()
    previous = cp.read()
    if previous is None:
        cp.write(b"progress from attempt 1")
        raise FlyteRecoverableException("lost the connection")
    return previous.decode()


def orphan_reaped(x: int) -> bool:
    """Make an orphan that exits at once; as PID 1 the supervisor must reap its zombie."""
    pid = os.fork()
    if pid == 0:
        grandchild = os.fork()
        if grandchild:
            with open(scratch("orphan"), "w") as f:
                f.write(str(grandchild))
        os._exit(0)  # the grandchild (if not the writer) exits too: it becomes an orphan zombie
    os.waitpid(pid, 0)
    orphan = int(open(scratch("orphan")).read())
    for _ in range(100):
        try:
            with open(f"/proc/{orphan}/stat") as f:
                state = f.read().split(")")[-1].split()[0]
        except (FileNotFoundError, ProcessLookupError):  # ESRCH: reaped between the open and the read
            return True  # reaped
        time.sleep(0.05)
    return False
