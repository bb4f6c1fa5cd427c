"""Circuit breakers per upstream: closed → cooling down → one trial → closed or cooling again.

- An upstream opens (is skipped by the router) after `failures` failures in a row, or when at
  least `failure_rate` of its last requests failed, counted over `window_seconds` once there
  were `min_requests` of them. The counting is per process (a failure costs no Redis call);
  the opening is shared.
- It stays open `cooldown_seconds`; then it is half-open: ONE trial request (one across every
  process, a Redis SET NX) is let through; success closes it, failure opens it again.
- `passes` probes in a row that succeed (upstreams/health.py) close it too, with no traffic.
- Credentials rejected (401/403 from the upstream) is a mark of its own: the upstream is out of
  rotation until a probe passes, whatever the counts.

This is the lesson of one-api's channels, disabled after one error and never re-enabled: a
single failure opens nothing, and an upstream comes back by itself (docs/routing.md#cooldown).
Marks live in upstreams/shared_state.py tables: Redis when REDIS_URL is set (seen by every
process within a second), the process otherwise; the hot path reads a dict.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MARKS = "marks"

CLOSED, OPEN, HALF_OPEN, REJECTED = "closed", "open", "half_open", "credentials_rejected"


@dataclass(frozen=True)
class BreakerPolicy:
    failures: int = 3
    failure_rate: float = 0.5
    window_seconds: float = 30.0
    min_requests: int = 10
    cooldown_seconds: float = 10.0
    # A trial's claim expires after this long, so a process that died during it blocks nothing.
    trial_seconds: float = 30.0

    @classmethod
    def from_settings(cls) -> BreakerPolicy:
        from django.conf import settings

        return cls(
            failures=settings.GATEWAY_BREAKER_FAILURES,
            failure_rate=settings.GATEWAY_BREAKER_FAILURE_RATE,
            window_seconds=settings.GATEWAY_BREAKER_WINDOW_SECONDS,
            min_requests=settings.GATEWAY_BREAKER_MIN_REQUESTS,
            cooldown_seconds=settings.GATEWAY_BREAKER_COOLDOWN_SECONDS,
            trial_seconds=max(settings.GATEWAY_UPSTREAM_FAILOVER_SECONDS, 1.0),
        )


@dataclass
class Counts:
    """One process's recent outcomes for one upstream: failures in a row, and per-second buckets
    [second, requests, failures] over the window (constant work per request)."""

    in_a_row: int = 0
    buckets: deque = field(default_factory=deque)

    def add(self, now: float, failed: bool) -> None:
        second = int(now)
        buckets = self.buckets
        if buckets and buckets[-1][0] == second:
            bucket = buckets[-1]
        else:
            bucket = [second, 0, 0]
            buckets.append(bucket)
        bucket[1] += 1
        bucket[2] += failed


class Breakers:
    """Every upstream's breaker in this process. `clock` is wall-clock time (marks carry times
    that other processes read)."""

    def __init__(self, tables, policy: BreakerPolicy | None = None,
                 clock: Callable[[], float] = time.time):
        self.tables = tables
        self.policy = policy or BreakerPolicy()
        self.clock = clock
        self._counts: dict[str, Counts] = {}
        self._trials: set[str] = set()  # trials this process holds

    # Reading (the hot path: dict look-ups only).
    def state(self, name: str) -> str:
        mark = self.tables.get(MARKS, name)
        if mark is None:
            return CLOSED
        if mark.get("reason") == "credentials":
            return REJECTED
        return OPEN if self.clock() < mark.get("until", 0) else HALF_OPEN

    def mark(self, name: str) -> dict | None:
        return self.tables.get(MARKS, name)

    def usable(self, name: str) -> bool:
        """Worth choosing: closed, or half-open with no trial running in this process."""
        state = self.state(name)
        return state == CLOSED or (state == HALF_OPEN and name not in self._trials)

    def retry_after(self, names) -> float | None:
        """Seconds until the first of these upstreams may be tried again (None: not known)."""
        ends = [mark["until"] for name in names
                if (mark := self.mark(name)) and mark.get("reason") == "failures"]
        # At least a second: a half-open upstream whose one trial runs elsewhere is tried again soon.
        return max(1.0, min(ends) - self.clock()) if ends else None

    def claim_trial(self, name: str) -> bool:
        """For a half-open upstream: may this request be the trial? (Blocking on Redis, at most
        its timeout: async callers run it in a thread; only half-open upstreams get here.)"""
        if name in self._trials:
            return False
        if not self.tables.claim(f"trial:{name}", self.policy.trial_seconds):
            return False
        self._trials.add(name)
        return True

    # Outcomes.
    def succeeded(self, name: str) -> None:
        counts = self._counts.get(name)
        if counts is None:
            counts = self._counts[name] = Counts()
        counts.in_a_row = 0
        counts.add(self.clock(), False)
        if name in self._trials:
            self._end_trial(name)
            self.close(name)
        elif self.state(name) == HALF_OPEN:
            self.close(name)  # a request let through the half-open state succeeded

    def failed(self, name: str, kind: str = "failure", message: str = "") -> None:
        """A failure that says the upstream is unwell (not a client's 4xx)."""
        if kind == "credentials":
            self.reject(name, message)
            return
        now = self.clock()
        counts = self._counts.setdefault(name, Counts())
        counts.in_a_row += 1
        counts.add(now, True)
        if name in self._trials:
            self._end_trial(name)
            self.open(name, message or kind)
            return
        if self.state(name) != CLOSED:
            return
        if counts.in_a_row >= self.policy.failures or self._rate_exceeded(counts, now):
            self.open(name, message or kind)

    def _rate_exceeded(self, counts: Counts, now: float) -> bool:
        buckets = counts.buckets
        while buckets and buckets[0][0] <= now - self.policy.window_seconds:
            buckets.popleft()
        requests = sum(bucket[1] for bucket in buckets)
        if requests < self.policy.min_requests:
            return False
        return sum(bucket[2] for bucket in buckets) >= self.policy.failure_rate * requests

    def _end_trial(self, name: str) -> None:
        self._trials.discard(name)
        self.tables.release(f"trial:{name}")

    # Transitions (also used by the health probes).
    def open(self, name: str, message: str = "") -> None:
        self.tables.set(MARKS, name, {"reason": "failures", "until": self.clock() + self.policy.cooldown_seconds,
                                      "since": self.clock(), "message": message[:200]})
        self._counts.pop(name, None)

    def reject(self, name: str, message: str = "") -> None:
        if self.state(name) != REJECTED:
            self.tables.set(MARKS, name, {"reason": "credentials", "until": 1e18,
                                          "since": self.clock(), "message": message[:200]})
        self._counts.pop(name, None)

    def close(self, name: str) -> None:
        if self.tables.get(MARKS, name) is not None:
            self.tables.delete(MARKS, name)
        self._counts.pop(name, None)

    def clear(self) -> None:
        self._counts.clear()
        self._trials.clear()
