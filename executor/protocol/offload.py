"""Literal offloading, as flytekit's entrypoint does it when the backend sets _F_L_MIN_SIZE_MB.

An output literal at least that large is written to `<output prefix>/<name>_offloaded_metadata.pb`
and replaced in outputs.pb by an `offloaded_metadata` literal pointing at it.
"""
from __future__ import annotations

import os

from executor import storage
from executor.errors import TaskFailure
from executor.protocol.flyte1 import OUTPUTS_FILE

MIB = 1024 * 1024


def _hash_string(literal) -> str:
    """flytekit's compute_hash_string: sha256 over sorted, compact JSON of the message, base64."""
    import base64
    import hashlib
    import json

    from google.protobuf import json_format

    text = json.dumps(json_format.MessageToDict(literal), sort_keys=True, separators=(",", ":"))
    return base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("utf-8")


def offload_large_outputs(files: dict, output_prefix: str, output_types: dict) -> dict:
    if "_F_L_MIN_SIZE_MB" not in os.environ or OUTPUTS_FILE not in files:
        return files
    if type(files[OUTPUTS_FILE]).DESCRIPTOR.full_name != "flyteidl.core.LiteralMap":
        return files  # flytekit's scheme; a flyte 2 task's outputs (flyteidl2 Outputs) are never offloaded
    min_size = int(os.environ.get("_F_L_MIN_SIZE_MB") or "10") * MIB
    max_size = int(os.environ.get("_F_L_MAX_SIZE_MB") or "1000") * MIB
    from flyteidl.core import literals_pb2

    outputs = files[OUTPUTS_FILE]
    offloaded: dict = {}
    pointers: dict = {}
    for name, literal in outputs.literals.items():
        size = literal.ByteSize()
        if size >= max_size:
            raise TaskFailure(
                "OUTPUT_ENCODE",
                f"output {name!r} is {size} bytes, above the {max_size // MIB} MiB limit for offloaded literals",
                hint="return a file or a directory instead of a large inline value",
            )
        if size < min_size:
            continue
        file_name = f"{name}_offloaded_metadata.pb"
        pointer = literals_pb2.Literal(hash=literal.hash or _hash_string(literal))
        pointer.offloaded_metadata.uri = storage.join(output_prefix, file_name)
        pointer.offloaded_metadata.size_bytes = size
        if name in output_types:
            pointer.offloaded_metadata.inferred_type.CopyFrom(output_types[name])
        offloaded[file_name] = literal
        pointers[name] = pointer
    if not offloaded:
        return files
    rewritten = literals_pb2.LiteralMap()
    rewritten.CopyFrom(outputs)
    for name, pointer in pointers.items():
        rewritten.literals[name].CopyFrom(pointer)
    others = {k: v for k, v in files.items() if k != OUTPUTS_FILE}
    return {**offloaded, **others, OUTPUTS_FILE: rewritten}  # outputs.pb last: it points at the others
