"""flytekit twins of the plain functions: the SAME function objects wrapped with ``flytekit.task``.

flytekit's ``pyflyte-execute`` runs these (``task-module tests.differential.fk_twins``) while our
executor runs the bare functions in ``plain_tasks``; the outputs must be interchangeable.
"""
import flytekit

from tests.differential import plain_tasks as _plain

add = flytekit.task(_plain.add)
describe = flytekit.task(_plain.describe)
shift = flytekit.task(_plain.shift)
noop = flytekit.task(_plain.noop)
histogram = flytekit.task(_plain.histogram)
flatten = flytekit.task(_plain.flatten)
merge = flytekit.task(_plain.merge)
maybe_double = flytekit.task(_plain.maybe_double)
either = flytekit.task(_plain.either)
next_color = flytekit.task(_plain.next_color)
move = flytekit.task(_plain.move)
stats = flytekit.task(_plain.stats)
bump = flytekit.task(_plain.bump)
upper_file = flytekit.task(_plain.upper_file)
square = flytekit.task(_plain.square)
