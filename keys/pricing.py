"""Prices, read from the Price table at most once per GATEWAY_PRICE_CACHE_SECONDS per process.

A usage row's cost is priced in the usage writer's thread (off the request path) with the price in
force at the request's time; a request against a money budget is priced on admission from the
same cached table (one query per process every few seconds, never one per request). A model with
no price has no cost: None, never 0 (docs/decisions.md#prices).
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from gateway_project import state
from keys.models import Price

NANOS = Decimal("1e-9")  # budgets count money in integer billionths in the limit stores


@dataclass(frozen=True, slots=True)
class PriceInForce:
    """A price as of one moment: per million tokens, in `currency`."""

    input_per_million: Decimal
    output_per_million: Decimal
    currency: str
    valid_from: datetime

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (self.input_per_million * prompt_tokens + self.output_per_million * completion_tokens) / 1_000_000


def to_nanos(amount: Decimal) -> int:
    """An amount in whole billionths, rounded up (a budget never counts less than was spent)."""
    return int((amount / NANOS).to_integral_value(rounding=ROUND_CEILING))


class PriceBook:
    """Every price, grouped by (model, upstream), newest first; refreshed when older than `ttl`."""

    def __init__(self, ttl: float, clock=time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._prices: dict[tuple[str, str], list[PriceInForce]] = {}
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()

    def _stale(self) -> bool:
        return self.clock() - self._loaded_at >= self.ttl

    def load(self) -> None:
        """Read the table (in a thread that may query the database)."""
        loaded_at = self.clock()
        prices: dict[tuple[str, str], list[PriceInForce]] = defaultdict(list)
        for price in Price.objects.order_by("-valid_from"):
            prices[(price.model, price.upstream)].append(PriceInForce(
                price.input_per_million, price.output_per_million, price.currency, price.valid_from))
        self._prices, self._loaded_at = dict(prices), loaded_at

    def fresh(self) -> PriceBook:
        """This book, reloaded first if stale (synchronous: the usage writer's thread)."""
        if self._stale():
            with self._lock:
                if self._stale():
                    self.load()
        return self

    async def afresh(self) -> PriceBook:
        """This book, reloaded first if stale (from the event loop: a database thread)."""
        if self._stale():
            await sync_to_async(self._load_in_thread, thread_sensitive=True)()
        return self

    def _load_in_thread(self) -> None:
        close_old_connections()
        self.fresh()

    def price(self, model: str, upstream: str, at: datetime) -> PriceInForce | None:
        """The price in force at `at`: the upstream's own if it has one, else the model's."""
        for prices in (self._prices.get((model, upstream)) if upstream else None, self._prices.get((model, ""))):
            for price in prices or ():
                if price.valid_from <= at:
                    return price
        return None

    def dearest(self, model: str, at: datetime) -> PriceInForce | None:
        """The highest input and output prices in force at `at` for `model` over every upstream
        (a request's worst case before its upstream is chosen), in the model's own price's
        currency; None if the model has no price."""
        general = self.price(model, "", at)
        in_force = [p for p in (self.price(m, u, at) for (m, u) in self._prices if m == model) if p is not None]
        if not in_force:
            return None
        currency = general.currency if general else in_force[0].currency
        same = [p for p in in_force if p.currency == currency]
        return PriceInForce(max(p.input_per_million for p in same), max(p.output_per_million for p in same),
                            currency, max(p.valid_from for p in same))

    def invalidate(self) -> None:
        self._loaded_at = float("-inf")


def build_price_book() -> PriceBook:
    from django.conf import settings

    return PriceBook(ttl=settings.GATEWAY_PRICE_CACHE_SECONDS)


def get_price_book() -> PriceBook:
    return state.get("price_book")
