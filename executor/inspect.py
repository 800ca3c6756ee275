"""`executor inspect FILE`: any inputs/outputs/error/futures/TaskTemplate .pb as readable JSON.

Protobuf parses almost any bytes as almost any message, so the type comes from the file name
(inputs.pb, outputs.pb, error*.pb, futures.pb, *template*.pb) unless --type says otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

_TYPES = ("literal-map", "error", "futures", "task-template")


def _guess_type(path: str) -> str:
    name = os.path.basename(path).lower()
    if name.startswith("error"):
        return "error"
    if name.startswith("futures"):
        return "futures"
    if "template" in name or name.startswith("task"):
        return "task-template"
    return "literal-map"


def _message_class(kind: str):
    if kind == "error":
        from flyteidl.core.errors_pb2 import ErrorDocument

        return ErrorDocument
    if kind == "futures":
        from flyteidl.core.dynamic_job_pb2 import DynamicJobSpec

        return DynamicJobSpec
    if kind == "task-template":
        from flyteidl.core.tasks_pb2 import TaskTemplate

        return TaskTemplate
    from flyteidl.core.literals_pb2 import LiteralMap

    return LiteralMap


def literal_value(lit) -> object:
    """A best-effort plain rendering of a Literal, for people (types are not needed to read it)."""
    which = lit.WhichOneof("value")
    if which == "collection":
        return [literal_value(v) for v in lit.collection.literals]
    if which == "map":
        return {k: literal_value(v) for k, v in lit.map.literals.items()}
    if which == "offloaded_metadata":
        return {"offloaded": lit.offloaded_metadata.uri, "size_bytes": lit.offloaded_metadata.size_bytes}
    if which != "scalar":
        return None
    scalar = lit.scalar
    kind = scalar.WhichOneof("value")
    if kind == "primitive":
        p = scalar.primitive
        pk = p.WhichOneof("value")
        if pk == "datetime":
            return p.datetime.ToDatetime(tzinfo=datetime.timezone.utc).isoformat()
        if pk == "duration":
            return f"{p.duration.ToTimedelta().total_seconds()}s"
        return getattr(p, pk) if pk else None
    if kind == "none_type":
        return None
    if kind == "union":
        return literal_value(scalar.union.value)
    if kind == "binary":
        if scalar.binary.tag == "msgpack":
            import msgpack

            try:
                return msgpack.unpackb(scalar.binary.value, raw=False, strict_map_key=False)
            except Exception:
                pass
        return {"binary": scalar.binary.tag, "bytes": len(scalar.binary.value)}
    if kind == "blob":
        return {"blob": scalar.blob.uri, "format": scalar.blob.metadata.type.format}
    if kind == "generic":
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(scalar.generic)
    if kind == "structured_dataset":
        return {"structured_dataset": scalar.structured_dataset.uri}
    return {kind: "(not rendered)"}


def describe_file(data: bytes, kind: str) -> dict:
    from google.protobuf.json_format import MessageToDict

    message = _message_class(kind)()
    message.ParseFromString(data)
    out: dict = {"type": kind}
    if kind == "literal-map":
        out["values"] = {k: literal_value(v) for k, v in message.literals.items()}
    if kind == "error":
        out["message_text"] = message.error.message
    out["proto"] = MessageToDict(message, preserving_proto_field_name=True)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="executor inspect", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="a path or URI (s3://, gs://, file://)")
    parser.add_argument("--type", choices=_TYPES, help="override the type guessed from the file name")
    parser.add_argument("--values-only", action="store_true", help="print only the decoded values / error text")
    ns = parser.parse_args(argv)
    from executor import storage

    try:
        data = storage.read_bytes(ns.file)
    except storage.StorageError as e:
        sys.stderr.write(f"executor inspect: {e}\n")
        return 1
    kind = ns.type or _guess_type(ns.file)
    try:
        described = describe_file(data, kind)
    except Exception as e:
        sys.stderr.write(f"executor inspect: {ns.file} is not a {kind} file ({type(e).__name__}: {e}); try --type\n")
        return 1
    if ns.values_only:
        if kind == "error":
            print(described["message_text"])
            return 0
        described = described.get("values", described["proto"])
    print(json.dumps(described, indent=2, default=str))
    return 0
