"""The task timed by benchmarks/cold_start.py: add two ints, once as a plain typed function and once
as a flytekit task. Same body, same interface (a: int, b: int) -> o0: int.

`add_fk` exists only where flytekit is installed; the plain function needs no SDK, so the dev venv
(which has none) can import this module too.
"""


def add_plain(a: int, b: int) -> int:
    return a + b


try:
    import flytekit
except ImportError:  # the executor's own venv: no SDK, and add_plain needs none
    flytekit = None

if flytekit is not None:

    @flytekit.task
    def add_fk(a: int, b: int) -> int:
        return a + b


try:
    import flyte
except ImportError:  # no flyte 2 SDK here
    flyte = None

if flyte is not None:
    _env = flyte.TaskEnvironment(name="bench")

    @_env.task
    def add_f2(a: int, b: int) -> int:
        return a + b
