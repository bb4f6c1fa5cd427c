"""What keys/ raises to whoever serves requests (openai_api maps these to its HTTP errors).

keys/ knows nothing about HTTP statuses or OpenAI's error shape: a limit store says which limit
refused a request and when to retry, or that it cannot decide at the moment.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from keys.limits import Limits

LIMIT_KINDS = ("requests", "tokens", "parallel", "budget", "money", "unpriced")
BUDGET_KINDS = ("budget", "money", "unpriced")


class LimitExceeded(Exception):
    """A key's or its team's limit refused a request.

    kind: "requests" / "tokens" (per minute), "parallel", "budget" (tokens per period), "money"
    (money per period) or "unpriced" (a money budget cannot admit a model without a price in its
    currency); limits: the refusing level's limits (limits.scope: "key" or "team");
    retry_after: seconds until a retry may succeed (0 for a budget, which does not come back
    within a retry); headers: the x-ratelimit-* headers of the answer.
    """

    def __init__(self, kind: str, limits: Limits, retry_after: float, headers: dict[str, str]) -> None:
        if kind not in LIMIT_KINDS:
            raise ValueError(f"unknown limit kind {kind!r}")
        self.kind = kind
        self.limits = limits
        self.retry_after = max(0.0, retry_after)
        self.headers = headers
        super().__init__(f"{kind} limit of {limits.scope} {limits.key_id} reached")

    @property
    def scope(self) -> str:
        return self.limits.scope


class LimitsUnavailable(Exception):
    """The limit store cannot answer (Redis unreachable, the budget's usage unreadable):
    nobody knows whether the request is within its limits. retry_after: seconds to wait."""

    def __init__(self, reason: str, retry_after: float = 1.0) -> None:
        self.reason = reason
        self.retry_after = max(0.0, retry_after)
        super().__init__(reason)
