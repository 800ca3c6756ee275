"""`executor a0` without any SDK: flyte 2.12's argv and env, flyteidl2 files, --pkl bundles (real subprocesses)."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import cloudpickle
import pytest
from flyteidl2.core import execution_pb2
from flyteidl2.task import common_pb2

from executor.cli import UsageError, parse_a0
from tests.helpers import run_executor

RESOLVER = "flyte._internal.resolvers.default.DefaultTaskResolver"
ENV = {"_U_RUN_BASE": "s3://b/base", "_U_ORG_NAME": "org", "FLYTE_INTERNAL_EXECUTION_PROJECT": "p",
       "FLYTE_INTERNAL_EXECUTION_DOMAIN": "d", "RUN_NAME": "run-env", "ACTION_NAME": "a0-env"}
MD5 = "0123456789abcdef0123456789abcdef"


def argv(inputs="s3://b/in/inputs.pb", out="s3://b/out", *, version="v1", extra=(), resolver=True) -> list[str]:
    args = ["--inputs", inputs, "--outputs-path", out, "--version", version, "--raw-data-path", "{{.rawOutputDataPrefix}}",
            "--checkpoint-path", "s3://b/ck", "--prev-checkpoint", '""', "--run-name", "{{.runName}}", "--name", "n1",
            "--run-start-time", "2026-01-02T03:04:05Z", *extra]
    if resolver:
        args += ["--resolver", RESOLVER, "mod", "m", "instance", "t"]
    return args


def test_full_argv_and_env():
    inv = parse_a0(argv(version=MD5, extra=["--tgz", f"s3://b/fast{MD5}.tar.gz", "--dest", "/root"]), ENV)
    assert inv.protocol == "flyte2" and inv.inputs_uri == "s3://b/in/inputs.pb" and inv.output_prefix == "s3://b/out"
    assert inv.resolver == RESOLVER and inv.resolver_args == ("mod", "m", "instance", "t")
    assert inv.raw_output_prefix is None and inv.prev_checkpoint is None and inv.checkpoint_path == "s3://b/ck"
    assert inv.bundle.uri == f"s3://b/fast{MD5}.tar.gz" and inv.bundle.archive_md5 == MD5 and inv.bundle.dest_dir == "/root"
    spec = inv.flyte2
    assert (spec.run_name, spec.action_name) == ("run-env", "n1")  # unrendered template -> $RUN_NAME, as a0
    assert (spec.org, spec.project, spec.domain, spec.run_base_dir) == ("org", "p", "d", "s3://b/base")
    assert spec.run_start_time == "2026-01-02T03:04:05Z" and spec.pkl_uri is None


def test_short_flags_flags_over_env_and_non_md5_version():
    args = ["-i", "/in.pb", "-o", "/out", "-v", "not-an-md5", "--project", "flagged", "--tgz", "/b.tar.gz",
            "--resolver", RESOLVER, "mod", "m", "instance", "t"]
    inv = parse_a0(args, ENV)
    assert inv.inputs_uri == "/in.pb" and inv.output_prefix == "/out" and inv.flyte2.project == "flagged"
    assert inv.bundle.archive_md5 is None and inv.bundle.dest_dir == "."


def test_pkl_has_no_resolver():
    inv = parse_a0(argv(version=MD5, extra=["--pkl", "s3://b/x.pkl.gz", "--dest", "."], resolver=False), ENV)
    assert inv.flyte2.pkl_uri == "s3://b/x.pkl.gz" and inv.bundle is None and inv.resolver == ""


@pytest.mark.parametrize("drop,named", [("_U_RUN_BASE", "--run-base-dir (or $_U_RUN_BASE)"),
                                        ("_U_ORG_NAME", "--org (or $_U_ORG_NAME)"),
                                        ("FLYTE_INTERNAL_EXECUTION_DOMAIN", "--domain")])
def test_required_env_is_named(drop, named):
    with pytest.raises(UsageError, match=named.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        parse_a0(argv(), {k: v for k, v in ENV.items() if k != drop})


def test_tgz_and_pkl_are_exclusive():
    with pytest.raises(UsageError, match="--tgz and --pkl"):
        parse_a0(argv(extra=["--tgz", "/a.tar.gz", "--pkl", "/b.pkl.gz"]), ENV)


def test_usage_error_exits_2_and_names_the_flag(tmp_path):
    args = [a for a in argv() if a not in ("--version", "v1")]
    run = run_executor(["a0", *args], env=ENV)
    assert run.returncode == 2 and "--version" in run.stderr and "required" in run.stderr


# ------------------------------------------------------------------------------------ running


def write_inputs(path: Path, **ints: int) -> Path:
    message = common_pb2.Inputs()
    for name, value in ints.items():
        message.literals.add(name=name).value.scalar.primitive.integer = value
    message.context.add(key="k", value="v")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(message.SerializeToString())
    return path


def run_a0(tmp_path: Path, extra: list[str], resolver_args: list[str] | None, version="v1", env=None):
    inputs = write_inputs(tmp_path / "in" / "inputs.pb", a=2, b=3)
    out = tmp_path / "out"
    args = ["a0", "--inputs", str(inputs), "--outputs-path", str(out), "--version", version,
            "--raw-data-path", str(tmp_path / "raw"), "--run-name", "r", "--name", "a0", *extra]
    if resolver_args:
        args += ["--resolver", RESOLVER, *resolver_args]
    run = run_executor(args, env={**ENV, **(env or {})}, cwd=tmp_path)
    run.prefix = out
    return run


def test_plain_function_writes_flyteidl2_outputs(tmp_path):
    run = run_a0(tmp_path, [], ["mod", "tests.differential.plain_tasks", "instance", "describe_ints"])
    assert run.returncode == 0, run.stderr
    outputs = common_pb2.Outputs.FromString((tmp_path / "out" / "outputs.pb").read_bytes())
    assert [(n.name, n.value.scalar.primitive.integer) for n in outputs.literals] == [("o0", 5), ("o1", 6)]


def test_user_error_is_recoverable_under_flyte2(tmp_path):
    run = run_a0(tmp_path, [], ["mod", "tests.sample_tasks.failures", "instance", "user_error_ab"])
    assert run.returncode == 0, run.stderr
    doc = execution_pb2.ErrorDocument.FromString((tmp_path / "out" / "error.pb").read_bytes())
    assert doc.error.code == "USER" and doc.error.kind == execution_pb2.ContainerError.RECOVERABLE
    assert doc.error.origin == execution_pb2.ExecutionError.USER
    assert "user error, recoverable" in doc.error.message and "in user_error_ab" in doc.error.message


def pickled(tmp_path: Path, fn) -> tuple[Path, str]:
    path = tmp_path / "bundle" / "code_bundle.pkl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(filename=path, mode="wb", mtime=0) as f:
        cloudpickle.dump(fn, f)
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def test_pkl_bundle_verified_against_version(tmp_path):
    from tests.differential import plain_tasks

    pkl, md5 = pickled(tmp_path, plain_tasks.add)
    run = run_a0(tmp_path, ["--pkl", str(pkl), "--dest", "."], None, version=md5, env={"EXECUTOR_BUNDLE_VERIFY": "strict"})
    assert run.returncode == 0, run.stderr
    outputs = common_pb2.Outputs.FromString((tmp_path / "out" / "outputs.pb").read_bytes())
    assert outputs.literals[0].value.scalar.primitive.integer == 5
    assert "pickled task fetched" in run.stderr and "--version md5" in run.stderr


def test_pkl_bundle_md5_mismatch_is_refused(tmp_path):
    from tests.differential import plain_tasks

    pkl, _ = pickled(tmp_path, plain_tasks.add)
    run = run_a0(tmp_path, ["--pkl", str(pkl)], None, version=MD5)
    assert run.returncode == 0, run.stderr
    doc = execution_pb2.ErrorDocument.FromString((tmp_path / "out" / "error.pb").read_bytes())
    assert doc.error.code == "BUNDLE_INTEGRITY" and doc.error.kind == execution_pb2.ContainerError.NON_RECOVERABLE
    assert "phase: bundle" in doc.error.message and MD5 in doc.error.message


def test_pkl_strict_policy_needs_a_checked_md5(tmp_path):
    from tests.differential import plain_tasks

    pkl, _ = pickled(tmp_path, plain_tasks.add)
    run = run_a0(tmp_path, ["--pkl", str(pkl)], None, version="not-md5", env={"EXECUTOR_BUNDLE_VERIFY": "strict"})
    doc = execution_pb2.ErrorDocument.FromString((tmp_path / "out" / "error.pb").read_bytes())
    assert doc.error.code == "BUNDLE_INTEGRITY" and "strict" in doc.error.message


def test_pkl_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bundle" / "bomb.pkl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(b"\0" * (8 << 20)))
    run = run_a0(tmp_path, ["--pkl", str(path)], None, env={"EXECUTOR_PKL_MAX_INFLATED_BYTES": str(1 << 20)})
    doc = execution_pb2.ErrorDocument.FromString((tmp_path / "out" / "error.pb").read_bytes())
    assert doc.error.code == "BUNDLE_UNSAFE" and "decompression bomb" in doc.error.message


def test_no_resolver_and_no_pkl_is_an_import_error(tmp_path):
    run = run_a0(tmp_path, [], None)
    doc = execution_pb2.ErrorDocument.FromString((tmp_path / "out" / "error.pb").read_bytes())
    assert doc.error.code == "IMPORT" and "no --resolver" in doc.error.message
