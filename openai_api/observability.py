"""Metrics (Prometheus) and access logs: one finish hook observes every API request.

With several processes on one host, set PROMETHEUS_MULTIPROC_DIR (an empty directory shared by
them) so that /metrics reports the sum over all processes, whichever one is scraped.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
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
from openai_api.errors import OpenAIError
from openai_api.insiders import is_insider
from upstreams.errors import UpstreamFailure
from upstreams.router import get_router

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


# Label values come from closed sets, whatever clients send: every new value is a new series
# (about 40 per model, with the histograms' buckets) kept until the process ends, and with
# PROMETHEUS_MULTIPROC_DIR on tmpfs that is host memory.
OTHER = "other"
# Error codes the gateway sets without an error class of its own (the classes' codes are added).
ERROR_CODES = frozenset({
    "missing_api_key", "revoked_api_key", "expired_api_key", "model_not_allowed", "invalid_value",
    "invalid_type", "missing_required_parameter", "unsupported_parameter", "json_too_deep",
    "json_too_large", "unknown_url", "worker_unreachable", "controller_unreachable",
    "worker_out_of_memory", "server_shutting_down", "stream_error", "client_disconnected",
})


_endpoint_labels: dict[str, str] = {}  # path -> label, for the first MAX_CACHED_PATHS paths seen
MAX_CACHED_PATHS = 1024


def endpoint_label(path: str) -> str:
    """The route a path matched, as its template ("/v1/engines/{model}/embeddings"); "other"
    for a path no route matches. Decided once per path (a dict look-up on the hot path)."""
    label = _endpoint_labels.get(path)
    if label is None:
        label = route_label(path)
        if len(_endpoint_labels) < MAX_CACHED_PATHS:
            _endpoint_labels[path] = label
    return label


def route_label(path: str) -> str:
    for route, label in route_labels():
        if route.match(path[1:]):
            return label
    return OTHER


@functools.cache
def route_labels() -> tuple[tuple[Any, str], ...]:
    from django.conf import settings as django_settings
    from django.urls import get_resolver

    def template(route: str) -> str:
        return "/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda m: "{model}" if "model" in m[1] else f"{{{m[1]}}}", route)

    return tuple((pattern.pattern.regex, template(str(pattern.pattern)))
                 for pattern in get_resolver(django_settings.API_URLCONF).url_patterns)


_known_models: tuple[object, frozenset[str]] = (None, frozenset())


def model_label(ctx: RequestContext) -> str:
    """The request's model if the backend lists it or its key names it, else "other"."""
    model = ctx.model
    if not model:
        return ""
    if model in listed_models() or (ctx.key is not None and model in ctx.key.allowed_models):
        return model
    return OTHER


def listed_models() -> frozenset[str]:
    """The backend's model list as last fetched (no controller call), as a set, remade only
    when the backend fetched a new list."""
    global _known_models
    models = get_router().known_models()
    if models is not _known_models[0]:
        _known_models = (models, frozenset(models))
    return _known_models[1]


@functools.cache
def error_codes() -> frozenset[str]:
    def subclasses(cls: type) -> list[type]:
        return [cls, *(sub for direct in cls.__subclasses__() for sub in subclasses(direct))]

    return ERROR_CODES | {cls.code for base in (OpenAIError, UpstreamFailure) for cls in subclasses(base) if cls.code}


def error_label(ctx: RequestContext) -> str:
    code = ctx.error_code
    if not code:
        return str(ctx.status)  # a status is a closed set too
    return code if code in error_codes() else OTHER


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


@functools.lru_cache(maxsize=1024)
def error_series(endpoint: str, model: str, code: str, upstream: bool) -> tuple[Any, Any]:
    return ERRORS.labels(endpoint, code), UPSTREAM_ERRORS.labels(model, code) if upstream else None


def observe(ctx: RequestContext) -> None:
    """Count the finished request in the metrics and write its access-log line."""
    endpoint, model = endpoint_label(ctx.endpoint), model_label(ctx)
    metrics = series(endpoint, model, ctx.status)
    metrics.requests.inc()
    metrics.latency.observe(ctx.latency_ms / 1000)
    if ctx.status >= 400:
        errors, upstream_errors = error_series(endpoint, model, error_label(ctx), ctx.status in (502, 503, 504))
        errors.inc()
        if upstream_errors is not None:
            upstream_errors.inc()
    if ctx.ttft_ms is not None and ctx.status < 400:
        metrics.time_to_first_token.observe(ctx.ttft_ms / 1000)
    if ctx.prompt_tokens:
        metrics.prompt_tokens.inc(ctx.prompt_tokens)
    if ctx.completion_tokens:
        metrics.completion_tokens.inc(ctx.completion_tokens)
    if settings.GATEWAY_ACCESS_LOG and access_logger.isEnabledFor(logging.INFO):
        # access_logger.info() without its walk up the stack to find the caller: it is this line.
        here = sys._getframe()
        record = access_logger.makeRecord(access_logger.name, logging.INFO, here.f_code.co_filename, here.f_lineno,
                                          access_line(ctx), (), None, here.f_code.co_name)
        del here  # a frame held by its own local is a reference cycle: the request would wait for the GC
        access_logger.handle(record)


def access_line(ctx: RequestContext) -> str:
    """One JSON object per request. The key appears only as its display prefix."""
    return orjson.dumps({
        "request_id": ctx.request_id,
        "key": ctx.key.prefix if ctx.key is not None else None,
        "endpoint": ctx.endpoint,
        "model": ctx.model,
        "status": ctx.status,
        "error": ctx.error_code or None,
        "upstream": ctx.upstream or None,  # the registered upstream that served it
        "route": ctx.route_name or None,  # the model's name at that upstream
        "upstream_url": ctx.upstream_url or None,  # the controller or worker that failed
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
