"""Python value <-> Literal codec for plain typed functions (no SDK needed)."""
from executor.literals.codec import CodecError, Context, describe_literal, to_literal, to_python

__all__ = ["CodecError", "Context", "describe_literal", "to_literal", "to_python"]
