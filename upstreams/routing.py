"""Which route serves a request, and failover to the next one before the first byte.

Choice (`pick`): the routes of a public model that have the capabilities the request needs,
grouped into tiers by priority (a larger number is preferred); the first tier with a usable
route wins, and within it a route is drawn at random in proportion to its weight (the RNG is
injectable). A route is not usable while its upstream is disabled, cooling down or rejected
(upstreams/cooldown.py), or has `max_concurrency` requests in flight in THIS process (the cap
is per process: with N processes an upstream may get up to N times it).

Weighted random, not least-busy: LiteLLM's least-busy strategy was reported to send every
request to the first-listed deployment (BerriAI/litellm#38746: in-flight counts are mostly 0
under light load and ties went to the first) and to pin traffic to one deployment for hours
(BerriAI/litellm#39322: a drifting counter, not shared across workers). A weighted draw spreads
by design and needs no shared counter (docs/upstreams.md#routing).

Failover (`with_failover`): an attempt that fails before any byte reached the client with a
retryable failure (refused, connect or first-byte timeout, 429, 5xx, credentials rejected) is
retried on another upstream, at most `retries` times and within one overall deadline. An
upstream 4xx other than 429 (ClientFailure) is never retried: it is the client's answer. After
the first byte nothing is retried (streams are returned primed, and a failure after that is
the face's one error event + [DONE]). LiteLLM's fallbacks were reported not to apply to streams
(BerriAI/litellm#6294, #6957): here the rule is the same for streamed and non-streamed calls,
because the adapters return streams only once their first chunk is in.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from upstreams import errors

T = TypeVar("T")


class RouteLike(Protocol):
    upstream: str
    priority: int
    weight: int
    capabilities: frozenset[str]
    max_concurrency: int | None


@dataclass(frozen=True)
class RoutingPolicy:
    retries: int = 2
    deadline_seconds: float = 30.0

    @classmethod
    def from_settings(cls) -> RoutingPolicy:
        from django.conf import settings

        return cls(retries=settings.GATEWAY_UPSTREAM_RETRIES,
                   deadline_seconds=settings.GATEWAY_UPSTREAM_FAILOVER_SECONDS)


class InFlight:
    """Requests in flight per upstream, in this process."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)

    def enter(self, name: str) -> None:
        self.counts[name] += 1

    def leave(self, name: str) -> None:
        self.counts[name] = max(0, self.counts[name] - 1)

    def at_cap(self, route: RouteLike) -> bool:
        cap = route.max_concurrency
        return cap is not None and self.counts.get(route.upstream, 0) >= cap

    def clear(self) -> None:
        self.counts.clear()


def capable(routes: Iterable[RouteLike], call: Any) -> list[RouteLike]:
    """The routes that have every capability `call` needs; CapabilityMissing (400 naming the
    parameter that asked for it) if no route has them all."""
    routes = list(routes)
    fit = [route for route in routes if call.needs <= route.capabilities]
    if routes and not fit:
        from upstreams.calls import first_unmet

        # The route that lacks least decides which parameter the message names.
        best = max(routes, key=lambda route: len(call.needs & route.capabilities))
        need = first_unmet(call, best.capabilities)
        raise errors.CapabilityMissing(need.param, need.message)
    return fit


def tiers(routes: Iterable[RouteLike]) -> list[list[RouteLike]]:
    """Routes grouped by priority, preferred (largest) first."""
    grouped: dict[int, list[RouteLike]] = defaultdict(list)
    for route in routes:
        grouped[route.priority].append(route)
    return [grouped[priority] for priority in sorted(grouped, reverse=True)]


def weighted(routes: Sequence[RouteLike], rng: random.Random) -> RouteLike:
    weights = [max(route.weight, 0) for route in routes]
    if sum(weights) <= 0:
        return routes[rng.randrange(len(routes))]
    return rng.choices(routes, weights=weights)[0]


def pick(routes: Iterable[RouteLike], usable: Callable[[RouteLike], bool], rng: random.Random) -> RouteLike | None:
    """The first tier with a usable route, a weighted draw within it; None if no route is usable."""
    for tier in tiers(routes):
        ready = [route for route in tier if usable(route)]
        if ready:
            return weighted(ready, rng)
    return None


# Failure kinds, a closed set (metrics labels, breaker reasons).
def failure_kind(exc: BaseException) -> str:
    for cls, kind in (
        (errors.CredentialsRejected, "credentials"), (errors.RateLimited, "rate_limited"),
        (errors.UpstreamTimeout, "timeout"), (errors.Unreachable, "unreachable"),
        (errors.ServerFailure, "server_error"), (errors.ClientFailure, "client_error"),
        (errors.BadAnswer, "bad_answer"),
    ):
        if isinstance(exc, cls):
            return kind
    return "other"


def counts_against_upstream(exc: BaseException) -> bool:
    """Does this failure say the upstream is unwell? A client's 4xx does not."""
    return isinstance(exc, errors.UpstreamFailure) and not isinstance(exc, errors.ClientFailure)


class Reporter(Protocol):
    """What the router learns about attempts (metrics, the breakers)."""

    def started(self, route: Any) -> None: ...
    def failed(self, route: Any, exc: BaseException, elapsed: float) -> None: ...


async def with_failover(
    routes: Sequence[RouteLike],
    attempt: Callable[[RouteLike], Awaitable[T]],
    *,
    usable: Callable[[RouteLike], bool],
    claim: Callable[[RouteLike], Awaitable[bool]] | None = None,
    on_failure: Callable[[RouteLike, BaseException], None] | None = None,
    on_start: Callable[[RouteLike], None] | None = None,
    policy: RoutingPolicy = RoutingPolicy(),
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    retry_after: Callable[[Iterable[str]], float | None] | None = None,
) -> tuple[RouteLike, T]:
    """Run `attempt` on a chosen route; on a retryable failure, on another upstream's route.

    `usable(route)`: may it be chosen now (enabled, breaker, cap). `claim(route)`: for an
    upstream that is half-open, may this request be its one trial (None: always). `on_start`
    and `on_failure` are called for each attempt (in-flight counts, breakers, metrics).
    Returns the route that answered and its result; raises the last failure, NoRoute when no
    route could be tried, or UpstreamTimeout when the deadline passed first.
    """
    rng = rng or random.Random()
    deadline = clock() + policy.deadline_seconds
    tried: set[str] = set()
    last: BaseException | None = None
    for _ in range(policy.retries + 1):
        route = await _choose(routes, tried, usable, claim, rng)
        if route is None:
            break
        remaining = deadline - clock()
        if remaining <= 0:
            break
        tried.add(route.upstream)
        if on_start is not None:
            on_start(route)
        try:
            async with asyncio.timeout(remaining):
                return route, await attempt(route)
        except TimeoutError:
            exc: BaseException = errors.UpstreamTimeout(
                "The upstream did not answer in time", log_detail=f"failover deadline, upstream {route.upstream}")
            if on_failure is not None:
                on_failure(route, exc)
            last = exc
            break
        except errors.UpstreamFailure as exc:
            if on_failure is not None:
                on_failure(route, exc)
            if not exc.retryable or isinstance(exc, errors.ClientFailure):
                raise
            last = exc
        except BaseException as exc:
            if on_failure is not None:
                on_failure(route, exc)
            raise
    if last is not None:
        raise last
    wait = retry_after([route.upstream for route in routes]) if retry_after else None
    raise errors.NoRoute("No upstream can serve this model now", retry_after=wait)


async def _choose(routes, tried, usable, claim, rng):
    """A usable route of an upstream not tried yet; a half-open one only if its trial is ours."""
    refused: set[str] = set()
    while True:
        route = pick(routes, lambda r: r.upstream not in tried and r.upstream not in refused and usable(r), rng)
        if route is None or claim is None or await claim(route):
            return route
        refused.add(route.upstream)
