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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
from aiohttp import ClientSession, ClientTimeout
from asgiref.sync import async_to_sync
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream, map_aiohttp_exceptions
from multidict import CIMultiDict
from yarl import URL

_transports: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncBaseTransport] = (
    weakref.WeakKeyDictionary()
)
_test_transport: httpx.AsyncBaseTransport | None = None
# A one-off call from sync code (call_from_sync) uses a transport of its own.
_private: contextvars.ContextVar[httpx.AsyncBaseTransport | None] = contextvars.ContextVar(
    "private_transport", default=None
)

T = TypeVar("T")


Timeouts = dict[str, float | None]  # httpx's timeout extension: connect, read, write, pool


class RequestHeaders:
    """A request's headers, prepared once for every request that sends them: as httpx takes them
    (a test's fake transport) and as the pooled transport hands them to aiohttp."""

    __slots__ = ("raw", "for_aiohttp")

    def __init__(self, raw: list[tuple[bytes, bytes]]):
        self.raw = list(raw)
        # What httpx-aiohttp hands aiohttp for an httpx.Request's headers, less the Host and
        # Content-Length that httpx adds (aiohttp computes the same ones).
        self.for_aiohttp = CIMultiDict(httpx.Headers(self.raw).items())


async def send_direct(transport: AiohttpTransport, method: str, url: str, content: bytes, headers: RequestHeaders,
                      timeout: Timeouts) -> httpx.Response:
    """What AiohttpTransport.handle_async_request() does for an httpx.Request (the same aiohttp call,
    errors and httpx.Response), without the httpx.Request: building one (header normalisation, Host,
    Content-Length) and translating it back into aiohttp's arguments cost more CPU than the rest of
    a call to a fast upstream (bench/README.md)."""
    if transport.proxy is not None:  # new_transport() sets none; kept exact all the same
        return await transport.handle_async_request(httpx_request(method, url, content, headers, timeout))
    if not isinstance(transport.client, ClientSession):
        transport.client = transport.get_client()
    with map_aiohttp_exceptions():
        response = await transport.client.request(
            method=method, url=aiohttp_url(url), headers=headers.for_aiohttp, data=content or None,
            allow_redirects=False, auto_decompress=False, compress=False,
            timeout=client_timeout(timeout.get("connect"), timeout.get("read"), timeout.get("pool")),
            server_hostname=None, proxy=None, proxy_auth=None, proxy_headers=None,
        ).__aenter__()
    extensions = {"http_version": b"HTTP/1.1"}
    if response.reason:
        extensions["reason_phrase"] = response.reason.encode()
    return httpx.Response(status_code=response.status, headers=response.raw_headers,
                          stream=AiohttpResponseStream(response), extensions=extensions)


def raw_parts(response: httpx.Response) -> AsyncIterator[bytes]:
    """response.aiter_raw(): for an answer of send_direct() straight from its aiohttp stream
    (httpx's layer only counts the bytes and closes the response at the end, which every caller
    does in a `finally`), so that each network read of a 64-chunk stream goes through two
    generators fewer."""
    if type(response.stream) is AiohttpResponseStream:
        return response.stream.__aiter__()
    return response.aiter_raw()


def body_parts(response: httpx.Response) -> AsyncIterator[bytes]:
    """response.aiter_bytes(): as raw_parts() when httpx would pass the bytes through unchanged
    (no Content-Encoding to decode)."""
    if type(response.stream) is AiohttpResponseStream and "content-encoding" not in response.headers:
        return response.stream.__aiter__()
    return response.aiter_bytes()


def httpx_request(method: str, url: str, content: bytes, headers: RequestHeaders, timeout: Timeouts) -> httpx.Request:
    return httpx.Request(method, parsed_url(url), content=content, headers=headers.raw,
                         extensions={"timeout": timeout})


async def send(method: str, url: str, content: bytes, headers: RequestHeaders, timeout: Timeouts,
               transport: httpx.AsyncBaseTransport | None = None) -> httpx.Response:
    """Send a request through `transport` (the running loop's by default); the response's body is
    unread. httpx's errors as a transport raises them (httpx.HTTPError, aiohttp's as its cause)."""
    if transport is None:
        transport = get_transport()
    if isinstance(transport, AiohttpTransport):
        return await send_direct(transport, method, url, content, headers, timeout)
    return await transport.handle_async_request(httpx_request(method, url, content, headers, timeout))


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


@functools.lru_cache(maxsize=1024)
def aiohttp_url(url: str) -> URL:
    """The URL aiohttp gets for an httpx.Request to `url` (httpx-aiohttp passes it as a string)."""
    return URL(str(parsed_url(url)))


@functools.lru_cache(maxsize=64)
def client_timeout(connect: float | None, read: float | None, pool: float | None) -> ClientTimeout:
    """httpx-aiohttp's mapping of httpx's timeouts (ClientTimeout is immutable: one per set)."""
    return ClientTimeout(sock_connect=connect, sock_read=read, connect=pool)
