"""Code bundles, side by side: the executor's fetch + verify + extract + cache against a plain
download then `tar xzf` (what flytekit's pyflyte-fast-execute does), and a warm-cache hit.

    python benchmarks/bundle.py [--sizes 1,64,512] [--shapes small,large] [--storage local,s3]
                                [--runs N] [--mid-runs N] [--large-runs N] [--write-readme]

Bundles of about 1, 64 and 512 MiB, each in two shapes:
  small   many small files: 4-64 KiB of python-like text each, in a package tree (compressible)
  large   few large files: random bytes (incompressible)
built with `<dev venv>/bin/executor bundle build SRC OUT` (fast<digest>.tar.gz) and stored on a
local directory and on a moto S3 server on loopback (one PUT, so the ETag is the archive's md5).
Per size, shape and storage, three contenders, each a fresh process:
  ours cold   <dev venv>/bin/python -c "BundleCache(root).ensure(BundleRef(uri))" on an empty cache
              (a fresh root every run): fetch + md5, verify the name digest (and the S3 ETag), safe
              extract, publish. The wall time of the whole process, and the ensure() call timed inside.
  baseline    what flytekit's download_distribution does, in a python process: fetch the same bytes
              plainly (local: shutil.copyfile; S3: one s3fs get_file), then a `tar xzf` subprocess
              into a fresh directory. The whole process, and the fetch + tar timed inside it.
  ours hit    the same ensure() on a cache that already holds the bundle.
Every run is verified (exit status; the expected hit or miss; the extracted tree holds every file
of the source with its size) and its tree set aside (renamed into a trash directory emptied at the
end: see Trash); `sync` runs before each measured run so that one run's writeback does not land in
the next. Contenders run round-robin
(the first one rotating), --runs times below 32 MiB, --mid-runs from 32 MiB, --large-runs from
256 MiB; below 256 MiB after one unmeasured warm-up each (for ours cold, the run
that fills the warm cache), from 256 MiB without (the first cold run fills the warm cache). One
more cold ensure() per shape and storage runs under cProfile (at 64 MiB by default). Targets are
printed as PASS/MISS, never asserted: these are noisy machines.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402  (benchmarks/ is not a package the scripts can rely on)
    MIB, Spawner, Verdict, child_env, default_plain_python, load_average, machine_facts, moto_s3,
    nearest_rank, ratio, say, tail, write_readme_section,
)

BUCKET = "bundle-bench"
SHAPES = ("small", "large")
SHAPE_LABEL = {"small": "many small files", "large": "few large files"}
HIT_LIMIT_S = 0.010
MID_MIB = 32     # sizes from here on use --mid-runs
LARGE_MIB = 256  # sizes from here on use --large-runs
SEED = 20260101

# The executor's bundle path, as pyflyte-fast-execute runs it (inject() minus sys.path and dest-dir
# links). argv: cache root, bundle uri[, "profile"]. Prints tab-separated: import s, ensure() s,
# hit, entry root, what was verified.
OURS = r"""
import sys, time
t0 = time.perf_counter()
from executor.bundle.cache import BundleCache, BundleRef
t1 = time.perf_counter()
cache = BundleCache(sys.argv[1])
ref = BundleRef(sys.argv[2])
if sys.argv[3:] == ["profile"]:
    import cProfile, json, pstats
    profile = cProfile.Profile()
    t2 = time.perf_counter()
    prepared = profile.runcall(cache.ensure, ref)
    t3 = time.perf_counter()
    rows = [(f"{f.rsplit('/executor/', 1)[-1] if '/executor/' in f else f.rsplit('/', 1)[-1]}:{fn}" if f != "~" else fn,
             tt, ct, nc, "/executor/" in f)
            for (f, line, fn), (cc, nc, tt, ct, callers) in pstats.Stats(profile).stats.items()]
    sys.stderr.write("PROFILE " + json.dumps(rows) + "\n")
else:
    t2 = time.perf_counter()
    prepared = cache.ensure(ref)
    t3 = time.perf_counter()
print(t1 - t0, t3 - t2, int(prepared.hit), prepared.root, ",".join(prepared.verified), sep="\t")
"""

# The baseline, as flytekit's download_distribution runs inside pyflyte-fast-execute: fetch the
# archive (S3: one s3fs get_file, as its FileAccessProvider.get_data does through fsspec; local: a
# plain copy), then a `tar` subprocess. argv: uri, dest dir. Prints the seconds from the fetch to
# tar's exit (imports excluded, as ours excludes importing executor.bundle.cache).
BASELINE = r"""
import os, subprocess, sys, time
uri, dest = sys.argv[1], sys.argv[2]
archive = os.path.join(dest, uri.rsplit("/", 1)[-1])
if uri.startswith("s3://"):
    import s3fs
    t0 = time.perf_counter()
    fs = s3fs.S3FileSystem(key=os.environ["FLYTE_AWS_ACCESS_KEY_ID"], secret=os.environ["FLYTE_AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": os.environ["FLYTE_AWS_ENDPOINT"]})
    fs.get_file(uri, archive)
else:
    import shutil
    t0 = time.perf_counter()
    shutil.copyfile(uri, archive)
subprocess.run(["tar", "xzf", archive, "-C", dest], check=True)
print(time.perf_counter() - t0)
"""


def _say(message: str) -> None:
    say("bundle", message)


# ------------------------------------------------------------------------------------ data

_WORDS = ("data frame value result config path name index record batch model task workflow output input "
          "schema table column row cache store client request response error status items count total "
          "offset limit token node edge graph state event handler logger metric timer").split()
_TEMPLATES = (
    "def {a}_{b}({c}, {d}={n}):", "    return {a}.{b}({c}) + {n}", "    {a}_{b} = {c}[{n}:{m}]",
    "class {A}{B}({C}):", '    """{w} {a} {b} {c} {d}."""', "import {a}.{b}", "from {a}.{b} import {c}, {d}",
    "    if {a} is not None and {b} > {n}:", "        raise ValueError(f\"{a} {b}: {{{c}!r}}\")",
    "# {w} {a} {b} {c} {d} {e}", "", "    for {a} in {b}.{c}():", "        {a}.append({b}[{n}])",
    "    {a}: dict[str, int] = {{\"{b}\": {n}, \"{c}\": {m}}}", "@{a}.{b}(cache={T}, retries={n})",
)


def _text_pool(rng: random.Random, size: int) -> bytes:
    """A few MiB of python-like lines: files are slices of it (as compressible as source code)."""
    lines, total = [], 0
    while total < size:
        words = {k: rng.choice(_WORDS) for k in "abcde"}
        line = rng.choice(_TEMPLATES).format(
            **words, A=words["a"].title(), B=words["b"].title(), C=words["c"].title(),
            w=rng.choice(_WORDS).title(), n=rng.randrange(1000), m=rng.randrange(1000), T=rng.choice(("True", "False")))
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


@dataclass
class Manifest:
    files: dict[str, int]  # relative path -> size

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def total(self) -> int:
        return sum(self.files.values())


def make_source(root: Path, size: int, shape: str, seed: int) -> Manifest:
    """Write a source tree of about `size` bytes in `shape` under root."""
    rng = random.Random(seed)
    files: dict[str, int] = {}
    if shape == "small":
        pool = _text_pool(rng, 4 * MIB)
        total = 0
        i = 0
        while total < size:
            n = min(rng.randint(4 << 10, 64 << 10), max(size - total, 1 << 10))
            rel = f"app/pkg{i // 2000:02d}/mod{(i // 50) % 40:02d}/file_{i:05d}.py"
            start = rng.randrange(len(pool) - n)
            header = f"# {rel}\n".encode()
            body = header + pool[start: start + n - len(header)]
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(body)
            files[rel] = len(body)
            total += len(body)
            i += 1
        for d in {Path(rel).parent for rel in files} | {Path(rel).parent.parent for rel in files} | {Path("app")}:
            init = root / d / "__init__.py"
            if not init.exists():
                init.write_bytes(b"")
                files[str(d / "__init__.py")] = 0
    else:
        count = max(2, min(8, size // (16 * MIB)))
        each = size // count
        (root / "blobs").mkdir(parents=True)
        for i in range(count):
            rel = f"blobs/weights_{i:02d}.bin"
            with open(root / rel, "wb") as f:
                left = each
                while left:
                    chunk = rng.randbytes(min(left, 16 * MIB))
                    f.write(chunk)
                    left -= len(chunk)
            files[rel] = each
    return Manifest(files)


def check_tree(root: Path, manifest: Manifest, extra: set[str] = frozenset()) -> str:
    """'' if root holds exactly the manifest's files with their sizes (plus `extra` names at the top)."""
    seen: dict[str, int] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            seen[os.path.relpath(path, root)] = os.lstat(path).st_size
    for name in extra:
        seen.pop(name, None)
    if seen == manifest.files:
        return ""
    missing = sorted(set(manifest.files) - set(seen))
    unexpected = sorted(set(seen) - set(manifest.files))
    wrong = sorted(k for k in set(seen) & set(manifest.files) if seen[k] != manifest.files[k])
    return (f"extracted tree differs from the source: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of the wrong size {wrong[:3]}")


# ------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class Sample:
    wall_s: float
    peak_rss_bytes: int
    ok: bool
    problem: str = ""
    import_s: float | None = None  # ours: importing executor.bundle.cache, inside the process
    ensure_s: float | None = None  # inside the process: ours the ensure() call; the baseline fetch + tar


@dataclass
class Cell:
    size_mib: int
    shape: str
    storage: str
    files: int = 0
    archive_bytes: int = 0
    build_s: float = 0.0
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {"cold": [], "baseline": [], "hit": []})
    profile: str = ""

    def good(self, contender: str) -> list[Sample]:
        return [s for s in self.samples[contender] if s.ok]

    def median(self, contender: str, attr: str = "wall_s") -> float | None:
        values = [getattr(s, attr) for s in self.good(contender) if getattr(s, attr) is not None]
        return statistics.median(values) if values else None

    def p90(self, contender: str, attr: str = "wall_s") -> float | None:
        values = [getattr(s, attr) for s in self.good(contender) if getattr(s, attr) is not None]
        return nearest_rank(values, 0.9) if values else None

    def ok_runs(self, contender: str) -> str:
        return f"{len(self.good(contender))}/{len(self.samples[contender])}"


@dataclass
class Store:
    name: str
    env: dict[str, str]
    uri: dict[tuple[int, str], str] = field(default_factory=dict)  # (size, shape) -> the bundle's URI


# ------------------------------------------------------------------------------------ runs

# ext4 without a journal (as this machine's / is) does not reuse an inode freed in the last 60 s (300 s
# while its inode table block is dirty; RECENTCY_MIN and RECENTCY_DIRTY in fs/ext4/ialloc.c since
# Linux 5.7): to allocate one it checks every such free inode of the block group against the inode
# table, so after a tree of thousands of files is deleted, every file created in the next minute costs
# up to 0.5 ms more, whoever creates it (perf: find_get_block_common under recently_deleted). A pod does
# not delete thousands of files just before it extracts its bundle (and journaled filesystems skip
# that check), so the benchmark deletes no tree while it measures: each is renamed into a trash
# directory, emptied at the end, or earlier when the disk runs short (then it waits SETTLE_S).
SETTLE_S = 61.0


class Trash:
    """Where measured runs' trees go instead of being deleted (see above)."""

    def __init__(self, root: Path):
        self.root = root
        self.reserve = 0  # bytes to keep free for the next runs; below it, empty the trash first
        self._count = 0

    def put(self, path: Path) -> None:
        if not path.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._count += 1
        path.rename(self.root / f"{self._count:05d}")
        if shutil.disk_usage(self.root).free < self.reserve:
            self.empty(settle=True)

    def empty(self, settle: bool = False) -> None:
        if not self.root.exists():
            return
        _say(f"emptying the trash of measured trees{f', then waiting {SETTLE_S:g} s for ext4 to reuse their inodes' if settle else ''}")
        shutil.rmtree(self.root, ignore_errors=True)
        if settle:
            os.sync()
            time.sleep(SETTLE_S)


class Bench:
    def __init__(self, spawner: Spawner, workdir: Path, plain_python: str):
        self.spawner = spawner
        self.workdir = workdir
        self.trash = Trash(workdir / "trash")
        self.python = plain_python
        self._count = 0

    def _scratch(self, tag: str) -> tuple[Path, Path, Path]:
        self._count += 1
        name = f"{self._count:05d}-{tag}"
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        return self.workdir / "runs" / name, logs / f"{name}.stdout", logs / f"{name}.stderr"

    def ours(self, store: Store, uri: str, cache_root: Path, manifest: Manifest, expect_hit: bool,
             tag: str, profile: bool = False) -> Sample:
        _, out, err = self._scratch(tag)
        argv = [self.python, "-c", OURS, str(cache_root), uri] + (["profile"] if profile else [])
        os.sync()
        wall, rss, code = self.spawner.run(argv, child_env(store.env, repo_importable=False), out, err)
        fields = out.read_text().strip().split("\t") if out.exists() else []
        if code != 0 or len(fields) != 5:
            return Sample(wall, rss, False, f"exit {code}, stdout {fields!r}\n{tail(err)}")
        import_s, ensure_s, hit, root, verified = float(fields[0]), float(fields[1]), fields[2] == "1", fields[3], fields[4]
        problem = ""
        if hit != expect_hit:
            problem = f"expected a cache {'hit' if expect_hit else 'miss'}, got a {'hit' if hit else 'miss'}"
        elif "name digest" not in verified.split(","):
            problem = f"the name digest was not verified (verified: {verified or 'nothing'})"
        elif store.name == "s3" and "store md5" not in verified.split(","):
            problem = f"the S3 ETag was not verified (verified: {verified or 'nothing'})"
        else:
            problem = check_tree(Path(root), manifest)
        return Sample(wall, rss, not problem, problem, import_s, ensure_s)

    def baseline(self, store: Store, uri: str, manifest: Manifest, tag: str) -> Sample:
        dest, out, err = self._scratch(tag)
        dest.mkdir(parents=True)
        name = uri.rsplit("/", 1)[-1]
        try:
            os.sync()
            wall, rss, code = self.spawner.run([self.python, "-c", BASELINE, uri, str(dest)],
                                               child_env(store.env, repo_importable=False), out, err)
            fields = out.read_text().split() if out.exists() else []
            if code != 0 or len(fields) != 1:
                return Sample(wall, rss, False, f"exit {code}, stdout {fields!r}\n{tail(err)}")
            problem = check_tree(dest, manifest, extra={name})
            return Sample(wall, rss, not problem, problem, ensure_s=float(fields[0]))
        finally:
            self.trash.put(dest)


def measure_cell(bench: Bench, cell: Cell, store: Store, manifest: Manifest, runs: int, warm_up: bool,
                 profile: bool) -> None:
    uri = store.uri[(cell.size_mib, cell.shape)]
    tag = f"{cell.size_mib}M-{cell.shape}-{store.name}"
    caches = bench.workdir / "caches"
    warm = caches / f"warm-{tag}"

    def cold(label: str, **kw) -> Sample:
        root = caches / f"cold-{bench._count}"
        try:
            return bench.ours(store, uri, root, manifest, expect_hit=False, tag=f"{tag}-{label}", **kw)
        finally:
            bench.trash.put(root)

    def run(contender: str, label: str) -> Sample:
        if contender == "cold":
            return cold(label)
        if contender == "hit":
            return bench.ours(store, uri, warm, manifest, expect_hit=True, tag=f"{tag}-hit-{label}")
        return bench.baseline(store, uri, manifest, f"{tag}-baseline-{label}")

    try:
        order = ["cold", "baseline", "hit"]
        if warm_up:
            # one unmeasured run each; ours cold's is the run that fills the warm cache
            for contender, sample in (("cold", bench.ours(store, uri, warm, manifest, False, f"{tag}-fill")),
                                      ("baseline", run("baseline", "warmup")), ("hit", run("hit", "warmup"))):
                if not sample.ok:
                    _say(f"{tag}: warm-up of {contender} FAILED:\n{sample.problem}")
        else:
            # no warm-ups (too slow at this size): the first cold run, on the still empty warm cache, fills it
            first = bench.ours(store, uri, warm, manifest, False, f"{tag}-cold-run0")
            cell.samples["cold"].append(first)
            if not first.ok:
                _say(f"{tag}: first cold run FAILED:\n{first.problem}")
            for contender in order[1:]:
                cell.samples[contender].append(run(contender, "run0"))
        for i in range(0 if warm_up else 1, runs):
            shift = i % len(order)
            for contender in order[shift:] + order[:shift]:
                cell.samples[contender].append(run(contender, f"run{i}"))
        if profile:
            sample = cold("profile", profile=True)
            cell.profile = _profile_summary(bench, sample)
    finally:
        bench.trash.put(warm)
    _say(f"{tag}: cold {_ms(cell.median('cold'))}, baseline {_ms(cell.median('baseline'))}, "
         f"hit {_ms(cell.median('hit'))} (ensure() {_ms(cell.median('hit', 'ensure_s'), 2)})")


def _profile_summary(bench: Bench, sample: Sample) -> str:
    """From a cProfile'd cold ensure() (that run's stderr): the executor's own functions by cumulative
    time, then the top functions anywhere by own time."""
    import json

    logs = sorted((bench.workdir / "logs").glob("*-profile.stderr"))
    line = next((l for l in (logs[-1].read_text().splitlines() if logs else []) if l.startswith("PROFILE ")), None)
    if line is None or not sample.ok:
        return f"profile run failed: {sample.problem.splitlines()[0] if sample.problem else 'no profile printed'}"
    rows = json.loads(line[len("PROFILE "):])
    ours = sorted((r for r in rows if r[4] and r[2] >= 0.005 and not r[0].endswith(":ensure")), key=lambda r: -r[2])
    own = sorted(rows, key=lambda r: -r[1])[:6]
    return (f"ensure() {sample.ensure_s * 1000:.0f} ms under cProfile. Executor functions, cumulative: "
            + ", ".join(f"`{r[0]}` {r[2] * 1000:.0f} ms" for r in ours[:10])
            + ". Own time: " + ", ".join(f"`{r[0]}` {r[1] * 1000:.0f} ms ({r[3]} calls)" for r in own))


# ------------------------------------------------------------------------------------ report


def _ms(seconds: float | None, digits: int = 0) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.{digits}f} ms"


def _size(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.0f} KiB"


def render_table(cells: list[Cell]) -> str:
    rows = [
        "| size | shape | storage | files | archive | runs | ours cold: ensure() in process | baseline: fetch + tar in process "
        "| cold / baseline (in process) | ours cold: whole process | baseline: whole process | cold / baseline (whole processes) "
        "| ours hit: ensure() in process | ours hit: whole process | ours hit: import |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        runs = len(c.samples["cold"])
        ok = "" if all(len(c.good(k)) == len(c.samples[k]) for k in c.samples) else \
            f" (ok: cold {c.ok_runs('cold')}, baseline {c.ok_runs('baseline')}, hit {c.ok_runs('hit')})"
        rows.append(
            f"| {c.size_mib} MiB | {SHAPE_LABEL[c.shape]} | {c.storage} | {c.files} | {_size(c.archive_bytes)} | {runs}{ok} "
            f"| {_ms(c.median('cold', 'ensure_s'))} | {_ms(c.median('baseline', 'ensure_s'))} "
            f"| {ratio(c.median('cold', 'ensure_s'), c.median('baseline', 'ensure_s'))} "
            f"| {_ms(c.median('cold'))} | {_ms(c.median('baseline'))} | {ratio(c.median('cold'), c.median('baseline'))} "
            f"| {_ms(c.median('hit', 'ensure_s'), 2)} | {_ms(c.median('hit'))} | {_ms(c.median('hit', 'import_s'), 1)} |"
        )
    return "\n".join(rows)


def verdicts(cells: list[Cell]) -> list[Verdict]:
    out = []
    for c in cells:
        target = f"ours cold no slower than fetch + tar ({c.size_mib} MiB, {SHAPE_LABEL[c.shape]}, {c.storage}; in process)"
        ours, base = c.median("cold", "ensure_s"), c.median("baseline", "ensure_s")
        if ours is None or base is None:
            out.append(Verdict(target, "a contender had no successful run", None))
        else:
            out.append(Verdict(target, f"{ours / base:.2f}× ({_ms(ours)} vs {_ms(base)})", ours <= base))
    hits = [(c.median("hit", "ensure_s"), c) for c in cells]
    judged = [(h, c) for h, c in hits if h is not None]
    target = f"a hit's ensure() under {HIT_LIMIT_S * 1000:.0f} ms at every size (in process)"
    if not judged:
        out.append(Verdict(target, "no successful hit", None))
    else:
        worst, cell = max(judged, key=lambda hc: hc[0])
        p90 = max(c.p90("hit", "ensure_s") for _, c in judged)
        out.append(Verdict(target, f"slowest median {worst * 1000:.2f} ms ({cell.size_mib} MiB, {SHAPE_LABEL[cell.shape]}, "
                                   f"{cell.storage}); worst p90 {p90 * 1000:.2f} ms",
                           worst < HIT_LIMIT_S and len(judged) == len(hits)))
    return out


def failure_details(cells: list[Cell]) -> str:
    parts = []
    for c in cells:
        for contender, samples in c.samples.items():
            failed = [s for s in samples if not s.ok]
            if failed:
                parts.append(f"{contender}, {c.size_mib} MiB {c.shape} on {c.storage}: {len(failed)}/{len(samples)} "
                             f"runs failed; first failure:\n{failed[0].problem}")
    return "\n\n".join(parts)


def readme_section(command: str, facts: list[str], report: str) -> str:
    return f"""## Code bundles (`bundle.py`)

`bundle.py` times what a fast-registered task's pod does with its code bundle before the task can
start, for bundles of about 1 MiB, 64 MiB and 512 MiB in two shapes: many small files (4–64 KiB of
python-like text each, in a package tree: compressible, about 4×) and few large files (random
bytes: incompressible). Each bundle is built with `executor bundle build SRC OUT`
(`fast<digest>.tar.gz`) and stored on a local directory and on a moto S3 server on loopback (one
PUT, so its ETag is the archive's md5, as after flytekit's upload). Per size, shape and storage:

| contender | what runs (a fresh process each time) |
|---|---|
| ours cold | `<dev venv>/bin/python -c "from executor.bundle.cache import BundleCache, BundleRef; BundleCache(root).ensure(BundleRef(uri))"` on an empty cache (a fresh root every run): fetch while computing the md5, safe extraction into staging following the download as it arrives (a local bundle is read where it lies; its archive md5 is computed, by the decompressing thread, only when there is one to check it against), then verify the S3 ETag and the digest in the name (recomputed over the extracted files), read-only, publish |
| baseline | what flytekit's `download_distribution` does inside `pyflyte-fast-execute`, in a `<dev venv>/bin/python` process: fetch the same bytes plainly (locally `shutil.copyfile`; on S3 one s3fs `get_file`, as flytekit fetches through fsspec), then run `tar xzf` into a fresh directory as a subprocess |
| ours hit | the same `ensure()` on a cache that already holds the bundle (the next pod on the node) |

The target compares the bundle step inside the pod's entrypoint, which is a Python process for
flytekit as for us: ours `ensure()` timed inside its process (including what it imports on its
first call: an md5 implementation, the extraction modules, isal, obstore), against the baseline's fetch + `tar`
subprocess timed inside its process (after `import s3fs`, which flytekit's process also has done by
then; the s3fs client is made inside the timed part, as ours makes its obstore client). Both
processes' whole wall times, spawn to exit (taken by the same tiny spawner as the cold-start
benchmark), are in the table too: they add starting Python and the imports to both. For a hit
the import of `executor.bundle.cache` is timed as well (a hit in a real pod pays it too). Every run
is checked (exit status, the expected miss or hit, the name digest and on S3 the ETag verified, and
the extracted tree holding every source file at its size); `sync` runs before each measured run so
one run's writeback does not land in the next. No tree is deleted while the benchmark measures:
each is renamed into a trash directory, emptied at the end (or, when the disk runs short, emptied
and followed by a {SETTLE_S:g} s wait). ext4 without a journal (this machine's scratch filesystem)
does not reuse an inode freed in the last 60 s: to allocate one it checks every such free inode
against the inode table, so after a tree of thousands of files is deleted each file the next run
creates, ours or `tar`'s, costs up to 0.5 ms more. A pod does not delete thousands of files just
before it extracts its bundle, and journaled filesystems skip that check. Below {LARGE_MIB} MiB: one
unmeasured warm-up per contender (for ours cold: the run that fills the warm cache), then `--runs`
rounds (default 10), from {MID_MIB} MiB `--mid-runs` (default 5). From {LARGE_MIB} MiB: no warm-ups (the archive was just written, so it is in
the page cache anyway; the first measured cold run fills the warm cache), `--large-runs` rounds
(default 3). Contenders run round-robin, the first one rotating each round; the table gives
medians. Last, one more cold `ensure()` per shape and storage runs under cProfile (at 64 MiB, see
`--profile-size`) to show where its time goes (cProfile slows it down; read the shares, not the
totals).

Reading the figures: the baseline's `tar xzf` decompresses in a separate `gzip` process, so on
2 cores decompression overlaps file creation; ours decompresses in one thread (isal's inflate),
parses the headers in another, hashes in a third and creates files in a few more, and extracts
archives under 2 MiB in one thread alone (see [docs/bundles.md](../docs/bundles.md)). moto serves
every GET, ranged or not, by copying the whole object out of its store first
(`FakeKey.value`), so a download split into ranged GETs pays that once per range: on real S3 a
range costs only its own bytes. Creating files dominates bundles of many small files for every
contender.

Targets, printed as PASS/MISS and never asserted (the figures are noisy): on a cold cache ours is
no slower than fetch + `tar` in every cell, in process (although it also verifies and publishes); a
hit's `ensure()` takes under 10 ms at every size.

### Run it

```
{command}
```

`--sizes 1,64,512` (MiB), `--shapes small,large`, `--storage local,s3`, `--runs N` (default 10),
`--mid-runs N` (default 5), `--large-runs N` (default 3), `--profile-size MiB` (default 64; 0: no profile), `--workdir DIR`
(scratch space: about 5× the largest size is needed, and the trees of measured runs are kept until
the end while the disk has room; a size that does not fit is skipped with the reason), `--write-readme` (rewrites this section of this file).

### Latest figures

{chr(10).join(f"- {fact}" for fact in facts)}

{report}
"""


# ------------------------------------------------------------------------------------ main


@contextlib.contextmanager
def stores(names: list[str]) -> Iterator[dict[str, Store]]:
    out = {"local": Store("local", {})} if "local" in names else {}
    with contextlib.ExitStack() as stack:
        if "s3" in names:
            _say("starting moto S3 server")
            server = stack.enter_context(moto_s3(BUCKET))
            store = Store("s3", server.env)
            store.client = server.client  # type: ignore[attr-defined]
            out["s3"] = store
        yield out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,64,512", help="bundle sizes in MiB, comma-separated (default 1,64,512)")
    parser.add_argument("--shapes", default="small,large", help="comma-separated: small, large (default both)")
    parser.add_argument("--storage", default="local,s3", help="comma-separated: local, s3 (default both)")
    parser.add_argument("--runs", type=int, default=10, help=f"measured runs per cell below {MID_MIB} MiB (default 10)")
    parser.add_argument("--mid-runs", type=int, default=5,
                        help=f"measured runs per cell from {MID_MIB} to {LARGE_MIB - 1} MiB (default 5)")
    parser.add_argument("--large-runs", type=int, default=3, help=f"measured runs per cell from {LARGE_MIB} MiB (default 3)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new one under $TMPDIR)")
    parser.add_argument("--profile-size", type=int, default=64,
                        help="MiB: one more cold ensure() under cProfile per shape and storage, at the largest "
                             "measured size up to this (default 64; 0: none)")
    parser.add_argument("--write-readme", action="store_true",
                        help="rewrite the bundle section of benchmarks/README.md with this run's figures")
    parser.add_argument("--plain-python", default=default_plain_python(),
                        help="python of the venv with the executor (default <repo>/.venv/bin/python)")
    args = parser.parse_args(argv)
    args.plain_python = os.path.abspath(args.plain_python)
    try:
        args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes takes MiB as integers, got {args.sizes!r}")
    if not args.size_list or min(args.size_list) < 1:
        parser.error("--sizes must list sizes of at least 1 MiB")
    args.shape_list = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if set(args.shape_list) - set(SHAPES) or not args.shape_list:
        parser.error(f"--shapes takes small and/or large, got {args.shapes!r}")
    args.storages = [s.strip() for s in args.storage.split(",") if s.strip()]
    if set(args.storages) - {"local", "s3"} or not args.storages:
        parser.error(f"--storage takes local and/or s3, got {args.storage!r}")
    if min(args.runs, args.mid_runs, args.large_runs) < 1:
        parser.error("--runs, --mid-runs and --large-runs must be at least 1")
    return args


def command_line(args: argparse.Namespace) -> str:
    parts = ["python benchmarks/bundle.py"]
    if args.sizes != "1,64,512":
        parts.append(f"--sizes {','.join(map(str, args.size_list))}")
    if args.shape_list != list(SHAPES):
        parts.append(f"--shapes {','.join(args.shape_list)}")
    if args.storages != ["local", "s3"]:
        parts.append(f"--storage {','.join(args.storages)}")
    if args.runs != 10:
        parts.append(f"--runs {args.runs}")
    if args.mid_runs != 5:
        parts.append(f"--mid-runs {args.mid_runs}")
    if args.large_runs != 3:
        parts.append(f"--large-runs {args.large_runs}")
    if args.profile_size != 64:
        parts.append(f"--profile-size {args.profile_size}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = load_average()
    started = time.monotonic()
    executor_bin = Path(args.plain_python).parent / "executor"
    build_cmd = [str(executor_bin)] if executor_bin.exists() else [args.plain_python, "-m", "executor"]
    cells: list[Cell] = []
    skipped: list[str] = []
    below = [s for s in args.size_list if s <= args.profile_size]
    profile_size = max(below) if below and args.profile_size > 0 else None
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bundle-bench-", dir=args.workdir))
    try:
        with stores(args.storages) as by_name, contextlib.closing(Spawner(cwd=workdir)) as spawner:
            bench = Bench(spawner, workdir, args.plain_python)

            def free() -> int:
                return min(shutil.disk_usage(workdir).free, shutil.disk_usage(tempfile.gettempdir()).free)

            for size_mib in sorted(args.size_list):
                size = size_mib * MIB
                # source + archive, then: archive + its copy in moto's temp files + warm cache + one run's
                # download and extracted tree (about 3 archives + 2 trees); 5x the size covers both shapes.
                need = 5 * size + 256 * MIB
                if free() < need:
                    bench.trash.empty(settle=True)
                bench.trash.reserve = need
                if free() < need:
                    reason = f"{size_mib} MiB skipped: {free() / MIB:.0f} MiB free under {workdir}, about {need / MIB:.0f} MiB needed"
                    _say(reason)
                    skipped.append(reason)
                    continue
                runs = args.large_runs if size_mib >= LARGE_MIB else args.mid_runs if size_mib >= MID_MIB else args.runs
                for shape in args.shape_list:
                    src, out = workdir / "src", workdir / "out"
                    t = time.monotonic()
                    manifest = make_source(src, size, shape, SEED + size_mib)
                    _say(f"{size_mib} MiB {shape}: {manifest.count} files, {_size(manifest.total)} written in "
                         f"{time.monotonic() - t:.1f} s; building the bundle")
                    t = time.monotonic()
                    built = subprocess.run([*build_cmd, "bundle", "build", str(src), str(out)], capture_output=True,
                                           text=True, env=child_env(repo_importable=False))
                    build_s = time.monotonic() - t
                    archives = sorted(out.glob("fast*.tar.gz"))
                    if built.returncode != 0 or len(archives) != 1:
                        raise SystemExit(f"executor bundle build failed (exit {built.returncode}):\n{built.stderr}")
                    archive = archives[0]
                    bench.trash.put(src)
                    for store in by_name.values():
                        if store.name == "local":
                            store.uri[(size_mib, shape)] = str(archive)
                        else:
                            key = f"{size_mib}M/{shape}/{archive.name}"
                            with open(archive, "rb") as body:  # one PUT, as flytekit's upload: ETag = md5
                                store.client.put_object(Bucket=BUCKET, Key=key, Body=body)  # type: ignore[attr-defined]
                            store.uri[(size_mib, shape)] = f"s3://{BUCKET}/{key}"
                    _say(f"{size_mib} MiB {shape}: {archive.name}, {_size(archive.stat().st_size)}, built in {build_s:.1f} s")
                    try:
                        for store in by_name.values():
                            cell = Cell(size_mib, shape, store.name, manifest.count, archive.stat().st_size, build_s)
                            measure_cell(bench, cell, store, manifest, runs, warm_up=size_mib < LARGE_MIB,
                                         profile=size_mib == profile_size)
                            cells.append(cell)
                    finally:
                        for store in by_name.values():
                            if store.name == "s3":
                                store.client.delete_object(Bucket=BUCKET, Key=store.uri[(size_mib, shape)].split("/", 3)[3])  # type: ignore[attr-defined]
                        shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    elapsed = time.monotonic() - started
    table = render_table(cells)
    parts = [table, ""]
    builds = sorted({(c.size_mib, c.shape, c.build_s, c.archive_bytes) for c in cells})
    if builds:
        parts += ["`executor bundle build` (gzip level 9, as flytekit's): "
                  + ", ".join(f"{s} MiB {SHAPE_LABEL[sh]} {b:.1f} s" for s, sh, b, _ in builds), ""]
    parts += ["Targets:", *[f"- {v.line()}" for v in verdicts(cells)]]
    if skipped:
        parts += ["", "Skipped:", *[f"- {reason}" for reason in skipped]]
    profiles = [c for c in cells if c.profile]
    if profiles:
        parts += ["", "Where a cold `ensure()` spends its time (cProfile, one more cold run per shape and storage):"]
        parts += [f"- {c.size_mib} MiB, {SHAPE_LABEL[c.shape]}, {c.storage}: {c.profile}" for c in profiles]
    parts += ["", f"Total benchmark time: {elapsed / 60:.1f} min."]
    report = "\n".join(parts)
    failures = failure_details(cells)
    if failures:
        report += "\n\nFailures:\n```\n" + failures + "\n```"
    print(report)
    if args.write_readme:
        facts = machine_facts([("dev venv", args.plain_python)], load_at_start=load_at_start,
                              extra=[f"tar: {_tool_version(['tar', '--version'])}; gzip: {_tool_version(['gzip', '--version'])}",
                                     f"scratch filesystem: {_fs_type(workdir.parent)}"])
        write_readme_section("bundle.py", readme_section(command_line(args) + " --write-readme", facts, report))
        _say("wrote the bundle section of benchmarks/README.md")
    return 0


def _tool_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0].strip()
    except (OSError, IndexError):
        return "unknown"


def _fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout.splitlines()[1].split()
        return f"{out[1]} ({path})"
    except (OSError, IndexError):
        return f"unknown ({path})"


if __name__ == "__main__":
    sys.exit(main())
