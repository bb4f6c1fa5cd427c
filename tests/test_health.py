"""Upstream health (upstreams/health.py) with fake adapters: states, credentials rejected until
a probe passes, K passing probes closing a breaker, failed probes counting toward the cooldown,
one prober per interval across processes (Redis), and the probe loop."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import pytest

from upstreams.base import Probe
from upstreams.cooldown import BreakerPolicy, Breakers
from upstreams.health import (
    COOLING_DOWN,
    CREDENTIALS_REJECTED,
    DISABLED,
    HEALTHY,
    UNREACHABLE,
    Health,
    HealthPolicy,
)
from upstreams.shared_state import MemoryTables, RedisTables


@dataclass(frozen=True)
class Spec:
    name: str


class Snapshot:
    configured = True

    def __init__(self, *names):
        self.upstreams = tuple(Spec(name) for name in names)

    def upstream(self, name):
        return next((spec for spec in self.upstreams if spec.name == name), None)


class FakeAdapter:
    def __init__(self, results: list[Probe]):
        self.results, self.calls = list(results), 0

    async def probe(self) -> Probe:
        self.calls += 1
        return self.results.pop(0) if len(self.results) > 1 else self.results[0]


OK = Probe(True, 12.5)
REFUSED = Probe(False, 1.0, "unreachable", "connection refused")
WRONG_KEY = Probe(False, 3.0, "credentials", "401 Unauthorized")


def health(adapters: dict[str, FakeAdapter], tables=None, interval=10.0, passes=2, failures=3, snapshot=None):
    tables = tables or MemoryTables()
    snapshot = snapshot or Snapshot(*adapters)
    return Health(tables, Breakers(tables, BreakerPolicy(failures=failures)), HealthPolicy(interval, passes),
                  snapshot=lambda: snapshot, specs=lambda s: list(s.upstreams),
                  adapter=lambda spec: adapters[spec.name])


def test_states_from_probes_and_breakers():
    h = health({"a": FakeAdapter([OK]), "b": FakeAdapter([REFUSED])})
    assert h.state_of("a").state == HEALTHY and h.state_of("a").checked_at is None
    asyncio.run(h.probe_due())
    a, b = h.state_of("a"), h.state_of("b")
    assert a.state == HEALTHY and a.latency_ms == 12.5 and a.checked_at is not None and a.ok
    assert b.state == UNREACHABLE and b.last_error == "connection refused" and not b.ok
    assert h.in_rotation("b")  # one failed probe opens nothing
    assert h.state_of("gone").state == DISABLED  # not in the registry's enabled upstreams
    assert h.state_of("a", enabled=False).state == DISABLED


def test_failed_probes_follow_the_cooldown_rule_and_k_passes_bring_it_back():
    adapter = FakeAdapter([REFUSED, REFUSED, REFUSED, OK, OK])
    h = health({"a": adapter}, passes=2)
    for _ in range(3):
        asyncio.run(h.probe_now("a"))
    assert h.state_of("a").state == COOLING_DOWN and not h.in_rotation("a")
    asyncio.run(h.probe_now("a"))
    assert h.state_of("a").state == COOLING_DOWN  # one pass is not enough
    state = asyncio.run(h.probe_now("a"))
    assert state.state == HEALTHY and h.in_rotation("a")


def test_credentials_rejected_until_one_probe_passes():
    adapter = FakeAdapter([WRONG_KEY, WRONG_KEY, OK])
    h = health({"a": adapter})
    state = asyncio.run(h.probe_now("a"))
    assert state.state == CREDENTIALS_REJECTED and "401" in state.last_error and not h.in_rotation("a")
    asyncio.run(h.probe_now("a"))
    assert h.state_of("a").state == CREDENTIALS_REJECTED
    assert asyncio.run(h.probe_now("a")).state == HEALTHY


def test_a_request_rejected_for_credentials_marks_the_upstream_too():
    h = health({"a": FakeAdapter([OK])})
    h.breakers.failed("a", "credentials", "403 from upstream")
    assert h.state_of("a").state == CREDENTIALS_REJECTED


def test_an_adapter_that_raises_or_hangs_is_a_failed_probe():
    class Broken:
        async def probe(self):
            raise RuntimeError("bug")

    class Hanging:
        async def probe(self):
            await asyncio.sleep(60)

    h = health({"a": Broken(), "b": Hanging()}, interval=0.2)
    h.policy = HealthPolicy(1.0, 2)
    asyncio.run(h.probe_due())
    assert h.state_of("a").state == UNREACHABLE and h.state_of("b").state == UNREACHABLE
    assert "timed out" in h.state_of("b").last_error


def test_the_loop_probes_every_interval_and_stops():
    adapter = FakeAdapter([OK])
    h = health({"a": adapter}, interval=0.1)

    async def main():
        h.ensure_started()
        h.ensure_started()  # one loop
        await asyncio.sleep(0.55)
        await h.stop()
        calls = adapter.calls
        await asyncio.sleep(0.3)
        return calls

    calls = asyncio.run(main())
    assert 3 <= calls <= 6 and adapter.calls == calls


def test_redis_one_process_probes_each_interval(redis_url):
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    one = RedisTables(redis_url, ("marks", "probes"), prefix=prefix, refresh_seconds=0.1)
    two = RedisTables(redis_url, ("marks", "probes"), prefix=prefix, refresh_seconds=0.1)
    try:
        adapter_one, adapter_two = FakeAdapter([WRONG_KEY]), FakeAdapter([WRONG_KEY])
        h1, h2 = health({"a": adapter_one}, one, interval=5), health({"a": adapter_two}, two, interval=5)
        asyncio.run(h1.probe_due())
        asyncio.run(h2.probe_due())
        assert adapter_one.calls + adapter_two.calls == 1
        one.refresh_now()
        two.refresh_now()
        assert h2.state_of("a").state == CREDENTIALS_REJECTED  # the other process's probe, seen here
        assert h2.state_of("a").checked_at is not None
    finally:
        one.stop()
        two.stop()


@pytest.mark.parametrize("interval", [0])
def test_interval_zero_never_probes(interval):
    adapter = FakeAdapter([OK])
    h = health({"a": adapter}, interval=interval)

    async def main():
        h.ensure_started()
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert adapter.calls == 0 and h._task is None


def test_redis_failed_probes_count_across_processes(redis_url):
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    one = RedisTables(redis_url, ("marks", "probes"), prefix=prefix, refresh_seconds=0.1)
    two = RedisTables(redis_url, ("marks", "probes"), prefix=prefix, refresh_seconds=0.1)
    try:
        h1 = health({"a": FakeAdapter([REFUSED])}, one, failures=3)
        h2 = health({"a": FakeAdapter([REFUSED])}, two, failures=3)
        for prober, mine, other in ((h1, one, two), (h2, two, one), (h1, one, two)):  # the lease moves
            asyncio.run(prober.probe_now("a"))
            mine.refresh_now()  # its write reaches Redis (the thread would within milliseconds)
            other.refresh_now()
        assert h1.state_of("a").state == COOLING_DOWN
        two.refresh_now()
        assert h2.state_of("a").state == COOLING_DOWN
    finally:
        one.stop()
        two.stop()
