"""Limits of a key and of its team, the part every store shares: the levels' limits (Limits), a
request's worst case (Worst) and admission (Lease), the one budget rule (over_budget), OpenAI's
rate-limit headers, the store contract (LimitStore) and the process's store. The rules:
docs/decisions.md#limits (every level checked, the tightest wins).

A request takes a Lease before it reaches a worker, reserving its worst case (Worst) against
every budget, and gives it back, with the tokens and cost it used, on every path (success,
error, timeout, client disconnect). Two stores share one contract: MemoryLimitStore
(keys/limit_store_memory.py, one process) and RedisLimitStore (keys/limit_store_redis.py, atomic
Lua scripts, shared by every process), chosen by REDIS_URL. Windows are sliding: requests are
counted over the last 60 s, tokens in one-second buckets over the last 60 s.

A refused request raises LimitExceeded; a store that cannot decide (Redis unreachable, a
budget's usage unreadable) raises LimitsUnavailable (keys/exceptions.py).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from asgiref.sync import sync_to_async
from django.db import Error as DatabaseError
from django.utils import timezone

from gateway_project import state
from keys.exceptions import LimitsUnavailable

if TYPE_CHECKING:
    from keys.limit_store_memory import MemoryLimitStore
    from keys.limit_store_redis import RedisLimitStore

# A parallel slot (or budget reservation) a process took and did not refresh for this long is
# presumed leaked by a dead process and freed (the Redis store: keys/limit_store_redis.py).
SLOT_TTL = 30


@dataclass(frozen=True)
class Limits:
    """The limits of one level, a key's or its team's; None means unlimited.

    `key_id` is the id of the level's owner (a team's id for scope "team"). A key's Limits carry
    its team's in `team`: a request must pass both (docs/decisions.md#limits).
    """

    key_id: int
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    parallel_requests: int | None = None
    token_budget: int | None = None
    budget_period: str = "month"
    money_budget: Decimal | None = None
    currency: str = "USD"
    scope: str = "key"  # "key" or "team"
    name: str = ""  # the team's name, for the answer's message
    team: Limits | None = None
    team_id: int | None = None  # a key's team (names its counters in Redis)

    @property
    def own(self) -> bool:
        """This level has a limit of its own."""
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute,
                                           self.parallel_requests, self.token_budget, self.money_budget))

    @property
    def any(self) -> bool:
        return self.own or (self.team is not None and self.team.own)

    @property
    def has_budget(self) -> bool:
        return self.token_budget is not None or self.money_budget is not None

    @property
    def money_budget_nanos(self) -> int | None:
        if self.money_budget is None:
            return None
        return int(self.money_budget * 1_000_000_000)  # whole billionths, rounded down

    @property
    def levels(self) -> tuple[Limits, ...]:
        """The levels a request must pass, key first."""
        levels = (self,) if self.own else ()
        return levels + ((self.team,) if self.team is not None and self.team.own else ())

    @property
    def wants_money(self) -> bool:
        return any(level.money_budget is not None for level in self.levels)


@dataclass(frozen=True)
class Worst:
    """A request's worst case, reserved on admission against every budget: tokens, and its cost
    in billionths of `currency` (None: the model has no price)."""

    tokens: int = 0
    nanos: int | None = 0
    currency: str = ""

    def nanos_in(self, currency: str) -> int | None:
        """The worst cost in `currency`; None if it cannot be told in it (no price, or a price
        in another currency). A request that may cost nothing costs nothing in any currency."""
        if self.nanos == 0:
            return 0
        return self.nanos if self.nanos is not None and self.currency == currency else None


NOTHING = Worst()


@dataclass(frozen=True)
class Spent:
    """A level's spend in its budget period so far, as the database counts it."""

    tokens: int = 0
    nanos: int = 0


@dataclass
class Lease:
    """A request's admission: released exactly once, with the tokens (and cost) it used."""

    limits: Limits
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    headers: dict[str, str] = field(default_factory=dict)
    released: bool = False
    worst: Worst = NOTHING
    price: object = None  # the price the worst case was counted with (accounting settles with it)


def over_budget(spent: int, reserved: int, worst: int, budget: int) -> bool:
    """The one budget rule, for tokens and money, keys and teams (and ACQUIRE_SCRIPT in
    keys/limit_store_redis.py): refused when the budget is spent (spent + reserved >= budget) or
    when this request's worst case would take it past the budget (spent + reserved + worst >
    budget)."""
    committed = spent + reserved
    return committed >= budget or committed + worst > budget


def budget_period_start(period: str, now: datetime | None = None) -> datetime:
    now = timezone.localtime(now or timezone.now())
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return start if period == "day" else start.replace(day=1)


def budget_period_name(period: str, now: datetime | None = None) -> str:
    return budget_period_start(period, now).strftime("%Y-%m-%d")


async def load_budget(loader, limits: Limits) -> Spent:
    """What a level spent in its budget's period so far; LimitsUnavailable if the database
    cannot tell. A loader may answer a token count alone."""
    try:
        spent = await loader(limits)
    except DatabaseError as exc:
        raise LimitsUnavailable(f"the budget's usage could not be read ({type(exc).__name__})") from None
    return Spent(tokens=spent) if isinstance(spent, int) else spent


async def default_budget_loader(limits: Limits) -> Spent:
    from keys.usage_totals import spent_since

    since = budget_period_start(limits.budget_period)
    return await sync_to_async(spent_since, thread_sensitive=True)(limits, since)


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


def rate_headers(limits: Limits, requests_used: int, tokens_used: int, request_reset: float, token_reset: float) -> dict[str, str]:
    headers = {}
    if limits.requests_per_minute is not None:
        headers.update({
            "x-ratelimit-limit-requests": str(limits.requests_per_minute),
            "x-ratelimit-remaining-requests": str(max(0, limits.requests_per_minute - requests_used)),
            "x-ratelimit-reset-requests": format_reset(request_reset),
        })
    if limits.tokens_per_minute is not None:
        headers.update({
            "x-ratelimit-limit-tokens": str(limits.tokens_per_minute),
            "x-ratelimit-remaining-tokens": str(max(0, limits.tokens_per_minute - tokens_used)),
            "x-ratelimit-reset-tokens": format_reset(token_reset),
        })
    return headers


class LimitStore(Protocol):
    async def acquire(self, limits: Limits, worst: Worst = NOTHING) -> Lease:
        """Admit a request, or raise LimitExceeded (refused) or LimitsUnavailable (cannot tell)."""

    async def release(self, lease: Lease, tokens: int, nanos: int = 0) -> None:
        """Give back a lease and count the tokens (and cost, in billionths) the request used."""


def build_limit_store() -> MemoryLimitStore | RedisLimitStore:
    """Redis when REDIS_URL is set, process memory otherwise (one per process:
    gateway_project/state.py)."""
    from django.conf import settings

    # The stores import this module's types: imported here, not at the top, to keep it acyclic.
    if settings.REDIS_URL:
        from keys.limit_store_redis import RedisLimitStore

        return RedisLimitStore(settings.REDIS_URL, timeout=settings.GATEWAY_REDIS_TIMEOUT)
    from keys.limit_store_memory import MemoryLimitStore

    return MemoryLimitStore()


def get_limit_store() -> MemoryLimitStore | RedisLimitStore:
    return state.get("limit_store")


def reset_limit_store(store: MemoryLimitStore | RedisLimitStore | None = None) -> None:
    state.put("limit_store", store)
