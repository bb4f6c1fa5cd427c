"""Graceful shutdown: in-flight streams get GATEWAY_DRAIN_SECONDS to finish, then end cleanly.

When the server is told to stop (SIGTERM), it stops accepting connections and waits for the
open ones. A stream still running when the drain time is up has its upstream closed: it then
ends the usual way for a failure, with one error event and `[DONE]`, and its usage is recorded
with the tokens produced so far. At the server's lifespan shutdown (after the last request),
the pooled upstream connections are closed and the usage queue is written.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ASGIReceive = Callable[[], Awaitable[dict]]


@dataclass(eq=False)
class ActiveStream:
    upstreams: list[Any] = field(default_factory=list)
    interrupted: bool = False


active_streams: set[ActiveStream] = set()
shutting_down = False


def interrupt_streams() -> None:
    """Close the upstream of every stream still running; each ends with an error event."""
    for stream in list(active_streams):
        stream.interrupted = True
        for upstream in stream.upstreams:
            asyncio.ensure_future(upstream.aclose())
    if active_streams:
        logger.warning("Shutdown: interrupted %d stream(s) still running", len(active_streams))


def begin_shutdown(loop: asyncio.AbstractEventLoop, drain_seconds: float) -> None:
    """Called from the server's signal handler: interrupt streams after drain_seconds."""
    global shutting_down
    if shutting_down:
        return
    shutting_down = True
    logger.info("Shutdown: %d stream(s) in flight get %.0f s to finish", len(active_streams), drain_seconds)
    loop.call_soon_threadsafe(loop.call_later, drain_seconds, interrupt_streams)


async def lifespan(scope: dict, receive: ASGIReceive, send: Callable[[dict], Awaitable[None]]) -> None:
    """The gateway's ASGI lifespan (uvicorn: every process, once it has served its last
    request): close this process's upstream connections, then write its usage queue."""
    from keys.usage import usage_lifespan
    from upstreams.transport import close_transport

    async def receive_then_close() -> dict:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                from upstreams.health import get_health

                get_health().ensure_started()  # probes registered upstreams from the start
            except Exception:
                logger.exception("Startup: the upstream probe loop did not start")
        if message["type"] == "lifespan.shutdown":
            try:
                from upstreams.health import stop_probes

                await stop_probes()  # the upstream probe loop, if it runs
                await close_transport()
            except Exception:
                logger.exception("Shutdown: closing the upstream connections failed")
        return message

    await usage_lifespan(scope, receive_then_close, send)
