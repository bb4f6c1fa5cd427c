"""/v1/completions: raw prompts (no template text, but the template's stop words), n per prompt."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from openai_api.backend import Backend
from openai_api.client import check_worker_error
from openai_api.context import RequestContext
from openai_api.conversation import stop_list
from openai_api.generation import (
    PrimedStream,
    TextDelta,
    finish_stream,
    fit_max_tokens,
    gather_all,
    open_primed_stream,
    streamed_usage,
    sum_usage,
    worker_params,
)
from openai_api.ids import random_id
from openai_api.protocol import CompletionRequest
from openai_api.streaming import merge, sse_event


async def completion_params(backend: Backend, address: str, request: CompletionRequest, prompts: list[str], *, stream: bool) -> list[dict[str, Any]]:
    """One payload per prompt; every prompt gets the smallest max_tokens that fits (FastChat)."""
    template = await backend.template(address, request.model)
    max_tokens = request.sampling.max_tokens
    for prompt in prompts:
        max_tokens = await fit_max_tokens(backend, address, request.model, prompt, max_tokens, "prompt")
    extras = {} if stream else {"best_of": request.best_of, "use_beam_search": request.use_beam_search}
    return [
        worker_params(
            request.model, prompt, request.sampling, max_tokens,
            stop=stop_list(request.sampling.stop, template),
            stop_token_ids=None if template.stop_token_ids is None else list(template.stop_token_ids),
            echo=request.echo, logprobs=request.logprobs, **extras,
        )
        for prompt in prompts
    ]


def new_id() -> str:
    return random_id("cmpl-")


async def create_completion(backend: Backend, request: CompletionRequest, prompts: list[str], ctx: RequestContext) -> dict[str, Any]:
    n = request.sampling.n

    async def run(address: str) -> list[dict[str, Any]]:
        payloads = await completion_params(backend, address, request, prompts, stream=False)
        return await gather_all(backend.client.generate(address, p) for p in payloads for _ in range(n))

    results = await backend.on_worker(request.model, run)
    ctx.mark_first_token()
    usage = sum_usage(results[i:i + n] for i in range(0, len(results), n))
    ctx.add_usage(usage)
    return {
        "id": new_id(),
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": i,
                "text": result.get("text", ""),
                "logprobs": result.get("logprobs"),
                "finish_reason": result.get("finish_reason", "stop"),
            }
            for i, result in enumerate(results)
        ],
        "usage": usage,
    }


async def open_completion_streams(backend: Backend, request: CompletionRequest, prompts: list[str]) -> list[PrimedStream]:
    """Streams in prompt-major order: index = prompt_i * n + j."""

    async def run(address: str) -> list[PrimedStream]:
        payloads = await completion_params(backend, address, request, prompts, stream=True)
        n = request.sampling.n
        return await gather_all(open_primed_stream(backend, address, p) for p in payloads for _ in range(n))

    return await backend.on_worker(request.model, run)


def completion_events(request: CompletionRequest, streams: list[PrimedStream], ctx: RequestContext) -> AsyncIterator[bytes]:
    """SSE events; indices are unique across prompts (see streaming.py for errors/cancel)."""
    completion_id, created = new_id(), int(time.time())
    n, include_usage = request.sampling.n, request.sampling.include_usage
    states = [TextDelta() for _ in streams]

    def chunk(index: int, text: str, logprobs: Any, finish_reason: str | None) -> bytes:
        body = {"id": completion_id, "object": "text_completion", "created": created, "model": request.model,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return sse_event(body)

    async def events() -> AsyncIterator[bytes]:
        ctx.mark_first_token()
        async for index, worker_chunk in merge([stream.chunks() for stream in streams]):
            check_worker_error(worker_chunk)
            state = states[index]
            delta = state.update(worker_chunk)
            logprobs = state.logprobs_delta(worker_chunk)
            if delta:
                yield chunk(index, delta, logprobs, None)
            if state.take_finish():
                yield chunk(index, "", None, state.finish_reason)
        for index, state in enumerate(states):
            if state.take_finish(stream_ended=True):
                yield chunk(index, "", None, state.finish_reason)
        if include_usage:
            yield sse_event({"id": completion_id, "object": "text_completion", "created": created,
                             "model": request.model, "choices": [], "usage": streamed_usage(states, n)})

    return finish_stream(events(), streams, states, n, ctx)
