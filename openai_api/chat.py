"""/v1/chat/completions: prompt from the worker's template, then one generation per choice."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from openai_api.backend import Backend
from openai_api.client import check_worker_error
from openai_api.context import RequestContext
from openai_api.conversation import PromptError, build_prompt, stop_list
from openai_api.errors import InvalidRequestError
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
from openai_api.protocol import ChatRequest
from openai_api.streaming import merge, sse_event


async def chat_params(backend: Backend, address: str, request: ChatRequest) -> dict[str, Any]:
    template = await backend.template(address, request.model)
    try:
        prompt, images = build_prompt(template, request.messages)
    except PromptError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
    sampling = request.sampling
    max_new_tokens = await fit_max_tokens(backend, address, request.model, prompt, sampling.max_tokens, "messages")
    return worker_params(
        request.model, prompt, sampling, max_new_tokens,
        stop=stop_list(sampling.stop, template),
        stop_token_ids=None if template.stop_token_ids is None else list(template.stop_token_ids),
        images=images or None,
        repetition_penalty=request.repetition_penalty,
    )


def new_id() -> str:
    return random_id("chatcmpl-")


async def create_chat_completion(backend: Backend, request: ChatRequest, ctx: RequestContext) -> dict[str, Any]:
    n = request.sampling.n

    async def run(address: str) -> list[dict[str, Any]]:
        params = await chat_params(backend, address, request)
        return await gather_all(backend.client.generate(address, params) for _ in range(n))

    results = await backend.on_worker(request.model, run)
    ctx.mark_first_token()
    usage = sum_usage([results])
    ctx.add_usage(usage)
    return {
        "id": new_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": result.get("text", "")},
                "logprobs": None,
                "finish_reason": result.get("finish_reason", "stop"),
            }
            for i, result in enumerate(results)
        ],
        "usage": usage,
    }


async def open_chat_streams(backend: Backend, request: ChatRequest) -> list[PrimedStream]:
    """Open all n worker streams and wait for their first chunks (errors are still HTTP errors)."""

    async def run(address: str) -> list[PrimedStream]:
        params = await chat_params(backend, address, request)
        return await gather_all(open_primed_stream(backend, address, params) for _ in range(request.sampling.n))

    return await backend.on_worker(request.model, run)


def chat_completion_events(request: ChatRequest, streams: list[PrimedStream], ctx: RequestContext) -> AsyncIterator[bytes]:
    """SSE events for n concurrent choices (see streaming.py for the error/cancel contract)."""
    completion_id, created = new_id(), int(time.time())
    include_usage = request.sampling.include_usage

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": request.model, "choices": choices, **extra}
        if include_usage and "usage" not in body:
            body["usage"] = None
        return sse_event(body)

    def choice(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    states = [TextDelta() for _ in streams]

    async def events() -> AsyncIterator[bytes]:
        ctx.mark_first_token()
        for index in range(len(streams)):
            yield chunk([choice(index, {"role": "assistant", "content": ""})])
        async for index, worker_chunk in merge([stream.chunks() for stream in streams]):
            check_worker_error(worker_chunk)
            state = states[index]
            delta = state.update(worker_chunk)
            if delta:
                yield chunk([choice(index, {"content": delta})])
            if state.take_finish():
                yield chunk([choice(index, {}, state.finish_reason)])
        for index, state in enumerate(states):
            if state.take_finish(stream_ended=True):
                yield chunk([choice(index, {}, state.finish_reason)])
        if include_usage:
            yield chunk([], usage=streamed_usage(states, len(states)))

    return finish_stream(events(), streams, states, len(states), ctx)
