"""Every failure after argv is parsed ends as exactly one documented error.pb (real subprocesses)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from executor.errors import Kind, Origin
from tests.helpers import MAP_RESOLVER, pyflyte_execute_args, run_executor, write_inputs

M = "tests.sample_tasks.failures"


def _run(tmp_path: Path, task: str, values: dict | None = None, module: str = M, env: dict | None = None,
         annotations: dict | None = None, extra: list[str] | None = None):
    values = {"x": 5} if values is None else values
    inputs = write_inputs(tmp_path / "in" / "inputs.pb", values, annotations or {k: type(v) for k, v in values.items()})
    prefix = tmp_path / "out"
    run = run_executor(pyflyte_execute_args(inputs, prefix, module, task, extra=extra), env=env)
    run.prefix = prefix
    return run


def _assert_error(run, code: str, origin: Origin, kind: Kind, phase: str):
    assert run.returncode == 0, run.stderr
    assert run.files() == ["error.pb"], f"expected only error.pb, got {run.files()}"
    err = run.error()
    assert err.code == code
    assert err.origin == origin
    assert err.kind == kind
    assert f"phase: {phase}" in err.message
    assert err.timestamp.seconds > 0
    assert err.worker  # the pod's name when no distributed worker name is given
    assert "timings:" in err.message and "peak RSS" in err.message
    return err


def test_success_writes_only_outputs(tmp_path):
    run = _run(tmp_path, "double")
    assert run.returncode == 0, run.stderr
    assert run.files() == ["outputs.pb"]
    assert run.outputs().literals["o0"].scalar.primitive.integer == 10


def test_user_exception_has_only_user_frames(tmp_path):
    err = _assert_error(_run(tmp_path, "user_error"), "USER", Origin.USER, Kind.NON_RECOVERABLE, "run")
    assert "ValueError: x must be positive, got 5" in err.message
    assert "in user_error" in err.message and "in helper_that_raises" in err.message
    assert "executor/" not in err.message.split("Traceback", 1)[1], "executor frames leaked into the user traceback"


def test_recoverable_user_exception_is_recoverable(tmp_path):
    err = _assert_error(_run(tmp_path, "recoverable_error"), "USER", Origin.USER, Kind.RECOVERABLE, "run")
    assert "FlakyError: the database was busy" in err.message


def test_system_exit_in_task_is_a_user_error(tmp_path):
    # flytekit lets SystemExit kill the pod with no error.pb; we explain it
    err = _assert_error(_run(tmp_path, "exits"), "USER", Origin.USER, Kind.NON_RECOVERABLE, "run")
    assert "sys.exit(3)" in err.message and "in exits" in err.message


def test_missing_module_is_import_error(tmp_path):
    err = _assert_error(_run(tmp_path, "task", module="tests.sample_tasks.no_such_module"),
                        "IMPORT", Origin.USER, Kind.NON_RECOVERABLE, "load")
    assert "no_such_module" in err.message and "hint:" in err.message


def test_missing_dependency_points_at_the_import_line(tmp_path):
    err = _assert_error(_run(tmp_path, "task", module="tests.sample_tasks.broken_import"),
                        "IMPORT", Origin.USER, Kind.NON_RECOVERABLE, "load")
    assert "definitely_not_installed_package" in err.message
    assert "broken_import.py" in err.message and "line 2" in err.message


def test_module_raising_at_import(tmp_path):
    err = _assert_error(_run(tmp_path, "task", module="tests.sample_tasks.raises_at_import"),
                        "IMPORT", Origin.USER, Kind.NON_RECOVERABLE, "load")
    assert "KeyError: 'threshold'" in err.message and "raises_at_import.py" in err.message


def test_missing_attribute_lists_candidates(tmp_path):
    err = _assert_error(_run(tmp_path, "doubel"), "IMPORT", Origin.USER, Kind.NON_RECOVERABLE, "load")
    assert "'doubel'" in err.message and "double" in err.message


def test_missing_inputs_file_is_recoverable_system_error(tmp_path):
    prefix = tmp_path / "out"
    run = run_executor(pyflyte_execute_args(tmp_path / "nope" / "inputs.pb", prefix, M, "double"))
    run.prefix = prefix
    err = _assert_error(run, "SYSTEM", Origin.SYSTEM, Kind.RECOVERABLE, "inputs")
    assert "does not exist" in err.message


def test_corrupt_inputs_file(tmp_path):
    inputs = tmp_path / "inputs.pb"
    inputs.write_bytes(b"\xff\xff\xff garbage \x00\x01")
    prefix = tmp_path / "out"
    run = run_executor(pyflyte_execute_args(inputs, prefix, M, "double"))
    run.prefix = prefix
    _assert_error(run, "INPUT_DECODE", Origin.SYSTEM, Kind.NON_RECOVERABLE, "inputs")


def test_input_of_wrong_type(tmp_path):
    err = _assert_error(_run(tmp_path, "double", {"x": "five"}), "INPUT_DECODE", Origin.SYSTEM, Kind.NON_RECOVERABLE, "inputs")
    assert "input 'x'" in err.message and "expected int" in err.message and "'five'" in err.message


def test_missing_input_names_it(tmp_path):
    err = _assert_error(_run(tmp_path, "scale", {"x": 1}), "INPUT_DECODE", Origin.SYSTEM, Kind.NON_RECOVERABLE, "inputs")
    assert "'factor'" in err.message and "scale(x: int, factor: int)" in err.message


def test_default_fills_a_missing_optional_input(tmp_path):
    run = _run(tmp_path, "optional_default", {"x": 1})
    assert run.outputs().literals["o0"].scalar.primitive.integer == 101


@pytest.mark.parametrize("task, fragment", [
    ("wrong_return_type", "expected int, got str"),
    ("returns_none_for_int", "got None"),
    ("wrong_tuple_arity", "tuple of 2"),
])
def test_output_encoding_failures(tmp_path, task, fragment):
    err = _assert_error(_run(tmp_path, task), "OUTPUT_ENCODE", Origin.USER, Kind.NON_RECOVERABLE, "outputs")
    assert fragment in err.message


def test_output_upload_failure_still_writes_error(tmp_path):
    (tmp_path / "out" / "outputs.pb").mkdir(parents=True)  # a directory where the file must go
    run = _run(tmp_path, "double")
    assert run.returncode == 0, run.stderr
    err = run.error()
    assert err.code == "OUTPUT_UPLOAD" and err.kind == Kind.RECOVERABLE and "phase: upload" in err.message


def test_unwritable_error_document_goes_to_stderr(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output prefix directory should be")
    inputs = write_inputs(tmp_path / "inputs.pb", {"x": 1}, {"x": int})
    run = run_executor(pyflyte_execute_args(inputs, blocker / "out", M, "user_error"))
    assert run.returncode == 1
    assert '"code": "USER"' in run.stderr and "could not write the error document" in run.stderr


def test_fail_on_error_exits_one(tmp_path):
    run = _run(tmp_path, "user_error", env={"FLYTE_FAIL_ON_ERROR": "true"})
    assert run.returncode == 1
    assert run.error().code == "USER"


def test_distributed_error_strategy_names_file_and_worker(tmp_path):
    run = _run(tmp_path, "user_error", env={"_F_DES": "earliest", "_F_WN": "worker-3"})
    names = run.files()
    assert len(names) == 1 and names[0].startswith("error-") and names[0].endswith(".pb") and names[0] != "error.pb"
    err = run.error(names[0])
    assert err.worker == "worker-3" and err.code == "USER"


def test_secret_like_text_is_kept_unless_registered(tmp_path):
    # Redaction applies to known secret values only (issue 4 registers them); here the text is the user's own.
    err = _assert_error(_run(tmp_path, "secret_in_message"), "USER", Origin.USER, Kind.NON_RECOVERABLE, "run")
    assert "hunter2-secret" in err.message


def test_test_flag_loads_but_writes_nothing(tmp_path):
    run = _run(tmp_path, "double", extra=["--test"])
    assert run.returncode == 0, run.stderr
    assert run.files() == []
    run = _run(tmp_path, "nonexistent_task", extra=["--test"])
    assert run.error().code == "IMPORT"


def test_json_logs_and_summary_line(tmp_path):
    run = _run(tmp_path, "double", env={"LOG_FORMAT": "json"})
    records = [json.loads(line) for line in run.stderr.splitlines() if line.strip()]
    summary = [r for r in records if r["msg"] == "invocation finished"]
    assert len(summary) == 1
    s = summary[0]
    assert s["outcome"] == "success" and s["level"] == "info"
    for phase in ("load_ms", "inputs_ms", "run_ms", "outputs_ms", "upload_ms"):
        assert isinstance(s[phase], (int, float)) and s[phase] >= 0
    assert s["peak_rss_mib"] > 1


def test_human_summary_line(tmp_path):
    run = _run(tmp_path, "double")
    line = [l for l in run.stderr.splitlines() if "invocation finished" in l][0]
    assert "outcome=success" in line and "run_ms=" in line and "peak_rss_mib=" in line


# --- map tasks -------------------------------------------------------------------------------------

def _map_args(inputs, prefix, bound: str, task: str):
    return [
        "pyflyte-map-execute", "--inputs", str(inputs), "--output-prefix", str(prefix),
        "--raw-output-data-prefix", f"{prefix}/raw", "--checkpoint-path", f"{prefix}/ck", "--prev-checkpoint", '""',
        "--resolver", MAP_RESOLVER, "--", "vars", bound, "resolver",
        "flytekit.core.python_auto_container.default_task_resolver", "task-module", M, "task-name", task,
    ]


@pytest.mark.parametrize("index, offset, expected", [(0, None, 10), (2, None, 30), (1, "1", 30)])
def test_map_task_picks_the_element(tmp_path, index, offset, expected):
    inputs = write_inputs(tmp_path / "inputs.pb", {"x": [1, 2, 3], "factor": 10}, {"x": list[int], "factor": int})
    env = {"BATCH_JOB_ARRAY_INDEX_VAR_NAME": "FLYTE_K8S_ARRAY_INDEX", "FLYTE_K8S_ARRAY_INDEX": str(index)}
    if offset:
        env["BATCH_JOB_ARRAY_INDEX_OFFSET"] = offset
    prefix = tmp_path / "out"
    run = run_executor(_map_args(inputs, prefix, "factor", "scale"), env=env)
    run.prefix = prefix
    assert run.returncode == 0, run.stderr
    assert run.outputs().literals["o0"].scalar.primitive.integer == expected


def test_map_index_out_of_range(tmp_path):
    inputs = write_inputs(tmp_path / "inputs.pb", {"x": [1, 2, 3], "factor": 10}, {"x": list[int], "factor": int})
    env = {"BATCH_JOB_ARRAY_INDEX_VAR_NAME": "FLYTE_K8S_ARRAY_INDEX", "FLYTE_K8S_ARRAY_INDEX": "7"}
    prefix = tmp_path / "out"
    run = run_executor(_map_args(inputs, prefix, "factor", "scale"), env=env)
    run.prefix = prefix
    err = _assert_error(run, "INPUT_DECODE", Origin.SYSTEM, Kind.NON_RECOVERABLE, "inputs")
    assert "element 7" in err.message and "3 elements" in err.message


def test_large_outputs_are_offloaded_like_flytekit(tmp_path):
    from flyteidl.core import literals_pb2

    inputs = write_inputs(tmp_path / "inputs.pb", {"n": 300_000}, {"n": int})
    prefix = tmp_path / "out"
    run = run_executor(pyflyte_execute_args(inputs, prefix, "tests.sample_tasks.big", "big_list"),
                       env={"_F_L_MIN_SIZE_MB": "1"})
    run.prefix = prefix
    assert run.returncode == 0, run.stderr
    assert run.files() == ["o0_offloaded_metadata.pb", "outputs.pb"]
    pointer = run.outputs().literals["o0"]
    assert pointer.offloaded_metadata.uri == f"{prefix}/o0_offloaded_metadata.pb"
    assert pointer.offloaded_metadata.inferred_type.collection_type.simple == 1  # INTEGER
    assert pointer.hash
    full = literals_pb2.Literal()
    full.ParseFromString((prefix / "o0_offloaded_metadata.pb").read_bytes())
    assert pointer.offloaded_metadata.size_bytes == full.ByteSize()
    assert len(full.collection.literals) == 300_000 and full.collection.literals[-1].scalar.primitive.integer == 299_999


def test_offloaded_input_is_read(tmp_path):
    from flyteidl.core import literals_pb2

    from executor.literals import Context, to_literal

    lit = to_literal(21, int, Context())
    (tmp_path / "x.pb").write_bytes(lit.SerializeToString())
    m = literals_pb2.LiteralMap()
    m.literals["x"].offloaded_metadata.uri = str(tmp_path / "x.pb")
    (tmp_path / "inputs.pb").write_bytes(m.SerializeToString())
    prefix = tmp_path / "out"
    run = run_executor(pyflyte_execute_args(tmp_path / "inputs.pb", prefix, M, "double"))
    run.prefix = prefix
    assert run.outputs().literals["o0"].scalar.primitive.integer == 42


def test_argv_is_logged_for_replay(tmp_path):
    run = _run(tmp_path, "double", env={"LOG_FORMAT": "json"})
    first = json.loads(run.stderr.splitlines()[0])
    assert first["msg"] == "starting"
    argv = json.loads(first["argv"])
    assert argv[0] == "pyflyte-execute" and argv[-4:] == ["task-module", M, "task-name", "double"]
