"""Server-sent events: framing the chunks of an upstream stream, the streaming response and its end.

The router hands the face a primed Stream (upstreams/base.py): batches of OpenAI chunks' JSON bytes,
the chunks one read from the upstream completed. Here each chunk becomes a `data: ` event, and each
batch one write to the client. Once the 200 status is sent, a failure becomes one
`data: {"error": ...}` event followed by `data: [DONE]`. A stream with an `EventTranslator` (the
Responses API, openai_api/responses/events.py) is framed by it instead: its opening events, each
chunk's events, its final events; a failure becomes its one failure event, and no `[DONE]` follows.
If the client disconnects, Django
cancels the generator (asyncio.CancelledError at its current await): the stream is closed in
`finally` and the cancellation re-raised, so the upstream sees the disconnect at once.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from django.http import StreamingHttpResponse

from openai_api.context import RequestContext
from openai_api.errors import OpenAIError, UpstreamError, UpstreamUnavailableError, error_body
from openai_api.lifecycle import ActiveStream, active_streams
from openai_api.observability import stream_started
from openai_api.upstream_errors import as_openai
from upstreams.base import Stream
from upstreams.usage import Usage

logger = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def stream_error(exc: BaseException) -> OpenAIError:
    """The error a failed stream reports (an unexpected exception is logged, and told as a 502)."""
    exc = as_openai(exc)
    if not isinstance(exc, OpenAIError):
        logger.exception("Stream failed", exc_info=exc)
        exc = UpstreamError("The stream failed.")
    return exc


def sse_error(exc: BaseException) -> bytes:
    return sse_event(error_body(stream_error(exc)))


class EventTranslator(Protocol):
    """Frames a stream's chunks in another API's events (the Responses API's)."""

    def start(self) -> bytes:
        """The events sent before the first chunk's."""

    def chunk(self, raw: bytes) -> bytes:
        """The events of one chunk (b"" for none)."""

    async def end(self, usage: Usage) -> bytes:
        """The final events, once the stream ended well (`usage`: the stream's tokens)."""

    def failed(self, error: OpenAIError) -> bytes:
        """The one event that ends a failed stream."""


class EventStreamResponse(StreamingHttpResponse):
    """A streaming response that closes its event generator when the server stops reading.

    Django's ASGI handler closes the iterator it reads (`aclosing(aiter(response))`), but the
    base class relays through a wrapper that leaves the original generator suspended; closing
    it here runs its `finally` (upstream close, usage, limits) at once.
    """

    async def __aiter__(self) -> AsyncIterator[bytes]:
        events = self._iterator
        try:
            async for part in events:
                yield part
        finally:
            await events.aclose()


def sse_response(events: AsyncIterator[bytes]) -> StreamingHttpResponse:
    response = EventStreamResponse(events, content_type="text/event-stream; charset=utf-8")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


async def guarded(stream: Stream, on_end: Any, upstreams: list[Any],
                  translator: EventTranslator | None = None) -> AsyncIterator[bytes]:
    """Frame `stream`'s chunks as events, then `[DONE]`; a failure becomes one error event before
    `[DONE]`. With a `translator`, its events frame the stream, and no `[DONE]` is sent.

    `on_end(status, error_code, upstream_url)` runs exactly once, however the stream ends: 200
    on success, 502 after an error event (503 if a shutdown cut it), 499 when the client went
    away (then no `[DONE]` is sent). While it runs, a shutdown may close its `upstreams`
    (lifecycle.py).
    """
    status, error_code, upstream_url = 200, "", ""
    active = ActiveStream(upstreams)
    active_streams.add(active)
    try:
        if translator is None:  # chat and completions: the chunks as they came, one write per batch
            async for batch in stream:
                yield b"data: " + b"\n\ndata: ".join(batch) + b"\n\n"
        else:
            yield translator.start()
            async for batch in stream:
                if events := b"".join([translator.chunk(chunk) for chunk in batch]):
                    yield events
            yield await translator.end(stream.usage)
    except Exception as exc:
        error: BaseException = as_openai(exc)
        if active.interrupted:
            error = UpstreamUnavailableError("The server is shutting down; please retry.", code="server_shutting_down")
        status = error.status_code if isinstance(error, OpenAIError) else 502
        error_code = getattr(error, "code", None) or "stream_error"
        upstream_url = getattr(error, "upstream_url", "")
        yield sse_error(error) if translator is None else translator.failed(stream_error(error))
    except BaseException:
        status, error_code = 499, "client_disconnected"
        raise
    finally:
        active_streams.discard(active)
        try:
            await stream.aclose()
        finally:  # even if a cancellation interrupts the close: on_end must run
            await on_end(status, error_code, upstream_url)
    if translator is None:
        yield SSE_DONE


async def stream_response(stream: Stream, ctx: RequestContext,
                          translator: EventTranslator | None = None) -> StreamingHttpResponse:
    """The one owner of a streamed request's end: the SSE response for an upstream's `stream`.

    It counts the stream in flight, guards it (see guarded: an error becomes one event, then
    `[DONE]`; a shutdown may interrupt it), and runs it up to its first event before returning:
    a started generator is finalised even if the client goes away before the server iterates
    it, an unstarted one would leak its upstream. However the stream ends, the tokens produced
    so far (`stream.usage`) are recorded, the stream closed and the request finished.
    A `translator` frames the stream in its own events (see guarded).
    """
    stream_started(ctx)
    upstreams = [stream]

    async def on_end(status: int, error_code: str, upstream_url: str) -> None:
        ctx.upstream_url = upstream_url
        try:
            ctx.add_usage(stream.usage)
        except Exception:
            logger.exception("Usage of stream %s could not be read", ctx.request_id)
        try:
            await asyncio.gather(*(upstream.aclose() for upstream in upstreams), return_exceptions=True)
        finally:  # a client leaving as the stream ends cancels this await: finish all the same
            ctx.finish(status, error_code)

    guarded_events = guarded(stream, on_end, upstreams, translator)
    # The server may never iterate the response (its task cancelled before or as it starts
    # sending): the API handler then closes the stream through this (handler.py).
    ctx.close_stream = guarded_events.aclose
    ctx.mark_first_token()
    first = await anext(guarded_events)

    async def relay() -> AsyncIterator[bytes]:
        try:
            yield first
            async for event in guarded_events:
                yield event
        finally:
            await guarded_events.aclose()

    return sse_response(relay())
