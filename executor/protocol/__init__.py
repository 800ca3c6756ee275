"""Wire formats: what a Flyte backend hands the pod and reads back.

Runnables speak flyteidl.core LiteralMaps; a protocol module converts at the edges:
    parse_inputs(data, uri) -> flyteidl.core LiteralMap
    outputs_bytes(LiteralMap) -> bytes of that protocol's outputs.pb
    error_document(failure, message) -> message with SerializeToString()
    error_file_name() -> "error.pb" (or a unique name for distributed tasks)
    classify(failure) -> failure, with this protocol's retry semantics applied (before rendering)
"""
from __future__ import annotations

OUTPUTS_FILE = "outputs.pb"
FUTURES_FILE = "futures.pb"


def for_invocation(invocation):
    if invocation.protocol == "flyte2":
        from executor.protocol import flyte2

        return flyte2
    from executor.protocol import flyte1

    return flyte1
