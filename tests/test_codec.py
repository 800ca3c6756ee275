"""The plain-function codec: round trips for every supported annotation, and flytekit's exact shapes.

Byte-level agreement with flytekit itself is proven by tests/test_differential_flyte1.py; here the
shapes flytekit 1.16.31 was observed to write are pinned so a regression shows up without the oracle.
"""
from __future__ import annotations

import dataclasses
import datetime
import enum
import typing

import pytest
from flyteidl.core import literals_pb2

from executor.literals import CodecError, Context, to_literal, to_python


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclasses.dataclass
class Inner:
    x: int
    tags: list[str]


@dataclasses.dataclass
class DC:
    a: int
    b: float
    c: str
    d: typing.Optional[int]
    e: Inner
    f: dict[str, int]
    g: bool = True
    h: Color = Color.RED
    i: datetime.datetime = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)


class Opaque:
    def __init__(self, v):
        self.v = v

    def __eq__(self, other):
        return isinstance(other, Opaque) and other.v == self.v


UTC = datetime.timezone.utc
CASES = [
    (3, int), (2.5, float), ("hi", str), (True, bool), (None, type(None)),
    (datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC), datetime.datetime),
    (datetime.timedelta(seconds=90, microseconds=5), datetime.timedelta),
    ([1, 2], list[int]), ([[1], []], list[list[int]]), ({"a": 1.5}, dict[str, float]),
    ({"k": [1, {"z": None}], "n": 1.0}, dict), (Color.GREEN, Color),
    (DC(1, 2.0, "s", None, Inner(3, ["t"]), {"q": 1}), DC),
    (3, typing.Optional[int]), (None, typing.Optional[int]), ("x", typing.Union[int, str]),
    (Color.RED, typing.Optional[Color]), ([1], typing.Optional[list[int]]), (5, int | None),
    (Opaque(7), Opaque), ({1: "a"}, dict[int, str]),
]


@pytest.mark.parametrize("value, tp", CASES, ids=[str(t) for _, t in CASES])
def test_round_trip(tmp_path, value, tp):
    lit = to_literal(value, tp, Context(str(tmp_path / "raw")))
    back = literals_pb2.Literal()
    back.ParseFromString(lit.SerializeToString())
    assert to_python(back, tp) == value


def test_flytekit_shapes():
    ctx = Context()
    assert to_literal({"k": [1, {"z": None}], "n": 1.0}, dict, ctx).scalar.binary.value == (
        b"\x82\xa1k\x92\x01\x81\xa1z\xc0\xa1n\xcb?\xf0\x00\x00\x00\x00\x00\x00")
    dc = to_literal(DC(1, 2.0, "s", None, Inner(3, ["t"]), {"q": 1}), DC, ctx).scalar.binary
    assert dc.tag == "msgpack"
    assert dc.value == (b"\x89\xa1a\x01\xa1b\xcb@\x00\x00\x00\x00\x00\x00\x00\xa1c\xa1s\xa1d\xc0\xa1e\x82\xa1x\x03"
                        b"\xa4tags\x91\xa1t\xa1f\x81\xa1q\x01\xa1g\xc3\xa1h\xa3red\xa1i\xb92024-01-02T03:04:05+00:00")
    union = to_literal(Color.RED, typing.Optional[Color], ctx).scalar.union
    assert union.type.structure.tag == "DefaultEnumTransformer" and list(union.type.enum_type.values) == ["red", "green"]
    assert to_literal([1], typing.Optional[list[int]], ctx).scalar.union.type.structure.tag == "Typed List"
    assert to_literal(None, typing.Optional[int], ctx).scalar.union.type.structure.tag == "none"
    naive = to_literal(datetime.datetime(2024, 5, 6, 7, 8, 9, 123456), datetime.datetime, ctx)
    assert (naive.scalar.primitive.datetime.seconds, naive.scalar.primitive.datetime.nanos) == (1714979289, 123456000)


def test_pickle_layout(tmp_path):
    lit = to_literal(Opaque(1), Opaque, Context(str(tmp_path)))
    blob = lit.scalar.blob
    assert blob.metadata.type.format == "PythonPickle"
    parts = blob.uri[len(str(tmp_path)) + 1:].split("/")
    assert len(parts) == 2 and len(parts[0]) == 32 and len(parts[1]) == 32  # <random>/<md5>


@pytest.mark.parametrize("value, tp, fragment", [
    ("x", int, "expected int, got str"),
    (True, int, "expected int, got bool"),
    (None, int, "got None"),
    ([1, "a"], list[int], "expected list[int]"),
    (3, typing.Union[int, Opaque], "several variants"),
    (1.5, typing.Union[int, str], "fits no variant"),
])
def test_encoding_errors_are_clear(value, tp, fragment):
    with pytest.raises(CodecError, match=None) as info:
        to_literal(value, tp, Context("/tmp/raw"))
    assert fragment in str(info.value)


def test_int_is_accepted_for_float():
    assert to_literal(3, float, Context()).scalar.primitive.float_value == 3.0


def test_reads_what_flytekit_accepts():
    int_from_float = literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(float_value=4.0)))
    assert to_python(int_from_float, int) == 4
    plain_int = literals_pb2.Literal(scalar=literals_pb2.Scalar(primitive=literals_pb2.Primitive(integer=4)))
    assert to_python(plain_int, typing.Optional[int]) == 4
    from google.protobuf import struct_pb2
    generic = struct_pb2.Struct()
    generic.update({"x": 3, "tags": ["a"]})
    old_dc = literals_pb2.Literal(scalar=literals_pb2.Scalar(generic=generic))
    assert to_python(old_dc, Inner) == Inner(3, ["a"])


def test_decode_error_names_the_path():
    lit = to_literal({"a": "x"}, dict[str, str], Context())
    with pytest.raises(CodecError) as info:
        to_python(lit, dict[str, int])
    assert "value['a']" in str(info.value) and "expected int" in str(info.value)


def test_enum_value_not_in_enum():
    lit = to_literal("blue", str, Context())
    with pytest.raises(CodecError, match="'blue' is not a value of Color"):
        to_python(lit, Color)


def test_pathlike_round_trip_uploads_and_downloads(tmp_path):
    import os
    import pathlib

    src = tmp_path / "report.csv"
    src.write_text("a,b\n")
    lit = to_literal(src, os.PathLike, Context(str(tmp_path / "raw")))
    blob = lit.scalar.blob
    assert blob.metadata.type.format == "" and blob.uri.startswith(str(tmp_path / "raw")) and blob.uri.endswith("/report.csv")
    back = to_python(lit, os.PathLike)
    assert isinstance(back, pathlib.Path) and back.read_text() == "a,b\n" and back != src


def test_pickle_reader_checks_the_blob_format(tmp_path):
    import os

    (tmp_path / "f.txt").write_text("hello")
    lit = to_literal(str(tmp_path / "f.txt"), os.PathLike, Context(str(tmp_path / "raw")))
    with pytest.raises(CodecError, match="expected a pickle"):
        to_python(lit, Opaque)
