"""Plain typed functions: no flytekit, no SDK. Our executor runs these directly.

``fk_twins.py`` wraps each with ``flytekit.task`` so flytekit's own ``pyflyte-execute`` can run the
very same function; ``fk_tasks.py`` (flytekit-authored tasks) reuses the types defined here, so
values of these types unpickle in both the SDK-free test process and the oracle venv.
"""
import datetime
import enum
import os
import pathlib
import tempfile
import typing
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

# ---------------------------------------------------------------------------------------- types


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


@dataclass
class Inner:
    name: str
    weight: float


@dataclass
class Point:
    x: float
    y: float
    tags: list[str]
    counts: dict[str, int]
    inner: Inner
    label: Optional[str] = None
    history: list[int] = field(default_factory=list)


class Stats(NamedTuple):
    mean: float
    count: int


class Opaque:
    """No Flyte type exists for this: flytekit stores it as a FlytePickle (cloudpickle blob)."""

    def __init__(self, payload: list, note: str):
        self.payload = payload
        self.note = note

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and (self.payload, self.note) == (other.payload, other.note)

    def __repr__(self) -> str:
        return f"Opaque({self.payload!r}, {self.note!r})"


_COLORS = list(Color)

# ---------------------------------------------------------------------------------------- tasks


def add(a: int, b: int) -> int:
    return a + b


def describe(x: float, name: str, loud: bool) -> typing.Tuple[str, bool, float]:
    text = f"{name}={x}"
    return (text.upper() if loud else text), not loud, x * 2.5


def shift(when: datetime.datetime, by: datetime.timedelta) -> tuple[datetime.datetime, datetime.timedelta, str]:
    """Also reports the tzinfo the function was handed (flytekit hands over aware UTC datetimes)."""
    return when + by, by * 2, str(when.tzinfo)


def noop(x: int) -> None:
    assert isinstance(x, int)


def histogram(words: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in words:
        out[w] = out.get(w, 0) + 1
    return out


def flatten(groups: dict[str, list[int]], scale: float) -> list[float]:
    return [v * scale for k in sorted(groups) for v in groups[k]]


def merge(base: dict, extra: dict) -> dict:
    return {**base, **extra, "merged": True}


def maybe_double(x: Optional[int]) -> Optional[int]:
    return None if x is None else 2 * x


def either(v: Union[int, str]) -> Union[str, float]:
    return v * 1.5 if isinstance(v, int) else v[::-1]


def next_color(c: Color) -> Color:
    return _COLORS[(_COLORS.index(c) + 1) % len(_COLORS)]


def move(p: Point, dx: float) -> Point:
    return Point(
        x=p.x + dx, y=p.y, tags=[*p.tags, "moved"], counts={**p.counts, "moves": p.counts.get("moves", 0) + 1},
        inner=Inner(name=p.inner.name.upper(), weight=p.inner.weight / 2), label=p.label, history=[*p.history, 1],
    )


def stats(xs: list[float]) -> Stats:
    return Stats(mean=sum(xs) / len(xs), count=len(xs))


def bump(o: Opaque, n: int) -> Opaque:
    return Opaque([*o.payload, n], o.note + "!")


def upper_file(f: os.PathLike) -> os.PathLike:
    text = pathlib.Path(f).read_text()
    out = pathlib.Path(tempfile.mkdtemp()) / "upper.txt"
    out.write_text(text.upper())
    return out


def square(x: int, offset: int) -> int:
    """The map-task case: mapped over ``x``, ``offset`` optionally bound."""
    return x * x + offset


def describe_ints(a: int, b: int) -> tuple[int, int]:
    """Two outputs, for output-order checks."""
    return a + b, a * b
