"""A plain typed Python function, converted with our own codec: no SDK in the image at all."""
from __future__ import annotations

import contextlib
import inspect
import typing
from dataclasses import dataclass

from flyteidl.core import literals_pb2

from executor import literals
from executor.errors import TaskFailure, is_marked_recoverable, out_of_memory
from executor.invocation import Invocation, MapSpec
from executor.literals.types import NoneType, describe
from executor.protocol.flyte1 import OUTPUTS_FILE

_NO_DEFAULT = inspect.Parameter.empty


@dataclass
class Parameter:
    name: str
    annotation: typing.Any
    default: typing.Any = _NO_DEFAULT


@dataclass
class PlainFunction:
    fn: typing.Callable
    name: str
    inputs: list[Parameter]
    outputs: list[tuple[str, typing.Any]]
    returns_named_tuple: bool = False
    map_spec: MapSpec | None = None
    kind: str = "plain function"
    _codec_ctx: literals.Context | None = None
    _output_types: dict | None = None

    @classmethod
    def from_callable(cls, fn, name: str, map_spec: MapSpec | None = None) -> "PlainFunction":
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
            signature = inspect.signature(fn)
        except Exception as e:
            raise TaskFailure("IMPORT", f"cannot read the type annotations of {name}: {type(e).__name__}: {e}", cause=e) from None
        params = []
        for p in signature.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TaskFailure("IMPORT", f"{name} takes *{p.name}; a task's inputs must be named parameters")
            if p.name not in hints:
                raise TaskFailure("IMPORT", f"parameter {p.name!r} of {name} has no type annotation", hint="annotate every parameter, as flytekit requires")
            params.append(Parameter(p.name, hints[p.name], p.default))
        outputs, named = _output_variables(hints.get("return", NoneType))
        return cls(fn, name, params, outputs, named, map_spec)

    def signature_text(self) -> str:
        args = ", ".join(f"{p.name}: {describe(p.annotation)}" for p in self.inputs)
        return f"{self.name}({args})"

    @contextlib.contextmanager
    def session(self, invocation: Invocation):
        self._codec_ctx = literals.Context(raw_output_prefix=invocation.raw_output_prefix_or_default,
                                           enum_by_name=invocation.protocol == "flyte2")
        try:
            yield self
        finally:  # this object is cached (loader): a warm runner's next invocation must not find these paths
            self._codec_ctx = None

    def decode_inputs(self, literal_map: literals_pb2.LiteralMap) -> dict:
        given = literal_map.literals
        kwargs = {}
        missing = [p.name for p in self.inputs if p.name not in given and p.default is _NO_DEFAULT]
        if missing:
            raise TaskFailure(
                "INPUT_DECODE",
                f"inputs.pb has no value for {', '.join(map(repr, missing))}, required by {self.signature_text()}",
                hint=f"inputs.pb holds {sorted(given) or 'nothing'}; was the task re-registered with a new signature?",
            )
        for p in self.inputs:
            if p.name not in given:
                kwargs[p.name] = p.default
                continue
            lit = given[p.name]
            if self.map_spec is not None and p.name not in self.map_spec.bound_inputs:
                lit = self._map_element(p.name, lit)
            try:
                kwargs[p.name] = literals.to_python(lit, p.annotation, path=f"input {p.name!r}")
            except literals.CodecError as e:
                raise TaskFailure("INPUT_DECODE", f"{e} (task {self.signature_text()})") from None
        return kwargs

    def _map_element(self, name: str, lit: literals_pb2.Literal) -> literals_pb2.Literal:
        index = self.map_spec.index
        if not lit.HasField("collection"):
            raise TaskFailure("INPUT_DECODE", f"map input {name!r} should be a collection, got {literals.describe_literal(lit)}")
        items = lit.collection.literals
        if not 0 <= index < len(items):
            raise TaskFailure(
                "INPUT_DECODE",
                f"map element {index} is out of range: input {name!r} has {len(items)} elements",
                hint="check BATCH_JOB_ARRAY_INDEX_VAR_NAME / BATCH_JOB_ARRAY_INDEX_OFFSET",
            )
        return items[index]

    def call(self, kwargs: dict):
        try:
            if inspect.iscoroutinefunction(self.fn):
                import asyncio

                return asyncio.run(self.fn(**kwargs))
            return self.fn(**kwargs)
        except SystemExit as e:
            raise TaskFailure(
                "USER", f"the task called sys.exit({e.code!r}) instead of returning", cause=e,
                hint="return a value, or raise an exception that says what went wrong",
            ) from None
        except MemoryError as e:
            raise out_of_memory(e) from None
        except Exception as e:
            raise TaskFailure(
                "USER", f"{type(e).__name__}: {e}", cause=e, recoverable=is_marked_recoverable(e)
            ) from None

    def output_literal_types(self) -> dict:
        if self._output_types is None:  # the same every attempt: built once (a warm pool builds it before forking)
            from executor.literals.types import literal_type

            self._output_types = {name: literal_type(tp) for name, tp in self.outputs}
        return self._output_types

    def encode_outputs(self, value) -> dict:
        if not self.outputs:
            return {OUTPUTS_FILE: literals_pb2.LiteralMap()}
        if len(self.outputs) == 1 and not (self.returns_named_tuple and isinstance(value, tuple)):
            values = [value]
        else:
            if not isinstance(value, tuple) or len(value) != len(self.outputs):
                names = ", ".join(n for n, _ in self.outputs)
                raise TaskFailure(
                    "OUTPUT_ENCODE",
                    f"{self.name} should return a tuple of {len(self.outputs)} ({names}), returned {type(value).__name__}",
                )
            values = list(value)
        out = literals_pb2.LiteralMap()
        for (name, tp), v in zip(self.outputs, values):
            try:
                out.literals[name].CopyFrom(literals.to_literal(v, tp, self._codec_ctx, path=f"output {name!r}"))
            except literals.CodecError as e:
                raise TaskFailure("OUTPUT_ENCODE", f"{e} (returned by {self.name})") from None
        return {OUTPUTS_FILE: out}


def _output_variables(annotation) -> tuple[list[tuple[str, typing.Any]], bool]:
    """Output names as flytekit gives them: NamedTuple field names, else o0, o1, ..."""
    if annotation in (None, NoneType, inspect.Signature.empty):
        return [], False
    if isinstance(annotation, type) and issubclass(annotation, tuple) and hasattr(annotation, "_fields"):
        field_types = typing.get_type_hints(annotation, include_extras=True)
        return [(f, field_types.get(f, typing.Any)) for f in annotation._fields], True
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if args and args[-1] is not Ellipsis:
            return [(f"o{i}", t) for i, t in enumerate(args)], False
    return [("o0", annotation)], False
