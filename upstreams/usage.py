"""Token counts from upstreams, checked before anything uses them.

An upstream's numbers reach usage blocks, limit leases, usage rows and metric counters; a negative,
fractional or huge one would break each of them differently (a counter cannot decrease, a row
column has a range). Every count read from an upstream goes through token_count().
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The range of a 32-bit signed integer column, and far beyond any real context.
MAX_TOKEN_COUNT = 2**31 - 1


def token_count(value: Any) -> int | None:
    """`value` if it is a plausible token count (an int in [0, MAX_TOKEN_COUNT]), else None."""
    if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT:  # not bool, not float
        return value
    return None


@dataclass(frozen=True)
class Usage:
    """A call's tokens, valid by construction (see checked()). `estimated`: the upstream reported
    none, so the gateway counted what it could."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False

    @classmethod
    def checked(cls, prompt_tokens: Any, completion_tokens: Any, estimated: bool = False) -> Usage | None:
        """The usage if both counts are plausible token counts, else None (a bad answer)."""
        prompt, completion = token_count(prompt_tokens), token_count(completion_tokens)
        if prompt is None or completion is None:
            return None
        return cls(prompt, completion, estimated)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def block(self) -> dict[str, int]:
        """OpenAI's usage object."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens}


NO_USAGE = Usage()
