"""The argv front-ends: flytekit's flags exactly, usage errors exit 2 and name the flag."""
from __future__ import annotations

import pytest

from executor.cli import UsageError, parse_flyte1
from tests.helpers import DEFAULT_RESOLVER, MAP_RESOLVER, run_executor

BASE = ["--inputs", "s3://b/in/inputs.pb", "--output-prefix", "s3://b/out"]
TAIL = ["--resolver", DEFAULT_RESOLVER, "--", "task-module", "m", "task-name", "t"]


def test_full_flytekit_argv():
    inv = parse_flyte1("pyflyte-execute", BASE + [
        "--raw-output-data-prefix", "s3://b/raw", "--checkpoint-path", "s3://b/ck", "--prev-checkpoint", "s3://b/prev",
        "--dynamic-addl-distro", "s3://b/fast123.tar.gz", "--dynamic-dest-dir", "/root", "--test"] + TAIL)
    assert inv.inputs_uri == "s3://b/in/inputs.pb" and inv.output_prefix == "s3://b/out"
    assert inv.raw_output_prefix == "s3://b/raw" and inv.checkpoint_path == "s3://b/ck" and inv.prev_checkpoint == "s3://b/prev"
    assert inv.dynamic_addl_distro == "s3://b/fast123.tar.gz" and inv.dynamic_dest_dir == "/root"
    assert inv.test and inv.resolver == DEFAULT_RESOLVER
    assert inv.resolver_args == ("task-module", "m", "task-name", "t")


@pytest.mark.parametrize("value", ['""', "", "{{.prevCheckpointPrefix}}"])
def test_prev_checkpoint_none_forms(value):
    inv = parse_flyte1("pyflyte-execute", BASE + ["--prev-checkpoint", value] + TAIL)
    assert inv.prev_checkpoint is None


def test_unrendered_optional_templates_mean_none():
    inv = parse_flyte1("pyflyte-execute", BASE + [
        "--raw-output-data-prefix", "{{.rawOutputDataPrefix}}", "--checkpoint-path", "{{.checkpointOutputPrefix}}"] + TAIL)
    assert inv.raw_output_prefix is None and inv.checkpoint_path is None
    assert inv.raw_output_prefix_or_default == "s3://b/out/raw"


def test_map_execute_flags():
    inv = parse_flyte1("pyflyte-map-execute", BASE + ["--max-concurrency", "4", "--resolver", MAP_RESOLVER, "--",
                                                      "vars", "", "resolver", DEFAULT_RESOLVER, "task-module", "m", "task-name", "t"])
    assert inv.is_map_task and inv.max_concurrency == 4 and inv.resolver == MAP_RESOLVER
    assert inv.resolver_args[:4] == ("vars", "", "resolver", DEFAULT_RESOLVER)


def test_resolver_args_keep_dashes_after_separator():
    inv = parse_flyte1("pyflyte-execute", BASE + ["--resolver", "my.resolver", "--", "--weird", "arg"])
    assert inv.resolver_args == ("--weird", "arg")


@pytest.mark.parametrize("argv, flag", [
    (["--output-prefix", "x"] + TAIL, "--inputs"),
    (["--inputs", "x"] + TAIL, "--output-prefix"),
    (BASE + ["--bogus", "1"] + TAIL, "--bogus"),
    (BASE + ["--max-concurrency", "2"] + TAIL, "--max-concurrency"),  # only map-execute takes it
    (["--inputs", "{{.input}}", "--output-prefix", "x"] + TAIL, "--inputs"),
    (BASE + ["--resolver", DEFAULT_RESOLVER], "resolver arguments"),
])
def test_usage_errors_name_the_flag(argv, flag):
    with pytest.raises(UsageError) as info:
        parse_flyte1("pyflyte-execute", argv)
    assert flag in str(info.value)


def test_map_execute_requires_resolver():
    with pytest.raises(UsageError, match="--resolver"):
        parse_flyte1("pyflyte-map-execute", BASE + ["--", "vars", "", "resolver", DEFAULT_RESOLVER])


def test_max_concurrency_must_be_int():
    with pytest.raises(UsageError, match="--max-concurrency"):
        parse_flyte1("pyflyte-map-execute", BASE + ["--max-concurrency", "many", "--resolver", MAP_RESOLVER, "--", "vars"])


def test_usage_error_exits_2_in_a_real_process(tmp_path):
    run = run_executor(["pyflyte-execute", "--output-prefix", str(tmp_path)])
    assert run.returncode == 2
    assert "--inputs" in run.stderr
    assert "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written: there is no invocation yet


def test_unknown_command_exits_2():
    run = run_executor(["pyflyte-frobnicate"])
    assert run.returncode == 2 and "unknown command" in run.stderr


def test_help_and_version():
    run = run_executor(["--help"])
    assert run.returncode == 0 and "pyflyte-execute" in run.stdout
    run = run_executor(["pyflyte-execute", "--help"])
    assert run.returncode == 0 and "--raw-output-data-prefix" in run.stdout
    run = run_executor(["version"])
    assert run.returncode == 0 and run.stdout.startswith("executor ")


@pytest.mark.parametrize("command, options", [
    ("pyflyte-execute", BASE + ["--resolver", DEFAULT_RESOLVER]),
    ("pyflyte-execute", BASE + ["--raw-output-data-prefix", "s3://b/raw", "--checkpoint-path", "s3://b/ck",
                                "--prev-checkpoint", '""', "--dynamic-addl-distro", "", "--test", "--resolver", "r"]),
    ("pyflyte-execute", BASE + ["--task-template", "/t.pb", "--secrets-dir", "/s", "--grace-period", "2.5",
                                "--inputs", "s3://b/again"]),  # repeated: the last one, as argparse
    ("pyflyte-map-execute", BASE + ["--max-concurrency", "4", "--resolver", MAP_RESOLVER]),
])
def test_plain_parse_makes_what_argparse_makes(command, options):
    from executor.cli import _build_parser, _parse_plain

    plain = _parse_plain(command, options)
    assert plain is not None and vars(plain) == vars(_build_parser(command).parse_args(options))


@pytest.mark.parametrize("command, options", [
    ("pyflyte-execute", ["--output-prefix", "x"]),  # a required flag missing: argparse names it
    ("pyflyte-execute", BASE + ["--bogus", "1"]),
    ("pyflyte-execute", BASE + ["--inputs=s3://b/x"]),
    ("pyflyte-execute", BASE + ["--grace-period", "-1"]),  # a value that looks like a flag
    ("pyflyte-execute", BASE + ["--grace-period", "soon"]),
    ("pyflyte-execute", BASE + ["--resolver"]),
    ("pyflyte-execute", BASE + ["task-module", "m"]),  # resolver arguments without "--"
    ("pyflyte-execute", BASE + ["--max-concurrency", "2"]),
    ("pyflyte-map-execute", BASE + ["--max-concurrency", "many"]),
])
def test_plain_parse_leaves_anything_else_to_argparse(command, options):
    from executor.cli import _parse_plain

    assert _parse_plain(command, options) is None


# --- pyflyte-fast-execute: the inner command learns the distribution (flytekit, for dynamic tasks) --

FAST_URI = "s3://b/fast0123456789abcdef0123456789abcdef.tar.gz"


def test_fast_execute_passes_the_distribution_to_the_inner_command():
    from executor.cli import parse_fast_execute

    inv = parse_fast_execute(["--additional-distribution", FAST_URI, "--dest-dir", "/root", "--",
                              "pyflyte-execute", *BASE, *TAIL])
    # flytekit's fast_execute_task_cmd inserts --dynamic-addl-distro/--dynamic-dest-dir before --resolver.
    assert inv.dynamic_addl_distro == FAST_URI and inv.dynamic_dest_dir == "/root"
    assert (inv.bundle.uri, inv.bundle.dest_dir, inv.bundle.archive_md5) == (FAST_URI, "/root", None)
    assert inv.inputs_uri == "s3://b/in/inputs.pb" and inv.resolver == DEFAULT_RESOLVER and not inv.is_map_task
    assert inv.resolver_args == ("task-module", "m", "task-name", "t")


def test_fast_execute_passes_the_distribution_to_a_map_task(monkeypatch, tmp_path):
    from executor.cli import parse_fast_execute

    monkeypatch.chdir(tmp_path)  # no --dest-dir: flytekit uses the working directory
    inv = parse_fast_execute(["--additional-distribution", FAST_URI, "--", "pyflyte-map-execute", *BASE,
                              "--resolver", MAP_RESOLVER, "--", "vars", "", "resolver", DEFAULT_RESOLVER,
                              "task-module", "m", "task-name", "t"])
    assert inv.is_map_task and inv.resolver == MAP_RESOLVER
    assert inv.dynamic_addl_distro == FAST_URI and inv.dynamic_dest_dir == str(tmp_path)
    assert inv.bundle.uri == FAST_URI and inv.bundle.dest_dir == str(tmp_path)


def test_fast_execute_distribution_replaces_stale_inner_values():
    # flytekit inserts its pair right before --resolver and click keeps an option's last value, so
    # values the inner argv gives earlier are replaced by the outer command's.
    from executor.cli import parse_fast_execute

    inv = parse_fast_execute(["--additional-distribution", FAST_URI, "--dest-dir", "/root", "--", "pyflyte-execute",
                              *BASE, "--dynamic-addl-distro", "s3://b/old.tar.gz", "--dynamic-dest-dir", "/old", *TAIL])
    assert inv.dynamic_addl_distro == FAST_URI and inv.dynamic_dest_dir == "/root"


@pytest.mark.parametrize("own", [[], ["--additional-distribution", ""], ["--additional-distribution", "{{.fastDistro}}"]])
def test_fast_execute_without_a_distribution_keeps_the_inner_values(own):
    from executor.cli import parse_fast_execute

    inv = parse_fast_execute([*own, "--", "pyflyte-execute", *BASE, "--dynamic-addl-distro", "s3://b/d.tar.gz",
                              "--dynamic-dest-dir", "/d", *TAIL])
    assert inv.bundle is None
    assert inv.dynamic_addl_distro == "s3://b/d.tar.gz" and inv.dynamic_dest_dir == "/d"
