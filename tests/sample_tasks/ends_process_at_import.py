"""A task module that ends the process outright (os._exit) while it is imported."""
import os

os._exit(3)


def task(a: int) -> int:
    return a
