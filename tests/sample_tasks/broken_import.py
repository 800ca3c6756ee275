"""A task module whose import fails on a missing dependency."""
import definitely_not_installed_package  # noqa: F401


def task(x: int) -> int:
    return x
