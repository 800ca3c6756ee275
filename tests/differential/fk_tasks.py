"""flytekit-authored tasks (``@flytekit.task``), the way a flytekit user writes them.

Our executor must run these through flytekit itself and produce what flytekit's
``pyflyte-execute`` produces. Types shared with the plain functions live in ``plain_tasks``.
"""
import datetime
import os
import pathlib
import typing
from typing import Optional, Union

from flytekit import current_context, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.file import FlyteFile

from tests.differential.plain_tasks import Color, Inner, Opaque, Point, Stats


@task
def add(a: int, b: int) -> int:
    return a + b


@task
def describe(x: float, name: str, loud: bool) -> typing.Tuple[str, bool, float]:
    text = f"{name}={x}"
    return (text.upper() if loud else text), not loud, x * 2.5


@task
def shift(when: datetime.datetime, by: datetime.timedelta) -> tuple[datetime.datetime, datetime.timedelta, str]:
    return when + by, by * 2, str(when.tzinfo)


@task
def noop(x: int) -> None:
    assert isinstance(x, int)


@task
def histogram(words: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in words:
        out[w] = out.get(w, 0) + 1
    return out


@task
def flatten(groups: dict[str, list[int]], scale: float) -> list[float]:
    return [v * scale for k in sorted(groups) for v in groups[k]]


@task
def merge(base: dict, extra: dict) -> dict:
    return {**base, **extra, "merged": True}


@task
def maybe_double(x: Optional[int]) -> Optional[int]:
    return None if x is None else 2 * x


@task
def either(v: Union[int, str]) -> Union[str, float]:
    return v * 1.5 if isinstance(v, int) else v[::-1]


@task
def next_color(c: Color) -> Color:
    colors = list(Color)
    return colors[(colors.index(c) + 1) % len(colors)]


@task
def move(p: Point, dx: float) -> Point:
    return Point(
        x=p.x + dx, y=p.y, tags=[*p.tags, "moved"], counts={**p.counts, "moves": p.counts.get("moves", 0) + 1},
        inner=Inner(name=p.inner.name.upper(), weight=p.inner.weight / 2), label=p.label, history=[*p.history, 1],
    )


@task
def stats(xs: list[float]) -> Stats:
    return Stats(mean=sum(xs) / len(xs), count=len(xs))


@task
def bump(o: Opaque, n: int) -> Opaque:
    return Opaque([*o.payload, n], o.note + "!")


@task
def upper_file(f: FlyteFile) -> FlyteFile:
    with open(f) as fh:
        text = fh.read()
    out = pathlib.Path(current_context().working_directory) / "upper.txt"
    out.write_text(text.upper())
    return FlyteFile(str(out))


@task
def listing(d: FlyteDirectory) -> list[str]:
    root = d.download()
    return sorted(
        os.path.relpath(os.path.join(dirpath, name), root)
        for dirpath, _, names in os.walk(root)
        for name in names
    )


@task
def square(x: int, offset: int) -> int:
    return x * x + offset


@task
def ignored(x: int) -> int:
    from flytekit.core.base_task import IgnoreOutputs

    if x != 0:  # flytekit insists on a return statement in a task that returns a value
        raise IgnoreOutputs(f"worker {x} is not the chief")
    return x
