"""Prometheus series of the usage writer (served by /metrics with every other metric of the process).

With PROMETHEUS_MULTIPROC_DIR set, the counters add up over the host's processes and the queue
gauge is the sum over the processes alive ("livesum").
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge

PENDING = Gauge("gateway_usage_pending_rows", "Usage rows queued in memory, not written yet.",
                multiprocess_mode="livesum")
WRITTEN = Counter("gateway_usage_rows_written", "Usage rows written to the database.")
FLUSH_FAILURES = Counter("gateway_usage_flush_failures",
                         "Usage flushes that found the database unreachable (their rows are kept and retried).")
SET_ASIDE = Counter("gateway_usage_rows_set_aside",
                    "Usage rows the database refused even alone: logged, not written, the others are.")
DROPPED = Counter("gateway_usage_rows_dropped",
                  "Oldest usage rows dropped because the queue was full (USAGE_MAX_PENDING).")
