"""Argv front-ends. Each one turns argv into an Invocation; nothing else happens here.

Accepted exactly as flytekit 1.16 and flyte 2.12 write them:
    executor pyflyte-execute --inputs U --output-prefix P [...] --resolver R -- <resolver args>
    executor pyflyte-map-execute ... --resolver ArrayNodeMapTaskResolver -- vars ... resolver ...
    executor a0 --inputs U --outputs-path P --version V [...] (--tgz U | --pkl U) --dest D [--resolver R <args>]
A usage error exits 2 and names the flag.
"""
from __future__ import annotations

import functools
import os
import sys

from executor.invocation import DEFAULT_RESOLVER, Invocation

USAGE_EXIT = 2

_COMMON_FLAGS = (
    "--inputs",
    "--output-prefix",
    "--raw-output-data-prefix",
    "--checkpoint-path",
    "--prev-checkpoint",
    "--dynamic-addl-distro",
    "--dynamic-dest-dir",
    "--resolver",
)


class UsageError(Exception):
    pass


def _unrendered(value: str | None) -> bool:
    return value is not None and value.startswith("{{") and value.endswith("}}")


def _optional(value: str | None) -> str | None:
    """flytekit's normalize_inputs: '', '""' and unrendered templates mean 'none'."""
    if value is None or value in ("", '""', "''") or _unrendered(value):
        return None
    return value


@functools.lru_cache(maxsize=None)  # the warm server parses many argvs; a parser is reusable
def _build_parser(command: str):
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message):  # argparse would exit 2 itself; we want one place that does
            raise UsageError(f"{self.prog}: {message}")

    parser = _Parser(prog=f"executor {command}", allow_abbrev=False, add_help=True)
    for flag in _COMMON_FLAGS:
        parser.add_argument(flag, required=flag in ("--inputs", "--output-prefix"), metavar="VALUE")
    parser.add_argument("--test", action="store_true", help="load the task and stop (dry run)")
    _add_runtime_flags(parser)
    if command == "pyflyte-map-execute":
        parser.add_argument("--max-concurrency", type=int, metavar="N")
    parser.add_argument("resolver_args", nargs="*", help="resolver arguments (after --)")
    return parser


@functools.lru_cache(maxsize=None)
def _flag_types(command: str) -> dict:
    """The flags _build_parser declares, each with its type (bool: a switch)."""
    types = {**dict.fromkeys(_COMMON_FLAGS, str), "--test": bool, **{flag: kind for flag, kind, _, _ in _RUNTIME_FLAGS}}
    if command == "pyflyte-map-execute":
        types["--max-concurrency"] = int
    return types


def _parse_plain(command: str, options: list[str]):
    """The options as flytekit writes them (known flags, each with its value) without argparse, whose
    import and parse cost more than the rest of a warm invocation's admission. The same namespace
    argparse would make, or None for anything else: argparse then parses it, or names the problem."""
    from types import SimpleNamespace

    types = _flag_types(command)
    dest = {flag: flag[2:].replace("-", "_") for flag in types}  # argparse's attribute names
    values = {dest[flag]: False if kind is bool else None for flag, kind in types.items()}
    i = 0
    while i < len(options):
        kind = types.get(options[i])
        if kind is bool:
            values[dest[options[i]]] = True
            i += 1
            continue
        if kind is None or i + 1 == len(options) or options[i + 1].startswith("-"):
            return None
        try:
            values[dest[options[i]]] = kind(options[i + 1])
        except ValueError:
            return None
        i += 2
    if values["inputs"] is None or values["output_prefix"] is None:
        return None
    return SimpleNamespace(**values, resolver_args=[])


def parse_fast_execute(argv: list[str]) -> Invocation:
    """pyflyte-fast-execute --additional-distribution U --dest-dir D [--bundle-md5 M] -- pyflyte-execute ..."""
    import argparse
    import dataclasses

    from executor.invocation import BundleSpec

    if "--" not in argv:
        raise UsageError("executor pyflyte-fast-execute: expected '-- pyflyte-execute ...' after its own flags")
    split = argv.index("--")
    own, inner = argv[:split], argv[split + 1 :]

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(f"{self.prog}: {message}")

    parser = _Parser(prog="executor pyflyte-fast-execute", allow_abbrev=False)
    parser.add_argument("--additional-distribution", metavar="URI")
    parser.add_argument("--dest-dir", metavar="DIR")
    parser.add_argument("--bundle-md5", metavar="MD5", help="expected md5 of the archive (also EXECUTOR_BUNDLE_MD5)")
    _add_runtime_flags(parser)
    ns = parser.parse_args(own)
    if not inner or inner[0] not in ("pyflyte-execute", "pyflyte-map-execute"):
        raise UsageError(f"executor pyflyte-fast-execute: after '--' expected pyflyte-execute or pyflyte-map-execute, got {inner[:1]}")
    invocation = parse_flyte1(inner[0], inner[1:])
    outer = {k: v for k, v in _runtime_fields(ns).items() if v is not None}
    invocation = dataclasses.replace(invocation, **outer)
    distribution = _optional(ns.additional_distribution)
    if distribution is None:
        return invocation
    dest_dir = ns.dest_dir or os.getcwd()
    # As flytekit does: the inner command learns the distribution, for dynamic tasks.
    return dataclasses.replace(
        invocation,
        dynamic_addl_distro=distribution,
        dynamic_dest_dir=dest_dir,
        bundle=BundleSpec(uri=distribution, dest_dir=dest_dir, archive_md5=ns.bundle_md5),
    )


# Our additions to every front-end (flytekit's argv never contains them): flag, type, metavar, help.
_RUNTIME_FLAGS = (
    ("--task-template", str, "URI", "TaskTemplate .pb: env, timeout, retries, secrets"),
    ("--secrets-dir", str, "DIR", "local secrets as DIR/group/key files (debugging)"),
    ("--grace-period", float, "SECONDS", "SIGTERM to SIGKILL grace for the task (default EXECUTOR_GRACE_SECONDS or 25)"),
)


def _add_runtime_flags(parser) -> None:
    for flag, kind, metavar, text in _RUNTIME_FLAGS:
        parser.add_argument(flag, type=kind, metavar=metavar, help=text)


def _runtime_fields(ns) -> dict:
    return {"task_template": ns.task_template, "secrets_dir": ns.secrets_dir, "grace_seconds": ns.grace_period}


def parse_flyte1(command: str, argv: list[str]) -> Invocation:
    """Parse pyflyte-execute / pyflyte-map-execute argv (everything after the command word)."""
    if "--" in argv:
        split = argv.index("--")
        options, trailing = argv[:split], argv[split + 1 :]
    else:
        options, trailing = argv, []
    ns = _parse_plain(command, options) or _build_parser(command).parse_args(options)
    resolver_args = tuple(ns.resolver_args) + tuple(trailing)
    for flag, value in (("--inputs", ns.inputs), ("--output-prefix", ns.output_prefix)):
        if not value or _unrendered(value):
            raise UsageError(f"executor {command}: {flag} must be a URI, got {value!r} (was the template rendered?)")
    if not resolver_args:
        raise UsageError(f"executor {command}: resolver arguments are missing (expected '-- task-module M task-name T')")
    is_map = command == "pyflyte-map-execute"
    if is_map and not ns.resolver:
        raise UsageError(f"executor {command}: the following arguments are required: --resolver")
    return Invocation(
        inputs_uri=ns.inputs,
        output_prefix=ns.output_prefix,
        resolver=ns.resolver or DEFAULT_RESOLVER,
        resolver_args=resolver_args,
        raw_output_prefix=_optional(ns.raw_output_data_prefix),
        checkpoint_path=_optional(ns.checkpoint_path),
        prev_checkpoint=_optional(ns.prev_checkpoint),
        dynamic_addl_distro=_optional(ns.dynamic_addl_distro),
        dynamic_dest_dir=_optional(ns.dynamic_dest_dir),
        is_map_task=is_map,
        max_concurrency=getattr(ns, "max_concurrency", None),
        test=ns.test,
        **_runtime_fields(ns),
    )


# a0's options as flyte 2.12 declares them (flyte/_bin/runtime.py): flag, short alias, env fallback.
_A0_OPTIONS = (
    ("--inputs", "-i", None),
    ("--outputs-path", "-o", None),
    ("--version", "-v", None),
    ("--run-base-dir", None, "_U_RUN_BASE"),
    ("--raw-data-path", "-r", None),
    ("--checkpoint-path", "-c", None),
    ("--prev-checkpoint", "-p", None),
    ("--name", None, "ACTION_NAME"),
    ("--run-name", None, "RUN_NAME"),
    ("--run-start-time", None, None),
    ("--project", None, "FLYTE_INTERNAL_EXECUTION_PROJECT"),
    ("--domain", None, "FLYTE_INTERNAL_EXECUTION_DOMAIN"),
    ("--org", None, "_U_ORG_NAME"),
    ("--debug", None, "_F_E_VS"),
    ("--interactive-mode", None, None),
    ("--image-cache", None, None),
    ("--tgz", None, None),
    ("--pkl", None, None),
    ("--dest", None, None),
    ("--resolver", None, None),
)
# Without these a0 stops before running anything (click's required options, then its asserts).
_A0_REQUIRED = ("--inputs", "--outputs-path", "--version", "--run-base-dir", "--org", "--project", "--domain",
                "--run-name", "--name")
_MD5_HEX = "0123456789abcdef"


def _a0_parser():
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(f"{self.prog}: {message}")

    parser = _Parser(prog="executor a0", allow_abbrev=False, description="Run one Flyte 2 action (flyte's a0 flags).")
    for flag, short, env in _A0_OPTIONS:
        names = (flag, short) if short else (flag,)
        parser.add_argument(*names, metavar="VALUE", help=f"(env {env})" if env else None)
    parser.add_argument("resolver_args", nargs="*", help="resolver arguments, e.g. mod my.module instance my_task")
    _add_runtime_flags(parser)
    return parser


def _bool_option(flag: str, value: str | None) -> bool:
    if value is None or value == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "t", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "f", "no", "n", "off"):
        return False
    raise UsageError(f"executor a0: {flag} takes a boolean, got {value!r}")


def parse_a0(argv: list[str], environ: dict | None = None) -> Invocation:
    """Parse flyte 2's `a0` argv (everything after the command word) and its environment."""
    from executor.invocation import BundleSpec, Flyte2Spec

    env = os.environ if environ is None else environ
    trailing: list[str] = []
    if "--" in argv:  # a0 writes none; click would take it as the end of options, so do we
        split = argv.index("--")
        argv, trailing = argv[:split], argv[split + 1:]
    ns = _a0_parser().parse_intermixed_args(argv)
    values = {}
    for flag, _, env_name in _A0_OPTIONS:
        value = getattr(ns, flag[2:].replace("-", "_"))
        if value is None and env_name:
            value = env.get(env_name)
        values[flag] = value
    # As a0: an unrendered run/action name template falls back to the env the backend also sets.
    for flag, env_name in (("--run-name", "RUN_NAME"), ("--name", "ACTION_NAME")):
        if values[flag] and values[flag].startswith("{{"):
            values[flag] = env.get(env_name, "")
    for flag in _A0_REQUIRED:
        value = values[flag]
        env_name = next(e for f, _, e in _A0_OPTIONS if f == flag)
        source = f"{flag} (or ${env_name})" if env_name else flag
        if value is None or (value == "" and flag != "--version"):
            raise UsageError(f"executor a0: {source} is required")
        if flag in ("--inputs", "--outputs-path", "--run-base-dir") and _unrendered(value):
            raise UsageError(f"executor a0: {flag} must be a URI, got {value!r} (was the template rendered?)")
    tgz, pkl = _optional(values["--tgz"]), _optional(values["--pkl"])
    if tgz and pkl:
        raise UsageError("executor a0: --tgz and --pkl are exclusive (a bundle is one or the other)")
    version = values["--version"]
    # `flyte run` sets --version to the md5 of the uploaded archive (or pickle): then it verifies it.
    archive_md5 = version.lower() if len(version) == 32 and all(c in _MD5_HEX for c in version.lower()) else None
    dest_dir = _optional(values["--dest"]) or "."
    start = values["--run-start-time"]
    spec = Flyte2Spec(
        version=version,
        run_base_dir=values["--run-base-dir"],
        run_name=values["--run-name"],
        action_name=values["--name"],
        project=values["--project"],
        domain=values["--domain"],
        org=values["--org"],
        run_start_time=None if not start or start.startswith("{{") else start,
        image_cache=_optional(values["--image-cache"]),
        pkl_uri=pkl,
        dest_dir=dest_dir,
        interactive=_bool_option("--debug", values["--debug"]) or _bool_option("--interactive-mode", values["--interactive-mode"]),
    )
    resolver = values["--resolver"] or ""  # none with --pkl; without a bundle a0 also needs one
    return Invocation(
        inputs_uri=values["--inputs"],
        output_prefix=values["--outputs-path"],
        resolver=resolver,
        resolver_args=tuple(ns.resolver_args) + tuple(trailing),
        raw_output_prefix=_optional(values["--raw-data-path"]),
        checkpoint_path=_optional(values["--checkpoint-path"]),
        prev_checkpoint=_optional(values["--prev-checkpoint"]),
        protocol="flyte2",
        bundle=BundleSpec(uri=tgz, dest_dir=dest_dir, archive_md5=archive_md5) if tgz else None,
        flyte2=spec,
        **_runtime_fields(ns),
    )


_HELP = """usage: executor COMMAND [ARGS]

The in-pod runtime for Flyte tasks.

Commands (argv exactly as the Flyte backend writes it):
  pyflyte-fast-execute  fetch, verify and cache the code bundle, then run the inner command
  pyflyte-execute       run one Flyte 1 task   (flytekit's pyflyte-execute flags)
  pyflyte-map-execute   run one element of a map task (ArrayNode)
  a0                    run one Flyte 2 action (flyte 2.12's a0 flags and env; --tgz/--pkl bundles verified)
Tools:
  bundle build SRC OUT  write fast<digest>.tar.gz for SRC, named exactly as flytekit names it
  run MODULE.FUNC -i NAME=JSON ...
                        run a task locally against a directory store, print its outputs
  inspect FILE          print an inputs/outputs/error/TaskTemplate .pb file as JSON
  serve [--listen HOST:PORT | --stdio] [--concurrency N] ...
                        run invocations warm in this container, each isolated (docs/serve.md)
  replay [PREFIX] --argv-file F | --task M.T [--inputs URI] [--bundle URI] [--out DIR]
                        rerun a pod's invocation locally into a fresh directory
  version               print the executor's version

Environment: LOG_FORMAT=json for JSON logs; FLYTE_FAIL_ON_ERROR=true to exit 1 after writing error.pb.
See docs/cli.md for every flag.
"""


_FAST_HELP = """usage: executor pyflyte-fast-execute --additional-distribution URI [--dest-dir DIR] [--bundle-md5 MD5]
                                    -- pyflyte-execute|pyflyte-map-execute ...

Fetches the code bundle, verifies it (EXECUTOR_BUNDLE_VERIFY=strict|auto|off), extracts it safely
into the node's cache (EXECUTOR_CACHE_DIR), puts it first on sys.path and runs the inner command
in the same process. See docs/bundles.md.
"""


def _argv_text(argv: list[str]) -> str:
    return "[" + ", ".join('"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"' for a in argv) + "]"


def _bundle_command(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "build":
        sys.stderr.write("usage: executor bundle build SRC_DIR OUT_DIR\n")
        return USAGE_EXIT
    from executor.bundle.archive import build

    if not os.path.isdir(argv[1]):
        sys.stderr.write(f"executor bundle build: {argv[1]} is not a directory\n")
        return USAGE_EXIT
    print(build(argv[1], argv[2]))
    return 0


def run() -> None:
    """Console-script and `python -m executor` entry: main(), then a fast exit."""
    code = main()
    if os.environ.get("EXECUTOR_FAST_EXIT", "1") != "0":
        _fast_exit(code)
    sys.exit(code)


def _fast_exit(code: int) -> None:
    """Exit without tearing the interpreter down object by object.

    Everything the invocation wrote is already durable; what remains is interpreter finalization
    (module teardown, a final GC, fsspec's event-loop threads), which costs 10-200 ms per pod.
    User-visible exit behaviour is kept: non-daemon threads are joined and atexit handlers run.
    """
    import atexit
    import threading

    try:
        threading._shutdown()  # what finalization does first: wait for non-daemon threads
    except Exception:
        pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_HELP)
        return 0 if argv else USAGE_EXIT
    command, rest = argv[0], argv[1:]
    if command.startswith("pyflyte-") or command == "a0":
        import gc

        from executor import logs

        # Pod logs keep exactly what ran: `executor replay --argv-file` takes this list back.
        logs.info("starting", argv=_argv_text(argv))

        # Imports (the task module, an SDK) allocate heavily and no cycle is garbage yet:
        # collecting during them is wasted time. Re-enabled before user code runs (execute.py).
        gc.disable()
    try:
        if command == "pyflyte-fast-execute":
            if rest in (["-h"], ["--help"]):
                sys.stdout.write(_FAST_HELP)
                return 0
            from executor.supervisor import supervise

            return supervise(parse_fast_execute(rest)).exit_code
        if command == "bundle":
            return _bundle_command(rest)
        if command in ("pyflyte-execute", "pyflyte-map-execute"):
            options_part = rest[: rest.index("--")] if "--" in rest else rest
            if "-h" in options_part or "--help" in options_part:
                _build_parser(command).print_help()
                return 0
            invocation = parse_flyte1(command, rest)
            from executor.supervisor import supervise

            return supervise(invocation).exit_code
        if command == "a0":
            if "-h" in rest or "--help" in rest:
                _a0_parser().print_help()
                return 0
            invocation = parse_a0(rest)
            from executor.supervisor import supervise

            return supervise(invocation).exit_code
        if command == "serve":
            from executor.serve import main as serve_main

            return serve_main(rest)
        if command == "run":
            from executor.local_run import main as run_main

            return run_main(rest)
        if command == "inspect":
            from executor.inspect import main as inspect_main

            return inspect_main(rest)
        if command == "replay":
            from executor.replay import main as replay_main

            return replay_main(rest)
        if command in ("version", "--version"):
            from executor import __version__

            print(f"executor {__version__}")
            return 0
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        return USAGE_EXIT
    sys.stderr.write(f"executor: unknown command {command!r}\n\n{_HELP}")
    return USAGE_EXIT
