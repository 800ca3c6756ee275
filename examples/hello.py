"""Sample tasks for the quick start: plain typed functions, no SDK needed."""
from dataclasses import dataclass
from typing import NamedTuple, Optional


@dataclass
class Greeting:
    text: str
    length: int


class Stats(NamedTuple):
    total: int
    mean: float


def add(a: int, b: int) -> int:
    return a + b


def greet(name: str, punctuation: Optional[str] = None) -> Greeting:
    text = f"Hello, {name}{punctuation or '!'}"
    return Greeting(text=text, length=len(text))


def stats(values: list[int]) -> Stats:
    return Stats(total=sum(values), mean=sum(values) / len(values))


def divide(a: float, b: float) -> float:
    return a / b
