"""A task module that raises while being imported."""

CONFIG = {}
THRESHOLD = CONFIG["threshold"]


def task(x: int) -> int:
    return x
