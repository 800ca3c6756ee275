"""Plain typed functions that fail in every way a task can."""
import dataclasses
from typing import Optional


class FlyteRecoverableException(RuntimeError):
    """Same name as flytekit's: the executor recognises it by name, without the SDK."""


class FlakyError(FlyteRecoverableException):
    pass


def helper_that_raises(x: int) -> int:
    raise ValueError(f"x must be positive, got {x}")


def user_error(x: int) -> int:
    return helper_that_raises(x)


def recoverable_error(x: int) -> int:
    raise FlakyError("the database was busy")


def wrong_return_type(x: int) -> int:
    return "not an int"  # type: ignore[return-value]


def returns_none_for_int(x: int) -> int:
    return None  # type: ignore[return-value]


def wrong_tuple_arity(x: int) -> tuple[int, int]:
    return (x,)  # type: ignore[return-value]


def double(x: int) -> int:
    return 2 * x


def scale(x: int, factor: int) -> int:
    return x * factor


def optional_default(x: int, y: Optional[int] = None) -> int:
    return x + (y or 100)


def exits(x: int) -> int:
    raise SystemExit(3)


@dataclasses.dataclass
class Unpicklable:
    fh: object


def secret_in_message(x: int) -> int:
    raise RuntimeError("token=hunter2-secret leaked")


def user_error_ab(a: int, b: int) -> int:
    """For a0 runs (inputs a and b)."""
    return helper_that_raises(a + b)
