"""The core chat and completions share: run a request's generations on one worker and answer with
their choices, as one JSON body or as server-sent events.

A request has one or more prompts and n choices per prompt: one worker generation per choice, in
prompt-major order (choice index = prompt_i * n + j). Every generation is a worker stream
(/worker_generate_stream), streamed request or not. A non-streamed answer is made of the streams'
last chunks, so that the worker timeout measures silence (as for streams), a request the gateway
abandons (client gone, timeout, an error in a sibling choice) closes its streams, which stops the
worker's generations, and its usage counts the tokens produced up to then.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from django.http import HttpResponse

from openai_api.backend import Backend
from openai_api.client import WorkerStream, check_worker_error
from openai_api.context import RequestContext
from openai_api.endpoint import json_response
from openai_api.errors import UpstreamError
from openai_api.generation import PrimedStream, TextDelta, close_all, gather_all, open_primed_stream, reported_usage
from openai_api.ids import random_id
from openai_api.streaming import merge, sse_event, stream_response

# What a worker's chunk fields may be, for chunks whose types are not checked on the way
# (a chunk is parsed, not validated: this is what a bad one raises when it is used).
MALFORMED = (TypeError, AttributeError, ValueError, KeyError, IndexError)


class Rendering(Protocol):
    """How an endpoint renders its choices (chat.py, completions.py)."""

    id_prefix: str
    object: str  # of the JSON answer
    chunk_object: str  # of each streamed chunk
    streams_logprobs: bool  # whether streamed choices carry the new part of the worker's logprobs

    def choice(self, index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
        """A choice of the JSON answer."""

    def opening(self, index: int) -> dict[str, Any] | None:
        """The streamed choice each choice starts with, if any (chat: the assistant role)."""

    def delta(self, index: int, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        """A streamed choice with new text."""

    def finish(self, index: int, finish_reason: str) -> dict[str, Any]:
        """A streamed choice's last chunk."""


Payloads = Callable[[str], Awaitable[list[dict[str, Any]]]]


@dataclass(frozen=True)
class Generations:
    """What a request asks of a worker: `payloads(address)` gives one payload per prompt (built
    for that worker's template and context), each generated n times."""

    model: str
    n: int
    stream: bool
    include_usage: bool
    rendering: Rendering
    payloads: Payloads


async def respond(backend: Backend, generations: Generations, ctx: RequestContext) -> HttpResponse:
    """Open every generation's stream on one worker (another if that one is gone), then answer."""
    ctx.streamed = generations.stream
    open_stream = open_primed_stream if generations.stream else open_plain_stream

    async def open_all(address: str) -> list[Any]:
        payloads = await generations.payloads(address)
        n = generations.n
        return await gather_all(open_stream(backend, address, payload) for payload in payloads for _ in range(n))

    streams = await backend.on_worker(generations.model, open_all)
    if generations.stream:
        return await stream_response(events(generations, streams, ctx), streams, ctx,
                                     lambda: reported_usage(streams, generations.n)[0])
    return json_response(await answer(generations, streams, ctx))


async def open_plain_stream(backend: Backend, address: str, params: dict[str, Any]) -> WorkerStream:
    return await backend.open_stream(address, params)


async def answer(generations: Generations, streams: list[WorkerStream], ctx: RequestContext) -> dict[str, Any]:
    """The JSON answer, from each stream's last chunk. However it ends, the usage the worker
    reported so far is the request's and the streams are closed."""
    try:
        last_chunks = await gather_all(stream.last_chunk() for stream in streams)
        ctx.mark_first_token()
        for chunk in last_chunks:
            check_worker_error(chunk)
        choices = [render_choice(generations.rendering, index, chunk) for index, chunk in enumerate(last_chunks)]
    finally:
        usage, valid = reported_usage(streams, generations.n)
        ctx.add_usage(usage)
        await close_all(streams)
    if not valid:
        raise UpstreamError("The worker reported an invalid token count.")
    return {
        "id": random_id(generations.rendering.id_prefix),
        "object": generations.rendering.object,
        "created": int(time.time()),
        "model": generations.model,
        "choices": choices,
        "usage": usage,
    }


def render_choice(rendering: Rendering, index: int, chunk: dict[str, Any]) -> dict[str, Any]:
    """A choice from the worker's last chunk, its fields checked (a bad one is a 502)."""
    text = chunk.get("text", "")
    logprobs = chunk.get("logprobs")
    finish_reason = chunk.get("finish_reason", "stop")
    if not isinstance(text, str) or not (finish_reason is None or isinstance(finish_reason, str)) or not (
        logprobs is None or (isinstance(logprobs, dict) and all(isinstance(v, list) for v in logprobs.values()))
    ):
        raise UpstreamError("The worker sent a malformed answer.")
    return rendering.choice(index, text, logprobs, finish_reason)


def events(generations: Generations, streams: list[PrimedStream], ctx: RequestContext) -> AsyncIterator[bytes]:
    """SSE events for concurrent choices, each sent as it is produced (see streaming.py for the
    error and cancel contract)."""
    completion_id, created = random_id(generations.rendering.id_prefix), int(time.time())
    rendering, model, include_usage = generations.rendering, generations.model, generations.include_usage
    chunk_object = rendering.chunk_object
    states = [TextDelta() for _ in streams]

    def chunk(choice: dict[str, Any]) -> bytes:
        body = {"id": completion_id, "object": chunk_object, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return sse_event(body)

    async def run() -> AsyncIterator[bytes]:
        ctx.mark_first_token()
        for index in range(len(streams)):
            opening = rendering.opening(index)
            if opening is not None:
                yield chunk(opening)
        streams_logprobs = rendering.streams_logprobs
        try:
            async for index, worker_chunk in merge([stream.chunks() for stream in streams]):
                check_worker_error(worker_chunk)
                state = states[index]
                delta = state.update(worker_chunk)
                logprobs = state.logprobs_delta(worker_chunk) if streams_logprobs else None
                if delta:
                    yield chunk(rendering.delta(index, delta, logprobs))
                if state.take_finish():
                    yield chunk(rendering.finish(index, state.finish_reason))
        except MALFORMED:
            raise UpstreamError("The worker sent a malformed stream chunk.") from None
        for index, state in enumerate(states):
            if state.take_finish(stream_ended=True):
                yield chunk(rendering.finish(index, state.finish_reason))
        if include_usage:
            usage, valid = reported_usage(streams, generations.n)
            if not valid:
                raise UpstreamError("The worker reported an invalid token count.")
            yield sse_event({"id": completion_id, "object": chunk_object, "created": created, "model": model,
                             "choices": [], "usage": usage})

    return run()
