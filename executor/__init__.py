"""executor: the in-pod runtime for Flyte tasks.

Kept empty of imports on purpose: `python -m executor` must start fast.
"""
__version__ = "0.1.0"
