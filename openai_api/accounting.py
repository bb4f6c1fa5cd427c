"""Admission and accounting for a request: its key's limits going in, its usage coming out."""
from __future__ import annotations

import math

from django.conf import settings

from keys.exceptions import LimitExceeded, LimitsUnavailable
from keys.limits import get_limit_store
from keys.usage import UsageEvent, usage_writer
from openai_api.context import RequestContext
from openai_api.errors import (
    LimitsUnavailableError,
    OpenAIError,
    QuotaExceededError,
    RateLimitError,
    TokenRateLimitError,
)


async def admit(ctx: RequestContext) -> None:
    """Take a lease on the key's limits (429 if refused); the request's finish gives it back
    with the tokens used. Keys without limits cost nothing here. A limit store that cannot
    answer refuses the request with 503 (GATEWAY_LIMITS_FAIL_OPEN: admits it unchecked)."""
    limits = ctx.key.limits
    if limits.any:
        store = get_limit_store()
        try:
            ctx.lease = await store.acquire(limits)
        except LimitExceeded as exc:
            raise limit_error(exc) from None
        except LimitsUnavailable as exc:
            if settings.GATEWAY_LIMITS_FAIL_OPEN:
                return  # no lease: nothing to give back
            raise limits_unavailable_error(exc) from None
        ctx.release_lease = lambda done: store.release_soon(done.lease, done.prompt_tokens + done.completion_tokens)


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def limit_error(exc: LimitExceeded) -> RateLimitError:
    """The 429 for a refused request: which limit, when to retry."""
    limits = exc.limits
    if exc.kind == "budget":
        return QuotaExceededError(
            f"This key used its token budget of {limits.token_budget} for this {limits.budget_period}.",
            headers={**exc.headers, "x-should-retry": "false"},
        )
    messages = {
        "requests": f"Rate limit reached: {limits.requests_per_minute} requests per minute.",
        "tokens": f"Rate limit reached: {limits.tokens_per_minute} tokens per minute.",
        "parallel": f"Too many parallel requests: at most {limits.parallel_requests} at a time.",
    }
    error_class = TokenRateLimitError if exc.kind == "tokens" else RateLimitError
    return error_class(messages[exc.kind], headers={"Retry-After": retry_after(exc.retry_after), **exc.headers})


def limits_unavailable_error(exc: LimitsUnavailable) -> OpenAIError:
    """The 503 for a request whose limits cannot be checked (the reason stays in the logs)."""
    return LimitsUnavailableError(headers={"Retry-After": retry_after(exc.retry_after)})


def record_usage(ctx: RequestContext) -> None:
    """The request's usage row (queued: written off the request path by keys.usage)."""
    if ctx.key is None:
        return
    usage_writer.record(UsageEvent(
        key_id=ctx.key.id, model=ctx.model, endpoint=ctx.endpoint, request_id=ctx.request_id,
        status=ctx.status, error_code=ctx.error_code, prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens, latency_ms=ctx.latency_ms, ttft_ms=ctx.ttft_ms,
        streamed=ctx.streamed,
    ))
