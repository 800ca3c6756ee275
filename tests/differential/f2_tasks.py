"""flyte 2-authored tasks (``@env.task``), the way a flyte 2 user writes them.

Our executor must run these through the flyte SDK itself and produce what flyte's ``a0`` produces.
Types shared with the plain functions live in ``plain_tasks`` (so values unpickle everywhere).
"""
import datetime
import tempfile
import typing
from typing import Optional, Union

import flyte
import flyte.errors
from flyte.io import File

from tests.differential.plain_tasks import Color, Inner, Opaque, Point

env = flyte.TaskEnvironment(name="differential")


@env.task
def add(a: int, b: int) -> int:
    return a + b


@env.task
def sub(a: int, b: int) -> int:
    """Same interface as add: the substitute in the tampered-pickle test."""
    return a - b


@env.task
async def add_async(a: int, b: int) -> int:
    return a + b


@env.task
def describe(x: float, name: str, loud: bool) -> typing.Tuple[str, bool, float]:
    text = f"{name}={x}"
    return (text.upper() if loud else text), not loud, x * 2.5


@env.task
def shift(when: datetime.datetime, by: datetime.timedelta) -> tuple[datetime.datetime, datetime.timedelta]:
    return when + by, by * 2


@env.task
def noop(x: int) -> None:
    assert isinstance(x, int)


@env.task
def histogram(words: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in words:
        out[w] = out.get(w, 0) + 1
    return out


@env.task
def flatten(groups: dict[str, list[int]], scale: float) -> list[float]:
    return [v * scale for k in sorted(groups) for v in groups[k]]


@env.task
def merge(base: dict, extra: dict) -> dict:
    return {**base, **extra, "merged": True}


@env.task
def maybe_double(x: Optional[int]) -> Optional[int]:
    return None if x is None else 2 * x


@env.task
def either(v: Union[int, str]) -> Union[str, float]:
    return v * 1.5 if isinstance(v, int) else v[::-1]


@env.task
def next_color(c: Color) -> Color:
    colors = list(Color)
    return colors[(colors.index(c) + 1) % len(colors)]


@env.task
def move(p: Point, dx: float) -> Point:
    return Point(
        x=p.x + dx, y=p.y, tags=[*p.tags, "moved"], counts={**p.counts, "moves": p.counts.get("moves", 0) + 1},
        inner=Inner(name=p.inner.name.upper(), weight=p.inner.weight / 2), label=p.label, history=[*p.history, 1],
    )


@env.task
def bump(o: Opaque, n: int) -> Opaque:
    return Opaque([*o.payload, n], o.note + "!")


@env.task
async def upper_file(f: File) -> File:
    async with f.open("rb") as fh:
        text = bytes(await fh.read()).decode()
    local = tempfile.mkdtemp() + "/upper.txt"
    with open(local, "w") as out:
        out.write(text.upper())
    return await File.from_local(local)


@env.task
def context_value(key: str) -> str:
    """Reads the action's custom context (Inputs.context) through flyte.ctx()."""
    return flyte.ctx().custom_context.get(key, "<unset>")


@env.task
def action_identity(x: int) -> str:
    tctx = flyte.ctx()
    return f"{tctx.action.run_name}/{tctx.action.name}/{tctx.action.project}/{tctx.action.domain}/{x}"


# ------------------------------------------------------------------------------------- failures


@env.task
def fails(x: int) -> int:
    raise ValueError(f"x must be negative, got {x}")


@env.task
def fails_for_good(x: int) -> int:
    raise flyte.errors.NonRecoverableError(f"the input {x} can never work")
