"""Dataclasses and untyped dicts as msgpack, the way flytekit (through mashumaro) writes them.

Encoding: fields in declaration order; nested dataclasses as maps; Enum as its value; datetime and
date as ISO strings; timedelta as float seconds; None as nil. Decoding walks the annotations back.
"""
from __future__ import annotations

import dataclasses
import datetime
import enum
import typing

from executor.literals.types import NoneType, is_union, strip_annotated


class StructError(ValueError):
    pass


def pack(data: typing.Any) -> bytes:
    import msgpack  # only tasks with dataclasses or dicts pay for it

    return msgpack.packb(data, use_bin_type=True)


def unpack(raw: bytes) -> typing.Any:
    import msgpack

    return msgpack.unpackb(raw, raw=False, strict_map_key=False)


def to_plain(value: typing.Any, tp: typing.Any, path: str) -> typing.Any:
    """A dataclass value (or anything inside one) as msgpack-ready data."""
    tp = strip_annotated(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = typing.get_type_hints(type(value))
        return {
            f.name: to_plain(getattr(value, f.name), hints.get(f.name, typing.Any), f"{path}.{f.name}")
            for f in dataclasses.fields(value)
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    args = typing.get_args(tp)
    if isinstance(value, (list, tuple)):
        inner = args[0] if args else typing.Any
        return [to_plain(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        inner = args[1] if len(args) == 2 else typing.Any
        return {k: to_plain(v, inner, f"{path}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (int, float, str, bool, bytes)):
        return value
    raise StructError(f"{path}: cannot store a {type(value).__name__} inside a dataclass or dict")


def from_plain(data: typing.Any, tp: typing.Any, path: str) -> typing.Any:
    """Rebuild a typed value from msgpack/JSON data using its annotation."""
    tp = strip_annotated(tp)
    if tp is typing.Any or tp is None and data is None:
        return data
    if data is None:
        if tp is NoneType or (is_union(tp) and NoneType in typing.get_args(tp)):
            return None
        raise StructError(f"{path}: value is missing (None) but the field is not Optional")
    if is_union(tp):
        errors = []
        for arg in typing.get_args(tp):
            if arg is NoneType:
                continue
            try:
                return from_plain(data, arg, path)
            except (StructError, TypeError, ValueError) as e:
                errors.append(str(e))
        raise StructError(f"{path}: {data!r} fits no variant of {tp}: {'; '.join(errors)}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise StructError(f"{path}: expected a map for {tp.__name__}, got {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in data:
                kwargs[f.name] = from_plain(data[f.name], hints.get(f.name, typing.Any), f"{path}.{f.name}")
        try:
            return tp(**kwargs)
        except TypeError as e:
            raise StructError(f"{path}: cannot build {tp.__name__}: {e}") from None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is datetime.datetime:
        return datetime.datetime.fromisoformat(data)
    if tp is datetime.date:
        return datetime.date.fromisoformat(data)
    if tp is datetime.timedelta:
        return datetime.timedelta(seconds=data)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (list, tuple) or tp in (list, tuple):
        inner = args[0] if args else typing.Any
        items = [from_plain(v, inner, f"{path}[{i}]") for i, v in enumerate(data)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        inner = args[1] if len(args) == 2 else typing.Any
        return {k: from_plain(v, inner, f"{path}[{k!r}]") for k, v in data.items()}
    if tp is float and isinstance(data, int) and not isinstance(data, bool):
        return float(data)
    if tp is int and isinstance(data, float) and data.is_integer():  # JSON structs carry every number as float
        return int(data)
    if isinstance(tp, type) and not isinstance(data, tp):
        raise StructError(f"{path}: expected {tp.__name__}, got {type(data).__name__} {data!r}")
    return data
