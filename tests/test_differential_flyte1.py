"""Differential tests against flytekit 1.16.31's own in-pod entrypoint.

Every case: flytekit's TypeEngine writes ``inputs.pb``; flytekit's ``pyflyte-execute`` and ours
(``python -m executor pyflyte-execute``, same argv) run the task into separate prefixes under
``tmp_path``; flytekit's TypeEngine decodes both ``outputs.pb`` and the values must be equal (and
equal to the value the case table expects, so the oracle itself is checked). Where flytekit's output
is deterministic the two ``outputs.pb`` must also encode the same bytes once map entries are put in
key order -- flytekit itself writes map entries in varying order from run to run (it converts
outputs concurrently), so raw byte order is not something flytekit is consistent about. Outputs
holding a pickle or a file carry a random URI; there the literals must match apart from the URI,
and every URI must lie under that run's ``--raw-output-data-prefix``.

Three families:
  * flytekit-authored tasks (``differential/fk_tasks.py``): ours runs them with the oracle venv's
    python, through flytekit;
  * plain functions (``differential/plain_tasks.py``, no SDK): ours runs them with this test
    process's python (no flytekit installed), flytekit runs their twins (``fk_twins.py``);
  * map tasks (``pyflyte-map-execute``) of both kinds, one array element each.

Set ``DIFFERENTIAL_OURS=flytekit`` to run flytekit on both sides: a self-check of this harness.
"""
from __future__ import annotations

import datetime
import difflib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pytest
from flyteidl.core import errors_pb2, literals_pb2
from google.protobuf import text_format

from tests.differential.plain_tasks import Color, Inner, Opaque, Point
from tests.oracle.flytekit_env import REPO_ROOT, FlytekitOracle

pytestmark = pytest.mark.oracle

FK_TASKS = "tests.differential.fk_tasks"
FK_TWINS = "tests.differential.fk_twins"
PLAIN = "tests.differential.plain_tasks"
DEFAULT_RESOLVER = "flytekit.core.python_auto_container.default_task_resolver"
MAP_RESOLVER = "flytekit.core.array_node_map_task.ArrayNodeMapTaskResolver"
SELF_CHECK = os.environ.get("DIFFERENTIAL_OURS") == "flytekit"

UTC = datetime.timezone.utc
IST = datetime.timezone(datetime.timedelta(hours=5, minutes=30))


# ------------------------------------------------------------------------------------ case table


@dataclass(frozen=True)
class FileInput:
    """A FlyteFile / os.PathLike input: materialised under tmp_path before inputs are written."""
    content: bytes


@dataclass(frozen=True)
class DirInput:
    """A FlyteDirectory input: {relative path: content}, materialised under tmp_path."""
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class Case:
    id: str
    task: str
    inputs: Mapping[str, Any]
    expected: Mapping[str, Any]      # output name -> value, as flytekit decodes it
    deterministic: bool = True       # False: an output holds a pickle/file at a random URI
    families: tuple[str, ...] = ("flytekit", "plain")
    # flytekit does not upload a file returned as a bare os.PathLike: its URI stays the pod-local
    # temp path. Ours must always leave durable URIs under --raw-output-data-prefix.
    flytekit_uploads: bool = True

    def __repr__(self) -> str:
        return self.id


POINT = Point(x=1.5, y=-2.0, tags=["a", "ü"], counts={"k": 1}, inner=Inner(name="in", weight=3.0), label=None)

CASES = [
    Case("int", "add", {"a": 3, "b": -7}, {"o0": -4}),
    Case("int64-max", "add", {"a": 2**62, "b": 2**62 - 1}, {"o0": 2**63 - 1}, families=("plain",)),
    Case("float-str-bool-tuple", "describe", {"x": 1.25, "name": "héllo ✓", "loud": True},
         {"o0": "HÉLLO ✓=1.25", "o1": False, "o2": 3.125}),
    Case("datetime-timedelta", "shift",
         {"when": datetime.datetime(2024, 2, 29, 23, 30, 1, 123456, tzinfo=IST),
          "by": datetime.timedelta(days=1, microseconds=7)},
         {"o0": datetime.datetime(2024, 3, 1, 18, 0, 1, 123463, tzinfo=UTC),
          "o1": datetime.timedelta(days=2, microseconds=14), "o2": "UTC"}),
    Case("none-output", "noop", {"x": 1}, {}),
    Case("list-in-dict-out", "histogram", {"words": ["b", "a", "b", "c"]}, {"o0": {"b": 2, "a": 1, "c": 1}}),
    Case("dict-of-lists-in-list-out", "flatten", {"groups": {"y": [3, 4], "x": [1]}, "scale": 0.5},
         {"o0": [0.5, 1.5, 2.0]}),
    Case("untyped-dict-msgpack", "merge",
         {"base": {"a": 1, "nested": {"l": [1, 2.5, "s", None]}}, "extra": {"b": "two", "flag": False}},
         {"o0": {"a": 1, "nested": {"l": [1, 2.5, "s", None]}, "b": "two", "flag": False, "merged": True}}),
    Case("optional-none", "maybe_double", {"x": None}, {"o0": None}),
    Case("optional-value", "maybe_double", {"x": 21}, {"o0": 42}),
    Case("union-int-to-float", "either", {"v": 4}, {"o0": 6.0}),
    Case("union-str-to-str", "either", {"v": "abc"}, {"o0": "cba"}),
    Case("enum", "next_color", {"c": Color.BLUE}, {"o0": Color.RED}),
    Case("dataclass-msgpack", "move", {"p": POINT, "dx": 0.25},
         {"o0": Point(x=1.75, y=-2.0, tags=["a", "ü", "moved"], counts={"k": 1, "moves": 1},
                      inner=Inner(name="IN", weight=1.5), label=None, history=[1])}),
    Case("namedtuple-outputs", "stats", {"xs": [1.0, 2.0, 4.5]}, {"mean": 2.5, "count": 3}),
    Case("pickle", "bump", {"o": Opaque([1, "x"], "n"), "n": 2}, {"o0": Opaque([1, "x", 2], "n!")},
         deterministic=False),
    Case("file", "upper_file", {"f": FileInput(b"hello\nfile\n")}, {"o0": ("file", b"HELLO\nFILE\n")},
         deterministic=False, families=("flytekit",)),
    Case("pathlike", "upper_file", {"f": FileInput(b"hello\nfile\n")}, {"o0": ("file", b"HELLO\nFILE\n")},
         deterministic=False, families=("plain",), flytekit_uploads=False),
    Case("directory-in", "listing", {"d": DirInput({"a.txt": b"A", "sub/b.txt": b"B"})},
         {"o0": ["a.txt", "sub/b.txt"]}, families=("flytekit",)),
]


def cases_for(family: str) -> list:
    return [pytest.param(c, id=c.id) for c in CASES if family in c.families]


@dataclass(frozen=True)
class MapCase:
    id: str
    inputs: Mapping[str, Any]          # whole collections for mapped inputs, plain values for bound ones
    bound: tuple[str, ...]
    index_env: Mapping[str, str]
    expected: Mapping[str, Any]


MAP_CASES = [
    MapCase("element-1", {"x": [1, 2, 3], "offset": [10, 20, 30]}, (),
            {"FLYTE_K8S_ARRAY_INDEX": "1"}, {"o0": 2 * 2 + 20}),
    MapCase("bound-offset-and-index-offset", {"x": [1, 2, 3, 4, 5], "offset": 100}, ("offset",),
            {"FLYTE_K8S_ARRAY_INDEX": "1", "BATCH_JOB_ARRAY_INDEX_OFFSET": "2"}, {"o0": 4 * 4 + 100}),
]


# ------------------------------------------------------------------------------------ storage


class LocalStore:
    """Prefixes are plain directories under tmp_path (flytekit writes bare absolute paths)."""

    env: Mapping[str, str] = {}

    def __init__(self, root: Path):
        self.root = root

    def prefix(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def read(self, uri: str) -> bytes | None:
        path = Path(uri.removeprefix("file://"))
        return path.read_bytes() if path.is_file() else None

    def is_under(self, uri: str, prefix: str) -> bool:
        return os.path.realpath(uri.removeprefix("file://")).startswith(os.path.realpath(prefix) + os.sep)


class S3Store:
    """Prefixes are keys in a fresh bucket of the moto S3 server."""

    def __init__(self, server, bucket: str):
        self.server, self.bucket = server, bucket
        self.env = server.env

    def prefix(self, *parts: str) -> str:
        return f"s3://{self.bucket}/" + "/".join(parts)

    def read(self, uri: str) -> bytes | None:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return self.server.get(bucket, key)

    def is_under(self, uri: str, prefix: str) -> bool:
        return uri.startswith(prefix.rstrip("/") + "/")


# ------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class Family:
    """Who runs what: flytekit always runs (and decodes with) a flytekit task; ours runs
    ``ours_module`` with ``ours_python``."""
    name: str
    fk_module: str
    ours_module: str
    ours_python: Callable[[FlytekitOracle], str]


FAMILIES = {
    "flytekit": Family("flytekit", FK_TASKS, FK_TASKS, lambda oracle: oracle.python),
    "plain": Family("plain", FK_TWINS, PLAIN, lambda oracle: sys.executable),
}


def entrypoint_args(verb: str, inputs: str, prefix: str, resolver: str, resolver_args: list[str]) -> list[str]:
    """flytekit's container args, verbatim (see CONTRACT.md section 1)."""
    return [
        verb,
        "--inputs", inputs,
        "--output-prefix", f"{prefix}/out",
        "--raw-output-data-prefix", f"{prefix}/raw",
        "--checkpoint-path", f"{prefix}/ckpt",
        "--prev-checkpoint", '""',
        "--resolver", resolver,
        "--", *resolver_args,
    ]


def task_args(module: str, task: str, map_bound: tuple[str, ...] | None) -> tuple[str, str, list[str]]:
    """(verb, resolver, resolver args) for a plain run, or for a map-task element when map_bound is given."""
    inner = ["task-module", module, "task-name", task]
    if map_bound is None:
        return "pyflyte-execute", DEFAULT_RESOLVER, inner
    return "pyflyte-map-execute", MAP_RESOLVER, ["vars", ",".join(sorted(map_bound)), "resolver", DEFAULT_RESOLVER,
                                                 *inner]


@dataclass
class Run:
    name: str
    argv: list[str]
    prefix: str
    store: LocalStore | S3Store
    proc: subprocess.CompletedProcess | None = None
    _popen: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def raw(self) -> str:
        return f"{self.prefix}/raw"

    @property
    def outputs_uri(self) -> str:
        return f"{self.prefix}/out/outputs.pb"

    def outputs(self) -> literals_pb2.LiteralMap:
        m = literals_pb2.LiteralMap()
        m.ParseFromString(self.store.read(self.outputs_uri))
        return m

    def start(self, env: Mapping[str, str]) -> "Run":
        if isinstance(self.store, LocalStore):
            Path(self.prefix).mkdir(parents=True, exist_ok=True)
        self._popen = subprocess.Popen(
            self.argv, cwd=REPO_ROOT, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        return self

    def wait(self) -> "Run":
        stdout, stderr = self._popen.communicate(timeout=300)
        self.proc = subprocess.CompletedProcess(self.argv, self._popen.returncode, stdout, stderr)
        return self

    def describe(self) -> str:
        return (f"[{self.name}] {' '.join(self.argv)}\n  exit {self.proc.returncode}\n"
                f"  --- stderr (tail) ---\n{self.proc.stderr[-4000:]}")


def materialise(values: Mapping[str, Any], where: Path) -> dict[str, Any]:
    out = {}
    for name, v in values.items():
        if isinstance(v, FileInput):
            p = where / f"{name}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(v.content)
            v = str(p)
        elif isinstance(v, DirInput):
            root = where / name
            for rel, content in v.files.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(content)
            v = str(root)
        out[name] = v
    return out


# ------------------------------------------------------------------------------------ checking


def as_text(m) -> str:
    return text_format.MessageToString(m, as_utf8=True)


_URI = re.compile(r'uri: "([^"]*)"')


def mask_uris(text: str) -> str:
    return _URI.sub('uri: "<uri>"', text)


def assert_succeeded(run: Run) -> None:
    error = run.store.read(f"{run.prefix}/out/error.pb")
    if error is not None:
        doc = errors_pb2.ErrorDocument()
        doc.ParseFromString(error)
        pytest.fail(f"{run.name} wrote error.pb:\n{as_text(doc)}\n{run.describe()}", pytrace=False)
    assert run.proc.returncode == 0, run.describe()
    assert run.store.read(run.outputs_uri) is not None, f"{run.name} wrote no outputs.pb\n{run.describe()}"


def assert_uris_under_raw_prefix(run: Run) -> None:
    text = as_text(run.outputs())
    uris = _URI.findall(text)
    assert uris, f"{run.name}: expected a blob URI in a non-deterministic output:\n{text}"
    for uri in uris:
        assert run.store.is_under(uri, run.raw), (
            f"{run.name}: blob URI {uri!r} is not under its --raw-output-data-prefix {run.raw}"
        )
        assert run.store.read(uri) is not None, f"{run.name}: blob URI {uri!r} points at nothing"


def compare_outputs(theirs: Run, ours: Run, decoded: list[dict], expected: Mapping[str, Any],
                    deterministic: bool, flytekit_uploads: bool) -> None:
    decoded_theirs, decoded_ours = decoded
    # The oracle agrees with the table (so the comparison below cannot pass vacuously) ...
    assert decoded_theirs == dict(expected), f"flytekit itself produced {decoded_theirs!r}"
    # ... and flytekit decodes ours to the same Python values.
    assert decoded_ours == decoded_theirs, (
        f"decoded values differ\n  flytekit: {decoded_theirs!r}\n  ours:     {decoded_ours!r}"
    )
    t_map, o_map = theirs.outputs(), ours.outputs()
    diff = "\n".join(difflib.unified_diff(as_text(t_map).splitlines(), as_text(o_map).splitlines(),
                                          "flytekit outputs.pb", "ours outputs.pb", lineterm=""))
    if deterministic:
        # Map entries in key order on both sides; everything else byte for byte.
        assert o_map.SerializeToString(deterministic=True) == t_map.SerializeToString(deterministic=True), (
            f"outputs.pb encodings differ:\n{diff}"
        )
    else:
        assert mask_uris(as_text(o_map)) == mask_uris(as_text(t_map)), f"literals differ beyond their URIs:\n{diff}"
        if flytekit_uploads:
            assert_uris_under_raw_prefix(theirs)
        if flytekit_uploads or not SELF_CHECK:  # in self-check mode "ours" is flytekit too
            assert_uris_under_raw_prefix(ours)


def run_both(oracle: FlytekitOracle, store: LocalStore | S3Store, tmp_path: Path, family: Family, task: str,
             inputs: Mapping[str, Any], *, map_bound: tuple[str, ...] | None = None,
             extra_env: Mapping[str, str] | None = None) -> tuple[Run, Run, dict]:
    """Write inputs with flytekit, run flytekit's entrypoint and ours side by side; both finished."""
    env = {**store.env, **(extra_env or {})}
    inputs_uri = store.prefix("inputs", "inputs.pb")
    oracle.write_inputs(family.fk_module, task, materialise(inputs, tmp_path / "input-files"), inputs_uri,
                        workdir=tmp_path / "inputs", raw_prefix=store.prefix("inputs", "raw"),
                        map_bound=map_bound, env=env)

    verb, resolver, fk_args = task_args(family.fk_module, task, map_bound)
    theirs_prefix, ours_prefix = store.prefix("flytekit"), store.prefix("ours")
    theirs = Run("flytekit", [str(oracle.venv / "bin" / verb),  # console script named like the pod's args[0]
                              *entrypoint_args(verb, inputs_uri, theirs_prefix, resolver, fk_args)[1:]],
                 theirs_prefix, store)
    if SELF_CHECK:
        ours_argv = [*theirs.argv[:1], *entrypoint_args(verb, inputs_uri, ours_prefix, resolver, fk_args)[1:]]
    else:
        _, _, our_args = task_args(family.ours_module, task, map_bound)
        ours_argv = [family.ours_python(oracle), "-m", "executor",
                     *entrypoint_args(verb, inputs_uri, ours_prefix, resolver, our_args)]
    ours = Run("ours", ours_argv, ours_prefix, store)

    run_env = oracle.env(env)
    theirs.start(run_env), ours.start(run_env)
    theirs.wait(), ours.wait()
    return theirs, ours, env


def differential(oracle: FlytekitOracle, store: LocalStore | S3Store, tmp_path: Path, family: Family, task: str,
                 inputs: Mapping[str, Any], expected: Mapping[str, Any], *, deterministic: bool = True,
                 flytekit_uploads: bool = True, map_bound: tuple[str, ...] | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
    """Run both entrypoints on the same inputs, decode both outputs with flytekit, compare."""
    theirs, ours, env = run_both(oracle, store, tmp_path, family, task, inputs, map_bound=map_bound,
                                 extra_env=extra_env)
    for run in (theirs, ours):
        assert_succeeded(run)
    decoded = oracle.decode_outputs(family.fk_module, task, [theirs.outputs_uri, ours.outputs_uri],
                                    workdir=tmp_path / "decode", env=env)
    compare_outputs(theirs, ours, decoded, expected, deterministic, flytekit_uploads)


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", cases_for("flytekit"))
def test_flytekit_task_matches_pyflyte_execute(case: Case, flytekit_oracle: FlytekitOracle, tmp_path: Path):
    """A flytekit-authored task: ours (oracle venv's python, via flytekit) vs flytekit's entrypoint."""
    differential(flytekit_oracle, LocalStore(tmp_path / "store"), tmp_path, FAMILIES["flytekit"], case.task,
                 case.inputs, case.expected, deterministic=case.deterministic)


@pytest.mark.parametrize("case", cases_for("plain"))
def test_plain_function_matches_flytekit_twin(case: Case, flytekit_oracle: FlytekitOracle, tmp_path: Path):
    """A plain function run by ours WITHOUT any SDK vs the same function as a flytekit task."""
    differential(flytekit_oracle, LocalStore(tmp_path / "store"), tmp_path, FAMILIES["plain"], case.task,
                 case.inputs, case.expected, deterministic=case.deterministic,
                 flytekit_uploads=case.flytekit_uploads)


def test_ignore_outputs_writes_no_file_like_flytekit(flytekit_oracle: FlytekitOracle, tmp_path: Path):
    """flytekit's IgnoreOutputs (raised by non-chief workers of distributed training): exit 0, and
    neither outputs.pb nor error.pb, so only the chief's outputs count."""
    theirs, ours, _ = run_both(flytekit_oracle, LocalStore(tmp_path / "store"), tmp_path, FAMILIES["flytekit"],
                               "ignored", {"x": 1})
    for run in (theirs, ours):
        assert run.proc.returncode == 0, run.describe()
        assert run.store.read(run.outputs_uri) is None, run.describe()
        assert run.store.read(f"{run.prefix}/out/error.pb") is None, run.describe()
    assert "IgnoreOutputs" in ours.proc.stderr


def test_plain_functions_run_without_flytekit():
    """The premise of the plain family: this test process (ours' python for plain functions) has no SDK."""
    with pytest.raises(ImportError):
        __import__("flytekit")


@pytest.mark.parametrize("family", ["flytekit", "plain"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in MAP_CASES])
def test_map_task_element_matches(case: MapCase, family: str, flytekit_oracle: FlytekitOracle, tmp_path: Path):
    """pyflyte-map-execute with the ArrayNode resolver: one element, chosen by the array index env."""
    env = {"BATCH_JOB_ARRAY_INDEX_VAR_NAME": "FLYTE_K8S_ARRAY_INDEX", **case.index_env}
    differential(flytekit_oracle, LocalStore(tmp_path / "store"), tmp_path, FAMILIES[family], "square",
                 case.inputs, case.expected, map_bound=case.bound, extra_env=env)


S3_CASES = [c for c in CASES if c.id in ("pickle", "dataclass-msgpack")]


@pytest.mark.parametrize("family", ["flytekit", "plain"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in S3_CASES])
def test_on_s3(case: Case, family: str, flytekit_oracle: FlytekitOracle, moto_s3, tmp_path: Path):
    """The same comparison with every prefix in a (moto) S3 bucket, reached via FLYTE_AWS_ENDPOINT."""
    differential(flytekit_oracle, S3Store(moto_s3, moto_s3.make_bucket()), tmp_path, FAMILIES[family],
                 case.task, case.inputs, case.expected, deterministic=case.deterministic)
