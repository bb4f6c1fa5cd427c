"""Breakers (upstreams/cooldown.py) on the process's tables and on a real Redis shared by two
"processes" (two tables objects): opening after N failures in a row or a failure rate, one trial
after the cooldown, credentials marks, and the shared view within a second."""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from upstreams.cooldown import CLOSED, HALF_OPEN, OPEN, REJECTED, BreakerPolicy, Breakers
from upstreams.shared_state import MemoryTables, RedisTables


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def breakers(clock=None, tables=None, **policy) -> Breakers:
    clock = clock or Clock()
    defaults = dict(failures=3, failure_rate=0.5, window_seconds=30, min_requests=10, cooldown_seconds=10)
    return Breakers(tables or MemoryTables(clock=clock), BreakerPolicy(**{**defaults, **policy}), clock=clock)


def test_opens_after_n_failures_in_a_row_not_before():
    b = breakers()
    b.failed("a")
    b.failed("a")
    assert b.state("a") == CLOSED and b.usable("a")
    b.succeeded("a")  # a success resets the run
    b.failed("a")
    b.failed("a")
    assert b.state("a") == CLOSED
    b.failed("a")
    assert b.state("a") == OPEN and not b.usable("a")
    assert b.state("b") == CLOSED  # per upstream


def test_opens_on_failure_rate_over_the_window():
    clock = Clock()
    b = breakers(clock, failures=100)
    for i in range(10):  # alternating: never 2 in a row, 50% failed
        clock.now += 1
        (b.failed if i % 2 else b.succeeded)("a")
    assert b.state("a") == OPEN


def test_old_outcomes_leave_the_window():
    clock = Clock()
    b = breakers(clock, failures=100)
    for _ in range(4):
        b.failed("a")
        b.succeeded("a")
    clock.now += 31  # those 8 are out of the window
    for _ in range(9):
        b.succeeded("a")
    b.failed("a")
    assert b.state("a") == CLOSED


def test_half_open_lets_one_trial_through_and_it_decides():
    clock = Clock()
    b = breakers(clock)
    b.open("a", "refused")
    assert b.retry_after(["a"]) == pytest.approx(10)
    clock.now += 9.9
    assert b.state("a") == OPEN
    clock.now += 0.2
    assert b.state("a") == HALF_OPEN and b.usable("a")
    assert b.claim_trial("a") is True
    assert b.claim_trial("a") is False and not b.usable("a")  # one trial only
    b.failed("a")
    assert b.state("a") == OPEN  # again for the whole cooldown
    clock.now += 10.1
    assert b.claim_trial("a") is True
    b.succeeded("a")
    assert b.state("a") == CLOSED and b.mark("a") is None


def test_a_trial_claim_expires_when_its_holder_is_gone():
    clock = Clock()
    tables = MemoryTables(clock=clock)
    one = breakers(clock, tables, trial_seconds=5)
    other = breakers(clock, tables, trial_seconds=5)
    one.open("a")
    clock.now += 11
    assert one.claim_trial("a") is True
    assert other.claim_trial("a") is False
    clock.now += 6  # the holder never reported
    assert other.claim_trial("a") is True


def test_credentials_rejected_stays_until_cleared_whatever_the_successes():
    clock = Clock()
    b = breakers(clock)
    b.failed("a", "credentials", "401 from upstream")
    assert b.state("a") == REJECTED and not b.usable("a")
    clock.now += 10_000
    b.succeeded("a")
    assert b.state("a") == REJECTED
    b.close("a")  # a probe passed
    assert b.state("a") == CLOSED


def test_failures_while_open_do_not_extend_the_cooldown():
    clock = Clock()
    b = breakers(clock)
    b.open("a")
    until = b.mark("a")["until"]
    clock.now += 5
    b.failed("a")  # a request started before the opening
    assert b.mark("a")["until"] == until


# On Redis: two processes' views.

@pytest.fixture
def two_processes(redis_url) -> Iterator[tuple[RedisTables, RedisTables]]:
    import uuid

    prefix = f"test-{uuid.uuid4().hex[:8]}"
    one = RedisTables(redis_url, ("marks", "probes"), prefix=prefix, refresh_seconds=0.2)
    two = RedisTables(redis_url, ("marks", "probes"), prefix=prefix, refresh_seconds=0.2)
    yield one, two
    one.stop()
    two.stop()


def wait_until(predicate, timeout: float = 2.0) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "not seen in time"
        time.sleep(0.01)
    return time.monotonic() - start


def test_redis_an_opening_reaches_the_other_process_within_a_second(two_processes):
    one, two = two_processes
    a, b = Breakers(one, BreakerPolicy(failures=2)), Breakers(two, BreakerPolicy(failures=2))
    a.failed("up")
    a.failed("up")
    assert a.state("up") == OPEN
    assert wait_until(lambda: b.state("up") == OPEN) < 1.0
    a.close("up")
    assert wait_until(lambda: b.state("up") == CLOSED) < 1.0


def test_redis_one_trial_across_processes(two_processes):
    one, two = two_processes
    clock = Clock(time.time())
    a = Breakers(one, BreakerPolicy(cooldown_seconds=1), clock=clock)
    b = Breakers(two, BreakerPolicy(cooldown_seconds=1), clock=clock)
    a.open("up")
    wait_until(lambda: b.state("up") == OPEN)
    clock.now += 2
    assert {a.claim_trial("up"), b.claim_trial("up")} == {True, False}


def test_redis_down_keeps_per_process_state_and_never_raises(redis_url):
    tables = RedisTables("redis://127.0.0.1:1/0", ("marks", "probes"), timeout=0.2, refresh_seconds=0.1)
    try:
        b = Breakers(tables, BreakerPolicy(failures=1))
        b.failed("up")
        assert b.state("up") == OPEN
        time.sleep(0.4)  # refreshes fail: the process's own mark stays
        assert b.state("up") == OPEN
        b.close("up")
        clock_now = time.time()
        b.open("up")
        assert b.mark("up")["until"] >= clock_now
        assert tables.claim("trial:x", 1) is True and tables.claim("trial:x", 1) is False
    finally:
        tables.stop()
