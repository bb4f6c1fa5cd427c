"""Streams from an OpenAI-compatible upstream, as upstreams/base.py's Stream contract wants them.

PassThroughStream reads the upstream's server-sent events and yields each chunk's JSON with the
public model name put in at the byte level (re-serialised only when a deviation is corrected).
It is primed (the first chunk was read before the adapter returns it), reads the usage the
upstream reports (the adapter asked for it with stream_options.include_usage) and drops that
chunk when the client did not ask; an upstream that reports none gets its text-bearing deltas
counted (Usage.estimated) and, if the client asked, a usage chunk made from that count.

FanOutStream merges n one-choice streams into one stream of n choices (for upstreams that answer
one choice whatever `n` asks), renumbering each stream's choices.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from upstreams.base import Route
from upstreams.errors import BadAnswer, ServerFailure, UpstreamFailure, UpstreamTimeout
from upstreams.openai.chunks import ToolCallHeaders, text_pieces
from upstreams.openai.failures import Hidden, scrubbed, transport_failure, upstream_message
from upstreams.openai.rewrite import with_model
from upstreams.openai.sse import EventTooLarge, SSEParser
from upstreams.transport import body_parts
from upstreams.usage import Usage

DONE = b"[DONE]"


class PassThroughStream:
    """One upstream stream (see the module's docstring). `usage` follows the chunks."""

    def __init__(self, response: httpx.Response, *, url: str, public_model: str, model_json: bytes,
                 include_usage: bool, prompt_estimate: int, deadline: float, max_bytes: int,
                 idle_timeout: float | None, tool_headers: ToolCallHeaders | None, obj: str,
                 hidden: Hidden = ()):
        self.route: Route | None = None
        self.response = response
        self.url = url
        self.public_model = public_model
        self.model_json = model_json
        self.include_usage = include_usage
        self.prompt_estimate = prompt_estimate
        self.deadline = deadline
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout  # only when shorter than the transport's read timeout
        self.tool_headers = tool_headers
        self.obj = obj  # the chunks' object, for a usage chunk the gateway makes
        self.hidden = hidden  # what an error event may echo that the client must not see
        self.reported: Usage | None = None  # the upstream's own usage, once it sent one
        self.usage_sent = False  # a usage chunk (no choices) went to the client
        self.pieces = 0  # text-bearing deltas, for the estimate
        self.last_id: Any = None
        self.created: Any = None
        # A finish_reason (or the usage chunk after it) was seen. `[DONE]` alone is not enough: llama.cpp's
        # server (llama-cpp-python) ends a stream it cuts short with `[DONE]` and no finish_reason
        # (docs/openai-upstreams.md), which a client would take for a finished answer.
        self.finished = False
        self.started = False
        self._first: list[bytes] | None = None
        self._batches = self._read()

    @property
    def usage(self) -> Usage:
        if self.reported is not None:
            return self.reported
        return Usage(self.prompt_estimate, self.pieces, estimated=True)

    async def prime(self, first_byte_timeout: float | None) -> PassThroughStream:
        """Read up to the first batch of chunks (within `first_byte_timeout`); failures before it raise
        retryable exceptions. Closes the response on failure."""
        try:
            if first_byte_timeout is not None:
                async with asyncio.timeout(first_byte_timeout):
                    self._first = await self._batches.__anext__()
            else:
                self._first = await self._batches.__anext__()
        except TimeoutError:
            await self.aclose()
            raise UpstreamTimeout(log_detail=f"{self.url}: no first chunk in time") from None
        except StopAsyncIteration:
            await self.aclose()
            raise BadAnswer("The upstream ended the stream without a chunk.", log_detail=self.url) from None
        except BaseException:
            await self.aclose()
            raise
        self.started = True
        return self

    def __aiter__(self) -> PassThroughStream:
        return self

    async def __anext__(self) -> list[bytes]:
        first = self._first
        if first is not None:
            self._first = None
            return first
        if self.idle_timeout is None:
            return await self._batches.__anext__()
        try:
            async with asyncio.timeout(self.idle_timeout):
                return await self._batches.__anext__()
        except TimeoutError:
            raise UpstreamTimeout("The upstream stayed silent too long.", retryable=False,
                                  log_detail=self.url) from None

    async def aclose(self) -> None:
        try:
            await self._batches.aclose()
        finally:
            await self.response.aclose()

    async def _read(self) -> AsyncIterator[list[bytes]]:
        parser = SSEParser(self.max_bytes)
        try:
            async for piece in body_parts(self.response):
                if time.monotonic() > self.deadline:
                    raise UpstreamTimeout("The upstream did not finish within GATEWAY_UPSTREAM_DEADLINE.",
                                          retryable=False, log_detail=self.url)
                batch: list[bytes] = []
                try:
                    done = self._take(parser.feed(piece), batch)
                except Exception:
                    if batch:  # the chunks before the failure reach the client before its error event
                        yield batch
                    raise
                if batch:
                    yield batch
                if done:
                    break
            else:
                batch = []
                self._take(parser.close(), batch)
                if batch:
                    yield batch
        except httpx.HTTPError as exc:
            raise transport_failure(exc, self.url, started=self.started) from exc
        except EventTooLarge:
            raise BadAnswer(f"An upstream stream chunk exceeded GATEWAY_UPSTREAM_MAX_BYTES ({self.max_bytes} bytes).",
                            log_detail=self.url) from None
        finally:
            await self.response.aclose()
        if not self.finished:
            raise BadAnswer("The upstream closed the stream before it finished.", log_detail=self.url)
        if self.include_usage and not self.usage_sent:
            # none, or only inside a chunk with choices: the client gets OpenAI's usage chunk
            yield [self.usage_chunk()]

    def _take(self, events: list[tuple[bytes, bytes]], batch: list[bytes]) -> bool:
        """Append the chunks of `events` for the client to `batch`; True once `[DONE]` came
        (the stream's end; it is finished only after a finish_reason, see _chunk)."""
        for event, data in events:
            if data == DONE:
                return True
            chunk = self._chunk(event, data)
            if chunk is not None:
                batch.append(chunk)
        return False

    def _chunk(self, event: bytes, data: bytes) -> bytes | None:
        """One event's chunk, ready for the client; None for a chunk the client does not get."""
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BadAnswer("The upstream sent an invalid stream chunk.", log_detail=self.url) from None
        if not isinstance(chunk, dict):
            raise BadAnswer("The upstream sent an invalid stream chunk.", log_detail=self.url)
        if event == b"error" or ("error" in chunk and "choices" not in chunk):
            message = scrubbed(upstream_message(data)[0], self.hidden)
            raise ServerFailure(f"The upstream failed: {message[:300]}" if message else None,
                                retryable=not self.started, log_detail=self.url)
        self.last_id = chunk.get("id", self.last_id)
        self.created = chunk.get("created", self.created)
        choices = chunk.get("choices")
        usage = chunk.get("usage")
        if usage:
            checked = Usage.checked(usage.get("prompt_tokens"), usage.get("completion_tokens")) \
                if isinstance(usage, dict) else None
            if checked is None:
                raise BadAnswer("The upstream reported an invalid usage.", log_detail=self.url)
            self.reported = checked
            if not choices:
                if not self.include_usage:
                    return None  # the gateway asked for it, the client did not
                self.finished = self.usage_sent = True
        if choices:
            self.pieces += text_pieces(chunk)
            if not self.finished:
                for choice in choices:
                    if isinstance(choice, dict) and choice.get("finish_reason"):
                        self.finished = True
            if self.tool_headers is not None and self.tool_headers.fix(chunk):
                chunk["model"] = self.public_model
                return orjson.dumps(chunk)
        return with_model(data, chunk, self.public_model, self.model_json)

    def usage_chunk(self) -> bytes:
        return usage_chunk(self.last_id, self.created, self.public_model, self.usage, self.obj)


def usage_chunk(chunk_id: Any, created: Any, model: str, usage: Usage, obj: str) -> bytes:
    """The final chunk of a stream whose client asked for usage, made by the gateway."""
    return orjson.dumps({
        "id": chunk_id, "object": obj, "created": created if created is not None else int(time.time()),
        "model": model, "choices": [], "usage": usage.block(),
    })


class FanOutStream:
    """n primed one-choice streams merged into one, choice i from stream i (the first stream's
    id for every chunk); one usage chunk at the end when the client asked."""

    def __init__(self, streams: list[PassThroughStream], *, public_model: str, include_usage: bool, obj: str):
        self.route: Route | None = None
        self.streams = streams
        self.public_model = public_model
        self.include_usage = include_usage
        self.obj = obj
        self.id = streams[0].last_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] | None = None
        self._open = len(streams)
        self._ended = False

    @property
    def usage(self) -> Usage:
        usages = [stream.usage for stream in self.streams]
        return Usage(usages[0].prompt_tokens, sum(usage.completion_tokens for usage in usages),
                     estimated=any(usage.estimated for usage in usages))

    def __aiter__(self) -> FanOutStream:
        return self

    async def __anext__(self) -> list[bytes]:
        if self._tasks is None:
            self._tasks = [asyncio.create_task(self._pump(i, stream)) for i, stream in enumerate(self.streams)]
        while self._open:
            index, item = await self._queue.get()
            if item is None:
                self._open -= 1
                continue
            if isinstance(item, BaseException):
                await self.aclose()
                raise item
            return [self._renumbered(index, chunk) for chunk in item]
        if self.include_usage and not self._ended:
            self._ended = True
            return [usage_chunk(self.id, self.streams[0].created, self.public_model, self.usage, self.obj)]
        raise StopAsyncIteration

    async def _pump(self, index: int, stream: PassThroughStream) -> None:
        try:
            async for batch in stream:
                self._queue.put_nowait((index, batch))
        except Exception as exc:  # handed to the reader, which raises it
            self._queue.put_nowait((index, exc))
        self._queue.put_nowait((index, None))

    def _renumbered(self, index: int, raw: bytes) -> bytes:
        chunk = orjson.loads(raw)
        chunk["id"] = self.id
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                choice["index"] = index
        return orjson.dumps(chunk)

    async def aclose(self) -> None:
        tasks = [task for task in self._tasks or () if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:  # each stream is closed once its reader has stopped reading it
            await asyncio.gather(*tasks, return_exceptions=True)
        for stream in self.streams:
            try:
                await stream.aclose()
            except (UpstreamFailure, httpx.HTTPError, RuntimeError):
                pass
