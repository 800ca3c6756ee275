"""A task module that calls sys.exit while it is imported."""
import sys

sys.exit(3)


def task(a: int) -> int:
    return a
