"""Flyte 1 files under --output-prefix: inputs.pb in, outputs.pb / futures.pb / error.pb out."""
from __future__ import annotations

import os
import time

from flyteidl.core import errors_pb2, literals_pb2

from executor.errors import Diagnostics, TaskFailure

from executor.protocol import FUTURES_FILE, OUTPUTS_FILE  # noqa: F401  (re-exported)

ERROR_FILE = "error.pb"


def parse_inputs(data: bytes, uri: str) -> literals_pb2.LiteralMap:
    inputs = literals_pb2.LiteralMap()
    try:
        inputs.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError, and sometimes plain errors on garbage
        raise TaskFailure(
            "INPUT_DECODE",
            f"{uri} is not a flyteidl.core.LiteralMap ({type(e).__name__}: {e})",
            hint="the file is corrupt or was written by something else; `executor inspect` shows what it holds",
        ) from None
    return inputs


def outputs_bytes(outputs: literals_pb2.LiteralMap) -> bytes:
    return outputs.SerializeToString()


def _get_one_of(*names: str) -> str:
    for name in names:
        if name in os.environ:
            return os.environ[name]
    return ""


def distributed_error_strategy() -> bool:
    return bool(_get_one_of("FLYTE_INTERNAL_DIST_ERROR_STRATEGY", "_F_DES"))


def classify(failure: TaskFailure) -> TaskFailure:
    """Flyte 1 keeps the taxonomy's kinds as they are (see executor.errors)."""
    return failure


def error_file_name() -> str:
    """error.pb, or error-<unique>.pb when several workers of one task report (flytekit's naming)."""
    if not distributed_error_strategy():
        return ERROR_FILE
    return f"error-{os.urandom(16).hex()}.pb"


def worker_name() -> str:
    # flytekit leaves this empty outside distributed tasks; the pod name is more useful to a reader.
    return _get_one_of("FLYTE_INTERNAL_WORKER_NAME", "_F_WN") or os.environ.get("HOSTNAME") or os.uname().nodename


def error_document(failure: TaskFailure, message: str, when: float | None = None) -> errors_pb2.ErrorDocument:
    when = time.time() if when is None else when
    error = errors_pb2.ContainerError(
        code=failure.code,
        message=message,
        kind=int(failure.kind),
        origin=int(failure.origin),
        worker=worker_name(),
    )
    error.timestamp.seconds = int(when)
    error.timestamp.nanos = int((when - int(when)) * 1e9)
    return errors_pb2.ErrorDocument(error=error)
