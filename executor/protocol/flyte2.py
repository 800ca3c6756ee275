"""Flyte 2 files under --outputs-path: flyteidl2 Inputs in, flyteidl2 Outputs / ErrorDocument out.

Runnables speak flyteidl.core LiteralMaps. flyteidl2.core.Literal has the same field numbers as
flyteidl.core.Literal, and a repeated NamedLiteral{name=1, value=2} is on the wire exactly a
map<string, Literal> field, so the conversion is done by bytes at the edge:

    Inputs bytes  --parse as flyteidl.core.LiteralMap-->  the runnable's LiteralMap
                  (Inputs.context, field 2, rides along as an unknown field: a flyte 2 task gets it back)
    LiteralMap  --bytes-->  flyteidl2.task.Outputs (literals in output order: o0, o1, ..., o10)

flyteidl2 is imported only here, so only a0 invocations pay for it (about 10 ms on top of flyteidl).
"""
from __future__ import annotations

import re

from flyteidl.core import literals_pb2
from flyteidl2.core import execution_pb2
from flyteidl2.task import common_pb2

from executor.errors import Kind, TaskFailure

from executor.protocol import FUTURES_FILE, OUTPUTS_FILE  # noqa: F401  (re-exported)

ERROR_FILE = "error.pb"


def parse_inputs(data: bytes, uri: str) -> literals_pb2.LiteralMap:
    try:
        inputs = common_pb2.Inputs.FromString(data)
    except Exception as e:  # DecodeError, and sometimes plain errors on garbage
        raise TaskFailure(
            "INPUT_DECODE",
            f"{uri} is not a flyteidl2.task.Inputs ({type(e).__name__}: {e})",
            hint="the file is corrupt or was written by something else; `executor inspect` shows what it holds",
        ) from None
    names = [named.name for named in inputs.literals]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise TaskFailure("INPUT_DECODE", f"{uri} holds more than one value for {', '.join(map(repr, duplicated))}")
    try:
        # Same wire shape (see the module docstring); the context stays attached as an unknown field.
        return literals_pb2.LiteralMap.FromString(data)
    except Exception as e:
        raise TaskFailure("INPUT_DECODE", f"{uri}: a literal is not a flyteidl.core.Literal ({type(e).__name__}: {e})") from None


def inputs_message(literal_map: literals_pb2.LiteralMap) -> common_pb2.Inputs:
    """The flyteidl2 Inputs a LiteralMap from parse_inputs came from, context included."""
    return common_pb2.Inputs.FromString(literal_map.SerializeToString())


_OUTPUT_NAME = re.compile(r"^o(\d+)$")


def _output_order(name: str):
    match = _OUTPUT_NAME.match(name)
    return (0, int(match.group(1)), "") if match else (1, 0, name)


def outputs_message(outputs) -> common_pb2.Outputs:
    if isinstance(outputs, common_pb2.Outputs):
        return outputs
    message = common_pb2.Outputs()
    for name in sorted(outputs.literals, key=_output_order):
        named = message.literals.add(name=name)
        named.value.ParseFromString(outputs.literals[name].SerializeToString())
    return message


def outputs_bytes(outputs) -> bytes:
    """outputs.pb: a flyteidl2.task.Outputs (given as one, or as a flyteidl.core.LiteralMap)."""
    return outputs_message(outputs).SerializeToString()


def error_file_name() -> str:
    return ERROR_FILE


def _marked_non_recoverable(exc: BaseException | None) -> bool:
    return exc is not None and any(cls.__name__ == "NonRecoverableError" for cls in type(exc).__mro__)


def classify(failure: TaskFailure) -> TaskFailure:
    """Flyte 2's retry semantics for user exceptions: retried within the task's retry budget unless
    the exception is a flyte.errors.NonRecoverableError (a0 does the same). Every other code keeps
    its taxonomy kind."""
    if failure.code == "USER":
        failure._recoverable = not _marked_non_recoverable(failure.cause)
    return failure


def error_document(failure: TaskFailure, message: str, when: float | None = None) -> execution_pb2.ErrorDocument:
    # flyteidl2's ContainerError has no timestamp or worker: the timings are in the message.
    error = execution_pb2.ContainerError(
        code=failure.code,
        message=message,
        kind=execution_pb2.ContainerError.RECOVERABLE if failure.kind == Kind.RECOVERABLE else execution_pb2.ContainerError.NON_RECOVERABLE,
        origin=int(failure.origin),
    )
    return execution_pb2.ErrorDocument(error=error)
