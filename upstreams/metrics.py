"""Per-upstream Prometheus series: attempts, failures by kind, latency, time to first token,
requests in flight and the breaker state.

Label values come from closed sets: an upstream's name (registered by an operator, at most
MAX_UPSTREAM_LABELS of them, "other" beyond), a failure kind from upstreams/routing.py's
`failure_kind`, a state from upstreams/health.py. With PROMETHEUS_MULTIPROC_DIR set, in-flight
gauges are summed over the live processes and states are the largest any live process reports
(every process sees the same shared state within a second).
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FAILURE_KINDS = frozenset({"credentials", "rate_limited", "timeout", "unreachable", "server_error",
                           "client_error", "bad_answer", "other"})
STATES = ("healthy", "cooling_down", "credentials_rejected", "unreachable", "disabled")
MAX_UPSTREAM_LABELS = 200
OTHER = "other"

REQUESTS = Counter("gateway_upstream_requests_total", "Attempts sent to an upstream (retries included).",
                   ["upstream"])
ERRORS = Counter("gateway_upstream_failures_total", "Attempts an upstream failed, by kind of failure.",
                 ["upstream", "kind"])
LATENCY = Histogram("gateway_upstream_request_duration_seconds",
                    "Time from sending an attempt to its last byte (or failure).", ["upstream"],
                    buckets=LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram("gateway_upstream_time_to_first_token_seconds",
                                "Time from sending an attempt to its first chunk or its answer.", ["upstream"],
                                buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("gateway_upstream_in_flight", "Attempts in flight per upstream.", ["upstream"],
                  multiprocess_mode="livesum")
STATE = Gauge("gateway_upstream_state", "1 for the upstream's current health state, 0 for the others.",
              ["upstream", "state"], multiprocess_mode="livemax")

_children: dict[str, tuple] = {}  # upstream -> its series (labels() costs a lock and a look-up)


def series(upstream: str) -> tuple:
    """(requests, in flight, latency, time to first token) of `upstream`; "other" beyond
    MAX_UPSTREAM_LABELS names."""
    found = _children.get(upstream)
    if found is None:
        name = upstream if len(_children) < MAX_UPSTREAM_LABELS else OTHER
        found = (REQUESTS.labels(name), IN_FLIGHT.labels(name), LATENCY.labels(name), TIME_TO_FIRST_TOKEN.labels(name),
                 name)
        if name != OTHER:
            _children[upstream] = found
    return found


def label(upstream: str) -> str:
    return series(upstream)[4]


def started(upstream: str) -> None:
    requests, in_flight, *_ = series(upstream)
    requests.inc()
    in_flight.inc()


def first_byte(upstream: str, seconds: float) -> None:
    series(upstream)[3].observe(seconds)


def finished(upstream: str, seconds: float, kind: str | None = None) -> None:
    """An attempt ended after `seconds`: well (kind None) or with a failure of `kind`."""
    _, in_flight, latency, _, name = series(upstream)
    in_flight.dec()
    latency.observe(seconds)
    if kind is not None:
        ERRORS.labels(name, kind if kind in FAILURE_KINDS else OTHER).inc()


def state(upstream: str, current: str) -> None:
    name = label(upstream)
    for each in STATES:
        STATE.labels(name, each).set(1 if each == current else 0)
