"""Python annotations, classified the way flytekit's TypeEngine picks a transformer.

`kind_of(tp)` names the transformer flytekit would use; `literal_type(tp)` is the LiteralType that
transformer reports (used as a Union's stored type); `union_tag(tp)` is the transformer's name,
which flytekit writes into the union's `structure.tag` and matches on when reading.
"""
from __future__ import annotations

import dataclasses
import datetime
import enum
import os
import types
import typing

from flyteidl.core import types_pb2

NoneType = type(None)

_SIMPLE = {
    int: ("int", types_pb2.INTEGER),
    float: ("float", types_pb2.FLOAT),
    str: ("str", types_pb2.STRING),
    bool: ("bool", types_pb2.BOOLEAN),
    NoneType: ("none", types_pb2.NONE),
    datetime.datetime: ("datetime", types_pb2.DATETIME),
    datetime.date: ("date", types_pb2.DATETIME),
    datetime.timedelta: ("timedelta", types_pb2.DURATION),
}

_TAGS = {
    "list": "Typed List",
    "map": "Typed Dict",
    "untyped_dict": "Typed Dict",
    "enum": "DefaultEnumTransformer",
    "dataclass": "Object-Dataclass-Transformer",
    "pickle": "FlytePickle",
    "file": "FlyteFilePath",
    "union": "Typed Union",
}


def strip_annotated(tp: typing.Any) -> typing.Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def is_union(tp: typing.Any) -> bool:
    origin = typing.get_origin(tp)
    return origin is typing.Union or origin is types.UnionType


def kind_of(tp: typing.Any) -> str:
    tp = strip_annotated(tp)
    if tp is None:
        tp = NoneType
    if tp in _SIMPLE:
        return _SIMPLE[tp][0]
    if is_union(tp):
        return "union"
    origin = typing.get_origin(tp)
    if origin is list and typing.get_args(tp):
        return "list"
    if origin is dict:
        args = typing.get_args(tp)
        if args and strip_annotated(args[0]) is str:
            return "map"
        return "pickle"
    if tp is dict:
        return "untyped_dict"
    if tp is os.PathLike:  # flytekit's FlyteFilePathTransformer; pathlib.Path is a pickle there too
        return "file"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "enum"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "dataclass"
    return "pickle"


def union_tag(tp: typing.Any) -> str:
    kind = kind_of(tp)
    return _TAGS.get(kind, kind)


def literal_type(tp: typing.Any) -> types_pb2.LiteralType:
    tp = strip_annotated(tp)
    kind = kind_of(tp)
    if tp is None:
        tp = NoneType
    if tp in _SIMPLE:
        return types_pb2.LiteralType(simple=_SIMPLE[tp][1])
    if kind == "list":
        return types_pb2.LiteralType(collection_type=literal_type(typing.get_args(tp)[0]))
    if kind == "map":
        return types_pb2.LiteralType(map_value_type=literal_type(typing.get_args(tp)[1]))
    if kind == "untyped_dict":
        lt = types_pb2.LiteralType(simple=types_pb2.STRUCT)
        lt.annotation.annotations.update({"cache-key-metadata": {"serialization-format": "msgpack"}})
        return lt
    if kind == "enum":
        return types_pb2.LiteralType(enum_type=types_pb2.EnumType(values=[str(m.value) for m in tp]))
    if kind == "dataclass":
        # flytekit also attaches a JSON schema as metadata; readers match on simple type and tag only.
        return types_pb2.LiteralType(simple=types_pb2.STRUCT)
    if kind == "file":
        return types_pb2.LiteralType(blob=types_pb2.BlobType(format="", dimensionality=types_pb2.BlobType.SINGLE))
    if kind == "union":
        variants = []
        for arg in typing.get_args(tp):
            variant = literal_type(arg)
            variant.structure.tag = union_tag(arg)
            variants.append(variant)
        return types_pb2.LiteralType(union_type=types_pb2.UnionType(variants=variants))
    lt = types_pb2.LiteralType(
        blob=types_pb2.BlobType(format="PythonPickle", dimensionality=types_pb2.BlobType.SINGLE)
    )
    lt.metadata.update({"python_class_name": str(tp)})
    return lt


def describe(tp: typing.Any) -> str:
    tp = strip_annotated(tp)
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")
