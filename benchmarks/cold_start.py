"""Cold start, side by side: our executor against flytekit's own `pyflyte-execute`.

    python benchmarks/cold_start.py [--runs N] [--storage local,s3] [--write-readme]

One add-two-ints task, the same inputs.pb bytes, three contenders:
  ours-plain    <dev venv>/bin/python -m executor pyflyte-execute ... task-name add_plain
                (a plain typed function; no SDK installed in that venv at all)
  ours-fk-task  <flytekit venv>/bin/python -m executor pyflyte-execute ... task-name add_fk
                (a @flytekit.task, run by us through flytekit's machinery)
  flytekit      <flytekit venv>/bin/pyflyte-execute ... task-name add_fk
and, unless --no-a0, the same task as a Flyte 2 action, with flyte 2's argv and pod env:
  ours-plain-a0 <dev venv>/bin/python -m executor a0 ... instance add_plain   (no SDK)
  ours-f2-task  <flyte venv>/bin/python -m executor a0 ... instance add_f2     (a flyte 2 task)
  a0            <flyte venv>/bin/a0 ... instance add_f2
each on a local directory and on a moto S3 server on loopback. Every run is one fresh process with
a fresh output prefix; a run counts only if it wrote outputs.pb with o0 == a + b. Wall time is
measured around posix_spawn -> wait4, peak RSS is the child's ru_maxrss from os.wait4, both taken
by a tiny spawner process (see Spawner). Contenders are interleaved round-robin (the starting
contender rotates) after one unmeasured warm-up run each.

The flytekit venv is built once at <repo>/.cache/bench/flytekit-<version> (flytekit and this repo,
editable, in one pip resolver pass) and reused while its marker file matches.
Targets are printed as PASS/MISS, never asserted: these are noisy machines.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import marshal
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"
FLYTEKIT_VERSION = "1.16.31"
TASK_MODULE = "benchmarks.bench_tasks"
DEFAULT_RESOLVER = "flytekit.core.python_auto_container.default_task_resolver"
A, B = 40, 2
BUCKET = "cold-start-bench"
RUN_TIMEOUT_S = 180.0
MIB = 2**20

# Neither Python's nor the storage's settings of this shell may leak into a contender.
_SCRUBBED_PREFIXES = ("FLYTE_", "AWS_", "EXECUTOR_", "STORAGE_EMULATOR_HOST", "GCSFS_")
_SCRUBBED = ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONDONTWRITEBYTECODE",
             "PYTHONPROFILEIMPORTTIME", "PIP_REQUIRE_VIRTUALENV")


def _say(message: str) -> None:
    print(f"[cold-start] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    command: tuple[str, ...]  # everything before pyflyte-execute's own flags
    task: str
    protocol: str = "flyte1"  # "flyte2": the command takes a0's flags (see a0_args)


@dataclass(frozen=True)
class Sample:
    contender: str
    storage: str
    wall_s: float
    peak_rss_bytes: int
    ok: bool
    problem: str = ""  # why the run does not count: exit status, missing outputs, stderr tail


@dataclass
class Cell:
    """One contender on one storage: its samples and their summary."""
    contender: Contender
    storage: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def good(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def failures(self) -> int:
        return len(self.samples) - len(self.good)

    @property
    def wall_median(self) -> float | None:
        return statistics.median(s.wall_s for s in self.good) if self.good else None

    @property
    def wall_min(self) -> float | None:
        return min(s.wall_s for s in self.good) if self.good else None

    @property
    def wall_p90(self) -> float | None:
        return nearest_rank([s.wall_s for s in self.good], 0.9) if self.good else None

    @property
    def rss_median(self) -> float | None:
        return statistics.median(s.peak_rss_bytes for s in self.good) if self.good else None


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Storage:
    name: str
    root: str                        # URI prefix every path of this storage lives under
    env: dict[str, str]              # what a contender needs to reach it
    put: Callable[[str, bytes], None]
    get: Callable[[str], bytes | None]


# ------------------------------------------------------------------------------------ venvs


def _spec() -> str:
    pyproject = (REPO / "pyproject.toml").read_bytes()
    return f"flytekit=={FLYTEKIT_VERSION}\npyproject-sha256={hashlib.sha256(pyproject).hexdigest()}\n"


def child_env(extra: dict[str, str] | None = None, *, repo_importable: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)}
    if repo_importable:
        env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


def ensure_flytekit_venv() -> Path:
    """<repo>/.cache/bench/flytekit-X: flytekit and this repo (editable) in one resolver pass."""
    root = REPO / ".cache" / "bench"
    venv = root / f"flytekit-{FLYTEKIT_VERSION}"
    marker = venv / ".bench-complete"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"flytekit-{FLYTEKIT_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == _spec() and (venv / "bin" / "python").exists():
            return venv
        if venv.exists():
            _say(f"discarding incomplete or stale {venv}")
            shutil.rmtree(venv)
        log = root / f"flytekit-{FLYTEKIT_VERSION}.log"
        _say(f"building {venv} (one-off, a minute or two; log: {log})")
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
             f"flytekit=={FLYTEKIT_VERSION}", "-e", str(REPO)],
        ]
        with open(log, "w") as out:
            for cmd in steps:
                out.write(f"$ {' '.join(cmd)}\n")
                out.flush()
                rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env=child_env(repo_importable=False)).returncode
                if rc != 0:
                    raise SystemExit(f"building the flytekit venv failed (exit {rc}): {' '.join(cmd)}\n"
                                     f"{log.read_text()[-3000:]}")
        marker.write_text(_spec())
        return venv


def default_plain_python() -> str:
    dev = REPO / ".venv" / "bin" / "python"
    return str(dev) if dev.exists() else sys.executable


def has_module(python: str, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([python, "-c", code], env=child_env(repo_importable=False)).returncode == 0


def contenders(plain_python: str, fk_venv: Path) -> list[Contender]:
    fk_python = str(fk_venv / "bin" / "python")
    return [
        Contender("ours-plain", "ours, plain function", (plain_python, "-m", "executor", "pyflyte-execute"), "add_plain"),
        Contender("ours-fk-task", "ours, flytekit task", (fk_python, "-m", "executor", "pyflyte-execute"), "add_fk"),
        Contender("flytekit", "flytekit pyflyte-execute", (str(fk_venv / "bin" / "pyflyte-execute"),), "add_fk"),
    ]


# ------------------------------------------------------------------------------------ storages


def local_storage(base: Path) -> Storage:
    root = base / "local-store"

    def put(uri: str, data: bytes) -> None:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        Path(uri).write_bytes(data)

    def get(uri: str) -> bytes | None:
        return Path(uri).read_bytes() if Path(uri).is_file() else None

    return Storage("local", str(root), {}, put, get)


@contextlib.contextmanager
def s3_storage() -> Iterator[Storage]:
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
        client.create_bucket(Bucket=BUCKET)
        env = {
            "FLYTE_AWS_ENDPOINT": endpoint,
            "FLYTE_AWS_ACCESS_KEY_ID": "testing",
            "FLYTE_AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        prefix = f"s3://{BUCKET}/"

        def key(uri: str) -> str:
            assert uri.startswith(prefix), uri
            return uri[len(prefix):]

        def put(uri: str, data: bytes) -> None:
            client.put_object(Bucket=BUCKET, Key=key(uri), Body=data)

        def get(uri: str) -> bytes | None:
            try:
                return client.get_object(Bucket=BUCKET, Key=key(uri))["Body"].read()
            except client.exceptions.NoSuchKey:
                return None

        yield Storage("s3", f"s3://{BUCKET}", env, put, get)
    finally:
        server.stop()


def inputs_pb() -> bytes:
    """The one inputs.pb every contender reads, written with the executor's own codec (the same
    encoding flytekit's TypeEngine gives two ints)."""
    from flyteidl.core import literals_pb2
    from executor.literals import Context, to_literal

    literal_map = literals_pb2.LiteralMap()
    for name, value in (("a", A), ("b", B)):
        literal_map.literals[name].CopyFrom(to_literal(value, int, Context()))
    return literal_map.SerializeToString()


# ------------------------------------------------------------------------------------ one run


@dataclass
class RunFiles:
    prefix: str
    stdout: Path
    stderr: Path

    @property
    def outputs(self) -> str:
        return f"{self.prefix}/out/outputs.pb"


def entrypoint_args(inputs_uri: str, prefix: str, task: str) -> list[str]:
    """flytekit's container args for a Flyte 1 task, verbatim."""
    return [
        "--inputs", inputs_uri,
        "--output-prefix", f"{prefix}/out",
        "--raw-output-data-prefix", f"{prefix}/raw",
        "--checkpoint-path", f"{prefix}/ckpt",
        "--prev-checkpoint", '""',
        "--resolver", DEFAULT_RESOLVER,
        "--", "task-module", TASK_MODULE, "task-name", task,
    ]


# ------------------------------------------------------------------------------------ Flyte 2 (a0)
# The same add-two-ints task as a Flyte 2 action: flyte's real `a0` against ours. The inputs.pb bytes
# serve both protocols (a flyteidl LiteralMap is on the wire a flyteidl2 Inputs), and so does
# verify(): a flyteidl2 Outputs parses as a LiteralMap.

FLYTE_VERSION = "2.12.1"
A0_RESOLVER = "flyte._internal.resolvers.default.DefaultTaskResolver"
A0_POD_ENV = {"_U_RUN_BASE": "/tmp/cold-start-run-base", "_U_ORG_NAME": "org", "RUN_NAME": "run",
              "ACTION_NAME": "a0", "FLYTE_INTERNAL_EXECUTION_PROJECT": "proj", "FLYTE_INTERNAL_EXECUTION_DOMAIN": "dev"}


def ensure_flyte_venv() -> Path:
    """<repo>/.cache/bench/flyte-X: flyte and this repo (editable, with s3fs) in one resolver pass."""
    root = REPO / ".cache" / "bench"
    venv = root / f"flyte-{FLYTE_VERSION}"
    marker = venv / ".bench-complete"
    spec = _spec().replace(f"flytekit=={FLYTEKIT_VERSION}", f"flyte=={FLYTE_VERSION}")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"flyte-{FLYTE_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == spec and (venv / "bin" / "a0").exists():
            return venv
        if venv.exists():
            shutil.rmtree(venv)
        log = root / f"flyte-{FLYTE_VERSION}.log"
        _say(f"building {venv} (one-off, a minute or two; log: {log})")
        with open(log, "w") as out:
            for cmd in ([sys.executable, "-m", "venv", str(venv)],
                        [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                         f"flyte=={FLYTE_VERSION}", "-e", f"{REPO}[s3]"]):
                if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(repo_importable=False)).returncode:
                    raise SystemExit(f"building the flyte venv failed: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
        marker.write_text(spec)
        return venv


def a0_args(inputs_uri: str, prefix: str, task: str) -> list[str]:
    """flyte 2's container args for the task (RuntimeTaskTemplate.container_args), rendered."""
    return [
        "--inputs", inputs_uri, "--outputs-path", f"{prefix}/out", "--version", "bench",
        "--raw-data-path", f"{prefix}/raw", "--checkpoint-path", f"{prefix}/ckpt", "--prev-checkpoint", "",
        "--run-name", "run", "--name", "a0", "--run-start-time", "2026-01-01T00:00:00Z",
        "--resolver", A0_RESOLVER, "mod", TASK_MODULE, "instance", task,
    ]


def a0_contenders(plain_python: str, flyte_venv: Path) -> list[Contender]:
    f2_python = str(flyte_venv / "bin" / "python")
    return [
        Contender("ours-plain-a0", "ours a0, plain function", (plain_python, "-m", "executor", "a0"), "add_plain", "flyte2"),
        Contender("ours-f2-task", "ours a0, flyte 2 task", (f2_python, "-m", "executor", "a0"), "add_f2", "flyte2"),
        Contender("a0", "flyte a0", (str(flyte_venv / "bin" / "a0"),), "add_f2", "flyte2"),
    ]


def a0_verdicts(cells: dict[tuple[str, str], Cell], storages: list[str]) -> list["Verdict"]:
    out = []

    def compare(target: str, key: str, storage: str, limit: float) -> "Verdict":
        if (key, storage) not in cells or ("a0", storage) not in cells:
            return Verdict(target, f"{storage} storage or a0 not measured", None)
        ours, theirs = cells[(key, storage)].wall_median, cells[("a0", storage)].wall_median
        if ours is None or theirs is None:
            return Verdict(target, "a contender had no successful run", None)
        return Verdict(target, f"{ours / theirs:.3f}× (limit {limit:g}×)", ours / theirs <= limit)

    out.append(compare("plain function under a0's argv wall ≤ 1/5 of a0's (local)", "ours-plain-a0", "local", 0.2))
    for storage in storages:
        out.append(compare(f"flyte 2 task through ours no slower than a0 ({storage})", "ours-f2-task", storage, 1.0))
    return out


# Peak RSS needs care: Linux charges a child, at exec, the high-water RSS of the address space it
# was forked (or vforked) from. Spawned straight from this process (which holds boto3 and a moto
# server) every contender would "peak" at our size. So every measured process is started by a tiny
# spawner (python -S -I, about 8 MiB, below any Python child's own peak) over a pipe, and the spawner
# times posix_spawn -> wait4 and reports the child's ru_maxrss.
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

    def __init__(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-S", "-I", "-c", _SPAWNER, str(REPO)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, argv: list[str], env: dict[str, str], stdout: Path, stderr: Path) -> tuple[float, int, int]:
        """Run argv (argv[0] an absolute path) with cwd = repo: (wall s, peak RSS bytes, exit code)."""
        job = marshal.dumps({"argv": argv, "env": env, "stdout": str(stdout), "stderr": str(stderr),
                             "timeout": int(RUN_TIMEOUT_S)})
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


def verify(storage: Storage, files: RunFiles, exit_code: int) -> str:
    """'' if the run wrote outputs.pb holding o0 == A + B; otherwise what went wrong."""
    from flyteidl.core import literals_pb2

    data = storage.get(files.outputs)
    if data is None:
        wrote_error = storage.get(f"{files.prefix}/out/error.pb") is not None
        what = "wrote error.pb instead of outputs.pb" if wrote_error else "wrote no outputs.pb"
        return f"exit {exit_code}, {what}\n{tail(files.stderr)}"
    literal_map = literals_pb2.LiteralMap.FromString(data)
    got = literal_map.literals["o0"].scalar.primitive.integer if "o0" in literal_map.literals else None
    if got != A + B:
        return f"exit {exit_code}, outputs.pb has o0={got!r}, expected {A + B}"
    if exit_code != 0:
        return f"exit {exit_code} although outputs.pb is right\n{tail(files.stderr)}"
    return ""


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Runner:
    """Runs contenders against storages, each run under a fresh prefix, logs kept under workdir."""

    def __init__(self, spawner: Spawner, workdir: Path, storages: dict[str, Storage]):
        self.spawner = spawner
        self.workdir = workdir
        self.storages = storages
        self.inputs_uri: dict[str, str] = {}
        self._count = 0
        data = inputs_pb()
        for storage in storages.values():
            uri = f"{storage.root}/inputs/inputs.pb"
            storage.put(uri, data)
            self.inputs_uri[storage.name] = uri

    def _files(self, contender: Contender, storage: Storage, tag: str) -> RunFiles:
        self._count += 1
        name = f"{self._count:04d}-{storage.name}-{contender.key}-{tag}"
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        return RunFiles(f"{storage.root}/runs/{name}", logs / f"{name}.stdout", logs / f"{name}.stderr")

    def run(self, contender: Contender, storage_name: str, tag: str, python_flags: tuple[str, ...] = ()) -> tuple[Sample, RunFiles]:
        storage = self.storages[storage_name]
        files = self._files(contender, storage, tag)
        command = list(contender.command)
        if python_flags:
            command[1:1] = python_flags
        if contender.protocol == "flyte2":
            if storage.name == "local":
                Path(files.prefix, "out").mkdir(parents=True, exist_ok=True)  # a0 cannot create it (ours can)
            argv = command + a0_args(self.inputs_uri[storage_name], files.prefix, contender.task)
            env = child_env({**storage.env, **A0_POD_ENV})
        else:
            argv = command + entrypoint_args(self.inputs_uri[storage_name], files.prefix, contender.task)
            env = child_env(storage.env)
        wall, rss, code = self.spawner.run(argv, env, files.stdout, files.stderr)
        problem = verify(storage, files, code)
        return Sample(contender.key, storage_name, wall, rss, ok=not problem, problem=problem), files


def measure(runner: Runner, entrants: list[Contender], storages: list[str], runs: int) -> dict[tuple[str, str], Cell]:
    cells = {(c.key, s): Cell(c, s) for s in storages for c in entrants}
    for storage in storages:  # warm the page cache (and __pycache__): one unmeasured run each
        for contender in entrants:
            sample, _ = runner.run(contender, storage, "warmup")
            _say(f"warm-up {storage:5} {contender.key:12} {sample.wall_s * 1000:7.0f} ms"
                 + ("" if sample.ok else "  FAILED"))
    for i in range(runs):
        shift = i % len(entrants)
        order = entrants[shift:] + entrants[:shift]
        for storage in storages:
            for contender in order:
                sample, _ = runner.run(contender, storage, f"run{i}")
                cells[(contender.key, storage)].samples.append(sample)
        _say(f"round {i + 1}/{runs} done")
    return cells


# ------------------------------------------------------------------------------------ import time

_IMPORTTIME = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


@dataclass(frozen=True)
class ImportCost:
    module: str
    self_us: int
    cumulative_us: int
    depth: int


def import_profile(runner: Runner, plain: Contender) -> tuple[list[ImportCost], str]:
    """Run the plain-function contender once under -X importtime (local storage); parse stderr."""
    runner.run(plain, "local", "importtime-warmup")  # local may not have been measured (warmed) at all
    sample, files = runner.run(plain, "local", "importtime", python_flags=("-X", "importtime"))
    costs = []
    for line in files.stderr.read_text(errors="replace").splitlines():
        m = _IMPORTTIME.match(line)
        if m:
            costs.append(ImportCost(m.group(4), int(m.group(1)), int(m.group(2)), (len(m.group(3)) - 1) // 2))
    return costs, sample.problem


def import_summary(costs: list[ImportCost], top: int = 10) -> str:
    """Two lines: the top cumulative imports at any depth, then the top-level ones (they add up)."""
    total_ms = sum(c.self_us for c in costs) / 1000

    def listing(entries: list[ImportCost]) -> str:
        ranked = sorted(entries, key=lambda c: c.cumulative_us, reverse=True)[:top]
        return ", ".join(f"{c.module} {c.cumulative_us / 1000:.1f}" for c in ranked)

    lines = [
        f"{len(costs)} modules, {total_ms:.0f} ms importing; top {top} cumulative (ms): {listing(costs)}",
        f"top-level imports (ms): {listing([c for c in costs if c.depth == 0])}",
    ]
    editable = [c for c in costs if c.module.startswith("__editable__")]
    if editable:
        lines.append(f"({', '.join(c.module for c in editable)} is the editable install's import hook, run by "
                     f"`site`: {sum(c.cumulative_us for c in editable) / 1000:.1f} ms a regular install does not pay)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ report


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f} ms"


def mib(size: float | None) -> str:
    return "—" if size is None else f"{size / MIB:.1f} MiB"


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "—"
    return f"{value / reference:.2f}×"


def render_table(cells: dict[tuple[str, str], Cell], entrants: list[Contender], storages: list[str]) -> str:
    rows = [
        "| storage | contender | ok runs | wall median | wall p90 | wall min | peak RSS median | wall vs flytekit | RSS vs flytekit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for storage in storages:
        reference = cells[("flytekit", storage)]
        for contender in entrants:
            cell = cells[(contender.key, storage)]
            ok = f"{len(cell.good)}/{len(cell.samples)}" + ("" if cell.good else " FAILED")
            rows.append(
                f"| {storage} | {contender.label} | {ok} | {ms(cell.wall_median)} | {ms(cell.wall_p90)} | {ms(cell.wall_min)} "
                f"| {mib(cell.rss_median)} | {ratio(cell.wall_median, reference.wall_median)} "
                f"| {ratio(cell.rss_median, reference.rss_median)} |"
            )
    return "\n".join(rows)


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    passed: bool | None  # None: could not be judged (a contender failed, storage not measured)

    def line(self) -> str:
        status = {True: "PASS", False: "MISS", None: "N/A "}[self.passed]
        return f"{status}  {self.target}: {self.measured}"


def verdicts(cells: dict[tuple[str, str], Cell], storages: list[str]) -> list[Verdict]:
    def compare(target: str, key: str, storage: str, metric: str, limit: float) -> Verdict:
        if storage not in storages:
            return Verdict(target, f"{storage} storage not measured", None)
        ours, theirs = getattr(cells[(key, storage)], metric), getattr(cells[("flytekit", storage)], metric)
        if ours is None or theirs is None:
            return Verdict(target, "a contender had no successful run", None)
        return Verdict(target, f"{ours / theirs:.3f}× (limit {limit:g}×)", ours / theirs <= limit)

    out = [
        compare("plain function wall ≤ 1/10 of flytekit's (local)", "ours-plain", "local", "wall_median", 0.1),
        compare("plain function peak RSS ≤ 1/2 of flytekit's (local)", "ours-plain", "local", "rss_median", 0.5),
    ]
    for storage in storages:
        out.append(compare(f"flytekit task through ours no slower than pyflyte-execute ({storage})",
                           "ours-fk-task", storage, "wall_median", 1.0))
    return out


def failure_details(cells: dict[tuple[str, str], Cell]) -> str:
    parts = []
    for cell in cells.values():
        failed = [s for s in cell.samples if not s.ok]
        if failed:
            first = failed[0]
            parts.append(f"{cell.contender.key} on {cell.storage}: {len(failed)}/{len(cell.samples)} runs failed; "
                         f"first failure:\n{first.problem}")
    return "\n\n".join(parts)


def floor_line(spawner: Spawner, plain_python: str, runs: int) -> str:
    """A bare `python -c pass` in the plain venv: what no entrypoint can beat."""
    walls, rsses = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            wall, rss, _ = spawner.run([plain_python, "-c", "pass"], child_env(), Path(tmp) / "out", Path(tmp) / "err")
            walls.append(wall)
            rsses.append(rss)
    return f"floor: bare `python -c pass` in the plain venv: {ms(statistics.median(walls))}, {mib(statistics.median(rsses))}"


def machine_facts(plain_python: str, fk_venv: Path) -> list[str]:
    def version(python: str) -> str:
        return subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                              capture_output=True, text=True).stdout.strip()

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "executor"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"nproc: {len(os.sched_getaffinity(0))} (cpu: {cpu})",
        f"os: {platform.system()} {platform.release()}",
        f"python: {version(plain_python)} (plain venv), {version(str(fk_venv / 'bin' / 'python'))} (flytekit venv)",
        f"flytekit: {FLYTEKIT_VERSION}; executor: git {commit or '?'}{' + uncommitted changes in executor/' if dirty else ''}",
    ]


def readme_text(command: str, facts: list[str], report: str) -> str:
    return f"""# Cold-start benchmark

`cold_start.py` compares, in one run and on the same machine, how long a Flyte 1 task pod's
entrypoint takes from exec to exit, and how much memory it peaks at, for a trivial task
(`add(a: int, b: int) -> int` in `bench_tasks.py`) with identical `inputs.pb` bytes:

| contender | command |
|---|---|
| ours, plain function | `<dev venv>/bin/python -m executor pyflyte-execute ... task-name add_plain` (no SDK installed) |
| ours, flytekit task | `<flytekit venv>/bin/python -m executor pyflyte-execute ... task-name add_fk` (`@flytekit.task`) |
| flytekit pyflyte-execute | `<flytekit venv>/bin/pyflyte-execute ... task-name add_fk` |

Each runs on local-directory storage and on a moto S3 server on loopback (reached through
`FLYTE_AWS_ENDPOINT` and friends, as in a pod). The argv is flytekit's own container argv
(`--inputs --output-prefix --raw-output-data-prefix --checkpoint-path --prev-checkpoint --resolver
-- task-module benchmarks.bench_tasks task-name ...`), with cwd and `PYTHONPATH` set to the repo root.

What is measured, per run: wall time from `posix_spawn` to `os.wait4` returning (spawn, exec,
interpreter start, imports, reading inputs, running the task, writing outputs, exit), and the
child's peak RSS (`ru_maxrss` from `os.wait4`). Both are taken by a tiny spawner process
(`python -S -I`, about 8 MiB): Linux charges a child, at exec, the high-water RSS of the address
space it was forked from, so spawning straight from the benchmark (which holds boto3 and the moto
server) would make every contender appear as big as the benchmark itself.

Every run uses a fresh output prefix and counts only if it wrote `outputs.pb` with `o0 == a + b`
(failures are counted in "ok runs" and their stderr is shown). One unmeasured warm-up run per
contender and storage warms the page cache; then contenders run round-robin, the first one rotating
each round. The table gives the median, 90th percentile (nearest rank) and minimum of wall time,
the median peak RSS, and the medians as ratios to flytekit's `pyflyte-execute` on the same storage.
The flytekit venv is built once at `.cache/bench/flytekit-{FLYTEKIT_VERSION}` (flytekit and this
repo, editable, one pip pass). Last, the plain-function contender runs once more under
`python -X importtime` to show what its start-up pays for.

Reading the figures: the machine is shared and noisy, so compare the median with the p90 and the
minimum (the least disturbed run) before trusting a difference of a few percent. Both venvs hold the executor as an editable install, whose
import hook `site` runs at every start (about 10 ms, listed below when present); an image with a
regular install does not pay it.

Targets, printed as PASS/MISS and never asserted (the figures are noisy):
a plain function takes at most 1/10 of flytekit's wall time and 1/2 of its peak RSS on local
storage; a flytekit-authored task run through ours is no slower than flytekit's own entrypoint.

## Run it

```
{command}
```

`--runs N` (default 10), `--storage local,s3` (either or both), `--write-readme` (rewrites this file).

## Latest figures

{chr(10).join(f"- {fact}" for fact in facts)}

{report}
"""


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="measured runs per contender and storage (default 10)")
    parser.add_argument("--storage", default="local,s3", help="comma-separated: local, s3 (default both)")
    parser.add_argument("--write-readme", action="store_true", help="rewrite benchmarks/README.md with this run's figures")
    parser.add_argument("--plain-python", default=default_plain_python(),
                        help="python of the SDK-free venv with the executor (default <repo>/.venv/bin/python)")
    parser.add_argument("--flytekit-venv", type=Path, default=None,
                        help=f"an existing venv with flytekit {FLYTEKIT_VERSION} and this repo installed "
                             f"(default: build/reuse .cache/bench/flytekit-{FLYTEKIT_VERSION})")
    parser.add_argument("--flyte-venv", type=Path, default=None,
                        help=f"an existing venv with flyte {FLYTE_VERSION} and this repo installed "
                             f"(default: build/reuse .cache/bench/flyte-{FLYTE_VERSION})")
    parser.add_argument("--no-a0", dest="a0", action="store_false",
                        help=f"leave out the Flyte 2 contenders (flyte {FLYTE_VERSION}'s a0 and ours under a0's argv)")
    args = parser.parse_args(argv)
    args.plain_python = os.path.abspath(args.plain_python)  # posix_spawn does not search PATH
    args.storages = [s.strip() for s in args.storage.split(",") if s.strip()]
    unknown = set(args.storages) - {"local", "s3"}
    if unknown or not args.storages:
        parser.error(f"--storage takes local and/or s3, got {args.storage!r}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fk_venv = args.flytekit_venv or ensure_flytekit_venv()
    entrants = contenders(args.plain_python, fk_venv)
    if args.a0:
        entrants += a0_contenders(args.plain_python, args.flyte_venv or ensure_flyte_venv())
    if has_module(args.plain_python, "flytekit"):
        _say(f"note: {args.plain_python} has flytekit installed; the plain function does not import it")
    command = "python benchmarks/cold_start.py" + (f" --runs {args.runs}" if args.runs != 10 else "") \
        + (f" --storage {','.join(args.storages)}" if args.storages != ["local", "s3"] else "")
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        spawner = Spawner()
        stack.callback(spawner.close)
        storages = {"local": local_storage(workdir)}  # always: the import profile runs on it
        if "s3" in args.storages:
            _say("starting moto S3 server")
            storages["s3"] = stack.enter_context(s3_storage())
        runner = Runner(spawner, workdir, storages)
        cells = measure(runner, entrants, args.storages, args.runs)
        costs, import_problem = import_profile(runner, entrants[0])
        floor = floor_line(spawner, args.plain_python, args.runs)

    table = render_table(cells, entrants, args.storages)
    verdict_lines = [v.line() for v in verdicts(cells, args.storages)]
    if args.a0:
        verdict_lines += [v.line() for v in a0_verdicts(cells, args.storages)]
    imports = import_summary(costs) + (f"\n(that run FAILED: {import_problem.splitlines()[0]})" if import_problem else "")
    report = "\n".join([
        table, "", floor, "",
        "Targets:", *[f"- {line}" for line in verdict_lines], "",
        "Import time, plain function on local storage (`-X importtime`):", *[f"- {line}" for line in imports.splitlines()],
    ])
    failures = failure_details(cells)
    if failures:
        report += "\n\nFailures:\n```\n" + failures + "\n```"
    print(report)
    if args.write_readme:
        README.write_text(readme_text(command + " --write-readme", machine_facts(args.plain_python, fk_venv), report))
        _say(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
