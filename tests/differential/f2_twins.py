"""flyte 2 twins of the plain functions: the SAME function objects wrapped with ``env.task``.

flyte's ``a0`` runs these (``mod tests.differential.f2_twins instance <name>``) while our executor
runs the bare functions in ``plain_tasks`` without any SDK; the outputs must be interchangeable.
"""
import flyte

from tests.differential import plain_tasks as _plain

env = flyte.TaskEnvironment(name="twins")

add = env.task(_plain.add)
describe = env.task(_plain.describe)
noop = env.task(_plain.noop)
histogram = env.task(_plain.histogram)
flatten = env.task(_plain.flatten)
merge = env.task(_plain.merge)
maybe_double = env.task(_plain.maybe_double)
either = env.task(_plain.either)
next_color = env.task(_plain.next_color)
move = env.task(_plain.move)
bump = env.task(_plain.bump)
