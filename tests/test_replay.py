"""`executor replay` and `executor inspect` on templates: a pod's invocation rerun locally, never
writing where the pod wrote (real processes, a local directory playing the object store)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from flyteidl.core import errors_pb2, literals_pb2, tasks_pb2, types_pb2

from executor.bundle.archive import build
from tests.helpers import DEFAULT_RESOLVER, MAP_RESOLVER, run_executor, write_inputs

TASKS = '''\
import os


def add(a: int, b: int) -> int:
    return a + b


def boom(a: int, b: int) -> int:
    raise ValueError(f"refusing {a} and {b}")


def greet(a: int, b: int) -> str:
    return f"{os.environ.get('GREETING', 'no greeting')} {a + b}"


def use_secret(a: int, b: int) -> str:
    from_env = os.environ["_FSEC_VAULT_TOKEN"]
    with open(os.path.join(os.environ["FLYTE_SECRETS_DEFAULT_DIR"], "vault", "token")) as f:
        from_file = f.read().strip()
    if a < 0:
        raise RuntimeError(f"the token {from_env} was rejected")
    return f"env={len(from_env)} file={from_env == from_file}"
'''


@pytest.fixture
def node(tmp_path):
    """A Flyte 1 node laid out as propeller lays it out: data/inputs.pb, data/<attempt>/, a bundle."""
    src = tmp_path / "src" / "wf"
    src.mkdir(parents=True)
    (src / "tasks.py").write_text(TASKS)

    class Node:
        root = tmp_path
        bundle = Path(build(str(tmp_path / "src"), str(tmp_path / "store" / "fast")))
        data = tmp_path / "store" / "n0" / "data"
        inputs = write_inputs(data / "inputs.pb", {"a": 40, "b": 2}, {"a": int, "b": int})
        prefix = data / "0"
        dest = tmp_path / "pod-root"

        def argv(self, task: str) -> list[str]:
            return ["pyflyte-fast-execute", "--additional-distribution", str(self.bundle), "--dest-dir", str(self.dest),
                    "--", "pyflyte-execute", "--inputs", str(self.inputs), "--output-prefix", str(self.prefix),
                    "--raw-output-data-prefix", str(tmp_path / "store" / "raw"),
                    "--checkpoint-path", f"{self.prefix}/_flytecheckpoints", "--prev-checkpoint", '""',
                    "--resolver", DEFAULT_RESOLVER, "--", "task-module", "wf.tasks", "task-name", task]

        def run_pod(self, task: str):
            run = run_executor(self.argv(task), env={"EXECUTOR_CACHE_DIR": str(tmp_path / "cache")}, cwd=tmp_path)
            assert run.returncode == 0, run.stderr
            return run

    return Node()


def _replay(args: list[str], cwd: Path, env: dict | None = None):
    return run_executor(["replay", *args], env={"EXECUTOR_CACHE_DIR": str(cwd / "cache"), **(env or {})}, cwd=cwd)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
            for p in sorted(directory.rglob("*"))} if directory.exists() else {}


def _error(path: Path) -> errors_pb2.ContainerError:
    doc = errors_pb2.ErrorDocument()
    doc.ParseFromString(path.read_bytes())
    return doc.error


@pytest.mark.parametrize("form", ["lines", "json"])
def test_replays_a_failed_pod_from_its_argv(node, tmp_path, form):
    node.run_pod("boom")
    assert _error(node.prefix / "error.pb").code == "USER"
    store_before, dest_before = _snapshot(tmp_path / "store"), _snapshot(node.dest)

    argv_file = tmp_path / "argv.txt"
    argv_file.write_text(json.dumps(node.argv("boom")) if form == "json" else "\n".join(node.argv("boom")) + "\n")
    out = tmp_path / "replayed"
    run = _replay([str(node.prefix), "--argv-file", str(argv_file), "--out", str(out)], tmp_path)

    assert run.returncode == 1, run.stderr
    assert "ValueError: refusing 40 and 2" in run.stdout  # the message, on stdout
    assert "original attempt" in run.stderr and "USER" in run.stderr
    assert _error(out / "outputs" / "error.pb").code == "USER"
    assert json.loads((out / "argv.json").read_text()) == node.argv("boom")
    assert (out / "dest" / "wf").is_symlink(), "the bundle's links go to the replay's own dest dir"
    assert _snapshot(tmp_path / "store") == store_before, "replay wrote under the original store"
    assert _snapshot(node.dest) == dest_before, "replay touched the pod's --dest-dir"


def test_replay_of_the_saved_argv_runs_again(node, tmp_path):
    first = _replay(["--argv-file", _write(tmp_path / "a.json", json.dumps(node.argv("add"))), "--out", str(tmp_path / "r1")],
                    tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"o0": 42}
    again = _replay(["--argv-file", str(tmp_path / "r1" / "argv.json"), "--out", str(tmp_path / "r2")], tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"o0": 42}
    out = literals_pb2.LiteralMap()
    out.ParseFromString((tmp_path / "r2" / "outputs" / "outputs.pb").read_bytes())
    assert out.literals["o0"].scalar.primitive.integer == 42


def test_task_and_bundle_flags_find_inputs_in_the_flyte_layout(node, tmp_path):
    # PREFIX is .../data/0; the node's inputs.pb is .../data/inputs.pb.
    run = _replay([str(node.prefix), "--task", "wf.tasks.add", "--bundle", str(node.bundle), "--out", str(tmp_path / "r")],
                  tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"o0": 42}
    assert not node.prefix.exists(), "nothing may be written under the original prefix"


def test_inputs_flag_overrides_the_argv(node, tmp_path):
    other = write_inputs(tmp_path / "mine" / "inputs.pb", {"a": 1, "b": 2}, {"a": int, "b": int})
    run = _replay(["--argv-file", _write(tmp_path / "a.json", json.dumps(node.argv("add"))), "--inputs", str(other),
                   "--out", str(tmp_path / "r")], tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"o0": 3}


def test_template_placeholders_and_env(node, tmp_path):
    template = tasks_pb2.TaskTemplate()
    template.id.name = "wf.tasks.greet"
    template.container.image = "localhost/executor:test"
    template.container.args.extend([
        "pyflyte-fast-execute", "--additional-distribution", str(node.bundle), "--dest-dir", "/root", "--",
        "pyflyte-execute", "--inputs", "{{.input}}", "--output-prefix", "{{ .outputPrefix }}",
        "--raw-output-data-prefix", "{{.rawOutputDataPrefix}}", "--checkpoint-path", "{{.checkpointOutputPrefix}}",
        "--prev-checkpoint", "{{.prevCheckpointPrefix}}", "--resolver", DEFAULT_RESOLVER,
        "--", "task-module", "wf.tasks", "task-name", "greet"])
    env = template.container.env.add()
    env.key, env.value = "GREETING", "hello from the template"
    path = tmp_path / "task_template.pb"
    path.write_bytes(template.SerializeToString())

    run = _replay([str(node.prefix), "--argv-file", str(path), "--out", str(tmp_path / "r")], tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"o0": "hello from the template 42"}
    recorded = json.loads((tmp_path / "r" / "argv.json").read_text())
    assert recorded[recorded.index("--inputs") + 1] == str(node.inputs)
    assert recorded[recorded.index("--output-prefix") + 1] == str(node.prefix)
    assert not any("{{" in arg for arg in recorded)
    # The template travels with the saved argv: replaying that applies the same env again.
    assert recorded[:3] == ["pyflyte-fast-execute", "--task-template", str(tmp_path / "r" / "task_template.pb")]
    assert (tmp_path / "r" / "task_template.pb").read_bytes() == path.read_bytes()
    again = _replay(["--argv-file", str(tmp_path / "r" / "argv.json"), "--out", str(tmp_path / "r2")], tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"o0": "hello from the template 42"}


def test_template_secrets_come_from_the_secrets_dir(node, tmp_path):
    template = tasks_pb2.TaskTemplate()
    template.container.args.extend(node.argv("use_secret"))
    secret = template.security_context.secrets.add()
    secret.group, secret.key = "vault", "token"
    path = _write_bytes(tmp_path / "task_template.pb", template.SerializeToString())

    missing = _replay([str(node.prefix), "--argv-file", path, "--out", str(tmp_path / "r1")], tmp_path)
    assert missing.returncode == 1, missing.stderr
    assert _error(tmp_path / "r1" / "outputs" / "error.pb").code == "SECRET_MISSING"
    assert "vault" in missing.stdout

    (tmp_path / "secrets" / "vault").mkdir(parents=True)
    (tmp_path / "secrets" / "vault" / "token").write_text("s3cr3t-value-123\n")
    found = _replay([str(node.prefix), "--argv-file", path, "--secrets-dir", str(tmp_path / "secrets"),
                     "--out", str(tmp_path / "r2")], tmp_path)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout) == {"o0": "env=16 file=True"}
    assert not (node.prefix / "outputs.pb").exists()


def test_secrets_dir_reaches_the_task_and_stays_redacted(node, tmp_path):
    secrets = tmp_path / "secrets" / "vault"
    secrets.mkdir(parents=True)
    (secrets / "token").write_text("s3cr3t-value-123\n")
    ok = _replay([str(node.prefix), "--task", "wf.tasks.use_secret", "--bundle", str(node.bundle),
                  "--secrets-dir", str(tmp_path / "secrets"), "--out", str(tmp_path / "r1")], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"o0": "env=16 file=True"}

    negative = write_inputs(tmp_path / "neg" / "inputs.pb", {"a": -1, "b": 0}, {"a": int, "b": int})
    failed = _replay(["--task", "wf.tasks.use_secret", "--bundle", str(node.bundle), "--inputs", str(negative),
                      "--secrets-dir", str(tmp_path / "secrets"), "--out", str(tmp_path / "r2")], tmp_path)
    assert failed.returncode == 1, failed.stderr
    assert "was rejected" in failed.stdout
    for text in (failed.stdout, failed.stderr, _error(tmp_path / "r2" / "outputs" / "error.pb").message):
        assert "s3cr3t-value-123" not in text


def test_map_task_element(node, tmp_path):
    inputs = write_inputs(tmp_path / "map" / "inputs.pb", {"a": [10, 20, 30], "b": [1, 2, 3]},
                          {"a": list[int], "b": list[int]})
    argv = ["pyflyte-map-execute", "--inputs", str(inputs), "--output-prefix", str(tmp_path / "map" / "0"),
            "--resolver", MAP_RESOLVER, "--", "vars", "", "resolver", DEFAULT_RESOLVER,
            "task-module", "wf.tasks", "task-name", "add"]
    run = _replay(["--argv-file", _write(tmp_path / "a.json", json.dumps(argv)), "--bundle", str(node.bundle),
                   "--array-index", "2", "--out", str(tmp_path / "r")], tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"o0": 33}


@pytest.mark.parametrize("case", ["out-inside-prefix", "out-not-empty", "no-invocation", "a0"])
def test_usage_errors_write_nothing(node, tmp_path, case):
    node.run_pod("add")
    before = _snapshot(tmp_path / "store")
    argv_file = _write(tmp_path / "a.json", json.dumps(node.argv("add")))
    if case == "out-inside-prefix":
        args, expect = ["--argv-file", argv_file, "--out", str(node.prefix / "replay")], "never write there"
    elif case == "out-not-empty":
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        args, expect = [str(node.prefix), "--argv-file", argv_file, "--out", str(tmp_path / "full")], "not empty"
    elif case == "no-invocation":
        args, expect = [str(node.prefix)], "--argv-file"
    else:
        args, expect = ["--argv-file", _write(tmp_path / "b.txt", "a0\n--inputs\nx\n")], "a0"
    run = _replay(args, tmp_path)
    assert run.returncode == 2, run.stderr
    assert expect in run.stderr
    assert _snapshot(tmp_path / "store") == before
    assert not (node.prefix / "replay").exists()


def test_help_lists_replay():
    run = run_executor(["--help"])
    assert run.returncode == 0 and "replay" in run.stdout
    own = run_executor(["replay", "--help"])
    assert own.returncode == 0 and "--argv-file" in own.stdout and "--secrets-dir" in own.stdout


# ---------------------------------------------------------------------------------------------
# inspect: TaskTemplate / TaskSpec files


def _template() -> tasks_pb2.TaskTemplate:
    t = tasks_pb2.TaskTemplate()
    t.id.project, t.id.domain, t.id.name, t.id.version = "proj", "dev", "wf.tasks.add", "v7"
    t.type = "python-task"
    t.metadata.timeout.seconds = 90
    t.metadata.retries.retries = 3
    t.interface.inputs.variables["a"].type.simple = types_pb2.INTEGER
    t.interface.inputs.variables["xs"].type.collection_type.simple = types_pb2.FLOAT
    t.interface.outputs.variables["o0"].type.map_value_type.simple = types_pb2.STRING
    t.container.image = "localhost/executor:test"
    t.container.args.extend(["pyflyte-execute", "--inputs", "{{.input}}"])
    kv = t.container.env.add()
    kv.key, kv.value = "GREETING", "hi"
    limit = t.container.resources.limits.add()
    limit.name, limit.value = tasks_pb2.Resources.MEMORY, "1Gi"
    secret = t.security_context.secrets.add()
    secret.group, secret.key, secret.mount_requirement = "vault", "token", 2
    return t


def test_inspect_task_template(tmp_path):
    path = tmp_path / "task_template.pb"
    path.write_bytes(_template().SerializeToString())
    run = run_executor(["inspect", str(path)])
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["type"] == "task-template"
    summary = shown["summary"]
    assert summary["task"] == "proj/dev/wf.tasks.add@v7"
    assert summary["inputs"] == {"a": "integer", "xs": "list[float]"} and summary["outputs"] == {"o0": "map[string]"}
    assert summary["timeout"] == "90.0s" and summary["retries"] == 3
    assert summary["args"] == ["pyflyte-execute", "--inputs", "{{.input}}"] and summary["env"] == {"GREETING": "hi"}
    assert summary["resources"]["limits"] == {"memory": "1Gi"}
    assert summary["secrets"] == [{"group": "vault", "key": "token", "mount": "file"}]
    assert shown["proto"]["container"]["image"] == "localhost/executor:test"
    values_only = run_executor(["inspect", str(path), "--values-only"])
    assert json.loads(values_only.stdout) == summary


def test_inspect_packaged_task_spec_by_name(tmp_path):
    from flyteidl.admin import task_pb2

    spec = task_pb2.TaskSpec()
    spec.template.CopyFrom(_template())
    path = tmp_path / "03_wf.tasks.add_1.pb"  # `pyflyte package` names TaskSpecs NN_<name>_1.pb
    path.write_bytes(spec.SerializeToString())
    run = run_executor(["inspect", str(path)])
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["type"] == "task-spec" and shown["summary"]["task"] == "proj/dev/wf.tasks.add@v7"


# ---------------------------------------------------------------------------------------------
# A real flytekit TaskSpec (the oracle serializes a fast-registered task): inspect, then replay.

FK_TASK = '''\
import os
from flytekit import task


@task
def add(a: int, b: int) -> int:
    return a + b + (100 if os.environ.get("FROM_TEMPLATE") == "yes" else 0)
'''


@pytest.mark.oracle
def test_flytekit_serialized_task_inspects_and_replays(flytekit_oracle, tmp_path):
    src = tmp_path / "src" / "wf"
    src.mkdir(parents=True)
    (src / "fk.py").write_text(FK_TASK)
    bundle = Path(build(str(tmp_path / "src"), str(tmp_path / "store")))
    serialized = tmp_path / "pkg"
    subprocess.run([flytekit_oracle.python, str(Path(__file__).parent / "image" / "fk_serialize.py"), str(tmp_path / "src"),
                    "wf.fk", "add", str(serialized), str(bundle), "/root"],
                   check=True, capture_output=True, text=True, timeout=300, env=flytekit_oracle.env())
    spec_file = serialized / "0_wf.fk.add_1.pb"

    shown = json.loads(run_executor(["inspect", str(spec_file), "--values-only"]).stdout)
    assert shown["task"] == "proj/dev/wf.fk.add@v1" and shown["inputs"] == {"a": "integer", "b": "integer"}
    assert shown["args"][:3] == ["pyflyte-fast-execute", "--additional-distribution", str(bundle)]
    assert "{{.input}}" in shown["args"] and shown["env"] == {"FROM_TEMPLATE": "yes"}

    inputs = write_inputs(tmp_path / "store" / "n0" / "data" / "inputs.pb", {"a": 1, "b": 2}, {"a": int, "b": int})
    for source in (spec_file, serialized / "task_template.pb"):
        out = tmp_path / f"replay-{source.stem}"
        run = run_executor(["replay", str(inputs.parent / "0"), "--argv-file", str(source), "--out", str(out)],
                           python=flytekit_oracle.python, cwd=tmp_path, env={"EXECUTOR_CACHE_DIR": str(tmp_path / "cache")})
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout) == {"o0": 103}, "the template's env must be applied"
        assert "flytekit" in run.stderr  # run through flytekit's own machinery


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)
