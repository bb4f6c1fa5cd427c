"""MemoryLimitStore: the limits of one process (no REDIS_URL), counted in its memory. The
contract and the shared types: keys/limits.py; the rules: docs/decisions.md#limits."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from keys.exceptions import LimitExceeded
from keys.limits import (
    NOTHING,
    Lease,
    Limits,
    Worst,
    budget_period_name,
    default_budget_loader,
    load_budget,
    over_budget,
    rate_headers,
)

WINDOW = 60.0  # the sliding windows, in seconds (docs/decisions.md#limits)


@dataclass
class KeyState:
    """One level's counters in this process."""

    requests: deque = field(default_factory=deque)  # admission times
    token_buckets: dict[int, int] = field(default_factory=dict)  # second -> tokens
    parallel: int = 0
    budget_period: str = ""
    budget_used: int | None = None  # tokens spent in the period
    nanos_used: int = 0  # money spent in the period, in billionths
    reserved: dict[str, tuple[int, int]] = field(default_factory=dict)  # lease id -> (tokens, nanos)


def level_key(limits: Limits) -> tuple[str, int]:
    return limits.scope, limits.key_id


def check_budget(limits: Limits, state: KeyState, worst: Worst) -> str | None:
    """The budget kind that refuses `worst` at this level, if any (over_budget's rule)."""
    reserved_tokens = sum(t for t, _ in state.reserved.values())
    if limits.token_budget is not None and over_budget(state.budget_used or 0, reserved_tokens, worst.tokens,
                                                       limits.token_budget):
        return "budget"
    if limits.money_budget is not None:
        nanos = worst.nanos_in(limits.currency)
        if nanos is None:
            return "unpriced"
        reserved_nanos = sum(n for _, n in state.reserved.values())
        if over_budget(state.nanos_used, reserved_nanos, nanos, limits.money_budget_nanos):
            return "money"
    return None


class MemoryLimitStore:
    """Limits for one process. The event loop is single-threaded, so no locks are needed: every
    await (loading a budget's spend from the database) comes before the checks, and the checks
    and the counting of every level run without one."""

    def __init__(self, clock=time.time, load_budget_used=None):
        self.clock = clock
        self.states: dict[tuple[str, int], KeyState] = {}
        self._load_budget_used = load_budget_used or default_budget_loader

    async def acquire(self, limits: Limits, worst: Worst = NOTHING) -> Lease:
        levels = limits.levels
        for level in levels:
            if level.has_budget:
                await self._ensure_budget(self.states.setdefault(level_key(level), KeyState()), level)
        now = self.clock()
        headers: dict[str, str] = {}
        for level in reversed(levels):  # the key's headers over its team's
            state = self.states.setdefault(level_key(level), KeyState())
            self._prune(state, now)
            headers.update(self._headers(level, state, now, 1))
        for level in levels:
            self._check(level, self.states[level_key(level)], now, worst, headers)
        lease = Lease(limits, headers=headers, worst=worst)
        for level in levels:
            state = self.states[level_key(level)]
            state.requests.append(now)
            state.parallel += 1
            if level.has_budget:
                state.reserved[lease.id] = (worst.tokens, worst.nanos or 0)
        return lease

    def _headers(self, limits: Limits, state: KeyState, now: float, extra: int) -> dict[str, str]:
        tokens_used = sum(state.token_buckets.values())
        request_reset = state.requests[0] + WINDOW - now if state.requests else 0.0
        token_reset = min(state.token_buckets) + WINDOW - now if state.token_buckets else 0.0
        return rate_headers(limits, len(state.requests) + extra, tokens_used, request_reset, token_reset)

    def _check(self, limits: Limits, state: KeyState, now: float, worst: Worst, headers: dict[str, str]) -> None:
        if limits.has_budget and (kind := check_budget(limits, state, worst)):
            raise LimitExceeded(kind, limits, 0, headers)
        if limits.parallel_requests is not None and state.parallel >= limits.parallel_requests:
            raise LimitExceeded("parallel", limits, 1, headers)
        if limits.requests_per_minute is not None and len(state.requests) >= limits.requests_per_minute:
            request_reset = state.requests[0] + WINDOW - now
            raise LimitExceeded("requests", limits, request_reset, {**headers, **self._headers(limits, state, now, 0)})
        if limits.tokens_per_minute is not None and sum(state.token_buckets.values()) >= limits.tokens_per_minute:
            raise LimitExceeded("tokens", limits, min(state.token_buckets) + WINDOW - now, headers)

    async def release(self, lease: Lease, tokens: int, nanos: int = 0) -> None:
        if lease.released:
            return
        lease.released = True
        second = int(self.clock())
        for level in lease.limits.levels:
            state = self.states.setdefault(level_key(level), KeyState())
            state.parallel = max(0, state.parallel - 1)
            state.reserved.pop(lease.id, None)
            if tokens:
                state.token_buckets[second] = state.token_buckets.get(second, 0) + tokens
                if state.budget_used is not None:
                    state.budget_used += tokens
            if nanos and state.budget_used is not None:
                state.nanos_used += nanos

    def release_soon(self, lease: Lease, tokens: int, nanos: int = 0) -> None:
        """Release from synchronous code (a request's finish hooks): here it is immediate."""
        _run_now(self.release(lease, tokens, nanos))

    def _prune(self, state: KeyState, now: float) -> None:
        while state.requests and state.requests[0] <= now - WINDOW:
            state.requests.popleft()
        for second in [s for s in state.token_buckets if s <= now - WINDOW]:
            del state.token_buckets[second]

    async def _ensure_budget(self, state: KeyState, limits: Limits) -> None:
        period = budget_period_name(limits.budget_period)
        if state.budget_period != period or state.budget_used is None:
            spent = await load_budget(self._load_budget_used, limits)
            if state.budget_period != period or state.budget_used is None:
                state.budget_period, state.budget_used, state.nanos_used = period, spent.tokens, spent.nanos

    async def parallel_in_use(self, key_id: int, scope: str = "key") -> int:
        """Parallel slots held now (releases are immediate in memory)."""
        return self.states.get((scope, key_id), KeyState()).parallel


def _run_now(coroutine) -> None:
    """Run a coroutine that never awaits anything to completion, synchronously."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise RuntimeError("release awaited unexpectedly")

