"""Admission and accounting for a request: its key's and team's limits going in, its usage
(and cost) coming out (docs/decisions.md#limits)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from django.conf import settings
from django.utils import timezone

from keys.exceptions import LimitExceeded, LimitsUnavailable
from keys.limits import NOTHING, Limits, Worst, get_limit_store
from keys.pricing import get_price_book, to_nanos
from keys.usage import UsageEvent, usage_writer
from openai_api.context import RequestContext
from openai_api.errors import (
    LimitsUnavailableError,
    OpenAIError,
    QuotaExceededError,
    RateLimitError,
    TokenRateLimitError,
)

# Tokens a chat template may add around the messages beyond the JSON body's own bytes (roles,
# separators, a default system prompt).
TEMPLATE_MARGIN = 512


@dataclass(frozen=True)
class Demand:
    """The most a request can use, known before any upstream call: prompt tokens at most the
    request body's UTF-8 bytes (a token is at least one byte of text, or of a JSON number in a
    token-id prompt) plus TEMPLATE_MARGIN; completion tokens max_tokens x choices per prompt
    (GATEWAY_BUDGET_DEFAULT_MAX_TOKENS when a chat names none)."""

    prompt_tokens: int
    completion_tokens: int


def demand_of(body: Any, body_bytes: int) -> Demand:
    """A parsed chat, completions or embeddings request's Demand (duck-typed on its fields)."""
    sampling = getattr(body, "sampling", None)
    completion = 0
    if sampling is not None:
        max_tokens = getattr(sampling, "max_tokens", None) or settings.GATEWAY_BUDGET_DEFAULT_MAX_TOKENS
        choices = max(getattr(sampling, "n", 1) or 1, getattr(body, "best_of", None) or 1)
        completion = max_tokens * choices * max(1, len(getattr(body, "prompts", None) or [None]))
    return Demand(body_bytes + TEMPLATE_MARGIN, completion)


async def admit(ctx: RequestContext, demand: Demand | None = None, limits: Limits | None = None) -> None:
    """Take a lease on the key's and its team's limits (429 if refused), reserving the request's
    worst case against their budgets; the request's finish gives it back with what it used.
    Keys without limits (and without a team with limits) cost nothing here. A limit store that
    cannot answer refuses the request with 503 (GATEWAY_LIMITS_FAIL_OPEN: admits it unchecked).
    `limits`: these instead of the key's (request_limits_only: a request that uses no tokens)."""
    limits = ctx.key.limits if limits is None else limits
    if not limits.any:
        return
    store = get_limit_store()
    worst, price = NOTHING, None
    if demand is not None and any(level.has_budget for level in limits.levels):
        worst, price = await worst_case(ctx.model, limits, demand)
    try:
        ctx.lease = await store.acquire(limits, worst)
    except LimitExceeded as exc:
        raise limit_error(exc) from None
    except LimitsUnavailable as exc:
        if settings.GATEWAY_LIMITS_FAIL_OPEN:
            return  # no lease: nothing to give back
        raise limits_unavailable_error(exc) from None
    ctx.lease.price = price
    ctx.release_lease = lambda done: store.release_soon(done.lease, done.prompt_tokens + done.completion_tokens,
                                                        spent_nanos(done))


def request_limits_only(limits: Limits) -> Limits:
    """The request limits (per minute, in parallel) of a key and its team, without its token rate
    and budgets: for requests that use no tokens (the stored responses' GET and DELETE), which a
    key past its budget may still make."""
    no_tokens = {"tokens_per_minute": None, "token_budget": None, "money_budget": None}
    team = replace(limits.team, **no_tokens) if limits.team is not None else None
    return replace(limits, **no_tokens, team=team)


async def worst_case(model: str, limits: Limits, demand: Demand) -> tuple[Worst, Any]:
    """The reservation: every token the request may use, priced at the dearest price in force for
    the model (the upstream is not chosen yet) when a level has a money budget."""
    tokens = demand.prompt_tokens + demand.completion_tokens
    if not limits.wants_money:
        return Worst(tokens), None
    book = await get_price_book().afresh()
    price = book.dearest(model, timezone.now())
    if price is None:
        return Worst(tokens, None), None
    return Worst(tokens, to_nanos(price.cost(demand.prompt_tokens, demand.completion_tokens)), price.currency), price


def spent_nanos(ctx: RequestContext) -> int:
    """What the finished request cost, in billionths, at the price of its upstream (else the one
    its reservation was counted with); 0 without a money budget."""
    reserved = getattr(ctx.lease, "price", None)
    if reserved is None:
        return 0
    price = get_price_book().price(ctx.model, ctx.upstream or "", timezone.now())
    if price is None or price.currency != reserved.currency:
        price = reserved
    return to_nanos(price.cost(ctx.prompt_tokens, ctx.completion_tokens))


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def level_name(limits: Limits) -> str:
    return f"team '{limits.name}'" if limits.scope == "team" else "this key"


def limit_error(exc: LimitExceeded) -> RateLimitError:
    """The 429 for a refused request: which limit of which level (key or team), when to retry."""
    limits, who = exc.limits, level_name(exc.limits)
    budget = "Team budget" if limits.scope == "team" else "Key budget"
    if exc.kind in ("budget", "money", "unpriced"):
        messages = {
            "budget": f"{budget} exhausted: {who} has a token budget of {limits.token_budget} per "
                      f"{limits.budget_period}, used up or too small for this request's worst case.",
            "money": f"{budget} exhausted: {who} has a money budget of {limits.money_budget} {limits.currency} per "
                     f"{limits.budget_period}, used up or too small for this request's worst case.",
            "unpriced": f"{budget}: {who} has a money budget in {limits.currency}, and this model has no price "
                        f"in {limits.currency}, so its cost cannot be counted.",
        }
        return QuotaExceededError(messages[exc.kind], headers={**exc.headers, "x-should-retry": "false"})
    scope = "Team rate limit" if limits.scope == "team" else "Rate limit"
    messages = {
        "requests": f"{scope} reached: {limits.requests_per_minute} requests per minute.",
        "tokens": f"{scope} reached: {limits.tokens_per_minute} tokens per minute.",
        "parallel": f"Too many parallel requests{' for ' + who if limits.scope == 'team' else ''}: "
                    f"at most {limits.parallel_requests} at a time.",
    }
    error_class = TokenRateLimitError if exc.kind == "tokens" else RateLimitError
    return error_class(messages[exc.kind], headers={"Retry-After": retry_after(exc.retry_after), **exc.headers})


def limits_unavailable_error(exc: LimitsUnavailable) -> OpenAIError:
    """The 503 for a request whose limits cannot be checked (the reason stays in the logs)."""
    return LimitsUnavailableError(headers={"Retry-After": retry_after(exc.retry_after)})


def record_usage(ctx: RequestContext) -> None:
    """The request's usage row (queued: written, and priced, off the request path by keys.usage)."""
    if ctx.key is None:
        return
    usage_writer.record(UsageEvent(
        key_id=ctx.key.id, model=ctx.model, endpoint=ctx.endpoint, request_id=ctx.request_id,
        status=ctx.status, error_code=ctx.error_code, prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens, latency_ms=ctx.latency_ms, ttft_ms=ctx.ttft_ms,
        streamed=ctx.streamed, upstream=ctx.upstream or "", route=ctx.route_name,
        tokens_estimated=ctx.tokens_estimated,
    ))
