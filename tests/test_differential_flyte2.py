"""Differential tests against flyte 2.12.1's own in-pod entrypoint, ``a0``.

Every case: flyte's type engine writes ``inputs.pb`` (a flyteidl2 Inputs); flyte's real ``a0`` and
ours (``python -m executor a0``) run the same argv -- the task's own container args as flyte
serializes them, templates rendered as the backend renders them -- with the same env, into
separate output prefixes; flyte's type engine decodes both ``outputs.pb`` and the values must be
equal (and equal to the table's expectation, so the oracle itself is checked). Where the output is
deterministic both files must also be the same bytes.

Two families, as for Flyte 1:
  * flyte-authored tasks (``differential/f2_tasks.py``): ours runs them with the oracle venv's python,
    through the flyte SDK;
  * plain functions (``differential/plain_tasks.py``, no SDK): ours runs them with this test process's
    python (no flyte installed), ``a0`` runs their twins (``f2_twins.py``).

Then bundles built by flyte's own bundler (``--tgz`` and ``--pkl``), and each failure ``a0``
mishandles (no error.pb, or a misleading one) next to the error.pb we document.
"""
from __future__ import annotations

import datetime
import gzip
import hashlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pytest
from flyteidl2.core import execution_pb2
from flyteidl2.task import common_pb2

from tests.differential.plain_tasks import Color, Inner, Opaque, Point
from tests.oracle.flyte_env import FlyteOracle
from tests.oracle.flytekit_env import REPO_ROOT

pytestmark = pytest.mark.oracle

F2_TASKS = "tests.differential.f2_tasks"
F2_TWINS = "tests.differential.f2_twins"
PLAIN = "tests.differential.plain_tasks"
RESOLVER = "flyte._internal.resolvers.default.DefaultTaskResolver"
UTC = datetime.timezone.utc
IST = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
RUN_START = "2026-01-02T03:04:05Z"


# ------------------------------------------------------------------------------------ case table


@dataclass(frozen=True)
class FileInput:
    content: bytes


@dataclass(frozen=True)
class Case:
    id: str
    task: str
    inputs: Mapping[str, Any]
    expected: Mapping[str, Any]
    families: tuple[str, ...] = ("flyte", "plain")
    deterministic: bool = True  # False: an output holds a blob at a random URI
    context: Mapping[str, str] | None = None

    def __repr__(self) -> str:
        return self.id


POINT = Point(x=1.5, y=-2.0, tags=["a", "ü"], counts={"k": 1}, inner=Inner(name="in", weight=3.0), label=None)

CASES = [
    Case("int", "add", {"a": 3, "b": -7}, {"o0": -4}),
    Case("int-async", "add_async", {"a": 2**40, "b": 2}, {"o0": 2**40 + 2}, families=("flyte",)),
    Case("float-str-bool-tuple", "describe", {"x": 1.25, "name": "héllo ✓", "loud": True},
         {"o0": "HÉLLO ✓=1.25", "o1": False, "o2": 3.125}),
    Case("datetime-timedelta", "shift",
         {"when": datetime.datetime(2024, 2, 29, 23, 30, 1, 123456, tzinfo=IST),
          "by": datetime.timedelta(days=1, microseconds=7)},
         {"o0": datetime.datetime(2024, 3, 1, 18, 0, 1, 123463, tzinfo=UTC),
          "o1": datetime.timedelta(days=2, microseconds=14)}, families=("flyte",)),
    Case("none-output", "noop", {"x": 1}, {}),
    Case("list-in-dict-out", "histogram", {"words": ["b", "a", "b", "c"]}, {"o0": {"b": 2, "a": 1, "c": 1}}),
    Case("dict-of-lists-in-list-out", "flatten", {"groups": {"y": [3, 4], "x": [1]}, "scale": 0.5},
         {"o0": [0.5, 1.5, 2.0]}),
    Case("untyped-dict", "merge",
         {"base": {"a": 1, "nested": {"l": [1, 2.5, "s", None]}}, "extra": {"b": "two", "flag": False}},
         {"o0": {"a": 1, "nested": {"l": [1, 2.5, "s", None]}, "b": "two", "flag": False, "merged": True}}),
    Case("optional-none", "maybe_double", {"x": None}, {"o0": None}),
    Case("optional-value", "maybe_double", {"x": 21}, {"o0": 42}),
    Case("union-int-to-float", "either", {"v": 4}, {"o0": 6.0}),
    Case("union-str-to-str", "either", {"v": "abc"}, {"o0": "cba"}),
    Case("enum", "next_color", {"c": Color.BLUE}, {"o0": Color.RED}),
    Case("dataclass", "move", {"p": POINT, "dx": 0.25},
         {"o0": Point(x=1.75, y=-2.0, tags=["a", "ü", "moved"], counts={"k": 1, "moves": 1},
                      inner=Inner(name="IN", weight=1.5), label=None, history=[1])}),
    Case("pickle", "bump", {"o": Opaque([1, "x"], "n"), "n": 2}, {"o0": Opaque([1, "x", 2], "n!")},
         deterministic=False),
    Case("file", "upper_file", {"f": FileInput(b"hello\nfile\n")}, {"o0": ("file", b"HELLO\nFILE\n")},
         families=("flyte",), deterministic=False),
    Case("custom-context", "context_value", {"key": "team"}, {"o0": "ml"}, families=("flyte",),
         context={"team": "ml"}),
    Case("action-identity", "action_identity", {"x": 7}, {"o0": "run-1/a0/proj/dev/7"}, families=("flyte",)),
]


def cases_for(family: str) -> list:
    return [pytest.param(c, id=c.id) for c in CASES if family in c.families]


# ------------------------------------------------------------------------------------ running


def pod_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What the Flyte 2 backend puts in every task pod's env (CONTRACT.md section 2)."""
    return {
        "_U_RUN_BASE": "/tmp/run-base-unused",
        "_U_ORG_NAME": "org",
        "FLYTE_INTERNAL_EXECUTION_PROJECT": "proj",
        "FLYTE_INTERNAL_EXECUTION_DOMAIN": "dev",
        "RUN_NAME": "run-1",
        "ACTION_NAME": "a0",
        "FLYTE_ATTEMPT_NUMBER": "0",
        **(extra or {}),
    }


def a0_args(module: str, task: str, version: str = "v1", bundle: tuple[str, str] | None = None) -> list[str]:
    """The task's container args, as flyte's RuntimeTaskTemplate.container_args writes them
    (test_argv_is_flytes_own checks this against flyte itself), templates unrendered."""
    args = ["a0", "--inputs", "{{.input}}", "--outputs-path", "{{.outputPrefix}}", "--version", version,
            "--raw-data-path", "{{.rawOutputDataPrefix}}", "--checkpoint-path", "{{.checkpointOutputPrefix}}",
            "--prev-checkpoint", "{{.prevCheckpointPrefix}}", "--run-name", "{{.runName}}", "--name", "{{.actionName}}",
            "--run-start-time", "{{.runStartTime}}"]
    if bundle:
        args += [f"--{bundle[0]}", bundle[1], "--dest", "."]
    if not bundle or bundle[0] != "pkl":
        args += ["--resolver", RESOLVER, "mod", module, "instance", task]
    return args


def render(args: list[str], inputs: str, prefix: str) -> list[str]:
    """What the backend substitutes into the templates."""
    values = {
        "{{.input}}": inputs, "{{.outputPrefix}}": f"{prefix}/out", "{{.rawOutputDataPrefix}}": f"{prefix}/raw",
        "{{.checkpointOutputPrefix}}": f"{prefix}/ckpt", "{{.prevCheckpointPrefix}}": "",
        "{{.runName}}": "run-1", "{{.actionName}}": "a0", "{{.runStartTime}}": RUN_START,
    }
    return [values.get(a, a) for a in args]


@dataclass
class Run:
    name: str
    prefix: Path
    proc: subprocess.CompletedProcess

    @property
    def out(self) -> Path:
        return self.prefix / "out"

    def files(self) -> list[str]:
        return sorted(p.name for p in self.out.iterdir()) if self.out.exists() else []

    def outputs(self) -> common_pb2.Outputs:
        return common_pb2.Outputs.FromString((self.out / "outputs.pb").read_bytes())

    def error(self) -> execution_pb2.ContainerError:
        return execution_pb2.ErrorDocument.FromString((self.out / "error.pb").read_bytes()).error

    def describe(self) -> str:
        return f"[{self.name}] exit {self.proc.returncode}\n--- stderr (tail) ---\n{self.proc.stderr[-4000:]}"


def start(name: str, argv: list[str], prefix: Path, env: Mapping[str, str], cwd: Path, make_out: bool = True):
    if make_out:
        (prefix / "out").mkdir(parents=True, exist_ok=True)  # a0 cannot write into a missing local directory
    cwd.mkdir(parents=True, exist_ok=True)
    popen = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return name, prefix, popen


def finish(started) -> Run:
    name, prefix, popen = started
    stdout, stderr = popen.communicate(timeout=300)
    return Run(name, prefix, subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr))


def run_both(oracle: FlyteOracle, tmp_path: Path, theirs_args: list[str], ours_args: list[str], ours_python: str,
             inputs: str, *, env: Mapping[str, str] | None = None, cwd_theirs: Path | None = None,
             cwd_ours: Path | None = None, make_out: bool = True) -> tuple[Run, Run]:
    run_env = oracle.env(pod_env(env))
    theirs = start("a0", [oracle.a0, *render(theirs_args, inputs, str(tmp_path / "theirs"))[1:]], tmp_path / "theirs",
                   run_env, cwd_theirs or REPO_ROOT, make_out)
    ours = start("ours", [ours_python, "-m", "executor", *render(ours_args, inputs, str(tmp_path / "ours"))],
                 tmp_path / "ours", run_env, cwd_ours or REPO_ROOT, make_out)
    return finish(theirs), finish(ours)


def assert_succeeded(run: Run) -> None:
    assert "error.pb" not in run.files(), f"{run.name} wrote error.pb: {run.error()}\n{run.describe()}"
    assert run.proc.returncode == 0, run.describe()
    assert "outputs.pb" in run.files(), f"{run.name} wrote no outputs.pb\n{run.describe()}"


def write_inputs(oracle: FlyteOracle, tmp_path: Path, module: str, task: str, values: Mapping[str, Any],
                 context: Mapping[str, str] | None = None) -> str:
    materialised = {}
    for k, v in values.items():
        if isinstance(v, FileInput):
            path = tmp_path / "input-files" / f"{k}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(v.content)
            v = ("file", str(path))
        materialised[k] = v
    inputs = tmp_path / "inputs" / "inputs.pb"
    oracle.write_inputs(module, task, materialised, inputs, workdir=tmp_path / "inputs", context=context)
    return str(inputs)


def compare(oracle: FlyteOracle, module: str, task: str, theirs: Run, ours: Run, expected, deterministic: bool,
            tmp_path: Path, our_codec: bool = False) -> None:
    for run in (theirs, ours):
        assert_succeeded(run)
    decoded_theirs, decoded_ours = oracle.decode_outputs(
        module, task, [theirs.out / "outputs.pb", ours.out / "outputs.pb"], workdir=tmp_path / "decode")
    assert decoded_theirs == dict(expected), f"a0 itself produced {decoded_theirs!r}"
    assert decoded_ours == decoded_theirs, f"decoded values differ\n  a0:   {decoded_theirs!r}\n  ours: {decoded_ours!r}"
    names = [n.name for n in theirs.outputs().literals]
    assert [n.name for n in ours.outputs().literals] == names, "outputs are not in a0's order"
    if deterministic:
        # flyte writes map entries in hash order, which varies run to run: compare with keys sorted
        assert ours.outputs().SerializeToString(deterministic=True) == \
            theirs.outputs().SerializeToString(deterministic=True), (
            f"outputs.pb encodings differ\n  a0:   {theirs.outputs()}\n  ours: {ours.outputs()}")
    else:
        # A blob's URI is random. Our codec keeps every blob it writes under --raw-data-path (the flyte
        # SDK, with a local raw path, leaves a returned local file where it is: a0 does the same).
        for named in ours.outputs().literals:
            uri = named.value.scalar.blob.uri
            if uri and our_codec:
                assert uri.startswith(str(ours.prefix / "raw")), f"blob {uri} is not under ours' --raw-data-path"


# ------------------------------------------------------------------------------------ type cases


@pytest.mark.parametrize("case", cases_for("flyte"))
def test_flyte_task_matches_a0(case: Case, flyte_oracle: FlyteOracle, tmp_path: Path):
    """A flyte-authored task: ours (oracle venv's python, via the flyte SDK) vs a0."""
    inputs = write_inputs(flyte_oracle, tmp_path, F2_TASKS, case.task, case.inputs, case.context)
    args = a0_args(F2_TASKS, case.task)
    theirs, ours = run_both(flyte_oracle, tmp_path, args, args, flyte_oracle.python, inputs)
    compare(flyte_oracle, F2_TASKS, case.task, theirs, ours, case.expected, case.deterministic, tmp_path)


@pytest.mark.parametrize("case", cases_for("plain"))
def test_plain_function_matches_a0_twin(case: Case, flyte_oracle: FlyteOracle, tmp_path: Path):
    """A plain function run by ours WITHOUT any SDK vs the same function as a flyte task under a0."""
    inputs = write_inputs(flyte_oracle, tmp_path, F2_TWINS, case.task, case.inputs, case.context)
    theirs, ours = run_both(flyte_oracle, tmp_path, a0_args(F2_TWINS, case.task), a0_args(PLAIN, case.task),
                            sys.executable, inputs)
    compare(flyte_oracle, F2_TWINS, case.task, theirs, ours, case.expected, case.deterministic, tmp_path,
            our_codec=True)


def test_plain_functions_run_without_flyte():
    """The premise of the plain family: this test process (ours' python for plain functions) has no SDK."""
    with pytest.raises(ImportError):
        __import__("flyte")


def test_argv_is_flytes_own(flyte_oracle: FlyteOracle):
    """The argv these tests give both sides is what flyte itself serializes into the task template."""
    assert flyte_oracle.container_args(F2_TASKS, "add", version="v1") == a0_args(F2_TASKS, "add")
    assert flyte_oracle.container_args(F2_TASKS, "add", version="v1", pkl="s3://b/x.pkl.gz") == \
        a0_args(F2_TASKS, "add", bundle=("pkl", "s3://b/x.pkl.gz"))


# ------------------------------------------------------------------------------------ bundles

BUNDLE_SOURCE = '''import flyte

env = flyte.TaskEnvironment(name="bundled")


@env.task
def greet(name: str, times: int) -> str:
    return " ".join([f"hello {name}"] * times) + MARK


def greet_plain(name: str, times: int) -> str:
    return " ".join([f"hello {name}"] * times) + MARK


MARK = "{mark}"
'''


def build_tgz(oracle: FlyteOracle, root: Path, mark: str) -> tuple[Path, str]:
    src = root / "src"
    (src / "bundled_pkg").mkdir(parents=True)
    (src / "bundled_pkg" / "__init__.py").write_text("")
    (src / "bundled_pkg" / "greeting.py").write_text(BUNDLE_SOURCE.replace("{mark}", mark))
    plain = BUNDLE_SOURCE.replace("{mark}", mark).split("\n\n\ndef greet_plain", 1)[1]
    (src / "bundled_pkg" / "plain.py").write_text("def greet_plain" + plain)  # no SDK import at all
    answer = oracle.tool("bundle-tgz", "--src", str(src), "--out", str(root / "bundle"))
    return Path(answer["tgz"]), answer["version"]


@pytest.mark.parametrize("attr,ours_python", [("greet", "oracle"), ("greet_plain", "dev")])
def test_tgz_bundle_built_by_flyte(attr: str, ours_python: str, flyte_oracle: FlyteOracle, tmp_path: Path):
    """`flyte run`'s bundle: fast<digest>.tar.gz, --version its md5. Ours verifies both, then runs it."""
    tgz, version = build_tgz(flyte_oracle, tmp_path / "build", "!")
    assert version == hashlib.md5(tgz.read_bytes()).hexdigest()
    assert tgz.name.startswith("fast") and tgz.name.endswith(".tar.gz")
    # the module exists only in the bundle: inputs written by hand (flyte's encoding of a str and an int)
    inputs_path = tmp_path / "inputs" / "inputs.pb"
    inputs_path.parent.mkdir(parents=True)
    named = common_pb2.Inputs()
    for name, lit in (("name", ("string_value", "x")), ("times", ("integer", 2))):
        entry = named.literals.add(name=name)
        setattr(entry.value.scalar.primitive, lit[0], lit[1])
    inputs_path.write_bytes(named.SerializeToString())
    theirs_args = a0_args("bundled_pkg.greeting", "greet", version=version, bundle=("tgz", str(tgz)))
    ours_module = "bundled_pkg.greeting" if attr == "greet" else "bundled_pkg.plain"
    ours_args = a0_args(ours_module, attr, version=version, bundle=("tgz", str(tgz)))
    python = flyte_oracle.python if ours_python == "oracle" else sys.executable
    env = {"EXECUTOR_CACHE_DIR": str(tmp_path / "cache"), "EXECUTOR_BUNDLE_VERIFY": "strict"}
    theirs, ours = run_both(flyte_oracle, tmp_path, theirs_args, ours_args, python, str(inputs_path), env=env,
                            cwd_theirs=tmp_path / "pod-theirs", cwd_ours=tmp_path / "pod-ours")
    for run in (theirs, ours):
        assert_succeeded(run)
    assert ours.outputs().literals[0].value.scalar.primitive.string_value == "hello x hello x!"
    assert (ours.out / "outputs.pb").read_bytes() == (theirs.out / "outputs.pb").read_bytes()
    assert "given archive md5" in ours.proc.stderr and "name digest" in ours.proc.stderr, ours.describe()


def test_tampered_tgz_is_run_by_a0_and_refused_by_ours(flyte_oracle: FlyteOracle, tmp_path: Path):
    """Same name, same --version, other bytes: a0 runs whatever it finds; ours refuses before any import."""
    tgz, version = build_tgz(flyte_oracle, tmp_path / "good", "!")
    evil, _ = build_tgz(flyte_oracle, tmp_path / "evil", " (tampered)")
    shutil.copyfile(evil, tgz)  # the store now holds other bytes under the launched name
    inputs_path = tmp_path / "inputs" / "inputs.pb"
    inputs_path.parent.mkdir(parents=True)
    named = common_pb2.Inputs()
    entry = named.literals.add(name="name")
    entry.value.scalar.primitive.string_value = "x"
    entry = named.literals.add(name="times")
    entry.value.scalar.primitive.integer = 1
    inputs_path.write_bytes(named.SerializeToString())
    args = a0_args("bundled_pkg.greeting", "greet", version=version, bundle=("tgz", str(tgz)))
    theirs, ours = run_both(flyte_oracle, tmp_path, args, args, flyte_oracle.python, str(inputs_path),
                            env={"EXECUTOR_CACHE_DIR": str(tmp_path / "cache")},
                            cwd_theirs=tmp_path / "pod-theirs", cwd_ours=tmp_path / "pod-ours")
    assert_succeeded(theirs)
    assert theirs.outputs().literals[0].value.scalar.primitive.string_value == "hello x (tampered)"
    assert ours.proc.returncode == 0, ours.describe()
    assert ours.files() == ["error.pb"]
    err = ours.error()
    assert err.code == "BUNDLE_INTEGRITY" and err.kind == execution_pb2.ContainerError.NON_RECOVERABLE
    assert err.origin == execution_pb2.ExecutionError.SYSTEM
    assert version in err.message and "nothing from it was run" in err.message


def test_pkl_bundle_built_by_flyte(flyte_oracle: FlyteOracle, tmp_path: Path):
    """`flyte run --copy-style none`: gzip(cloudpickle(task)), no resolver; --version is its md5."""
    answer = flyte_oracle.tool("bundle-pkl", "--module", F2_TASKS, "--task", "describe", "--out", str(tmp_path / "pkl"))
    pkl, version = answer["pkl"], answer["version"]
    assert version == hashlib.md5(Path(pkl).read_bytes()).hexdigest()
    inputs = write_inputs(flyte_oracle, tmp_path, F2_TASKS, "describe", {"x": 2.0, "name": "p", "loud": False})
    args = a0_args(F2_TASKS, "describe", version=version, bundle=("pkl", pkl))
    assert "--resolver" not in args
    theirs, ours = run_both(flyte_oracle, tmp_path, args, args, flyte_oracle.python, inputs,
                            env={"EXECUTOR_BUNDLE_VERIFY": "strict"},
                            cwd_theirs=tmp_path / "pod-theirs", cwd_ours=tmp_path / "pod-ours")
    compare(flyte_oracle, F2_TASKS, "describe", theirs, ours, {"o0": "p=2.0", "o1": True, "o2": 5.0}, True, tmp_path)


def test_tampered_pkl_is_refused_before_unpickling(flyte_oracle: FlyteOracle, tmp_path: Path):
    """A pickle whose bytes are not the launched --version: a0 unpickles (runs code from) it; ours refuses."""
    answer = flyte_oracle.tool("bundle-pkl", "--module", F2_TASKS, "--task", "add", "--out", str(tmp_path / "pkl"))
    pkl, version = Path(answer["pkl"]), answer["version"]
    other = flyte_oracle.tool("bundle-pkl", "--module", F2_TASKS, "--task", "sub", "--out", str(tmp_path / "other"))
    shutil.copyfile(other["pkl"], pkl)
    assert gzip.decompress(pkl.read_bytes())  # still a perfectly loadable pickle, just not the launched one
    inputs = write_inputs(flyte_oracle, tmp_path, F2_TASKS, "add", {"a": 1, "b": 2})
    args = a0_args(F2_TASKS, "add", version=version, bundle=("pkl", str(pkl)))
    theirs, ours = run_both(flyte_oracle, tmp_path, args, args, flyte_oracle.python, inputs,
                            cwd_theirs=tmp_path / "pod-theirs", cwd_ours=tmp_path / "pod-ours")
    assert_succeeded(theirs)
    assert theirs.outputs().literals[0].value.scalar.primitive.integer == -1  # a0 ran the substituted task
    assert ours.files() == ["error.pb"] and ours.proc.returncode == 0, ours.describe()
    err = ours.error()
    assert err.code == "BUNDLE_INTEGRITY" and f"--version says {version}" in err.message


# ------------------------------------------------------------------------------------ failures


def error_of(run: Run) -> execution_pb2.ContainerError:
    assert run.proc.returncode == 0, run.describe()
    assert run.files() == ["error.pb"], f"{run.name}: expected only error.pb, got {run.files()}\n{run.describe()}"
    return run.error()


def test_user_exception(flyte_oracle: FlyteOracle, tmp_path: Path):
    """Both write error.pb and exit 0, RECOVERABLE (flyte 2 retries user errors); ours adds the user's traceback."""
    inputs = write_inputs(flyte_oracle, tmp_path, F2_TASKS, "fails", {"x": 3})
    args = a0_args(F2_TASKS, "fails")
    theirs, ours = run_both(flyte_oracle, tmp_path, args, args, flyte_oracle.python, inputs)
    t, o = error_of(theirs), error_of(ours)
    assert (t.code, t.kind, t.origin) == ("ValueError", execution_pb2.ContainerError.RECOVERABLE, execution_pb2.ExecutionError.USER)
    assert (o.code, o.kind, o.origin) == ("USER", execution_pb2.ContainerError.RECOVERABLE, execution_pb2.ExecutionError.USER)
    assert "Traceback" not in t.message
    assert "ValueError: x must be negative, got 3" in o.message and "in fails" in o.message
    assert "f2_tasks.py" in o.message and "site-packages/flyte/" not in o.message, o.message
    assert "phase: run" in o.message and "timings:" in o.message


def test_non_recoverable_error(flyte_oracle: FlyteOracle, tmp_path: Path):
    inputs = write_inputs(flyte_oracle, tmp_path, F2_TASKS, "fails_for_good", {"x": 3})
    args = a0_args(F2_TASKS, "fails_for_good")
    theirs, ours = run_both(flyte_oracle, tmp_path, args, args, flyte_oracle.python, inputs)
    for err in (error_of(theirs), error_of(ours)):
        assert err.kind == execution_pb2.ContainerError.NON_RECOVERABLE
        assert "the input 3 can never work" in err.message


@pytest.mark.parametrize("family", ["flyte", "plain"])
def test_missing_inputs_file(family: str, flyte_oracle: FlyteOracle, tmp_path: Path):
    """a0 exits 1 and writes nothing: the backend sees only 'Pod failed'."""
    module, python = (F2_TASKS, flyte_oracle.python) if family == "flyte" else (PLAIN, sys.executable)
    theirs, ours = run_both(flyte_oracle, tmp_path, a0_args(F2_TASKS, "add"), a0_args(module, "add"), python,
                            str(tmp_path / "nowhere" / "inputs.pb"))
    assert theirs.proc.returncode == 1 and theirs.files() == [], theirs.describe()
    err = error_of(ours)
    assert (err.code, err.kind, err.origin) == ("SYSTEM", execution_pb2.ContainerError.RECOVERABLE,
                                                execution_pb2.ExecutionError.SYSTEM)
    assert "nowhere/inputs.pb does not exist" in err.message


@pytest.mark.parametrize("family", ["flyte", "plain"])
def test_input_of_the_wrong_type(family: str, flyte_oracle: FlyteOracle, tmp_path: Path):
    """A string literal for an int input: a0 exits 1 with no error.pb."""
    inputs = tmp_path / "inputs.pb"
    message = common_pb2.Inputs()
    message.literals.add(name="a").value.scalar.primitive.string_value = "three"
    message.literals.add(name="b").value.scalar.primitive.integer = 2
    inputs.write_bytes(message.SerializeToString())
    module, python = (F2_TASKS, flyte_oracle.python) if family == "flyte" else (PLAIN, sys.executable)
    theirs, ours = run_both(flyte_oracle, tmp_path, a0_args(F2_TASKS, "add"), a0_args(module, "add"), python, str(inputs))
    assert theirs.proc.returncode == 1 and theirs.files() == [], theirs.describe()
    err = error_of(ours)
    assert (err.code, err.kind, err.origin) == ("INPUT_DECODE", execution_pb2.ContainerError.NON_RECOVERABLE,
                                                execution_pb2.ExecutionError.SYSTEM)
    assert "phase: inputs" in err.message and "input 'a'" in err.message or "inputs could not be converted" in err.message


@pytest.mark.parametrize("family", ["flyte", "plain"])
def test_input_missing_from_inputs_file(family: str, flyte_oracle: FlyteOracle, tmp_path: Path):
    """inputs.pb without 'b': a0 calls the function anyway and reports the TypeError as a retryable user error."""
    inputs = tmp_path / "inputs.pb"
    message = common_pb2.Inputs()
    message.literals.add(name="a").value.scalar.primitive.integer = 1
    inputs.write_bytes(message.SerializeToString())
    module, python = (F2_TASKS, flyte_oracle.python) if family == "flyte" else (PLAIN, sys.executable)
    theirs, ours = run_both(flyte_oracle, tmp_path, a0_args(F2_TASKS, "add"), a0_args(module, "add"), python, str(inputs))
    t = error_of(theirs)
    assert t.code == "TypeError" and t.kind == execution_pb2.ContainerError.RECOVERABLE and "missing" in t.message
    o = error_of(ours)
    assert (o.code, o.kind, o.origin) == ("INPUT_DECODE", execution_pb2.ContainerError.NON_RECOVERABLE,
                                          execution_pb2.ExecutionError.SYSTEM)
    assert "no value for 'b'" in o.message


def test_task_module_missing(flyte_oracle: FlyteOracle, tmp_path: Path):
    """a0 writes an error.pb but exits 1 (the pod fails twice over); ours exits 0 with an IMPORT error."""
    inputs = write_inputs(flyte_oracle, tmp_path, F2_TASKS, "add", {"a": 1, "b": 2})
    args = a0_args("tests.differential.no_such_module", "add")
    theirs, ours = run_both(flyte_oracle, tmp_path, args, args, flyte_oracle.python, inputs)
    assert theirs.proc.returncode == 1 and theirs.files() == ["error.pb"], theirs.describe()
    err = error_of(ours)
    assert (err.code, err.kind, err.origin) == ("IMPORT", execution_pb2.ContainerError.NON_RECOVERABLE,
                                                execution_pb2.ExecutionError.USER)
    assert "no_such_module" in err.message and "hint:" in err.message


def test_output_prefix_not_yet_created(flyte_oracle: FlyteOracle, tmp_path: Path):
    """A local --outputs-path whose directory does not exist yet: a0's upload fails (exit 1, nothing written)."""
    inputs = write_inputs(flyte_oracle, tmp_path, F2_TASKS, "add", {"a": 1, "b": 2})
    args = a0_args(F2_TASKS, "add")
    theirs, ours = run_both(flyte_oracle, tmp_path, args, args, flyte_oracle.python, inputs, make_out=False)
    assert theirs.proc.returncode == 1 and theirs.files() == [], theirs.describe()
    assert_succeeded(ours)
    assert ours.outputs().literals[0].value.scalar.primitive.integer == 3


def test_failed_output_upload_on_s3(flyte_oracle: FlyteOracle, moto_s3, fault_proxy, tmp_path: Path):
    """The store refuses the PUT of outputs.pb: a0 exits 1 with no error.pb; ours documents OUTPUT_UPLOAD."""
    from tests.rig.object_stores import FORBIDDEN

    bucket = moto_s3.make_bucket()
    local_inputs = write_inputs(flyte_oracle, tmp_path, F2_TASKS, "add", {"a": 1, "b": 2})
    moto_s3.put(bucket, "inputs/inputs.pb", Path(local_inputs).read_bytes())
    proxy = fault_proxy(moto_s3.host, moto_s3.port)
    proxy.rule = lambda request: FORBIDDEN if request.method == "PUT" and request.path.split("?")[0].endswith("/outputs.pb") else None
    env = {**moto_s3.env, "FLYTE_AWS_ENDPOINT": proxy.endpoint, "EXECUTOR_STORAGE_RETRY_ATTEMPTS": "2"}
    args = a0_args(F2_TASKS, "add")
    run_env = flyte_oracle.env(pod_env(env))
    runs = []
    for name, argv in (("a0", [flyte_oracle.a0, *args[1:]]), ("ours", [flyte_oracle.python, "-m", "executor", *args])):
        prefix = f"s3://{bucket}/{name}"
        rendered = render(argv, f"s3://{bucket}/inputs/inputs.pb", prefix)
        runs.append(subprocess.run(rendered, cwd=REPO_ROOT, env=run_env, capture_output=True, text=True, timeout=300))
    theirs, ours = runs
    assert theirs.returncode == 1, theirs.stderr[-3000:]
    assert moto_s3.get(bucket, "a0/out/error.pb") is None and moto_s3.get(bucket, "a0/out/outputs.pb") is None
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert moto_s3.get(bucket, "ours/out/outputs.pb") is None
    err = execution_pb2.ErrorDocument.FromString(moto_s3.get(bucket, "ours/out/error.pb")).error
    assert (err.code, err.kind, err.origin) == ("OUTPUT_UPLOAD", execution_pb2.ContainerError.RECOVERABLE,
                                                execution_pb2.ExecutionError.SYSTEM)
    assert "outputs.pb" in err.message and "phase: upload" in err.message


def test_a0_reuses_a_stale_pickle_by_file_name(flyte_oracle: FlyteOracle, tmp_path: Path):
    """A warm pod (same working directory) gets a new action whose pickle has the same file name:
    a0 finds its marker and runs the previous action's task; ours fetches and verifies the new one."""
    first = flyte_oracle.tool("bundle-pkl", "--module", F2_TASKS, "--task", "add", "--out", str(tmp_path / "v1"))
    second = flyte_oracle.tool("bundle-pkl", "--module", F2_TASKS, "--task", "sub", "--out", str(tmp_path / "v2"))
    assert Path(first["pkl"]).name == Path(second["pkl"]).name and first["version"] != second["version"]
    inputs = write_inputs(flyte_oracle, tmp_path, F2_TASKS, "add", {"a": 1, "b": 2})
    pods = {"cwd_theirs": tmp_path / "pod-theirs", "cwd_ours": tmp_path / "pod-ours"}
    for n, bundle in enumerate((first, second)):
        args = a0_args(F2_TASKS, "add", version=bundle["version"], bundle=("pkl", bundle["pkl"]))
        theirs, ours = run_both(flyte_oracle, tmp_path / f"action-{n}", args, args, flyte_oracle.python, inputs,
                                env={"EXECUTOR_CACHE_DIR": str(tmp_path / "cache")}, **pods)
        for run in (theirs, ours):
            assert_succeeded(run)
    assert theirs.outputs().literals[0].value.scalar.primitive.integer == 3, "a0 ran the new pickle after all"
    assert ours.outputs().literals[0].value.scalar.primitive.integer == -1
