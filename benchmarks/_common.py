"""What benchmarks/cold_start.py and benchmarks/bundle.py share: clean child environments, the
flytekit and flyte 2 venvs, the measuring spawner, a moto S3 server, machine facts and the README sections.

Not a benchmark itself; both scripts put benchmarks/ on sys.path and import it as `_common`.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import marshal
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"
FLYTEKIT_VERSION = "1.16.31"
FLYTE_VERSION = "2.12.1"  # flyte 2, whose `a0` is the action entrypoint
RUN_TIMEOUT_S = 180.0
MIB = 2**20

# Neither Python's nor the storage's settings of this shell may leak into a measured process.
_SCRUBBED_PREFIXES = ("FLYTE_", "AWS_", "EXECUTOR_", "STORAGE_EMULATOR_HOST", "GCSFS_")
_SCRUBBED = ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONDONTWRITEBYTECODE",
             "PYTHONPROFILEIMPORTTIME", "PIP_REQUIRE_VIRTUALENV")


def say(tag: str, message: str) -> None:
    print(f"[{tag}] {message}", file=sys.stderr, flush=True)


def child_env(extra: dict[str, str] | None = None, *, repo_importable: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)}
    if repo_importable:
        env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------ venvs


def _venv_spec(requirement: str, extras: str) -> str:
    """What a bench venv's completion marker holds: a change to any of it means a rebuild."""
    pyproject = (REPO / "pyproject.toml").read_bytes()
    extras_line = f"extras={extras}\n" if extras else ""
    return f"{requirement}\n{extras_line}pyproject-sha256={hashlib.sha256(pyproject).hexdigest()}\n"


def ensure_bench_venv(name: str, requirement: str, *, extras: str = "", entry: str = "python",
                      tag: str = "bench") -> Path:
    """<repo>/.cache/bench/<name>: `requirement` and this repo (editable, with `extras`) installed in one
    pip resolver pass, under a lock. Reused while its completion marker matches the requirement, the
    extras and pyproject.toml (and bin/<entry> exists); rebuilt from scratch otherwise."""
    root = REPO / ".cache" / "bench"
    venv = root / name
    marker = venv / ".bench-complete"
    editable = f"{REPO}[{extras}]" if extras else str(REPO)
    spec = _venv_spec(requirement, extras)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == spec and (venv / "bin" / entry).exists():
            return venv
        if venv.exists():
            say(tag, f"discarding incomplete or stale {venv}")
            import shutil

            shutil.rmtree(venv)
        log = root / f"{name}.log"
        say(tag, f"building {venv} (one-off, a minute or two; log: {log})")
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
             requirement, "-e", editable],
        ]
        with open(log, "w") as out:
            for cmd in steps:
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env=child_env(repo_importable=False)).returncode
                if rc != 0:
                    raise SystemExit(f"building {venv} failed (exit {rc}): {' '.join(cmd)}\n"
                                     f"{log.read_text()[-3000:]}")
        marker.write_text(spec)
        return venv


def ensure_flytekit_venv(tag: str = "bench") -> Path:
    """<repo>/.cache/bench/flytekit-X: flytekit and this repo (editable)."""
    return ensure_bench_venv(f"flytekit-{FLYTEKIT_VERSION}", f"flytekit=={FLYTEKIT_VERSION}", tag=tag)


def ensure_flyte_venv(tag: str = "bench") -> Path:
    """<repo>/.cache/bench/flyte-X: flyte 2 (with its `a0`) and this repo (editable, with s3fs: flyte
    re-registers s3 with obstore, and the executor reads S3 through fsspec)."""
    return ensure_bench_venv(f"flyte-{FLYTE_VERSION}", f"flyte=={FLYTE_VERSION}", extras="s3", entry="a0", tag=tag)


def default_plain_python() -> str:
    dev = REPO / ".venv" / "bin" / "python"
    return str(dev) if dev.exists() else sys.executable


def has_module(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([python, "-c", code], env=child_env(repo_importable=False)).returncode == 0


def python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------------------------ spawner

# Peak RSS needs care: Linux charges a child, at exec, the high-water RSS of the address space it
# was forked (or vforked) from. Spawned straight from a benchmark (which holds boto3 and a moto
# server) every measured process would "peak" at the benchmark's size. So every measured process is
# started by a tiny spawner (python -S -I, about 8 MiB, below any Python child's own peak) over a
# pipe, and the spawner times posix_spawn -> wait4 and reports the child's ru_maxrss.
_SPAWNER = r"""
import _signal, marshal, os, sys, time
os.chdir(sys.argv[1])
src, dst = sys.stdin.buffer, sys.stdout.buffer
pid = 0
def kill(*_):
    if pid:
        os.kill(pid, 9)
_signal.signal(_signal.SIGALRM, kill)
while True:
    header = src.read(4)
    if len(header) < 4:
        break
    job = marshal.loads(src.read(int.from_bytes(header, "big")))
    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
               (os.POSIX_SPAWN_OPEN, 1, job["stdout"], write, 0o644),
               (os.POSIX_SPAWN_OPEN, 2, job["stderr"], write, 0o644)]
    try:
        start = time.perf_counter()
        pid = os.posix_spawn(job["argv"][0], job["argv"], job["env"], file_actions=actions)
        _signal.alarm(job["timeout"])
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
        _signal.alarm(0)
        pid = 0
        reply = (wall, usage.ru_maxrss, os.waitstatus_to_exitcode(status), "")
    except OSError as e:
        reply = (0.0, 0, -1, f"cannot start {job['argv'][0]}: {e}")
    out = marshal.dumps(reply)
    dst.write(len(out).to_bytes(4, "big") + out)
    dst.flush()
"""


class Spawner:
    """Runs processes from a small helper so that their peak RSS is theirs alone (see above)."""

    def __init__(self, cwd: Path = REPO) -> None:
        self._proc = subprocess.Popen([sys.executable, "-S", "-I", "-c", _SPAWNER, str(cwd)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, argv: list[str], env: dict[str, str], stdout: Path, stderr: Path,
            timeout_s: float = RUN_TIMEOUT_S) -> tuple[float, int, int]:
        """Run argv (argv[0] an absolute path) in the spawner's cwd: (wall s, peak RSS bytes, exit code)."""
        job = marshal.dumps({"argv": argv, "env": env, "stdout": str(stdout), "stderr": str(stderr),
                             "timeout": int(timeout_s)})
        self._proc.stdin.write(len(job).to_bytes(4, "big") + job)
        self._proc.stdin.flush()
        header = self._proc.stdout.read(4)
        if len(header) < 4:
            raise RuntimeError(f"the spawner died (exit {self._proc.wait()})")
        wall, maxrss_kib, code, error = marshal.loads(self._proc.stdout.read(int.from_bytes(header, "big")))
        if error:
            raise RuntimeError(error)
        return wall, maxrss_kib * 1024, code  # Linux reports ru_maxrss in KiB

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------ moto S3


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]  # what a measured process needs to reach it, as in a pod
    client: Any          # a boto3 S3 client on it


@contextlib.contextmanager
def moto_s3(*buckets: str) -> Iterator[S3Server]:
    """A moto S3 server on loopback, with the given buckets; stopped on exit."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        env = {
            "FLYTE_AWS_ENDPOINT": endpoint,
            "FLYTE_AWS_ACCESS_KEY_ID": "testing",
            "FLYTE_AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        yield S3Server(endpoint, env, client)
    finally:
        server.stop()


# ------------------------------------------------------------------------------------ report


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ms(seconds: float | None, digits: int = 0) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.{digits}f} ms"


def mib(size: float | None) -> str:
    return "—" if size is None else f"{size / MIB:.1f} MiB"


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "—"
    return f"{value / reference:.2f}×"


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    passed: bool | None  # None: could not be judged (a contender failed, a cell not measured)

    def line(self) -> str:
        status = {True: "PASS", False: "MISS", None: "N/A "}[self.passed]
        return f"{status}  {self.target}: {self.measured}"


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min)"


def machine_facts(pythons: list[tuple[str, str]], extra: list[str] = (), load_at_start: str | None = None) -> list[str]:
    """Facts for the README: date, CPUs, OS, the pythons (label, executable), flytekit, git commit, load."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "executor"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    load = f"load average: {load_at_start} at start, {load_average()} at end" if load_at_start else f"load average: {load_average()}"
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"nproc: {len(os.sched_getaffinity(0))} (cpu: {cpu}); {load}",
        f"os: {platform.system()} {platform.release()}",
        "python: " + ", ".join(f"{python_version(exe)} ({label})" for label, exe in pythons),
        f"flytekit: {FLYTEKIT_VERSION}; executor: git {commit or '?'}{' + uncommitted changes in executor/' if dirty else ''}",
        *extra,
    ]


# ------------------------------------------------------------------------------------ README

_README_HEAD = """# Benchmarks

Three scripts, each comparing the executor with what the Flyte SDKs do, in one run on the same machine:

- [`cold_start.py`](#cold-start-cold_startpy): a task pod's entrypoint from exec to exit
  (flytekit's `pyflyte-execute`, and `pyflyte-fast-execute` with a code bundle; flyte 2's `a0`),
  wall time and peak RSS.
- [`bundle.py`](#code-bundles-bundlepy): fetching, verifying and extracting code bundles of
  1 MiB to 512 MiB, against a plain download then `tar xzf`, and a warm-cache hit.
- `warm.py`: `executor serve` per-invocation latency and throughput, isolated and in-process,
  against the cold one-shot path.

Each script's `--write-readme` rewrites only its own section below, with the command, the machine
and the latest figures.
"""


def _markers(section: str) -> tuple[str, str]:
    return f"<!-- BEGIN {section} (written by benchmarks/{section} --write-readme) -->", f"<!-- END {section} -->"


def write_readme_section(section: str, body: str, order: tuple[str, ...] = ("cold_start.py", "bundle.py", "warm.py")) -> None:
    """Replace this script's section of benchmarks/README.md (between its markers), keeping the others.

    The head (above the sections) is this module's; sections missing from the file are created in
    `order`, and text outside the markers is dropped. The file is locked while it is rewritten.
    """
    README.touch(exist_ok=True)
    with open(README, "r+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        text = f.read()
        sections: dict[str, str] = {}
        for name in order:
            begin, end = _markers(name)
            if begin in text and end in text:
                sections[name] = text[text.index(begin): text.index(end) + len(end)]
        if "<!-- BEGIN " not in text and text.startswith("# Cold-start benchmark"):
            # the layout before bundle.py: the whole file was cold_start.py's; keep it as its section
            old = "## Cold start (`cold_start.py`)" + text[len("# Cold-start benchmark"):].replace("\n## ", "\n### ")
            begin, end = _markers("cold_start.py")
            sections["cold_start.py"] = f"{begin}\n{old.strip()}\n{end}"
        begin, end = _markers(section)
        sections[section] = f"{begin}\n{body.strip()}\n{end}"
        out = _README_HEAD.rstrip() + "\n\n" + "\n\n".join(sections[name] for name in order if name in sections) + "\n"
        f.seek(0)
        f.write(out)
        f.truncate()
