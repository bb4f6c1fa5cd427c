"""Token counts from upstreams, checked before anything uses them.

A worker's numbers reach usage blocks, limit leases, usage rows and metric counters; a negative,
fractional or huge one would break each of them differently (a counter cannot decrease, a row
column has a range). Every count read from a worker goes through token_count().
"""
from __future__ import annotations

from typing import Any

# The range of a 32-bit signed integer column, and far beyond any real context.
MAX_TOKEN_COUNT = 2**31 - 1


def token_count(value: Any) -> int | None:
    """`value` if it is a plausible token count (an int in [0, MAX_TOKEN_COUNT]), else None."""
    if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT:  # not bool, not float
        return value
    return None
