"""`executor run MODULE.FUNCTION -i name=JSON ...`: run a task locally against a directory store.

It writes inputs.pb from JSON values (converted by the function's annotations), runs exactly the
invocation a pod would run (`pyflyte-execute` with the default resolver), and prints the outputs
or the error. Exit 0 on success, 1 when the task failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid

from executor.invocation import DEFAULT_RESOLVER, Invocation


def _split_target(target: str) -> tuple[str, str]:
    if ":" in target:
        module, _, attr = target.partition(":")
    else:
        module, _, attr = target.rpartition(".")
    if not module or not attr:
        raise SystemExit(f"executor run: {target!r} is not MODULE.FUNCTION or MODULE:FUNCTION")
    return module, attr


def _input_annotations(obj) -> dict:
    interface = getattr(obj, "python_interface", None)
    if interface is not None:  # a flytekit task
        return dict(interface.inputs)
    import typing

    hints = typing.get_type_hints(obj, include_extras=True)
    hints.pop("return", None)
    return hints


def _parse_assignments(pairs: list[str]) -> dict:
    values = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"executor run: -i {pair!r} is not name=JSON")
        try:
            values[name] = json.loads(text)
        except json.JSONDecodeError:
            values[name] = text  # a bare word is a string: -i name=world
    return values


def write_inputs(obj, raw_values: dict, path: str) -> None:
    from flyteidl.core import literals_pb2

    from executor import literals, storage
    from executor.literals.structs import StructError, from_plain

    annotations = _input_annotations(obj)
    unknown = sorted(set(raw_values) - set(annotations))
    if unknown:
        raise SystemExit(f"executor run: unknown input(s) {unknown}; the task takes {sorted(annotations)}")
    inputs = literals_pb2.LiteralMap()
    for name, raw in raw_values.items():
        try:
            value = from_plain(raw, annotations[name], f"input {name!r}")
            inputs.literals[name].CopyFrom(literals.to_literal(value, annotations[name], literals.Context(os.path.dirname(path)), f"input {name!r}"))
        except (StructError, literals.CodecError, ValueError, TypeError) as e:
            raise SystemExit(f"executor run: {e}")
    storage.write_bytes(path, inputs.SerializeToString())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="executor run", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="MODULE.FUNCTION (a plain typed function or a flytekit task)")
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=JSON", help="an input value")
    parser.add_argument("--store", default=os.environ.get("EXECUTOR_LOCAL_STORE", "./executor-store"),
                        help="directory (or URI) that plays the object store (default ./executor-store)")
    ns = parser.parse_args(argv)
    module, attr = _split_target(ns.target)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from executor import loader, storage
    from executor.errors import TaskFailure

    try:
        obj = getattr(loader.import_task_module(module), attr)
    except (TaskFailure, AttributeError) as e:
        print(f"executor run: cannot load {ns.target}: {e}", file=sys.stderr)
        return 1
    run_dir = storage.join(ns.store, "runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    inputs_uri = storage.join(run_dir, "inputs.pb")
    write_inputs(obj, _parse_assignments(ns.input), inputs_uri)
    invocation = Invocation(
        inputs_uri=inputs_uri,
        output_prefix=storage.join(run_dir, "outputs"),
        raw_output_prefix=storage.join(run_dir, "raw"),
        resolver=DEFAULT_RESOLVER,
        resolver_args=("task-module", module, "task-name", attr),
    )
    from executor.inspect import describe_file
    from executor.supervisor import supervise

    result = supervise(invocation)
    print(f"run directory: {run_dir}", file=sys.stderr)
    if result.outcome == "success":
        outputs = storage.read_bytes(storage.join(invocation.output_prefix, "outputs.pb"))
        print(json.dumps(describe_file(outputs, "literal-map")["values"], indent=2, default=str))
        return 0
    return 1 if result.outcome == "failure" else result.exit_code
