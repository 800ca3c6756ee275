"""Cold start, side by side: our executor against flytekit's own `pyflyte-execute` and
`pyflyte-fast-execute`, and against flyte 2's `a0`.

    python benchmarks/cold_start.py [--runs N] [--storage local,s3] [--suite execute,fast,a0] [--write-readme]

One add-two-ints task, the same inputs.pb bytes. The `execute` suite, three contenders:
  ours-plain      <dev venv>/bin/python -m executor pyflyte-execute ... task-name add_plain
                  (a plain typed function; no SDK installed in that venv at all)
  ours-fk-task    <flytekit venv>/bin/python -m executor pyflyte-execute ... task-name add_fk
                  (a @flytekit.task, run by us through flytekit's machinery)
  flytekit        <flytekit venv>/bin/pyflyte-execute ... task-name add_fk
The `fast` suite: the task comes from a code bundle (fast<digest>.tar.gz, built with
`executor bundle build`, stored next to the inputs) instead of the image, three contenders:
  ours-fast-cold  <dev venv>/bin/python -m executor pyflyte-fast-execute --additional-distribution B
                  --dest-dir D -- pyflyte-execute ... task-module benchfast.tasks task-name add_plain,
                  on an empty bundle cache (a fresh EXECUTOR_CACHE_DIR every run)
  ours-fast-warm  the same on a cache already holding the bundle (as for the next pod on a node)
  flytekit-fast   <flytekit venv>/bin/pyflyte-fast-execute --additional-distribution B' --dest-dir D
                  -- pyflyte-execute ... task-module benchfast.tasks task-name add (a @flytekit.task)
The `a0` suite: the same task as a Flyte 2 action, with flyte 2's container argv and pod env, three contenders:
  ours-plain-a0   <dev venv>/bin/python -m executor a0 ... mod benchmarks.bench_tasks instance add_plain
                  (no SDK)
  ours-f2-task    <flyte venv>/bin/python -m executor a0 ... instance add_f2   (a flyte 2 task)
  a0              <flyte venv>/bin/a0 ... instance add_f2
each on a local directory and on a moto S3 server on loopback. Every run is one fresh process with
a fresh output prefix (and a fresh --dest-dir); a run counts only if it wrote outputs.pb with
o0 == a + b (and, for ours with a bundle, logged the expected cache miss or hit). Wall time is
measured around posix_spawn -> wait4, peak RSS is the child's ru_maxrss from os.wait4, both taken
by a tiny spawner process (see _common.Spawner). Contenders are interleaved round-robin (the
starting contender rotates) after one unmeasured warm-up run each.

The flytekit venv is built once at <repo>/.cache/bench/flytekit-<version> (flytekit and this repo,
editable, in one pip resolver pass), the flyte venv likewise at <repo>/.cache/bench/flyte-<version>
(flyte and this repo with its s3 extra), each reused while its marker file matches.
Targets are printed as PASS/MISS, never asserted: these are noisy machines.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (benchmarks/ is not a package the scripts can rely on)
    FLYTE_VERSION, FLYTEKIT_VERSION, Spawner, Verdict, child_env, default_plain_python, ensure_flyte_venv,
    ensure_flytekit_venv, has_module, load_average, machine_facts, mib, moto_s3, ms, nearest_rank, ratio, say, tail,
    write_readme_section,
)

TASK_MODULE = "benchmarks.bench_tasks"
BUNDLE_MODULE = "benchfast.tasks"  # exists only inside the bundles: the task must come from them
DEFAULT_RESOLVER = "flytekit.core.python_auto_container.default_task_resolver"
A, B = 40, 2
BUCKET = "cold-start-bench"
SUITES = ("execute", "fast", "a0")

# The two bundles' sources: the same add, once plain (ours) and once as a flytekit task (flytekit's).
BUNDLE_SOURCES = {
    "plain": {
        "benchfast/__init__.py": "",
        "benchfast/tasks.py": "def add_plain(a: int, b: int) -> int:\n    return a + b\n",
    },
    "fk": {
        "benchfast/__init__.py": "",
        "benchfast/tasks.py": "import flytekit\n\n\n@flytekit.task\ndef add(a: int, b: int) -> int:\n    return a + b\n",
    },
}


def _say(message: str) -> None:
    say("cold-start", message)


# ------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    command: tuple[str, ...]  # everything before the entrypoint's own flags
    task: str
    suite: str = "execute"
    module: str = TASK_MODULE
    reference: str = "flytekit"    # the SDK's own entrypoint its ratios are taken against
    protocol: str = "flyte1"       # "flyte2": the command takes a0's flags and pod env (see a0_args)
    bundle: str | None = None      # fast-execute: which bundle of BUNDLE_SOURCES it runs from
    cache: str | None = None       # ours with a bundle: "cold" (fresh cache each run) or "warm" (pre-filled)
    bin_first: str | None = None   # put first on PATH (flytekit's fast-execute runs `pyflyte-execute` from it)
    repo_on_path: bool = True      # PYTHONPATH=<repo> (not for bundles: the task must come from the bundle)


@dataclass(frozen=True)
class Sample:
    contender: str
    storage: str
    wall_s: float
    peak_rss_bytes: int
    ok: bool
    problem: str = ""  # why the run does not count: exit status, missing outputs, stderr tail
    bundle_ms: float | None = None  # ours with a bundle: the bundle phase, from the executor's own log


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

    @property
    def bundle_ms_median(self) -> float | None:
        values = [s.bundle_ms for s in self.good if s.bundle_ms is not None]
        return statistics.median(values) if values else None


@dataclass
class Storage:
    name: str
    root: str                        # URI prefix every path of this storage lives under
    env: dict[str, str]              # what a contender needs to reach it
    put: Callable[[str, bytes], None]
    get: Callable[[str], bytes | None]


def contenders(plain_python: str, fk_venv: Path, flyte_venv: Path | None, suites: list[str]) -> list[Contender]:
    """The contenders of the given suites; flyte_venv is needed only for the a0 suite."""
    fk_python = str(fk_venv / "bin" / "python")
    ours_fast = (plain_python, "-m", "executor", "pyflyte-fast-execute")
    every = [
        Contender("ours-plain", "ours, plain function", (plain_python, "-m", "executor", "pyflyte-execute"), "add_plain"),
        Contender("ours-fk-task", "ours, flytekit task", (fk_python, "-m", "executor", "pyflyte-execute"), "add_fk"),
        Contender("flytekit", "flytekit pyflyte-execute", (str(fk_venv / "bin" / "pyflyte-execute"),), "add_fk"),
        Contender("ours-fast-cold", "ours fast-execute, cold cache", ours_fast, "add_plain", suite="fast",
                  module=BUNDLE_MODULE, reference="flytekit-fast", bundle="plain", cache="cold", repo_on_path=False),
        Contender("ours-fast-warm", "ours fast-execute, warm cache", ours_fast, "add_plain", suite="fast",
                  module=BUNDLE_MODULE, reference="flytekit-fast", bundle="plain", cache="warm", repo_on_path=False),
        Contender("flytekit-fast", "flytekit pyflyte-fast-execute", (str(fk_venv / "bin" / "pyflyte-fast-execute"),),
                  "add", suite="fast", module=BUNDLE_MODULE, reference="flytekit-fast", bundle="fk",
                  bin_first=str(fk_venv / "bin"), repo_on_path=False),
    ]
    if flyte_venv is not None:
        f2_python = str(flyte_venv / "bin" / "python")
        a0 = {"suite": "a0", "reference": "a0", "protocol": "flyte2"}
        every += [
            Contender("ours-plain-a0", "ours a0, plain function", (plain_python, "-m", "executor", "a0"), "add_plain", **a0),
            Contender("ours-f2-task", "ours a0, flyte 2 task", (f2_python, "-m", "executor", "a0"), "add_f2", **a0),
            Contender("a0", "flyte a0", (str(flyte_venv / "bin" / "a0"),), "add_f2", **a0),
        ]
    return [c for c in every if c.suite in suites]


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
    with moto_s3(BUCKET) as server:
        client = server.client
        prefix = f"s3://{BUCKET}/"

        def key(uri: str) -> str:
            assert uri.startswith(prefix), uri
            return uri[len(prefix):]

        def put(uri: str, data: bytes) -> None:
            client.put_object(Bucket=BUCKET, Key=key(uri), Body=data)  # one PUT: the ETag is the md5

        def get(uri: str) -> bytes | None:
            try:
                return client.get_object(Bucket=BUCKET, Key=key(uri))["Body"].read()
            except client.exceptions.NoSuchKey:
                return None

        yield Storage("s3", f"s3://{BUCKET}", server.env, put, get)


def inputs_pb() -> bytes:
    """The one inputs.pb every contender reads, written with the executor's own codec (the same
    encoding flytekit's TypeEngine gives two ints)."""
    from flyteidl.core import literals_pb2
    from executor.literals import Context, to_literal

    literal_map = literals_pb2.LiteralMap()
    for name, value in (("a", A), ("b", B)):
        literal_map.literals[name].CopyFrom(to_literal(value, int, Context()))
    return literal_map.SerializeToString()


def build_bundles(plain_python: str, workdir: Path) -> dict[str, Path]:
    """fast<digest>.tar.gz for each of BUNDLE_SOURCES, with `executor bundle build` (the dev venv's)."""
    import subprocess

    built = {}
    for name, files in BUNDLE_SOURCES.items():
        src, out = workdir / "bundle-src" / name, workdir / "bundle-out" / name
        for rel, text in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(text)
        run = subprocess.run([plain_python, "-m", "executor", "bundle", "build", str(src), str(out)],
                             capture_output=True, text=True, env=child_env(repo_importable=False))
        archives = sorted(out.glob("fast*.tar.gz"))
        if run.returncode != 0 or len(archives) != 1:
            raise SystemExit(f"executor bundle build {src} failed (exit {run.returncode}):\n{run.stderr}")
        built[name] = archives[0]
    return built


# ------------------------------------------------------------------------------------ one run


@dataclass
class RunFiles:
    name: str
    prefix: str
    stdout: Path
    stderr: Path

    @property
    def outputs(self) -> str:
        return f"{self.prefix}/out/outputs.pb"


def entrypoint_args(inputs_uri: str, prefix: str, task: str, module: str = TASK_MODULE) -> list[str]:
    """flytekit's container args for a Flyte 1 task, verbatim."""
    return [
        "--inputs", inputs_uri,
        "--output-prefix", f"{prefix}/out",
        "--raw-output-data-prefix", f"{prefix}/raw",
        "--checkpoint-path", f"{prefix}/ckpt",
        "--prev-checkpoint", '""',
        "--resolver", DEFAULT_RESOLVER,
        "--", "task-module", module, "task-name", task,
    ]


# The same task as a Flyte 2 action. The inputs.pb bytes serve both protocols (a flyteidl LiteralMap
# is on the wire a flyteidl2 Inputs), and so does verify(): a flyteidl2 Outputs parses as a LiteralMap.
A0_RESOLVER = "flyte._internal.resolvers.default.DefaultTaskResolver"


def a0_args(inputs_uri: str, prefix: str, task: str) -> list[str]:
    """flyte 2's container args for the task (RuntimeTaskTemplate.container_args), rendered."""
    return [
        "--inputs", inputs_uri, "--outputs-path", f"{prefix}/out", "--version", "bench",
        "--raw-data-path", f"{prefix}/raw", "--checkpoint-path", f"{prefix}/ckpt", "--prev-checkpoint", "",
        "--run-name", "run", "--name", "a0", "--run-start-time", "2026-01-01T00:00:00Z",
        "--resolver", A0_RESOLVER, "mod", TASK_MODULE, "instance", task,
    ]


def a0_pod_env(prefix: str) -> dict[str, str]:
    """What flyte 2 puts in an action pod's env (a0 falls back to it for the flags it is not given)."""
    return {"_U_RUN_BASE": f"{prefix}/run-base", "_U_ORG_NAME": "org", "RUN_NAME": "run", "ACTION_NAME": "a0",
            "FLYTE_INTERNAL_EXECUTION_PROJECT": "proj", "FLYTE_INTERNAL_EXECUTION_DOMAIN": "dev"}


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


_CACHE_LOG = re.compile(r"""\bcache[=":\s]+(hit|miss)\b""")
_BUNDLE_MS = re.compile(r"""\bbundle_ms[=":\s]+([0-9.]+)""")


def verify_cache(files: RunFiles, expected: str) -> tuple[str, float | None]:
    """Ours with a bundle: did the executor log the expected cache outcome? And its bundle phase ms."""
    text = files.stderr.read_text(errors="replace") if files.stderr.exists() else ""
    seen = _CACHE_LOG.search(text)
    phase = _BUNDLE_MS.search(text)
    bundle_ms = float(phase.group(1)) if phase else None
    if not seen:
        return f"the executor logged no bundle cache outcome (expected cache={expected})\n{tail(files.stderr)}", bundle_ms
    if seen.group(1) != expected:
        return f"expected a cache {expected}, the executor logged cache={seen.group(1)}", bundle_ms
    return "", bundle_ms


class Runner:
    """Runs contenders against storages, each run under a fresh prefix, logs kept under workdir."""

    def __init__(self, spawner: Spawner, workdir: Path, storages: dict[str, Storage],
                 bundles: dict[str, Path] | None = None):
        self.spawner = spawner
        self.workdir = workdir
        self.storages = storages
        self.inputs_uri: dict[str, str] = {}
        self.bundle_uri: dict[tuple[str, str], str] = {}
        self._count = 0
        data = inputs_pb()
        for storage in storages.values():
            uri = f"{storage.root}/inputs/inputs.pb"
            storage.put(uri, data)
            self.inputs_uri[storage.name] = uri
            for name, archive in (bundles or {}).items():  # as registration leaves them: fast<digest>.tar.gz
                uri = f"{storage.root}/bundles/{name}/{archive.name}"
                storage.put(uri, archive.read_bytes())
                self.bundle_uri[(storage.name, name)] = uri

    def _files(self, contender: Contender, storage: Storage, tag: str) -> RunFiles:
        self._count += 1
        name = f"{self._count:04d}-{storage.name}-{contender.key}-{tag}"
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        return RunFiles(name, f"{storage.root}/runs/{name}", logs / f"{name}.stdout", logs / f"{name}.stderr")

    def run(self, contender: Contender, storage_name: str, tag: str, python_flags: tuple[str, ...] = ()) -> tuple[Sample, RunFiles]:
        storage = self.storages[storage_name]
        files = self._files(contender, storage, tag)
        command = list(contender.command)
        if python_flags:
            command[1:1] = python_flags
        env = dict(storage.env)
        scratch: list[Path] = []
        if contender.bundle:
            dest = self.workdir / "dest" / files.name  # a pod's --dest-dir exists (flytekit requires it)
            dest.mkdir(parents=True)
            scratch.append(dest)
            command += ["--additional-distribution", self.bundle_uri[(storage_name, contender.bundle)],
                        "--dest-dir", str(dest), "--", "pyflyte-execute"]
        if contender.cache == "cold":
            cache = self.workdir / "caches" / files.name
            scratch.append(cache)
            env["EXECUTOR_CACHE_DIR"] = str(cache)
        elif contender.cache == "warm":
            env["EXECUTOR_CACHE_DIR"] = str(self.workdir / "warm-cache" / storage_name)
        if contender.bin_first:
            env["PATH"] = contender.bin_first + os.pathsep + os.environ.get("PATH", "")
        if contender.protocol == "flyte2":
            if storage.name == "local":
                Path(files.prefix, "out").mkdir(parents=True, exist_ok=True)  # a0 cannot create it (ours can)
            env.update(a0_pod_env(files.prefix))
            argv = command + a0_args(self.inputs_uri[storage_name], files.prefix, contender.task)
        else:
            argv = command + entrypoint_args(self.inputs_uri[storage_name], files.prefix, contender.task, contender.module)
        wall, rss, code = self.spawner.run(argv, child_env(env, repo_importable=contender.repo_on_path),
                                           files.stdout, files.stderr)
        problem = verify(storage, files, code)
        bundle_ms = None
        if contender.cache:
            expected = "miss" if contender.cache == "cold" or tag == "warmup" else "hit"
            cache_problem, bundle_ms = verify_cache(files, expected)
            problem = problem or cache_problem
        for path in scratch:
            shutil.rmtree(path, ignore_errors=True)
        return Sample(contender.key, storage_name, wall, rss, ok=not problem, problem=problem, bundle_ms=bundle_ms), files


def measure(runner: Runner, entrants: list[Contender], storages: list[str], runs: int) -> dict[tuple[str, str], Cell]:
    cells = {(c.key, s): Cell(c, s) for s in storages for c in entrants}
    # warm the page cache (and __pycache__): one unmeasured run each; it also fills the warm bundle cache
    for storage in storages:
        for contender in entrants:
            sample, _ = runner.run(contender, storage, "warmup")
            _say(f"warm-up {storage:5} {contender.key:14} {sample.wall_s * 1000:7.0f} ms"
                 + ("" if sample.ok else "  FAILED\n" + sample.problem))
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


def import_profile(runner: Runner, contender: Contender) -> tuple[list[ImportCost], str]:
    """Run a contender once under -X importtime (local storage); parse stderr."""
    runner.run(contender, "local", "importtime-warmup")  # local may not have been measured (warmed) at all
    sample, files = runner.run(contender, "local", "importtime", python_flags=("-X", "importtime"))
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


def children(costs: list[ImportCost], module: str) -> list[ImportCost]:
    """The imports a module's import triggered directly (-X importtime prints a subtree before its root)."""
    for i, cost in enumerate(costs):
        if cost.module == module:
            kids = []
            for before in reversed(costs[:i]):
                if before.depth <= cost.depth:
                    break
                if before.depth == cost.depth + 1:
                    kids.append(before)
            return kids
    return []


def bundle_import_summary(costs: list[ImportCost], root: str = "executor.bundle.inject", min_ms: float = 0.3) -> str:
    """What importing the bundle code costs, package by package: the import tree under `root`."""
    top = next((c for c in costs if c.module == root), None)
    if top is None:
        return f"{root} was not imported"
    lines = [f"{root}: {top.cumulative_us / 1000:.1f} ms cumulative"]
    queue = [top]
    while queue:
        node = queue.pop(0)
        kids = [k for k in children(costs, node.module) if k.cumulative_us >= min_ms * 1000]
        if kids:
            listed = ", ".join(f"{k.module} {k.cumulative_us / 1000:.1f}"
                               for k in sorted(kids, key=lambda k: k.cumulative_us, reverse=True))
            lines.append(f"under {node.module} (self {node.self_us / 1000:.1f}): {listed}")
            queue += [k for k in kids if k.module.startswith("executor.")]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ report


def render_table(cells: dict[tuple[str, str], Cell], entrants: list[Contender], storages: list[str]) -> str:
    rows = [
        "| storage | contender | ok runs | wall median | wall p90 | wall min | peak RSS median | wall vs SDK entrypoint | RSS vs SDK entrypoint |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for storage in storages:
        for contender in entrants:
            cell = cells[(contender.key, storage)]
            reference = cells.get((contender.reference, storage))
            ok = f"{len(cell.good)}/{len(cell.samples)}" + ("" if cell.good else " FAILED")
            rows.append(
                f"| {storage} | {contender.label} | {ok} | {ms(cell.wall_median)} | {ms(cell.wall_p90)} | {ms(cell.wall_min)} "
                f"| {mib(cell.rss_median)} | {ratio(cell.wall_median, reference and reference.wall_median)} "
                f"| {ratio(cell.rss_median, reference and reference.rss_median)} |"
            )
    return "\n".join(rows)


def bundle_phase_line(cells: dict[tuple[str, str], Cell], storages: list[str]) -> str:
    parts = []
    for storage in storages:
        for key in ("ours-fast-cold", "ours-fast-warm"):
            cell = cells.get((key, storage))
            if cell and cell.bundle_ms_median is not None:
                parts.append(f"{key} {storage} {cell.bundle_ms_median:.1f} ms")
    return ("bundle phase as the executor logs it (`bundle_ms`, median; includes importing the bundle code): "
            + ", ".join(parts)) if parts else ""


def verdicts(cells: dict[tuple[str, str], Cell], storages: list[str], suites: list[str]) -> list[Verdict]:
    def compare(target: str, key: str, reference: str, storage: str, metric: str, limit: float) -> Verdict:
        if storage not in storages:
            return Verdict(target, f"{storage} storage not measured", None)
        ours, theirs = getattr(cells[(key, storage)], metric), getattr(cells[(reference, storage)], metric)
        if ours is None or theirs is None:
            return Verdict(target, "a contender had no successful run", None)
        return Verdict(target, f"{ours / theirs:.3f}× (limit {limit:g}×)", ours / theirs <= limit)

    out = []
    if "execute" in suites:
        out += [
            compare("plain function wall ≤ 1/10 of flytekit's (local)", "ours-plain", "flytekit", "local", "wall_median", 0.1),
            compare("plain function peak RSS ≤ 1/2 of flytekit's (local)", "ours-plain", "flytekit", "local", "rss_median", 0.5),
        ]
        for storage in storages:
            out.append(compare(f"flytekit task through ours no slower than pyflyte-execute ({storage})",
                               "ours-fk-task", "flytekit", storage, "wall_median", 1.0))
    if "fast" in suites:
        for storage in storages:
            out.append(compare(f"ours fast-execute on a cold cache ≤ 1/10 of flytekit's pyflyte-fast-execute wall ({storage})",
                               "ours-fast-cold", "flytekit-fast", storage, "wall_median", 0.1))
    if "a0" in suites:
        out.append(compare("plain function under a0's argv wall ≤ 1/5 of a0's (local)",
                           "ours-plain-a0", "a0", "local", "wall_median", 0.2))
        for storage in storages:
            out.append(compare(f"flyte 2 task through ours no slower than a0 ({storage})",
                               "ours-f2-task", "a0", storage, "wall_median", 1.0))
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


def readme_section(command: str, facts: list[str], report: str) -> str:
    return f"""## Cold start (`cold_start.py`)

`cold_start.py` compares, in one run and on the same machine, how long a task pod's entrypoint
(Flyte 1's `pyflyte-execute` and `pyflyte-fast-execute`, Flyte 2's `a0`) takes from exec to exit,
and how much memory it peaks at, for a trivial task (`add(a: int, b: int) -> int`) with identical
`inputs.pb` bytes. Suite `execute`, the task baked into the image (`bench_tasks.py`):

| contender | command |
|---|---|
| ours, plain function | `<dev venv>/bin/python -m executor pyflyte-execute ... task-name add_plain` (no SDK installed) |
| ours, flytekit task | `<flytekit venv>/bin/python -m executor pyflyte-execute ... task-name add_fk` (`@flytekit.task`) |
| flytekit pyflyte-execute | `<flytekit venv>/bin/pyflyte-execute ... task-name add_fk` |

Suite `fast`, the task shipped in a code bundle (fast registration): each run gets
`pyflyte-fast-execute --additional-distribution <store>/bundles/…/fast<digest>.tar.gz --dest-dir <fresh dir>
-- pyflyte-execute ... -- task-module benchfast.tasks ...`, the bundle built with `executor bundle build`
from a one-module package and stored next to the inputs, with the repo *not* on `PYTHONPATH` (the task
can only come from the bundle):

| contender | command |
|---|---|
| ours fast-execute, cold cache | `<dev venv>/bin/python -m executor pyflyte-fast-execute ... task-name add_plain`, a fresh empty `EXECUTOR_CACHE_DIR` every run: fetch, md5, verify the name digest (and the S3 ETag), safe extract, publish, then run in the same process |
| ours fast-execute, warm cache | the same, `EXECUTOR_CACHE_DIR` already holding the bundle (the next pod on a node, or a retry) |
| flytekit pyflyte-fast-execute | `<flytekit venv>/bin/pyflyte-fast-execute ... task-name add` (bundle with `@flytekit.task def add`): downloads, runs `tar`, then starts `pyflyte-execute` (from `PATH`, the flytekit venv's `bin` first) as a second interpreter |

Suite `a0`, the same task as a Flyte 2 action, baked into the image: each run gets flyte 2's
rendered container argv (`--inputs --outputs-path --version --raw-data-path --checkpoint-path
--prev-checkpoint --run-name --name --run-start-time --resolver flyte._internal.resolvers.default.DefaultTaskResolver
mod benchmarks.bench_tasks instance ...`) and the pod env a0 reads the rest from (`_U_RUN_BASE`,
`_U_ORG_NAME`, `RUN_NAME`, `ACTION_NAME`, `FLYTE_INTERNAL_EXECUTION_PROJECT`/`_DOMAIN`); on local
storage the output directory is made beforehand (a0 cannot create it; ours can):

| contender | command |
|---|---|
| ours a0, plain function | `<dev venv>/bin/python -m executor a0 ... instance add_plain` (no SDK installed) |
| ours a0, flyte 2 task | `<flyte venv>/bin/python -m executor a0 ... instance add_f2` (a `flyte.TaskEnvironment` task, run through flyte 2's SDK) |
| flyte a0 | `<flyte venv>/bin/a0 ... instance add_f2` |

Each runs on local-directory storage and on a moto S3 server on loopback (reached through
`FLYTE_AWS_ENDPOINT` and friends, as in a pod). The argv is flytekit's own container argv
(`--inputs --output-prefix --raw-output-data-prefix --checkpoint-path --prev-checkpoint --resolver
-- task-module ... task-name ...`) or, for `a0`, flyte 2's, with cwd the repo root and
`PYTHONPATH` the repo root for the `execute` and `a0` suites.

What is measured, per run: wall time from `posix_spawn` to `os.wait4` returning (spawn, exec,
interpreter start, imports, fetching the bundle, reading inputs, running the task, writing outputs,
exit), and the child's peak RSS (`ru_maxrss` from `os.wait4`; for flytekit's fast-execute that is
the larger of its two interpreters, not their sum). Both are taken by a tiny spawner process
(`python -S -I`, about 8 MiB): Linux charges a child, at exec, the high-water RSS of the address
space it was forked from, so spawning straight from the benchmark (which holds boto3 and the moto
server) would make every contender appear as big as the benchmark itself.

Every run uses a fresh output prefix (and `--dest-dir`) and counts only if it wrote `outputs.pb`
with `o0 == a + b` (for `a0`, a flyteidl2 `Outputs`, which parses as a `LiteralMap`), and for ours
with a bundle, only if the executor logged the expected `cache=miss` (cold) or `cache=hit` (warm); failures are counted in "ok runs" and their stderr is
shown. One unmeasured warm-up run per contender and storage warms the page cache (and fills the
warm bundle cache); then contenders run round-robin, the first one rotating each round. The table
gives the median, 90th percentile (nearest rank) and minimum of wall time, the median peak RSS,
and the medians as ratios to the SDK's own entrypoint for the same job on the same storage:
`pyflyte-execute` for the `execute` rows, `pyflyte-fast-execute` for the fast-execute rows, flyte
2's `a0` for the `a0` rows. The flytekit venv is built once at `.cache/bench/flytekit-{FLYTEKIT_VERSION}`
(flytekit and this repo, editable, one pip pass), the flyte venv at `.cache/bench/flyte-{FLYTE_VERSION}`
(flyte and this repo with its `s3` extra, editable, one pip pass). Last, the plain-function
contender (and, with the `fast` suite, the warm-cache fast-execute; with the `a0` suite, the plain
function under a0's argv) runs once more under `python -X importtime` to show what its start-up
pays for.

Reading the figures: the machine is shared and noisy, so compare the median with the p90 and the
minimum (the least disturbed run) before trusting a difference of a few percent. The venvs hold
the executor as an editable install, whose import hook `site` runs at every start (about 10 ms,
listed below when present); an image with a regular install does not pay it.

Targets, printed as PASS/MISS and never asserted (the figures are noisy):
a plain function takes at most 1/10 of flytekit's wall time and 1/2 of its peak RSS on local
storage; a flytekit-authored task run through ours is no slower than flytekit's own entrypoint;
ours fast-execute on a cold cache takes at most 1/10 of flytekit's `pyflyte-fast-execute` (local
and S3); a plain function under a0's argv takes at most 1/5 of `a0`'s wall time on local storage;
a flyte 2 task run through ours is no slower than `a0` (local and S3).

### Run it

```
{command}
```

`--runs N` (default 10), `--storage local,s3` (either or both), `--suite execute,fast,a0` (any of
them; default all), `--flytekit-venv`/`--flyte-venv` (use an existing venv), `--write-readme`
(rewrites this section of this file).

### Latest figures

{chr(10).join(f"- {fact}" for fact in facts)}

{report}
"""


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="measured runs per contender and storage (default 10)")
    parser.add_argument("--storage", default="local,s3", help="comma-separated: local, s3 (default both)")
    parser.add_argument("--suite", default=",".join(SUITES),
                        help=f"comma-separated: {', '.join(SUITES)} (default all)")
    parser.add_argument("--write-readme", action="store_true",
                        help="rewrite the cold-start section of benchmarks/README.md with this run's figures")
    parser.add_argument("--plain-python", default=default_plain_python(),
                        help="python of the SDK-free venv with the executor (default <repo>/.venv/bin/python)")
    parser.add_argument("--flytekit-venv", type=Path, default=None,
                        help=f"an existing venv with flytekit {FLYTEKIT_VERSION} and this repo installed "
                             f"(default: build/reuse .cache/bench/flytekit-{FLYTEKIT_VERSION})")
    parser.add_argument("--flyte-venv", type=Path, default=None,
                        help=f"for the a0 suite: an existing venv with flyte {FLYTE_VERSION} and this repo (with "
                             f"its s3 extra) installed (default: build/reuse .cache/bench/flyte-{FLYTE_VERSION})")
    args = parser.parse_args(argv)
    args.plain_python = os.path.abspath(args.plain_python)  # posix_spawn does not search PATH
    # ... and the spawner runs in the repo root: a relative venv would be looked up there
    args.flytekit_venv = args.flytekit_venv and args.flytekit_venv.absolute()
    args.flyte_venv = args.flyte_venv and args.flyte_venv.absolute()
    args.storages = [s.strip() for s in args.storage.split(",") if s.strip()]
    unknown = set(args.storages) - {"local", "s3"}
    if unknown or not args.storages:
        parser.error(f"--storage takes local and/or s3, got {args.storage!r}")
    args.suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    if set(args.suites) - set(SUITES) or not args.suites:
        parser.error(f"--suite takes any of {', '.join(SUITES)}, got {args.suite!r}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = load_average()
    fk_venv = args.flytekit_venv or ensure_flytekit_venv("cold-start")
    flyte_venv = (args.flyte_venv or ensure_flyte_venv("cold-start")) if "a0" in args.suites else None
    entrants = contenders(args.plain_python, fk_venv, flyte_venv, args.suites)
    plain = contenders(args.plain_python, fk_venv, None, ["execute"])[0]
    if has_module(args.plain_python, "flytekit"):
        _say(f"note: {args.plain_python} has flytekit installed; the plain function does not import it")
    command = "python benchmarks/cold_start.py" + (f" --runs {args.runs}" if args.runs != 10 else "") \
        + (f" --storage {','.join(args.storages)}" if args.storages != ["local", "s3"] else "") \
        + (f" --suite {','.join(args.suites)}" if args.suites != list(SUITES) else "")
    profiles: list[tuple[str, list, str]] = []
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        spawner = Spawner()
        stack.callback(spawner.close)
        bundles = build_bundles(args.plain_python, workdir) if "fast" in args.suites else {}
        storages = {"local": local_storage(workdir)}  # always: the import profile runs on it
        if "s3" in args.storages:
            _say("starting moto S3 server")
            storages["s3"] = stack.enter_context(s3_storage())
        runner = Runner(spawner, workdir, storages, bundles)
        cells = measure(runner, entrants, args.storages, args.runs)
        profiles.append(("plain function on local storage", *import_profile(runner, plain)))
        warm = next((c for c in entrants if c.key == "ours-fast-warm"), None)
        if warm is not None:
            profiles.append(("fast-execute on a warm cache, local storage", *import_profile(runner, warm)))
        plain_a0 = next((c for c in entrants if c.key == "ours-plain-a0"), None)
        if plain_a0 is not None:
            profiles.append(("plain function under a0's argv, local storage", *import_profile(runner, plain_a0)))
        floor = floor_line(spawner, args.plain_python, args.runs)

    table = render_table(cells, entrants, args.storages)
    verdict_lines = [v.line() for v in verdicts(cells, args.storages, args.suites)]
    parts = [table, "", floor]
    phase = bundle_phase_line(cells, args.storages)
    if phase:
        parts += ["", phase]
    parts += ["", "Targets:", *[f"- {line}" for line in verdict_lines]]
    for title, costs, problem in profiles:
        summary = import_summary(costs)
        if title.startswith("fast-execute"):
            summary += "\n" + bundle_import_summary(costs)
        if problem:
            summary += f"\n(that run FAILED: {problem.splitlines()[0]})"
        parts += ["", f"Import time, {title} (`-X importtime`):", *[f"- {line}" for line in summary.splitlines()]]
    report = "\n".join(parts)
    failures = failure_details(cells)
    if failures:
        report += "\n\nFailures:\n```\n" + failures + "\n```"
    print(report)
    if args.write_readme:
        pythons = [("plain venv", args.plain_python), ("flytekit venv", str(fk_venv / "bin" / "python"))]
        extra = []
        if flyte_venv is not None:
            pythons.append(("flyte venv", str(flyte_venv / "bin" / "python")))
            extra.append(f"flyte: {FLYTE_VERSION} (its `a0`)")
        facts = machine_facts(pythons, extra, load_at_start=load_at_start)
        write_readme_section("cold_start.py", readme_section(command + " --write-readme", facts, report))
        _say("wrote the cold-start section of benchmarks/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
