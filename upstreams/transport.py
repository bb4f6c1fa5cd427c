"""The pooled HTTP transport every adapter sends through: one per event loop (aiohttp sessions are
bound to the loop that made them), built on first use, closed at server shutdown.

Requests go to the transport directly: httpx.AsyncClient's redirects, auth, cookies and URL merging
cost more CPU than the call itself here and are not needed for a known upstream.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from asgiref.sync import async_to_sync
from httpx_aiohttp import AiohttpTransport

_transports: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncBaseTransport] = (
    weakref.WeakKeyDictionary()
)
_test_transport: httpx.AsyncBaseTransport | None = None
# A one-off call from sync code (call_from_sync) uses a transport of its own.
_private: contextvars.ContextVar[httpx.AsyncBaseTransport | None] = contextvars.ContextVar(
    "private_transport", default=None
)

T = TypeVar("T")


def new_transport() -> httpx.AsyncBaseTransport:
    return AiohttpTransport(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))


def get_transport() -> httpx.AsyncBaseTransport:
    """The process's pooled transport for the running event loop, built on first use."""
    private = _private.get()
    if private is not None:
        return private
    loop = asyncio.get_running_loop()
    transport = _transports.get(loop)
    if transport is None:
        transport = _test_transport or new_transport()
        _transports[loop] = transport
    return transport


async def close_transport() -> None:
    """Close the running loop's pooled transport (its aiohttp session and connections), at
    server shutdown: left to the garbage collector, aiohttp logs "Unclosed client session"."""
    transport = _transports.pop(asyncio.get_running_loop(), None)
    if transport is not None and transport is not _test_transport:
        await transport.aclose()


def call_from_sync(function: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run an adapter's coroutine from sync code (the admin's "test now" and "discover", `manage.py
    upstreams test|discover`) through a transport of its own, closed when it returns.

    async_to_sync runs it on the server's loop when there is one (an admin view under ASGI) and on a
    loop of its own otherwise (a management command): the pooled transport may not be closed in the
    first case and would be left unclosed in the second ("Unclosed client session").
    """

    async def run() -> T:
        transport = _test_transport or new_transport()
        token = _private.set(transport)
        try:
            return await function(*args)
        finally:
            _private.reset(token)
            if transport is not _test_transport:
                await transport.aclose()

    return async_to_sync(run)()


def reset_http_client(transport: httpx.AsyncBaseTransport | None = None) -> None:
    """Forget pooled transports; the next call uses `transport` (tests pass a fake)."""
    global _test_transport
    _test_transport = transport
    _transports.clear()


@functools.lru_cache(maxsize=1024)
def parsed_url(url: str) -> httpx.URL:
    """The few upstream URLs (controller and worker routes, API paths) are parsed once, not per call."""
    return httpx.URL(url)
