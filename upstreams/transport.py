"""The pooled HTTP transport every adapter sends through: one per event loop (aiohttp sessions are
bound to the loop that made them), built on first use, closed at server shutdown.

Requests go to the transport directly: httpx.AsyncClient's redirects, auth, cookies and URL merging
cost more CPU than the call itself here and are not needed for a known upstream.
"""
from __future__ import annotations

import asyncio
import functools
import weakref

import httpx
from httpx_aiohttp import AiohttpTransport

_transports: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncBaseTransport] = (
    weakref.WeakKeyDictionary()
)
_test_transport: httpx.AsyncBaseTransport | None = None


def get_transport() -> httpx.AsyncBaseTransport:
    """The process's pooled transport for the running event loop, built on first use."""
    loop = asyncio.get_running_loop()
    transport = _transports.get(loop)
    if transport is None:
        transport = _test_transport or AiohttpTransport(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        )
        _transports[loop] = transport
    return transport


async def close_transport() -> None:
    """Close the running loop's pooled transport (its aiohttp session and connections), at
    server shutdown: left to the garbage collector, aiohttp logs "Unclosed client session"."""
    transport = _transports.pop(asyncio.get_running_loop(), None)
    if transport is not None and transport is not _test_transport:
        await transport.aclose()


def reset_http_client(transport: httpx.AsyncBaseTransport | None = None) -> None:
    """Forget pooled transports; the next call uses `transport` (tests pass a fake)."""
    global _test_transport
    _test_transport = transport
    _transports.clear()


@functools.lru_cache(maxsize=1024)
def parsed_url(url: str) -> httpx.URL:
    """The few upstream URLs (controller and worker routes, API paths) are parsed once, not per call."""
    return httpx.URL(url)
