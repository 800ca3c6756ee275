"""A task module whose import crashes the interpreter (a native extension gone wrong)."""
import ctypes
import faulthandler

faulthandler.disable()  # the crash itself is the point, not its stack on stderr
ctypes.string_at(0)


def task(a: int) -> int:
    return a
