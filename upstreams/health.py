"""Upstream health: periodic probes, and each upstream's state for the admin, commands, /v1/models,
/health/ready and /metrics.

States (`HealthState.state`):
- `healthy`: in rotation;
- `cooling_down`: its breaker is open or half-open (upstreams/cooldown.py);
- `credentials_rejected`: it answered 401/403 (to a request or a probe); out of rotation until a
  probe passes;
- `unreachable`: the last probe failed (refused, timed out, garbage), the breaker not (yet) open;
  still in rotation, and each failed probe counts as one failure toward the cooldown rule;
- `disabled`: switched off in the registry.

Probes: every GATEWAY_UPSTREAM_PROBE_SECONDS each enabled upstream is probed (the adapter's
`probe()`: GET /v1/models, or the controller's model list) by ONE process: the one that takes
the upstream's probe lease for that interval (Redis SET NX PX with REDIS_URL). Results are shared
(upstreams/shared_state.py), so every process shows the same states. GATEWAY_UPSTREAM_PROBE_PASSES
passing probes in a row close an open breaker with no traffic; one passing probe clears a
credentials mark. The loop runs in every served process, started on its first API request (or at
the ASGI lifespan startup) and stopped at shutdown (openai_api/lifecycle.py). See
docs/routing.md#health.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from upstreams import metrics
from upstreams.base import Probe
from upstreams.cooldown import CLOSED, HALF_OPEN, OPEN, REJECTED, Breakers

logger = logging.getLogger(__name__)

PROBES = "probes"
HEALTHY, COOLING_DOWN, CREDENTIALS_REJECTED, UNREACHABLE, DISABLED = (
    "healthy", "cooling_down", "credentials_rejected", "unreachable", "disabled")
# How often the loop refreshes the state gauges between probes.
GAUGE_SECONDS = 1.0


@dataclass(frozen=True)
class HealthState:
    state: str
    latency_ms: float | None = None
    last_error: str = ""
    checked_at: datetime | None = None  # the last probe's time

    @property
    def ok(self) -> bool:
        return self.state == HEALTHY

    @property
    def in_rotation(self) -> bool:
        return self.state in (HEALTHY, UNREACHABLE)


@dataclass(frozen=True)
class HealthPolicy:
    interval_seconds: float = 10.0
    passes: int = 2

    @classmethod
    def from_settings(cls) -> HealthPolicy:
        from django.conf import settings

        return cls(interval_seconds=settings.GATEWAY_UPSTREAM_PROBE_SECONDS,
                   passes=settings.GATEWAY_UPSTREAM_PROBE_PASSES)


def _default_snapshot():
    from upstreams import registry

    return registry.snapshot()


def _default_specs(snapshot):
    """The upstreams to probe: the registered enabled ones. With zero configuration nothing is
    probed: the one controller has nothing to fail over to, and /health/ready pings it itself."""
    return list(snapshot.upstreams) if snapshot.configured else []


def _default_adapter(spec):
    from upstreams.adapters import adapter_for

    return adapter_for(spec)


class Health:
    """The process's view of every upstream's health, and its probe loop."""

    def __init__(self, tables, breakers: Breakers, policy: HealthPolicy | None = None, *,
                 snapshot: Callable = _default_snapshot, specs: Callable = _default_specs,
                 adapter: Callable = _default_adapter, clock: Callable[[], float] = time.time):
        self.tables, self.breakers = tables, breakers
        self.policy = policy or HealthPolicy()
        self.snapshot, self.specs, self.adapter, self.clock = snapshot, specs, adapter, clock
        self._task: asyncio.Task | None = None
        self._stopped = False

    # States.
    def state_of(self, name: str, *, enabled: bool | None = None) -> HealthState:
        """`enabled`: the caller knows it (the admin, from the row); else the registry says."""
        probe = self.tables.get(PROBES, name) or {}
        at = probe.get("at")
        checked_at = datetime.fromtimestamp(at, UTC) if at else None
        latency, error = probe.get("latency_ms"), probe.get("message", "")
        if enabled is None:
            enabled = self._enabled(name)
        breaker = self.breakers.state(name)
        mark = self.breakers.mark(name) or {}
        if not enabled:
            state = DISABLED
        elif breaker == REJECTED:
            state, error = CREDENTIALS_REJECTED, mark.get("message") or error
        elif breaker in (OPEN, HALF_OPEN):
            state, error = COOLING_DOWN, mark.get("message") or error
        elif probe and not probe.get("ok"):
            state = UNREACHABLE
        else:
            state = HEALTHY
        return HealthState(state, latency, error, checked_at)

    def _enabled(self, name: str) -> bool:
        try:
            snapshot = self.snapshot()
        except Exception:  # the registry was never readable: say what the breakers say
            return True
        return not snapshot.configured or snapshot.upstream(name) is not None

    def in_rotation(self, name: str) -> bool:
        """Hot path: may the router send to this upstream (breaker closed or half-open)."""
        return self.breakers.state(name) in (CLOSED, HALF_OPEN)

    # Probes.
    def record(self, name: str, probe: Probe) -> None:
        """Apply one probe's result: share it, and move the breaker."""
        previous = self.tables.get(PROBES, name) or {}
        # Counted in the shared record: the probes of one upstream run in whichever process
        # took the interval's lease.
        passes = (previous.get("passes", 0) + 1) if probe.ok else 0
        fails = 0 if probe.ok else previous.get("fails", 0) + 1
        self.tables.set(PROBES, name, {
            "ok": probe.ok, "latency_ms": round(probe.latency_ms, 1), "failure": probe.failure,
            "message": (probe.message or "")[:300], "at": self.clock(), "passes": passes, "fails": fails,
        })
        breaker = self.breakers.state(name)
        if probe.ok:
            if breaker == REJECTED or (breaker in (OPEN, HALF_OPEN) and passes >= self.policy.passes):
                logger.info("Upstream %s is back in rotation after %d passing probe(s)", name, passes)
                self.breakers.close(name)
        elif probe.failure == "credentials":
            if breaker != REJECTED:
                logger.warning("Upstream %s rejected the gateway's credentials: out of rotation", name)
            self.breakers.reject(name, probe.message or "credentials rejected")
        elif breaker == CLOSED and fails >= self.breakers.policy.failures:
            self.breakers.open(name, probe.message or "probes failed")
        metrics.state(name, self.state_of(name).state)

    async def probe_now(self, name: str) -> HealthState:
        """Probe one upstream now, whatever the interval (the admin's "test now", `upstreams test`)."""
        spec = next((spec for spec in self.specs(self.snapshot()) if spec.name == name), None)
        if spec is None:
            return self.state_of(name)
        self.record(name, await self._probe(spec))
        return self.state_of(name)

    async def _probe(self, spec) -> Probe:
        started = time.monotonic()
        try:
            async with asyncio.timeout(max(self.policy.interval_seconds, 1.0)):
                return await self.adapter(spec).probe()
        except TimeoutError:
            return Probe(False, (time.monotonic() - started) * 1000, "unreachable", "the probe timed out")
        except Exception as exc:  # an adapter's bug must not stop the loop
            logger.exception("Probing upstream %s failed", spec.name)
            return Probe(False, (time.monotonic() - started) * 1000, "bad_answer", type(exc).__name__)

    async def _claim(self, name: str) -> bool:
        """This process probes `name` this interval (one process across all with Redis)."""
        seconds = self.policy.interval_seconds * 0.9
        if getattr(self.tables, "blocking", False):
            return await asyncio.to_thread(self.tables.claim, f"probe:{name}", seconds)
        return self.tables.claim(f"probe:{name}", seconds)

    async def probe_due(self) -> None:
        """One round: probe every upstream whose lease this process gets."""
        try:
            specs = self.specs(self.snapshot())
        except Exception:
            return
        due = [spec for spec in specs if await self._claim(spec.name)]
        results = await asyncio.gather(*(self._probe(spec) for spec in due))
        for spec, probe in zip(due, results, strict=True):
            self.record(spec.name, probe)

    def publish_states(self) -> None:
        try:
            specs = self.specs(self.snapshot())
        except Exception:
            return
        for spec in specs:
            metrics.state(spec.name, self.state_of(spec.name, enabled=True).state)

    # The loop.
    def ensure_started(self) -> None:
        """Start the probe loop on the running event loop unless it runs (cheap: the hot path calls it)."""
        task = self._task
        if task is not None and not task.done():
            return
        if self._stopped or self.policy.interval_seconds <= 0:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="upstream-probes")
        _probing.add(self)

    async def _run(self) -> None:
        # The first round comes one interval after start: a process that serves one request and
        # stops probes nothing, and the previous round of the other processes is still fresh.
        next_probe = time.monotonic() + self.policy.interval_seconds
        while not self._stopped:
            await asyncio.sleep(min(GAUGE_SECONDS, max(0.0, next_probe - time.monotonic())))
            try:
                if time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + self.policy.interval_seconds
                    await self.probe_due()
                self.publish_states()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Upstream probes: one round failed")

    async def stop(self) -> None:
        self._stopped = True
        _probing.discard(self)
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    def clear(self) -> None:
        """Tests: forget the loop (its event loop may be gone)."""
        if self._task is not None and not self._task.done():
            try:
                self._task.cancel()
            except RuntimeError:
                pass
        self._task = None
        self._stopped = False
        _probing.discard(self)


# The process's instances (gateway_project/state.py parts, registered by upstreams/apps.py).

_probing: set[Health] = set()  # those whose probe loop was started


async def stop_probes() -> None:
    """Stop every probe loop of this process (ASGI lifespan shutdown, openai_api/lifecycle.py)."""
    for health in list(_probing):
        await health.stop()

def build_tables():
    from upstreams.cooldown import MARKS
    from upstreams.shared_state import build_tables as build

    return build((MARKS, PROBES))


def build_health() -> Health:
    from gateway_project import state
    from upstreams.cooldown import BreakerPolicy

    tables = state.get("upstream_tables")
    return Health(tables, Breakers(tables, BreakerPolicy.from_settings()), HealthPolicy.from_settings())


def get_health() -> Health:
    from gateway_project import state

    return state.get("upstream_health")


def state_of(name: str, *, enabled: bool | None = None) -> HealthState:
    """The upstream's state as every process sees it (the admin, `upstreams list`)."""
    return get_health().state_of(name, enabled=enabled)


async def probe_now(name: str) -> HealthState:
    """Probe `name` now and return its new state (the admin's "test now", `upstreams test`)."""
    return await get_health().probe_now(name)


def register_process_state() -> None:
    from gateway_project import state

    def clear_tables(tables) -> None:
        tables.clear()

    state.provide("upstream_tables", build_tables, clear=clear_tables)
    state.provide("upstream_health", build_health, clear=lambda health: (health.clear(), health.breakers.clear()))
