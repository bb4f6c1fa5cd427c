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
by design and needs no shared counter (docs/routing.md#routing).

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

from upstreams import errors, metrics

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
    needs = call.needs
    if not needs:
        return routes if isinstance(routes, (list, tuple)) else list(routes)
    routes = list(routes)
    fit = [route for route in routes if needs <= granted(route.capabilities)]
    if routes and not fit:
        from upstreams.calls import first_unmet

        # The route that lacks least decides which parameter the message names.
        best = max(routes, key=lambda route: len(needs & granted(route.capabilities)))
        need = first_unmet(call, granted(best.capabilities))
        raise errors.CapabilityMissing(need.param, need.message)
    return fit


def granted(capabilities: frozenset[str]) -> frozenset[str]:
    """A route's capabilities, with JSON mode for a route that has JSON schemas (a server that
    constrains output to a schema can constrain it to any JSON object)."""
    if "json_schema" in capabilities and "json_mode" not in capabilities:
        return capabilities | {"json_mode"}
    return capabilities


def tiers(routes: Iterable[RouteLike]) -> list[list[RouteLike]]:
    """Routes grouped by priority, preferred (largest) first."""
    if isinstance(routes, tuple):  # a snapshot's routes: grouped once
        cached = _tiers.get(id(routes))
        if cached is not None and cached[0] is routes:
            return cached[1]
    grouped: dict[int, list[RouteLike]] = defaultdict(list)
    for route in routes:
        grouped[route.priority].append(route)
    found = [grouped[priority] for priority in sorted(grouped, reverse=True)]
    if isinstance(routes, tuple):
        if len(_tiers) >= 4096:
            _tiers.clear()
        _tiers[id(routes)] = (routes, found)  # holding `routes` keeps its id from being reused
    return found


_tiers: dict[int, tuple[tuple, list]] = {}


def weighted(routes: Sequence[RouteLike], rng: random.Random) -> RouteLike:
    if len(routes) == 1:
        # The one route, with the draw rng.choices / rng.randrange would take (a seeded RNG gives
        # the same sequence), without choices' cumulative weights (a few us per request).
        if routes[0].weight > 0:
            rng.random()
        else:
            rng.randrange(1)
        return routes[0]
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


class Dispatcher:
    """Failover wired to the process's health, breakers, in-flight counts and metrics: what the
    router calls for every request. `answer()` for non-streamed calls, `stream()` for streamed
    ones (the returned stream reports its end: success, a mid-stream failure, or the client
    leaving, which is nobody's failure)."""

    def __init__(self, health, inflight: InFlight | None = None, policy: RoutingPolicy | None = None,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        self.health = health
        self.breakers = health.breakers
        self.inflight = inflight or InFlight()
        self.policy = policy or RoutingPolicy()
        self.rng = rng or random.Random()
        self.clock = clock

    def usable(self, route: RouteLike) -> bool:
        return self.breakers.usable(route.upstream) and not self.inflight.at_cap(route)

    async def claim(self, route: RouteLike) -> bool:
        from upstreams.cooldown import HALF_OPEN

        if self.breakers.state(route.upstream) != HALF_OPEN:
            return True
        if getattr(self.breakers.tables, "blocking", False):
            return await asyncio.to_thread(self.breakers.claim_trial, route.upstream)
        return self.breakers.claim_trial(route.upstream)

    def _start(self, route: RouteLike, observer) -> None:
        self.inflight.enter(route.upstream)
        metrics.started(route.upstream)
        if observer is not None:
            observer.on_route(route)

    def _end(self, route: RouteLike, started: float, exc: BaseException | None = None) -> None:
        """An attempt ended (exactly once per attempt)."""
        self.inflight.leave(route.upstream)
        elapsed = self.clock() - started
        if exc is None:
            metrics.finished(route.upstream, elapsed)
            self.breakers.succeeded(route.upstream)
            return
        kind = failure_kind(exc)
        metrics.finished(route.upstream, elapsed, kind)
        if counts_against_upstream(exc):
            self.breakers.failed(route.upstream, kind, getattr(exc, "message", "") or kind)
        elif isinstance(exc, errors.ClientFailure):
            self.breakers.succeeded(route.upstream)  # it answered: it is alive

    async def _run(self, routes, call, attempt, observer):
        self.health.ensure_started()
        fit = capable(routes, call)
        starts: dict[str, float] = {}

        def on_start(route):
            starts[route.upstream] = self.clock()
            self._start(route, observer)

        def on_failure(route, exc):
            self._end(route, starts[route.upstream], exc)

        route, result = await with_failover(
            fit, attempt, usable=self.usable, claim=self.claim, on_start=on_start, on_failure=on_failure,
            policy=self.policy, rng=self.rng, clock=self.clock, retry_after=self.breakers.retry_after)
        started = starts[route.upstream]
        metrics.first_byte(route.upstream, self.clock() - started)
        return route, result, started

    async def answer(self, routes: Sequence[RouteLike], call: Any, attempt: Callable[[RouteLike], Awaitable[T]],
                     observer=None) -> T:
        route, answer, started = await self._run(routes, call, attempt, observer)
        self._end(route, started)
        if getattr(answer, "route", False) is None:
            answer.route = route
        return answer

    async def stream(self, routes: Sequence[RouteLike], call: Any, attempt: Callable[[RouteLike], Awaitable[Any]],
                     observer=None) -> TrackedStream:
        route, stream, started = await self._run(routes, call, attempt, observer)
        if getattr(stream, "route", False) is None:
            stream.route = route
        return TrackedStream(stream, route, lambda exc: self._end(route, started, exc))


class TrackedStream:
    """A primed stream that reports its end once: exhausted (success), failed mid-stream (the
    upstream's failure, counted), or closed early by the face (the client left: not a failure)."""

    def __init__(self, inner, route, ended: Callable[[BaseException | None], None]):
        self.inner = inner
        self.route = route
        self._iterator = inner.__aiter__()
        self._ended = ended
        self._open = True

    @property
    def usage(self):
        return self.inner.usage

    def __getattr__(self, name: str):  # adapter extras (e.g. FastChat's) stay reachable
        return getattr(self.inner, name)

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[bytes]:
        try:
            return await self._iterator.__anext__()
        except StopAsyncIteration:
            self._finish(None)
            raise
        except BaseException as exc:
            self._finish(None if isinstance(exc, asyncio.CancelledError) else exc)
            raise

    def _finish(self, exc: BaseException | None) -> None:
        if self._open:
            self._open = False
            self._ended(exc)

    async def aclose(self) -> None:
        self._finish(None)
        await self.inner.aclose()
