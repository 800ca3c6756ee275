class Counter:
    """Not a dataclass, not a known type: travels as a FlytePickle."""

    def __init__(self, n: int):
        self.n = n

    def __eq__(self, other):
        return isinstance(other, Counter) and other.n == self.n


def make_counter(n: int) -> Counter:
    return Counter(n)
