"""Metrics (Prometheus) and access logs: one finish hook observes every API request.

With several processes on one host, set PROMETHEUS_MULTIPROC_DIR (an empty directory shared by
them) so that /metrics reports the sum over all processes, whichever one is scraped.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from openai_api.context import RequestContext
from openai_api.insiders import is_insider

access_logger = logging.getLogger("gateway.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("gateway_requests_total", "API requests finished.", ["endpoint", "model", "status"])
ERRORS = Counter("gateway_errors_total", "API requests that ended in an error, by error code.",
                 ["endpoint", "code"])
UPSTREAM_ERRORS = Counter("gateway_upstream_errors_total", "Requests failed by the controller or a worker.",
                          ["model", "code"])
LATENCY = Histogram("gateway_request_duration_seconds", "Time from request to last byte.",
                    ["endpoint", "model"], buckets=LATENCY_BUCKETS)
TIME_TO_FIRST_TOKEN = Histogram("gateway_time_to_first_token_seconds", "Time from request to the first token.",
                                ["model"], buckets=LATENCY_BUCKETS)
TOKENS = Counter("gateway_tokens_total", "Tokens in and out.", ["model", "direction"])
STREAMS_IN_FLIGHT = Gauge("gateway_streams_in_flight", "Streaming responses currently open.",
                          multiprocess_mode="livesum")


def endpoint_label(ctx: RequestContext) -> str:
    # Paths with a model in them (/v1/engines/{model}/embeddings) would explode the label set.
    return "/v1/engines/embeddings" if ctx.endpoint.startswith("/v1/engines/") else ctx.endpoint


def stream_started(ctx: RequestContext) -> None:
    STREAMS_IN_FLIGHT.inc()
    ctx.on_finish.append(lambda _: STREAMS_IN_FLIGHT.dec())


@dataclass(frozen=True)
class Series:
    """The labelled metrics one kind of request updates."""

    requests: Any
    latency: Any
    time_to_first_token: Any
    prompt_tokens: Any
    completion_tokens: Any


@functools.lru_cache(maxsize=1024)
def series(endpoint: str, model: str, status: int) -> Series:
    """Looked up once per label set: `.labels()` validates and locks on every call."""
    return Series(
        REQUESTS.labels(endpoint, model, str(status)), LATENCY.labels(endpoint, model),
        TIME_TO_FIRST_TOKEN.labels(model), TOKENS.labels(model, "prompt"), TOKENS.labels(model, "completion"),
    )  # fmt: skip


def observe(ctx: RequestContext) -> None:
    """Count the finished request in the metrics and write its access-log line."""
    endpoint = endpoint_label(ctx)
    metrics = series(endpoint, ctx.model, ctx.status)
    metrics.requests.inc()
    metrics.latency.observe(ctx.latency_ms / 1000)
    if ctx.status >= 400:
        ERRORS.labels(endpoint, ctx.error_code or str(ctx.status)).inc()
        if ctx.status in (502, 503, 504):
            UPSTREAM_ERRORS.labels(ctx.model, ctx.error_code or str(ctx.status)).inc()
    if ctx.ttft_ms is not None and ctx.status < 400:
        metrics.time_to_first_token.observe(ctx.ttft_ms / 1000)
    if ctx.prompt_tokens:
        metrics.prompt_tokens.inc(ctx.prompt_tokens)
    if ctx.completion_tokens:
        metrics.completion_tokens.inc(ctx.completion_tokens)
    if settings.GATEWAY_ACCESS_LOG and access_logger.isEnabledFor(logging.INFO):
        access_logger.info(access_line(ctx))


def access_line(ctx: RequestContext) -> str:
    """One JSON object per request. The key appears only as its display prefix."""
    return orjson.dumps({
        "request_id": ctx.request_id,
        "key": ctx.key.prefix if ctx.key is not None else None,
        "endpoint": ctx.endpoint,
        "model": ctx.model,
        "status": ctx.status,
        "error": ctx.error_code or None,
        "streamed": ctx.streamed,
        "prompt_tokens": ctx.prompt_tokens,
        "completion_tokens": ctx.completion_tokens,
        "latency_ms": ctx.latency_ms,
        "ttft_ms": ctx.ttft_ms,
    }).decode()


def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text format (summed over processes in multiprocess mode), for holders of
    GATEWAY_METRICS_TOKEN or, without one, direct callers on this host (openai_api/insiders.py)."""
    if not is_insider(request):
        if settings.GATEWAY_METRICS_TOKEN:
            return HttpResponse("Unauthorized", status=401, content_type="text/plain",
                                headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
        return HttpResponse("Forbidden: /metrics answers callers on this host, or set GATEWAY_METRICS_TOKEN.",
                            status=403, content_type="text/plain")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest()
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
