"""The core chat and completions share: run a request's generations on one worker and answer with
their choices, as one OpenAI response object or as a stream of OpenAI chunks.

A request has one or more prompts and n choices per prompt: one worker generation per choice, in
prompt-major order (choice index = prompt_i * n + j). Every generation is a worker stream
(/worker_generate_stream), streamed request or not. A non-streamed answer is made of the streams'
last chunks, so that the worker timeout measures silence (as for streams), a request the gateway
abandons (client gone, timeout, an error in a sibling choice) closes its streams, which stops the
worker's generations, and its usage counts the tokens produced up to then.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from upstreams.base import Answer, Observer, Route
from upstreams.errors import BadAnswer
from upstreams.fastchat.backend import Backend
from upstreams.fastchat.client import WorkerStream, check_worker_error
from upstreams.fastchat.generation import (
    PrimedStream,
    TextDelta,
    close_all,
    gather_all,
    open_primed_stream,
    reported_usage,
)
from upstreams.ids import random_id
from upstreams.usage import Usage

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
    for that worker's template and context), each generated n times. `worker_model` is the name
    the controller knows, `public_model` the one answers carry."""

    worker_model: str
    public_model: str
    n: int
    stream: bool
    include_usage: bool
    rendering: Rendering
    payloads: Payloads


async def open_streams(backend: Backend, generations: Generations) -> list[Any]:
    """Every generation's stream, on one worker (another if that one is gone); primed when the
    request streams, so that every failure before the first chunk is raised here."""
    open_stream = open_primed_stream if generations.stream else open_plain_stream

    async def open_all(address: str) -> list[Any]:
        payloads = await generations.payloads(address)
        n = generations.n
        return await gather_all(open_stream(backend, address, payload) for payload in payloads for _ in range(n))

    return await backend.on_worker(generations.worker_model, open_all)


async def open_plain_stream(backend: Backend, address: str, params: dict[str, Any]) -> WorkerStream:
    return await backend.open_stream(address, params)


async def answer(backend: Backend, generations: Generations, observer: Observer | None) -> Answer:
    """The JSON answer, from each stream's last chunk. However it ends, the usage the worker
    reported so far goes to `observer` and the streams are closed."""
    streams = await open_streams(backend, generations)
    try:
        last_chunks = await gather_all(stream.last_chunk() for stream in streams)
        for chunk in last_chunks:
            check_worker_error(chunk)
        choices = [render_choice(generations.rendering, index, chunk) for index, chunk in enumerate(last_chunks)]
    finally:
        usage, valid = reported_usage(streams, generations.n)
        if observer is not None:
            observer.on_usage(usage)
        await close_all(streams)
    if not valid:
        raise BadAnswer("The worker reported an invalid token count.")
    return Answer({
        "id": random_id(generations.rendering.id_prefix),
        "object": generations.rendering.object,
        "created": int(time.time()),
        "model": generations.public_model,
        "choices": choices,
        "usage": usage.block(),
    }, usage)


def render_choice(rendering: Rendering, index: int, chunk: dict[str, Any]) -> dict[str, Any]:
    """A choice from the worker's last chunk, its fields checked (a bad one is a 502)."""
    text = chunk.get("text", "")
    logprobs = chunk.get("logprobs")
    finish_reason = chunk.get("finish_reason", "stop")
    if not isinstance(text, str) or not (finish_reason is None or isinstance(finish_reason, str)) or not (
        logprobs is None or (isinstance(logprobs, dict) and all(isinstance(v, list) for v in logprobs.values()))
    ):
        raise BadAnswer("The worker sent a malformed answer.")
    return rendering.choice(index, text, logprobs, finish_reason)


async def stream(backend: Backend, generations: Generations) -> ChoiceStream:
    """The request's choices as a primed stream of OpenAI chunks (upstreams/base.py's Stream)."""
    return ChoiceStream(generations, await open_streams(backend, generations))


class ChoiceStream:
    """Concurrent choices, each chunk sent as soon as it is produced: batches of OpenAI chunks'
    JSON bytes (upstreams/base.py's Stream), one per batch of worker chunks that arrived together,
    the usage chunk last when the client asked for it."""

    route: Route | None = None

    def __init__(self, generations: Generations, streams: list[PrimedStream]):
        self._generations = generations
        self._streams = streams
        self._batches = self._run()
        self._closed = False

    @property
    def usage(self) -> Usage:
        """The tokens the workers reported so far (an invalid count counts as 0)."""
        return reported_usage(self._streams, self._generations.n)[0]

    def __aiter__(self) -> AsyncIterator[list[bytes]]:
        return self._batches

    async def aclose(self) -> None:
        """Stop: the worker streams are closed, which stops their generations. While the chunks
        are being read (a shutdown interrupting the stream), the reader gets the failure."""
        if self._closed:
            return
        self._closed = True
        if not self._batches.ag_running:
            await self._batches.aclose()
        await close_all(self._streams)

    async def _run(self) -> AsyncIterator[list[bytes]]:
        generations, streams = self._generations, self._streams
        completion_id, created = random_id(generations.rendering.id_prefix), int(time.time())
        rendering, model, include_usage = generations.rendering, generations.public_model, generations.include_usage
        chunk_object = rendering.chunk_object
        states = [TextDelta() for _ in streams]

        def chunk(choice: dict[str, Any]) -> bytes:
            body = {"id": completion_id, "object": chunk_object, "created": created, "model": model, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return orjson.dumps(body)

        # The openings go out with the first worker chunks (already read: the streams are primed).
        batch = [chunk(opening) for index in range(len(streams))
                 if (opening := rendering.opening(index)) is not None]
        streams_logprobs = rendering.streams_logprobs
        try:
            async for index, worker_batch in merge([stream.batches() for stream in streams]):
                state = states[index]
                try:
                    for worker_chunk in worker_batch:
                        check_worker_error(worker_chunk)
                        delta = state.update(worker_chunk)
                        logprobs = state.logprobs_delta(worker_chunk) if streams_logprobs else None
                        if delta:
                            batch.append(chunk(rendering.delta(index, delta, logprobs)))
                        if state.take_finish():
                            batch.append(chunk(rendering.finish(index, state.finish_reason)))
                except Exception:
                    if batch:  # what the chunks before the failing one produced goes out first
                        yield batch
                    raise
                if batch:
                    yield batch
                    batch = []
        except MALFORMED:
            raise BadAnswer("The worker sent a malformed stream chunk.") from None
        for index, state in enumerate(states):
            if state.take_finish(stream_ended=True):
                batch.append(chunk(rendering.finish(index, state.finish_reason)))
        if include_usage:
            usage, valid = reported_usage(streams, generations.n)
            if not valid:
                if batch:
                    yield batch
                raise BadAnswer("The worker reported an invalid token count.")
            batch.append(orjson.dumps({"id": completion_id, "object": chunk_object, "created": created,
                                       "model": model, "choices": [], "usage": usage.block()}))
        if batch:
            yield batch


_END = object()


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Yield (stream index, item) from several async iterators as items arrive.

    The first failure is raised after the other readers are cancelled.
    """
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None))
            await queue.put((index, _END, None))
        except Exception as exc:
            await queue.put((index, _END, exc))

    readers = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(readers)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is _END:
                remaining -= 1
            else:
                yield index, item
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
