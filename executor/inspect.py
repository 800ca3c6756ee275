"""`executor inspect FILE`: any inputs/outputs/error/futures/TaskTemplate .pb as readable JSON.

Protobuf parses almost any bytes as almost any message, so the type comes from the file name
(inputs.pb, outputs.pb, error*.pb, futures.pb, *template*.pb, task*.pb, and `pyflyte package`'s
NN_<name>_1.pb TaskSpecs) unless --type says otherwise.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

_TYPES = ("literal-map", "error", "futures", "task-template", "task-spec")
_PACKAGED_TASK = re.compile(r"^\d+_.+_1\.pb$")  # flytekit's persist_registrable_entities: admin.TaskSpec


def _guess_type(path: str) -> str:
    name = os.path.basename(path).lower()
    if name.startswith("error"):
        return "error"
    if name.startswith("futures"):
        return "futures"
    if _PACKAGED_TASK.match(name):
        return "task-spec"
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
    if kind == "task-spec":
        from flyteidl.admin.task_pb2 import TaskSpec

        return TaskSpec
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


def _type_name(literal_type) -> str:
    """A LiteralType as a short readable string: integer, list[string], map[float], blob:csv, ..."""
    which = literal_type.WhichOneof("type")
    if which == "simple":
        from flyteidl.core.types_pb2 import SimpleType

        return SimpleType.Name(literal_type.simple).lower()
    if which == "collection_type":
        return f"list[{_type_name(literal_type.collection_type)}]"
    if which == "map_value_type":
        return f"map[{_type_name(literal_type.map_value_type)}]"
    if which == "union_type":
        return "union[" + ", ".join(_type_name(v) for v in literal_type.union_type.variants) + "]"
    if which == "blob":
        return f"blob:{literal_type.blob.format or 'any'}"
    if which == "enum_type":
        return "enum[" + ", ".join(literal_type.enum_type.values) + "]"
    if which == "structured_dataset_type":
        return f"structured_dataset:{literal_type.structured_dataset_type.format or 'any'}"
    return which or "none"


def template_summary(t) -> dict:
    """What a person debugging a pod wants from a TaskTemplate, before the full protobuf."""
    from flyteidl.core.tasks_pb2 import Resources

    md = t.metadata
    summary: dict = {
        "task": f"{t.id.project}/{t.id.domain}/{t.id.name}@{t.id.version}",
        "type": t.type,
        "inputs": {k: _type_name(v.type) for k, v in t.interface.inputs.variables.items()},
        "outputs": {k: _type_name(v.type) for k, v in t.interface.outputs.variables.items()},
        "timeout": f"{md.timeout.ToTimedelta().total_seconds()}s" if md.HasField("timeout") else None,
        "retries": md.retries.retries,
        "interruptible": md.interruptible,
        "cache": {"version": md.discovery_version} if md.discoverable else None,
    }
    if t.HasField("container"):
        c = t.container
        summary["image"] = c.image
        summary["args"] = list(c.args)
        summary["env"] = {kv.key: kv.value for kv in c.env}
        summary["resources"] = {
            side: {Resources.ResourceName.Name(e.name).lower(): e.value for e in getattr(c.resources, side)}
            for side in ("requests", "limits")
        }
    summary["secrets"] = [
        {"group": s.group, "key": s.key, "mount": {0: "any", 1: "env_var", 2: "file"}.get(s.mount_requirement, "?")}
        for s in t.security_context.secrets
    ]
    return summary


def describe_file(data: bytes, kind: str) -> dict:
    from google.protobuf.json_format import MessageToDict

    message = _message_class(kind)()
    message.ParseFromString(data)
    out: dict = {"type": kind}
    if kind == "literal-map":
        out["values"] = {k: literal_value(v) for k, v in message.literals.items()}
    if kind == "error":
        out["message_text"] = message.error.message
    if kind in ("task-template", "task-spec"):
        out["summary"] = template_summary(message.template if kind == "task-spec" else message)
    out["proto"] = MessageToDict(message, preserving_proto_field_name=True)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="executor inspect", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="a path or URI (s3://, gs://, file://)")
    parser.add_argument("--type", choices=_TYPES, help="override the type guessed from the file name")
    parser.add_argument("--values-only", action="store_true", help="print only the decoded values / error text / template summary")
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
        described = described.get("values", described.get("summary", described["proto"]))
    print(json.dumps(described, indent=2, default=str))
    return 0
