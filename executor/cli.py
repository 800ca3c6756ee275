"""Argv front-ends. Each one turns argv into an Invocation; nothing else happens here.

Accepted exactly as flytekit 1.16 writes them:
    executor pyflyte-execute --inputs U --output-prefix P [...] --resolver R -- <resolver args>
    executor pyflyte-map-execute ... --resolver ArrayNodeMapTaskResolver -- vars ... resolver ...
A usage error exits 2 and names the flag.
"""
from __future__ import annotations

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


def _build_parser(command: str):
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message):  # argparse would exit 2 itself; we want one place that does
            raise UsageError(f"{self.prog}: {message}")

    parser = _Parser(prog=f"executor {command}", allow_abbrev=False, add_help=True)
    for flag in _COMMON_FLAGS:
        parser.add_argument(flag, required=flag in ("--inputs", "--output-prefix"), metavar="VALUE")
    parser.add_argument("--test", action="store_true", help="load the task and stop (dry run)")
    if command == "pyflyte-map-execute":
        parser.add_argument("--max-concurrency", type=int, metavar="N")
    parser.add_argument("resolver_args", nargs="*", help="resolver arguments (after --)")
    return parser


def parse_flyte1(command: str, argv: list[str]) -> Invocation:
    """Parse pyflyte-execute / pyflyte-map-execute argv (everything after the command word)."""
    if "--" in argv:
        split = argv.index("--")
        options, trailing = argv[:split], argv[split + 1 :]
    else:
        options, trailing = argv, []
    parser = _build_parser(command)
    ns = parser.parse_args(options)
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
    )


_HELP = """usage: executor COMMAND [ARGS]

The in-pod runtime for Flyte tasks.

Commands (argv exactly as the Flyte backend writes it):
  pyflyte-execute       run one Flyte 1 task   (flytekit's pyflyte-execute flags)
  pyflyte-map-execute   run one element of a map task (ArrayNode)
Tools:
  run MODULE.FUNC -i NAME=JSON ...
                        run a task locally against a directory store, print its outputs
  inspect FILE          print an inputs/outputs/error .pb file as JSON
  version               print the executor's version

Environment: LOG_FORMAT=json for JSON logs; FLYTE_FAIL_ON_ERROR=true to exit 1 after writing error.pb.
See docs/cli.md for every flag.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(_HELP)
        return 0 if argv else USAGE_EXIT
    command, rest = argv[0], argv[1:]
    try:
        if command in ("pyflyte-execute", "pyflyte-map-execute"):
            options_part = rest[: rest.index("--")] if "--" in rest else rest
            if "-h" in options_part or "--help" in options_part:
                _build_parser(command).print_help()
                return 0
            invocation = parse_flyte1(command, rest)
            from executor.execute import run_invocation

            return run_invocation(invocation).exit_code
        if command == "run":
            from executor.local_run import main as run_main

            return run_main(rest)
        if command == "inspect":
            from executor.inspect import main as inspect_main

            return inspect_main(rest)
        if command in ("version", "--version"):
            from executor import __version__

            print(f"executor {__version__}")
            return 0
    except UsageError as e:
        sys.stderr.write(f"{e}\n")
        return USAGE_EXIT
    sys.stderr.write(f"executor: unknown command {command!r}\n\n{_HELP}")
    return USAGE_EXIT
