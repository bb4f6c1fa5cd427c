"""Admission and accounting for a request: its key's limits going in, its usage coming out."""
from __future__ import annotations

from keys.limits import get_limit_store
from keys.usage import UsageEvent, usage_writer
from openai_api.context import RequestContext


async def admit(ctx: RequestContext) -> None:
    """Take a lease on the key's limits (429 if refused); the request's finish gives it back
    with the tokens used. Keys without limits cost nothing here."""
    limits = ctx.key.limits
    if limits.any:
        store = get_limit_store()
        ctx.lease = await store.acquire(limits)
        ctx.on_finish.append(lambda done: store.release_soon(done.lease, done.prompt_tokens + done.completion_tokens))


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
