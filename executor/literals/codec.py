"""Python values <-> flyteidl Literals for plain typed functions, exactly as flytekit encodes them.

`to_literal` writes what flytekit's TypeEngine would write for the same annotation (CONTRACT.md §1),
so a flytekit task downstream reads it unchanged. `to_python` accepts everything flytekit writes,
including the older JSON-struct dataclass format and offloaded literals.
"""
from __future__ import annotations

import datetime
import os
import typing
from dataclasses import dataclass

from flyteidl.core import literals_pb2 as L

from executor.literals import structs
from executor.literals.types import NoneType, describe, is_union, kind_of, literal_type, strip_annotated, union_tag

MSGPACK = "msgpack"
PICKLE_FORMAT = "PythonPickle"


class CodecError(ValueError):
    """A value or literal that does not fit its annotation; the message names the path."""


@dataclass(frozen=True)
class Context:
    raw_output_prefix: str = ""
    enum_by_name: bool = False  # flyte 2 writes an Enum as its member's name; flytekit as its value


# ---------------------------------------------------------------------------------------------
# Encoding


def to_literal(value: typing.Any, tp: typing.Any, ctx: Context, path: str = "value") -> L.Literal:
    tp = strip_annotated(tp)
    kind = kind_of(tp)
    if value is None and kind not in ("none", "union"):
        raise CodecError(f"{path}: got None but the annotation is {describe(tp)} (use Optional[...] to allow None)")
    if kind == "union":
        return _encode_union(value, tp, ctx, path)
    if not _accepts(value, tp, strict=False):
        raise CodecError(f"{path}: expected {describe(tp)}, got {type(value).__name__} {_short(value)}")
    return _encode(value, tp, kind, ctx, path)


def _encode(value, tp, kind, ctx, path) -> L.Literal:
    if kind == "int":
        return L.Literal(scalar=L.Scalar(primitive=L.Primitive(integer=value)))
    if kind == "float":
        return L.Literal(scalar=L.Scalar(primitive=L.Primitive(float_value=float(value))))
    if kind == "str":
        return L.Literal(scalar=L.Scalar(primitive=L.Primitive(string_value=value)))
    if kind == "bool":
        return L.Literal(scalar=L.Scalar(primitive=L.Primitive(boolean=value)))
    if kind == "none":
        return L.Literal(scalar=L.Scalar(none_type=L.Void()))
    if kind in ("datetime", "date"):
        if kind == "date":
            value = datetime.datetime.combine(value, datetime.time.min)
        if value.tzinfo is not None:  # flytekit stores UTC; naive values are taken as UTC
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        primitive = L.Primitive()
        primitive.datetime.FromDatetime(value)
        return L.Literal(scalar=L.Scalar(primitive=primitive))
    if kind == "timedelta":
        primitive = L.Primitive()
        primitive.duration.FromTimedelta(value)
        return L.Literal(scalar=L.Scalar(primitive=primitive))
    if kind == "list":
        inner = typing.get_args(tp)[0]
        items = [to_literal(v, inner, ctx, f"{path}[{i}]") for i, v in enumerate(value)]
        return L.Literal(collection=L.LiteralCollection(literals=items))
    if kind == "map":
        inner = typing.get_args(tp)[1]
        items = {k: to_literal(v, inner, ctx, f"{path}[{k!r}]") for k, v in value.items()}
        return L.Literal(map=L.LiteralMap(literals=items))
    if kind == "untyped_dict":
        try:
            raw = structs.pack(value)
        except (TypeError, ValueError) as e:
            raise CodecError(f"{path}: an untyped dict must hold only msgpack types (str, int, float, bool, None, list, dict): {e}") from None
        return L.Literal(scalar=L.Scalar(binary=L.Binary(value=raw, tag=MSGPACK)))
    if kind == "enum":
        if isinstance(value, str):
            text = value
        else:
            text = value.name if ctx.enum_by_name else value.value
        return L.Literal(scalar=L.Scalar(primitive=L.Primitive(string_value=text)))
    if kind == "dataclass":
        try:
            raw = structs.pack(structs.to_plain(value, tp, path))
        except structs.StructError as e:
            raise CodecError(str(e)) from None
        return L.Literal(scalar=L.Scalar(binary=L.Binary(value=raw, tag=MSGPACK)))
    if kind == "file":
        return _encode_file(value, ctx, path)
    return _encode_pickle(value, tp, ctx, path)


def _encode_file(value, ctx, path) -> L.Literal:
    """A local file is uploaded to <raw prefix>/<random>/<name> (flytekit's FlyteFile layout)."""
    from flyteidl.core import types_pb2

    from executor import storage

    local = os.fspath(value)
    if "://" in local and not local.startswith("file://"):
        uri = local  # already in the store
    else:
        if local.startswith("file://"):
            local = local[len("file://"):]
        if not os.path.isfile(local):
            raise CodecError(f"{path}: returned path {local!r} is not an existing file")
        if not ctx.raw_output_prefix:
            raise CodecError(f"{path}: returning a file needs --raw-output-data-prefix")
        uri = storage.join(ctx.raw_output_prefix, os.urandom(16).hex(), os.path.basename(local))
        storage.upload_file(local, uri)
    meta = L.BlobMetadata(type=types_pb2.BlobType(format="", dimensionality=types_pb2.BlobType.SINGLE))
    return L.Literal(scalar=L.Scalar(blob=L.Blob(metadata=meta, uri=uri)))


def _encode_union(value, tp, ctx, path) -> L.Literal:
    variants = typing.get_args(tp)
    matches = [v for v in variants if _accepts(value, v, strict=True)]
    if not matches:  # flytekit is strict about int-for-float; we accept it when nothing else fits
        matches = [v for v in variants if _accepts(value, v, strict=False)]
    if len(matches) > 1 and type(value) is str and sum(1 for m in matches if m is str) == 1:
        matches = [str]
    if not matches:
        raise CodecError(f"{path}: {type(value).__name__} {_short(value)} fits no variant of {describe(tp)}")
    if len(matches) > 1:
        raise CodecError(
            f"{path}: {_short(value)} fits several variants of {describe(tp)} ({', '.join(describe(m) for m in matches)}); "
            "flytekit refuses ambiguous unions too"
        )
    chosen = matches[0]
    inner = to_literal(value, chosen, ctx, path)
    stored = literal_type(chosen)
    stored.structure.tag = union_tag(chosen)
    return L.Literal(scalar=L.Scalar(union=L.Union(value=inner, type=stored)))


def _accepts(value, tp, strict: bool) -> bool:
    """Would flytekit's transformer for `tp` take `value`? (`strict=False` also takes int for float.)"""
    tp = strip_annotated(tp)
    kind = kind_of(tp)
    if kind == "none":
        return value is None
    if value is None:
        return kind == "union" and NoneType in typing.get_args(tp)
    if kind in ("int", "str", "bool", "timedelta", "date"):
        return type(value) is (tp if kind != "date" else datetime.date)
    if kind == "float":
        return type(value) is float or (not strict and type(value) is int)
    if kind == "datetime":
        return isinstance(value, datetime.datetime)
    if kind == "list":
        inner = typing.get_args(tp)[0]
        return isinstance(value, list) and all(_accepts(v, inner, strict) for v in value)
    if kind == "map":
        inner = typing.get_args(tp)[1]
        return isinstance(value, dict) and all(isinstance(k, str) and _accepts(v, inner, strict) for k, v in value.items())
    if kind == "untyped_dict":
        return isinstance(value, dict)
    if kind == "enum":
        return isinstance(value, tp) or (isinstance(value, str) and value in {m.value for m in tp})
    if kind == "dataclass":
        return isinstance(value, tp)
    if kind == "file":
        return isinstance(value, (str, os.PathLike))
    if kind == "union":
        return any(_accepts(value, v, strict) for v in typing.get_args(tp))
    return True  # pickle takes anything but None


def _encode_pickle(value, tp, ctx, path) -> L.Literal:
    import cloudpickle

    from executor import storage

    if not ctx.raw_output_prefix:
        raise CodecError(f"{path}: {describe(tp)} travels as a pickle, which needs --raw-output-data-prefix")
    try:
        data = cloudpickle.dumps(value)
    except Exception as e:
        raise CodecError(f"{path}: cannot pickle {type(value).__name__}: {e}") from None
    import hashlib

    # Same layout as flytekit: <raw prefix>/<random>/<md5 of the pickle>
    uri = storage.join(ctx.raw_output_prefix, os.urandom(16).hex(), hashlib.md5(data).hexdigest())
    storage.write_bytes(uri, data)
    from flyteidl.core import types_pb2

    meta = L.BlobMetadata(type=types_pb2.BlobType(format=PICKLE_FORMAT, dimensionality=types_pb2.BlobType.SINGLE))
    return L.Literal(scalar=L.Scalar(blob=L.Blob(metadata=meta, uri=uri)))


# ---------------------------------------------------------------------------------------------
# Decoding


def to_python(lit: L.Literal, tp: typing.Any, path: str = "value") -> typing.Any:
    tp = strip_annotated(tp)
    if lit.HasField("offloaded_metadata"):
        lit = _load_offloaded(lit, path)
    kind = kind_of(tp)
    scalar = lit.scalar if lit.HasField("scalar") else None
    if kind == "union":
        return _decode_union(lit, tp, path)
    if scalar is not None and scalar.HasField("union"):
        return to_python(scalar.union.value, tp, path)
    if kind == "pickle" and scalar is not None and scalar.HasField("binary") and not scalar.binary.tag:
        return _loads_pickle(scalar.binary.value, "an inline pickle", path)  # flyte 2 inlines small pickles
    if scalar is not None and scalar.HasField("binary") and kind not in ("dataclass", "untyped_dict"):
        return _from_msgpack(scalar.binary, tp, path)
    primitive = scalar.primitive if scalar is not None and scalar.HasField("primitive") else None
    which = primitive.WhichOneof("value") if primitive is not None else None
    if kind == "int" and which in ("integer", "float_value"):
        return int(getattr(primitive, which))
    if kind == "float" and which in ("float_value", "integer"):
        return float(getattr(primitive, which))
    if kind == "str" and which == "string_value":
        return primitive.string_value
    if kind == "bool" and which == "boolean":
        return primitive.boolean
    if kind == "none" and scalar is not None and scalar.HasField("none_type"):
        return None
    if kind == "datetime" and which == "datetime":
        return primitive.datetime.ToDatetime(tzinfo=datetime.timezone.utc)
    if kind == "date" and which == "datetime":
        return primitive.datetime.ToDatetime().date()
    if kind == "timedelta" and which == "duration":
        return primitive.duration.ToTimedelta()
    if kind == "list" and lit.HasField("collection"):
        inner = typing.get_args(tp)[0]
        return [to_python(v, inner, f"{path}[{i}]") for i, v in enumerate(lit.collection.literals)]
    if kind == "map" and lit.HasField("map"):
        inner = typing.get_args(tp)[1]
        return {k: to_python(v, inner, f"{path}[{k!r}]") for k, v in lit.map.literals.items()}
    if kind == "enum" and which == "string_value":
        try:
            return tp(primitive.string_value)
        except ValueError:
            if primitive.string_value in tp.__members__:  # flyte 2 writes the member's name
                return tp[primitive.string_value]
            allowed = ", ".join(repr(m.value) for m in tp)
            raise CodecError(f"{path}: {primitive.string_value!r} is not a value of {tp.__name__} ({allowed})") from None
    if kind in ("dataclass", "untyped_dict") and scalar is not None:
        if scalar.HasField("binary"):
            return _from_msgpack(scalar.binary, tp, path)
        if scalar.HasField("generic"):  # the pre-msgpack JSON format (FLYTE_USE_OLD_DC_FORMAT)
            from google.protobuf.json_format import MessageToDict

            data = MessageToDict(scalar.generic)
            return data if kind == "untyped_dict" else _from_plain(data, tp, path)
    if kind == "pickle" and scalar is not None and scalar.HasField("blob"):
        fmt = scalar.blob.metadata.type.format
        if fmt != PICKLE_FORMAT:
            raise CodecError(f"{path}: expected a pickle (blob format {PICKLE_FORMAT!r}), got a blob of format {fmt!r} at {scalar.blob.uri}")
        return _load_pickle(scalar.blob.uri, path)
    if kind == "file" and scalar is not None and scalar.HasField("blob"):
        if scalar.blob.metadata.type.dimensionality != 0:
            raise CodecError(f"{path}: expected a single file, got a multipart blob (a directory) at {scalar.blob.uri}")
        return _download_file(scalar.blob.uri)
    raise CodecError(f"{path}: expected {describe(tp)}, but the literal holds {describe_literal(lit)}")


def _decode_union(lit: L.Literal, tp, path):
    variants = typing.get_args(tp)
    if lit.HasField("scalar") and lit.scalar.HasField("union"):
        tag = lit.scalar.union.type.structure.tag
        tagged = [v for v in variants if union_tag(v) == tag]
        for variant in tagged or variants:
            try:
                return to_python(lit.scalar.union.value, variant, path)
            except CodecError:
                continue
        raise CodecError(f"{path}: union value tagged {tag!r} fits no variant of {describe(tp)}")
    if lit.HasField("scalar") and lit.scalar.HasField("none_type") and NoneType in variants:
        return None
    for variant in variants:
        try:
            return to_python(lit, variant, path)
        except CodecError:
            continue
    raise CodecError(f"{path}: expected {describe(tp)}, but the literal holds {describe_literal(lit)}")


def _from_msgpack(binary: L.Binary, tp, path):
    if binary.tag != MSGPACK:
        raise CodecError(f"{path}: binary literal with unsupported tag {binary.tag!r} (expected 'msgpack')")
    try:
        data = structs.unpack(binary.value)
    except Exception as e:
        raise CodecError(f"{path}: corrupt msgpack data: {e}") from None
    if kind_of(tp) == "untyped_dict":
        if not isinstance(data, dict):
            raise CodecError(f"{path}: expected a dict, the msgpack data holds {type(data).__name__}")
        return data
    return _from_plain(data, tp, path)


def _from_plain(data, tp, path):
    try:
        return structs.from_plain(data, tp, path)
    except (structs.StructError, TypeError, ValueError) as e:
        raise CodecError(str(e)) from None


def _load_pickle(uri: str, path: str):
    from executor import storage

    return _loads_pickle(storage.read_bytes(uri), uri, path)


def _loads_pickle(data: bytes, where: str, path: str):
    import pickle

    try:
        return pickle.loads(data)
    except Exception as e:
        raise CodecError(f"{path}: cannot unpickle {where}: {type(e).__name__}: {e}") from None


def _download_file(uri: str):
    """Inputs typed os.PathLike arrive as a local copy (flytekit hands over an undownloaded FlyteFile)."""
    import pathlib
    import tempfile

    from executor import storage

    local = os.path.join(tempfile.mkdtemp(prefix="executor-input-"), os.path.basename(uri.rstrip("/")) or "file")
    storage.download_file(uri, local)
    return pathlib.Path(local)


def _load_offloaded(lit: L.Literal, path: str) -> L.Literal:
    from executor import storage

    uri = lit.offloaded_metadata.uri
    loaded = L.Literal()
    try:
        loaded.ParseFromString(storage.read_bytes(uri))
    except Exception as e:
        if isinstance(e, storage.StorageError):
            raise
        raise CodecError(f"{path}: offloaded literal at {uri} is corrupt: {e}") from None
    return loaded


# ---------------------------------------------------------------------------------------------
# Messages


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_literal(lit: L.Literal) -> str:
    which = lit.WhichOneof("value")
    if which == "collection":
        return f"a collection of {len(lit.collection.literals)}"
    if which == "map":
        return f"a map with keys {sorted(lit.map.literals)[:5]}"
    if which == "offloaded_metadata":
        return f"an offloaded literal at {lit.offloaded_metadata.uri}"
    if which != "scalar":
        return which or "nothing"
    scalar = lit.scalar
    inner = scalar.WhichOneof("value")
    if inner == "primitive":
        kind = scalar.primitive.WhichOneof("value")
        if kind in ("datetime", "duration"):
            return f"a {kind}"
        return f"{kind} {_short(getattr(scalar.primitive, kind))}"
    if inner == "blob":
        return f"a blob ({scalar.blob.metadata.type.format or 'no format'}) at {scalar.blob.uri}"
    if inner == "binary":
        return f"binary data tagged {scalar.binary.tag!r}"
    if inner == "union":
        return f"a union value tagged {scalar.union.type.structure.tag!r}"
    if inner == "none_type":
        return "None"
    return inner or "an empty scalar"
