"""An upstream's health as the admin and `manage.py upstreams` show it, and "test now".

The states come from upstreams/health.py (`state_of(name)`, `probe_now(name)`); when it cannot
tell, "unknown". "test now" of a disabled upstream (which the health module does not probe) asks
the adapter's own probe. Errors are cut to MAX_ERROR_CHARS, with the upstream's key cut out.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from datetime import datetime
from typing import Any

STATES = ("healthy", "cooling_down", "credentials_rejected", "unreachable", "disabled", "unknown")
LABELS = {state: state.replace("_", " ") for state in STATES}
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Status:
    state: str = "unknown"
    latency_ms: float | None = None
    last_error: str = ""
    checked_at: datetime | float | None = None

    @property
    def label(self) -> str:
        return LABELS.get(self.state, self.state)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency_ms: float | None
    failure: str | None
    message: str


def _resolve(value: Any) -> Any:
    if inspect.isawaitable(value):
        from upstreams.transport import call_from_sync

        async def wait():
            return await value

        return call_from_sync(wait)
    return value


def redact(text: str, api_key: str | None) -> str:
    """`text` (an upstream's error message) without the upstream's key, should the upstream echo it."""
    text = str(text or "")
    if api_key and len(api_key) >= 4:
        text = text.replace(api_key, "…" + api_key[-4:])
    return text[:MAX_ERROR_CHARS]


def status_of(name: str, *, enabled: bool = True, api_key: str | None = None) -> Status:
    """The upstream's health state; "disabled" when it is switched off; "unknown" if nobody can tell.
    `api_key` (the upstream's) is cut out of the last error, should the upstream have echoed it."""
    if not enabled:
        return Status(state="disabled")
    try:
        from upstreams import health
    except ImportError:
        return Status()
    try:
        found = health.state_of(name, enabled=enabled)
    except Exception:  # the health store (Redis) is down: the page still renders
        return Status(last_error="the health state cannot be read now")
    if found is None:
        return Status()
    state = getattr(found, "state", "unknown")
    return Status(
        state=state if state in STATES else "unknown",
        latency_ms=getattr(found, "latency_ms", None),
        last_error=redact(getattr(found, "last_error", ""), api_key),
        checked_at=getattr(found, "checked_at", None),
    )


def test_now(upstream) -> ProbeResult:
    """Probe `upstream` (an Upstream row) now: through the health module when it has it (so the
    result updates its state), else with the adapter's probe."""
    try:
        from upstreams import health

        probe_now = health.probe_now
    except (ImportError, AttributeError):
        probe_now = None
    from upstreams import registry
    from upstreams.registry import readable_key, spec_of

    api_key = readable_key(upstream)
    if probe_now is not None and upstream.enabled:
        registry.snapshot()  # read here, in a thread without an event loop, for the health module
        probe = _resolve(probe_now(upstream.name))
    else:
        from upstreams.adapters import adapter_for

        probe = _resolve(adapter_for(spec_of(upstream, api_key)).probe())
    ok = probe.ok if hasattr(probe, "ok") else getattr(probe, "state", None) == "healthy"
    return ProbeResult(ok=bool(ok), latency_ms=getattr(probe, "latency_ms", None),
                      failure=None if ok else (getattr(probe, "failure", None) or getattr(probe, "state", None)),
                      message=redact(getattr(probe, "message", "") or getattr(probe, "last_error", ""), api_key))
