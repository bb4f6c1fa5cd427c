"""The FastChat controller/worker client (FASTCHAT_REFERENCE.md sections 15-16).

Every method either returns parsed data or raises one of the gateway's upstream errors:
WorkerUnreachableError (connection refused or dropped before an answer: ask the controller
for another worker), UpstreamTimeoutError, UpstreamUnavailableError (no worker, controller
down) or UpstreamError (the upstream answered, but with an error).
"""
from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import orjson
from django.conf import settings
from httpx_aiohttp import AiohttpTransport

from openai_api.errors import (
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    worker_error,
)

JSON_HEADERS = [(b"content-type", b"application/json"), (b"user-agent", b"Django OpenAI Gateway")]


class WorkerUnreachableError(UpstreamUnavailableError):
    """The worker did not take the request: another worker (or a retry) may."""

    code = "worker_unreachable"


# One pooled transport per event loop: aiohttp sessions are bound to the loop that made them.
# Requests go to the transport directly: httpx.AsyncClient's redirects, auth, cookies and URL
# merging cost more CPU than the call itself here and are not needed for a known upstream.
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


def reset_http_client(transport: httpx.AsyncBaseTransport | None = None) -> None:
    """Forget pooled transports; the next call uses `transport` (tests pass a fake)."""
    global _test_transport
    _test_transport = transport
    _transports.clear()


Timeouts = dict[str, float | None]  # httpx's timeout extension: connect, read, write, pool


@functools.lru_cache(maxsize=1024)
def parsed_url(url: str) -> httpx.URL:
    """The few upstream URLs (controller and worker routes) are parsed once, not per call."""
    return httpx.URL(url)


async def post(url: str, content: bytes, timeout: Timeouts) -> httpx.Response:
    """POST and return the response with its body still unread (the caller closes it)."""
    request = httpx.Request("POST", parsed_url(url), content=content, headers=JSON_HEADERS,
                            extensions={"timeout": timeout})
    try:
        return await get_transport().handle_async_request(request)
    except httpx.HTTPError as exc:
        raise translate_transport_error(exc, url) from exc


def translate_transport_error(exc: httpx.HTTPError, url: str) -> UpstreamUnavailableError | UpstreamTimeoutError:
    """Map a transport failure to a gateway error.

    httpx-aiohttp maps aiohttp's errors coarsely (a refused connection becomes ConnectTimeout),
    so the original aiohttp error, kept as __cause__, decides first.
    """
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ServerTimeoutError) or (
        cause is None and isinstance(exc, httpx.TimeoutException)
    ):
        return UpstreamTimeoutError(f"{url} did not answer within the timeout.")
    return WorkerUnreachableError(f"Could not reach {url}: {type(cause or exc).__name__}.")


class FastChatClient:
    """Talks to one FastChat controller and the workers it hands out."""

    def __init__(self, controller_address: str, worker_timeout: float, controller_timeout: float):
        self.controller_address = controller_address
        self.worker_timeout: Timeouts = httpx.Timeout(worker_timeout).as_dict()
        self.controller_timeout: Timeouts = httpx.Timeout(controller_timeout).as_dict()

    @classmethod
    def from_settings(cls) -> FastChatClient:
        return cls(
            settings.CONTROLLER_ADDRESS,
            settings.FASTCHAT_WORKER_API_TIMEOUT,
            settings.FASTCHAT_CONTROLLER_TIMEOUT,
        )

    # Controller

    async def list_models(self) -> list[str]:
        data = await self._controller("/list_models")
        return list(data["models"])

    async def get_worker_address(self, model: str) -> str:
        """The address of a worker serving `model`; raises UpstreamUnavailableError if none."""
        data = await self._controller("/get_worker_address", {"model": model})
        address = data.get("address") if isinstance(data, dict) else None
        if not address:
            raise UpstreamUnavailableError(f"No worker is available for model {model!r}. Please retry later.")
        return address.rstrip("/")

    async def ping_controller(self) -> None:
        await self._controller("/list_models")

    # Worker

    async def model_details(self, address: str, model: str) -> int:
        data = await self._worker(address, "/model_details", {"model": model})
        return int(data["context_length"])

    async def count_tokens(self, address: str, model: str, prompt: str) -> int:
        data = await self._worker(address, "/count_token", {"model": model, "prompt": prompt})
        check_worker_error(data)
        return int(data["count"])

    async def conv_template(self, address: str, model: str) -> dict[str, Any]:
        data = await self._worker(address, "/worker_get_conv_template", {"model": model})
        return data["conv"]

    async def generate(self, address: str, params: dict[str, Any]) -> dict[str, Any]:
        """The worker's final chunk; raises if it reports an error."""
        data = await self._worker(address, "/worker_generate", params)
        check_worker_error(data)
        return data

    async def embeddings(self, address: str, params: dict[str, Any]) -> dict[str, Any]:
        data = await self._worker(address, "/worker_get_embeddings", params)
        check_worker_error(data)
        return data

    async def open_stream(self, address: str, params: dict[str, Any]) -> WorkerStream:
        """Send a generate_stream request and wait for the worker's response headers."""
        url = address + "/worker_generate_stream"
        response = await post(url, orjson.dumps(params), self.worker_timeout)
        if response.status_code != 200:
            await response.aclose()
            raise UpstreamError(f"The worker answered HTTP {response.status_code} {response.reason_phrase}.")
        return WorkerStream(response, url)

    # Plumbing

    async def _controller(self, path: str, payload: dict | None = None) -> Any:
        url = self.controller_address + path
        try:
            return await self._post(url, payload, self.controller_timeout)
        except WorkerUnreachableError as exc:
            raise UpstreamUnavailableError(
                f"The FastChat controller at {self.controller_address} cannot be reached.",
                code="controller_unreachable",
            ) from exc

    async def _worker(self, address: str, path: str, payload: dict) -> Any:
        return await self._post(address + path, payload, self.worker_timeout)

    async def _post(self, url: str, payload: dict | None, timeout: Timeouts) -> Any:
        content = orjson.dumps(payload) if payload is not None else b""
        response = await post(url, content, timeout)
        try:
            body = await response.aread()
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, url) from exc
        finally:
            await response.aclose()
        if response.status_code != 200:
            raise UpstreamError(f"{url} answered HTTP {response.status_code} {response.reason_phrase}.")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamError(f"{url} answered with invalid JSON.") from None


def check_worker_error(data: Any) -> None:
    if not isinstance(data, dict):
        raise UpstreamError("The worker answered with an unexpected body.")
    error_code = data.get("error_code", 0)
    if error_code:
        raise worker_error(str(data.get("text", "")), int(error_code))


class WorkerStream:
    """A worker's NUL-delimited stream of cumulative-text chunks."""

    def __init__(self, response: httpx.Response, url: str):
        self.response = response
        self.url = url

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """Yield each parsed chunk; the worker's error chunks are yielded, not raised."""
        buffer = b""
        try:
            async for data in self.response.aiter_raw():
                buffer += data
                *complete, buffer = buffer.split(b"\0")
                for raw in complete:
                    if raw.strip():
                        yield parse_chunk(raw)
        except httpx.HTTPError as exc:
            error = translate_transport_error(exc, self.url)
            if isinstance(error, WorkerUnreachableError):
                error = UpstreamError("The worker closed the stream before it finished.")
            raise error from exc
        if buffer.strip():
            yield parse_chunk(buffer)

    async def aclose(self) -> None:
        await self.response.aclose()


def parse_chunk(raw: bytes) -> dict[str, Any]:
    try:
        chunk = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError("The worker sent an invalid stream chunk.") from None
    if not isinstance(chunk, dict):
        raise UpstreamError("The worker sent an invalid stream chunk.")
    return chunk
