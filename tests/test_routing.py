"""Route choice and failover (upstreams/routing.py) with fake attempts: tiers, weights, caps,
capabilities, which failures are retried and which are passed on, the retry count and the
deadline."""
from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from upstreams import errors
from upstreams.base import Route
from upstreams.calls import Need
from upstreams.routing import InFlight, RoutingPolicy, capable, pick, tiers, with_failover


def route(upstream: str, priority: int = 0, weight: int = 1, capabilities=(), cap=None) -> Route:
    return Route(upstream=upstream, kind="openai", public_model="m", upstream_model=f"{upstream}-m",
                 priority=priority, weight=weight, capabilities=frozenset(capabilities), max_concurrency=cap)


def run(coro):
    return asyncio.run(coro)


def test_weights_split_within_a_tier():
    rng = random.Random(7)
    routes = [route("a", weight=3), route("b", weight=1)]
    counts = Counter(pick(routes, lambda r: True, rng).upstream for _ in range(20_000))
    assert counts["a"] / 20_000 == pytest.approx(0.75, abs=0.015)


def test_the_highest_priority_tier_with_a_usable_route_wins():
    routes = [route("low", priority=0), route("high", priority=10), route("high2", priority=10)]
    assert [r.upstream for r in tiers(routes)[0]] == ["high", "high2"]
    rng = random.Random(1)
    assert {pick(routes, lambda r: True, rng).upstream for _ in range(50)} == {"high", "high2"}
    assert pick(routes, lambda r: r.upstream == "low", rng).upstream == "low"
    assert pick(routes, lambda r: False, rng) is None


def test_zero_weights_still_choose():
    assert pick([route("a", weight=0)], lambda r: True, random.Random()).upstream == "a"


def test_concurrency_cap_is_per_process_in_flight():
    inflight = InFlight()
    capped = route("a", cap=2)
    inflight.enter("a")
    assert not inflight.at_cap(capped)
    inflight.enter("a")
    assert inflight.at_cap(capped)
    inflight.leave("a")
    assert not inflight.at_cap(capped) and not inflight.at_cap(route("b"))


class Call:
    def __init__(self, needs, asked=()):
        self.needs, self.asked = frozenset(needs), tuple(asked)


def test_capabilities_choose_routes_that_have_them_and_name_the_parameter_otherwise():
    routes = [route("plain"), route("smart", capabilities={"tools", "json_schema"})]
    assert [r.upstream for r in capable(routes, Call({"tools"}))] == ["smart"]
    assert len(capable(routes, Call(set()))) == 2
    with pytest.raises(errors.CapabilityMissing) as caught:
        capable([route("plain")], Call({"tools"}, [Need("tools", "tools", "tools are not supported")]))
    assert caught.value.param == "tools" and caught.value.status == 400


class Script:
    """An attempt that fails per upstream as scripted, and records the order it was called in."""

    def __init__(self, outcomes: dict[str, object]):
        self.outcomes, self.calls = outcomes, []

    async def __call__(self, r: Route):
        self.calls.append(r.upstream)
        outcome = self.outcomes.get(r.upstream, "ok")
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, float):
            await asyncio.sleep(outcome)
        return f"answer from {r.upstream}"


def failover(routes, script, **kwargs):
    failures = []
    kwargs.setdefault("usable", lambda r: True)
    result = run(with_failover(routes, script, on_failure=lambda r, e: failures.append((r.upstream, type(e))),
                               rng=random.Random(3), **kwargs))
    return result, failures


@pytest.mark.parametrize("failure", [
    errors.Unreachable(), errors.UpstreamTimeout(), errors.RateLimited(), errors.ServerFailure(),
    errors.CredentialsRejected(),
])
def test_retryable_failures_move_to_the_next_route(failure):
    routes = [route("first", priority=1), route("second")]
    script = Script({"first": failure})
    (chosen, answer), failures = failover(routes, script)
    assert script.calls == ["first", "second"]
    assert chosen.upstream == "second" and answer == "answer from second"
    assert failures == [("first", type(failure))]


@pytest.mark.parametrize("failure", [errors.ClientFailure("bad 'temperature'", status=422), errors.BadAnswer()])
def test_client_errors_and_unretryable_failures_are_passed_on(failure):
    script = Script({"first": failure})
    with pytest.raises(type(failure)) as caught:
        failover([route("first", priority=1), route("second")], script)
    assert script.calls == ["first"]
    assert caught.value.status == failure.status


def test_the_retry_count_bounds_attempts_and_the_last_failure_is_raised():
    routes = [route(name) for name in "abcd"]
    script = Script({name: errors.ServerFailure(f"{name} failed", status=503) for name in "abcd"})
    with pytest.raises(errors.ServerFailure):
        failover(routes, script, policy=RoutingPolicy(retries=2, deadline_seconds=10))
    assert len(script.calls) == 3 and len(set(script.calls)) == 3  # never the same upstream twice


def test_one_overall_deadline_covers_every_attempt():
    routes = [route("slow", priority=1), route("fast")]
    script = Script({"slow": 5.0})
    with pytest.raises(errors.UpstreamTimeout):
        failover(routes, script, policy=RoutingPolicy(retries=3, deadline_seconds=0.2))
    assert script.calls == ["slow"]  # no time was left for another


def test_no_usable_route_is_no_route_with_a_retry_hint():
    with pytest.raises(errors.NoRoute) as caught:
        failover([route("a")], Script({}), usable=lambda r: False, retry_after=lambda names: 4.0)
    assert caught.value.status == 503 and caught.value.retry_after == 4.0


def test_a_half_open_route_is_taken_only_with_its_trial():
    routes = [route("half", priority=1), route("other")]

    async def claim(r):
        return r.upstream != "half"  # another process holds the trial

    script = Script({})
    (chosen, _), _ = failover(routes, script, claim=claim)
    assert chosen.upstream == "other" and script.calls == ["other"]


def test_unexpected_exceptions_are_reported_and_raised():
    script = Script({"a": RuntimeError("bug")})
    with pytest.raises(RuntimeError):
        failover([route("a"), route("b")], script)
    assert script.calls == ["a"]


# The dispatcher: failover wired to breakers, in-flight counts and metrics.

from upstreams.cooldown import OPEN, BreakerPolicy, Breakers  # noqa: E402
from upstreams.health import Health, HealthPolicy  # noqa: E402
from upstreams.routing import Dispatcher  # noqa: E402
from upstreams.shared_state import MemoryTables  # noqa: E402


class FakeStream:
    def __init__(self, chunks, fail_after: BaseException | None = None):
        self.chunks, self.fail_after, self.usage, self.route, self.closed = list(chunks), fail_after, None, None, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.chunks:
            return self.chunks.pop(0)
        if self.fail_after is not None:
            raise self.fail_after
        raise StopAsyncIteration

    async def aclose(self):
        self.closed = True


class Answer:
    route = None


def dispatcher(failures=2):
    tables = MemoryTables()
    health = Health(tables, Breakers(tables, BreakerPolicy(failures=failures)), HealthPolicy(0, 2))
    return Dispatcher(health, rng=random.Random(5))


def metric(name, **labels):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0


def test_dispatcher_opens_the_breaker_of_a_failing_upstream_and_routes_around_it():
    d = dispatcher(failures=2)
    routes = [route("sick-d1", priority=1), route("well-d1")]
    seen = []

    async def attempt(r):
        seen.append(r.upstream)
        if r.upstream == "sick-d1":
            raise errors.Unreachable()
        return Answer()

    async def main():
        return [await d.answer(routes, Call(set()), attempt) for _ in range(4)]

    answers = asyncio.run(main())
    assert [a.route.upstream for a in answers] == ["well-d1"] * 4
    assert seen == ["sick-d1", "well-d1", "sick-d1", "well-d1", "well-d1", "well-d1"]  # opened after 2
    assert d.breakers.state("sick-d1") == OPEN
    assert d.inflight.counts["sick-d1"] == 0 and d.inflight.counts["well-d1"] == 0
    assert metric("gateway_upstream_failures_total", upstream="sick-d1", kind="unreachable") == 2
    assert metric("gateway_upstream_requests_total", upstream="well-d1") == 4


def test_dispatcher_client_errors_do_not_count_against_the_upstream():
    d = dispatcher(failures=1)

    async def attempt(r):
        raise errors.ClientFailure("bad", status=422)

    with pytest.raises(errors.ClientFailure):
        asyncio.run(d.answer([route("picky-d2")], Call(set()), attempt))
    assert d.breakers.state("picky-d2") == "closed"
    assert metric("gateway_upstream_failures_total", upstream="picky-d2", kind="client_error") == 1


def test_dispatcher_streams_hold_their_in_flight_slot_until_they_end():
    d = dispatcher(failures=1)

    async def main():
        ok = await d.stream([route("s-d3", cap=1)], Call(set()), lambda r: _ready(FakeStream([b"1", b"2"])))
        assert d.inflight.counts["s-d3"] == 1
        with pytest.raises(errors.NoRoute):  # at its cap of 1
            await d.stream([route("s-d3", cap=1)], Call(set()), lambda r: _ready(FakeStream([])))
        assert [chunk async for chunk in ok] == [b"1", b"2"]
        assert d.inflight.counts["s-d3"] == 0 and ok.route.upstream == "s-d3"
        broken = await d.stream([route("s-d3")], Call(set()),
                                lambda r: _ready(FakeStream([b"1"], errors.UpstreamTimeout(retryable=False))))
        with pytest.raises(errors.UpstreamTimeout):
            async for _ in broken:
                pass
        await broken.aclose()  # the face closes it after the failure: counted once
        return broken

    broken = asyncio.run(main())
    assert broken.inner.closed and d.inflight.counts["s-d3"] == 0
    assert d.breakers.state("s-d3") == OPEN  # a mid-stream failure counts
    assert metric("gateway_upstream_failures_total", upstream="s-d3", kind="timeout") == 1


def test_dispatcher_a_client_leaving_a_stream_is_not_a_failure():
    d = dispatcher(failures=1)

    async def main():
        s = await d.stream([route("s-d4")], Call(set()), lambda r: _ready(FakeStream([b"1", b"2"])))
        await s.__anext__()
        await s.aclose()

    asyncio.run(main())
    assert d.breakers.state("s-d4") == "closed" and d.inflight.counts["s-d4"] == 0


async def _ready(value):
    return value


def test_json_schema_grants_json_mode():
    routes = [route("plain"), route("schema", capabilities={"json_schema"})]
    assert [r.upstream for r in capable(routes, Call({"json_mode"}))] == ["schema"]
