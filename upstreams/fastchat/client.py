"""The FastChat controller/worker client (the wire protocol: docs/fastchat-protocol.md).

Every method either returns parsed data or raises an upstreams/errors.py failure:
WorkerGone (connection refused or dropped before an answer: ask the controller for another
worker), UpstreamTimeout, Unreachable (no worker, controller down) or another UpstreamFailure
(the upstream answered, but with an error, or with garbage).
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import httpx
import orjson
from django.conf import settings

from upstreams.errors import (
    BadAnswer,
    ContextOverflow,
    OutOfMemory,
    ServerFailure,
    Unreachable,
    UpstreamFailure,
    UpstreamTimeout,
)
from upstreams.transport import RequestHeaders, Timeouts, body_parts, raw_parts, send
from upstreams.usage import token_count

logger = logging.getLogger(__name__)

JSON_HEADERS = RequestHeaders([(b"content-type", b"application/json"), (b"user-agent", b"Django OpenAI Gateway")])

# FastChat's error codes (fastchat/constants.py) the gateway acts on or sends.
INTERNAL_ERROR = 50001
CUDA_OUT_OF_MEMORY = 50002
CONTEXT_OVERFLOW = 40303
NO_WORKER = 50005
# A worker's error text is passed on to the client, up to this length.
MAX_WORKER_ERROR_TEXT = 2000


class WorkerGone(Unreachable):
    """The worker did not take the request: another worker (or a retry) may."""

    code = "worker_unreachable"


def no_worker(message: str, **kwargs: Any) -> Unreachable:
    return Unreachable(message, code="service_unavailable", fastchat_code=NO_WORKER, **kwargs)


async def post(url: str, content: bytes, timeout: Timeouts, who: str) -> httpx.Response:
    """POST and return the response with its body still unread (the caller closes it)."""
    try:
        return await send("POST", url, content, JSON_HEADERS, timeout)
    except httpx.HTTPError as exc:
        raise translate_transport_error(exc, url, who) from exc


def translate_transport_error(exc: httpx.HTTPError, url: str, who: str) -> WorkerGone | UpstreamTimeout:
    """Map a transport failure to a gateway error (`who`: "worker" or "controller"; the URL is
    kept on the error for the logs, never put in its message).

    httpx-aiohttp maps aiohttp's errors coarsely (a refused connection becomes ConnectTimeout),
    so the original aiohttp error, kept as __cause__, decides first.
    """
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ServerTimeoutError) or (
        cause is None and isinstance(exc, httpx.TimeoutException)
    ):
        return UpstreamTimeout(f"The {who} did not answer within the timeout.", log_detail=url)
    return WorkerGone(f"Could not reach the {who} ({type(cause or exc).__name__}).", log_detail=url)


def overdue(who: str, url: str) -> UpstreamTimeout:
    return UpstreamTimeout(f"The {who} did not finish within GATEWAY_UPSTREAM_DEADLINE.", log_detail=url,
                           retryable=False)


def too_large(what: str, limit: int, url: str) -> BadAnswer:
    return BadAnswer(f"The {what} exceeded GATEWAY_UPSTREAM_MAX_BYTES ({limit} bytes).", log_detail=url)


@functools.lru_cache(maxsize=256)
def checked_worker_address(address: str, allowed_hosts: frozenset[str]) -> str | None:
    """`address` without a trailing slash if the gateway may call it: scheme http or https, and a
    host in `allowed_hosts` (host or host:port) unless that is empty. None otherwise."""
    try:
        url = httpx.URL(address)
    except (httpx.InvalidURL, TypeError):
        return None
    if url.scheme not in ("http", "https") or not url.host:
        return None
    if allowed_hosts and url.host not in allowed_hosts and f"{url.host}:{url.port}" not in allowed_hosts:
        return None
    return address.rstrip("/")


class FastChatClient:
    """Talks to one FastChat controller and the workers it hands out.

    Every call has an overall deadline (`deadline` seconds, however steadily the upstream trickles
    bytes) besides the silence timeouts, and reads at most `max_bytes` of an answer body or of one
    stream chunk. What an upstream sends is checked before it is returned: garbage is a 502.
    """

    def __init__(self, controller_address: str, worker_timeout: float, controller_timeout: float, *,
                 deadline: float = 900.0, max_bytes: int = 64 * 1024 * 1024,
                 allowed_worker_hosts: Iterable[str] = ()):
        self.controller_address = controller_address
        self.worker_timeout: Timeouts = httpx.Timeout(worker_timeout).as_dict()
        self.controller_timeout: Timeouts = httpx.Timeout(controller_timeout).as_dict()
        self.deadline = deadline
        self.max_bytes = max_bytes
        self.allowed_worker_hosts = frozenset(host.lower() for host in allowed_worker_hosts)

    @classmethod
    def from_settings(cls) -> FastChatClient:
        return cls(
            settings.CONTROLLER_ADDRESS,
            settings.FASTCHAT_WORKER_API_TIMEOUT,
            settings.FASTCHAT_CONTROLLER_TIMEOUT,
            deadline=settings.GATEWAY_UPSTREAM_DEADLINE,
            max_bytes=settings.GATEWAY_UPSTREAM_MAX_BYTES,
            allowed_worker_hosts=settings.GATEWAY_WORKER_ALLOWED_HOSTS,
        )

    # Controller

    async def list_models(self) -> list[str]:
        data = await self._controller("/list_models")
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, list) or not all(isinstance(name, str) for name in models):
            raise BadAnswer("The controller answered with an invalid model list.")
        return models

    async def get_worker_address(self, model: str) -> str:
        """The address of a worker serving `model`; raises Unreachable if none, BadAnswer
        (invalid_worker_address) if the gateway may not call the one handed out."""
        data = await self._controller("/get_worker_address", {"model": model})
        address = data.get("address") if isinstance(data, dict) else None
        if address == "":
            raise no_worker(f"No worker is available for model {model!r}. Please retry later.")
        checked = checked_worker_address(address, self.allowed_worker_hosts) if isinstance(address, str) else None
        if checked is None:
            logger.warning("The controller handed out a worker address that is refused: %r", address)
            raise BadAnswer("The controller handed out a worker address the gateway does not accept.",
                            code="invalid_worker_address", log_detail=str(address))
        return checked

    async def ping_controller(self) -> None:
        await self._controller("/list_models")

    # Worker

    async def model_details(self, address: str, model: str) -> int:
        data = await self._worker(address, "/model_details", {"model": model})
        length = token_count(data.get("context_length")) if isinstance(data, dict) else None
        if not length:
            raise BadAnswer("The worker reported an invalid context length.", log_detail=address)
        return length

    async def count_tokens(self, address: str, model: str, prompt: str) -> int:
        data = await self._worker(address, "/count_token", {"model": model, "prompt": prompt})
        check_worker_error(data)
        count = token_count(data.get("count"))
        if count is None:
            raise BadAnswer("The worker reported an invalid token count.", log_detail=address)
        return count

    async def conv_template(self, address: str, model: str) -> dict[str, Any]:
        data = await self._worker(address, "/worker_get_conv_template", {"model": model})
        conv = data.get("conv") if isinstance(data, dict) else None
        if not isinstance(conv, dict):
            raise BadAnswer("The worker sent an invalid conversation template.", log_detail=address)
        return conv

    async def embeddings(self, address: str, params: dict[str, Any]) -> dict[str, Any]:
        data = await self._worker(address, "/worker_get_embeddings", params)
        check_worker_error(data)
        if not isinstance(data.get("embedding"), list) or token_count(data.get("token_num", 0)) is None:
            raise BadAnswer("The worker answered with invalid embeddings.", log_detail=address)
        return data

    async def open_stream(self, address: str, params: dict[str, Any]) -> WorkerStream:
        """Send a generate_stream request and wait for the worker's response headers. Non-streamed
        requests use it too: closing the stream is what stops a worker's generation."""
        url = address + "/worker_generate_stream"
        deadline = time.monotonic() + self.deadline
        response = await post(url, orjson.dumps(params), self.worker_timeout, "worker")
        if response.status_code != 200:
            await response.aclose()
            raise ServerFailure(f"The worker answered HTTP {response.status_code}.", log_detail=url)
        return WorkerStream(response, url, deadline, self.max_bytes)

    # Plumbing

    async def _controller(self, path: str, payload: dict | None = None) -> Any:
        url = self.controller_address + path
        try:
            return await self._post(url, payload, self.controller_timeout, "controller")
        except WorkerGone as exc:
            raise Unreachable("The FastChat controller cannot be reached.", code="controller_unreachable",
                              fastchat_code=NO_WORKER, log_detail=url) from exc

    async def _worker(self, address: str, path: str, payload: dict) -> Any:
        return await self._post(address + path, payload, self.worker_timeout, "worker")

    async def _post(self, url: str, payload: dict | None, timeout: Timeouts, who: str) -> Any:
        content = orjson.dumps(payload) if payload is not None else b""
        deadline = time.monotonic() + self.deadline
        response = await post(url, content, timeout, who)
        body = await self._read_body(response, url, who, deadline)
        if response.status_code != 200:
            raise ServerFailure(f"The {who} answered HTTP {response.status_code}.", log_detail=url)
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadAnswer(f"The {who} answered with invalid JSON.", log_detail=url) from None

    async def _read_body(self, response: httpx.Response, url: str, who: str, deadline: float) -> bytes:
        """The whole body, within the deadline and the size cap; the response is closed."""
        parts, size = [], 0
        try:
            async for data in body_parts(response):
                size += len(data)
                if size > self.max_bytes:
                    raise too_large(f"{who}'s answer", self.max_bytes, url)
                if time.monotonic() > deadline:
                    raise overdue(who, url)
                parts.append(data)
        except httpx.HTTPError as exc:
            raise translate_transport_error(exc, url, who) from exc
        finally:
            await response.aclose()
        return b"".join(parts)


def check_worker_error(data: Any) -> None:
    """Raise the failure for an error chunk (or a body that is not a JSON object)."""
    if not isinstance(data, dict):
        raise BadAnswer("The worker answered with an unexpected body.")
    error_code = data.get("error_code", 0)
    if error_code:
        raise worker_error(data.get("text"), error_code)


def worker_error(text: Any, error_code: Any) -> UpstreamFailure:
    """The failure for an error a worker reported ({"text", "error_code"}). Whatever the worker
    put there, the result is a well-formed failure (a 502 unless the code says otherwise)."""
    text = text[:MAX_WORKER_ERROR_TEXT] if isinstance(text, str) and text else "The model worker failed."
    if type(error_code) is not int or not 10000 <= error_code <= 99999:
        error_code = INTERNAL_ERROR
    if error_code == CUDA_OUT_OF_MEMORY:
        return OutOfMemory(text, fastchat_code=error_code)
    if error_code == CONTEXT_OVERFLOW:
        return ContextOverflow(text, fastchat_code=error_code)
    return UpstreamFailure(text, fastchat_code=error_code)


class WorkerStream:
    """A worker's NUL-delimited stream of cumulative-text chunks.

    Each network read is checked against the call's deadline; a chunk may not grow beyond
    max_bytes before its NUL arrives. `usage` is the latest usage the worker reported, unchecked
    (see counts.py); reported_usage() also covers a stream read with last_chunk().
    """

    def __init__(self, response: httpx.Response, url: str, deadline: float, max_bytes: int):
        self.response = response
        self.url = url
        self.deadline = deadline
        self.max_bytes = max_bytes
        self.usage: Any = None
        self._latest_raw: bytes | None = None
        self._previous_raw: bytes | None = None

    def batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        """Yield the parsed chunks each network read completed (never an empty list); the
        worker's error chunks are yielded, not raised."""
        return self._batches(parse=True)

    async def last_chunk(self) -> dict[str, Any]:
        """Read the stream to its end and return its last chunk, the worker's answer (the error
        chunk if it failed). Only that chunk is parsed: the others repeat its text in part."""
        async for raws in self._batches(parse=False):
            self._previous_raw = raws[-2] if len(raws) > 1 else self._latest_raw
            self._latest_raw = raws[-1]
        if self._latest_raw is None:
            raise BadAnswer("The worker closed the stream without sending anything.", log_detail=self.url)
        chunk = parse_chunk(self._latest_raw)
        self._latest_raw = None
        usage = chunk.get("usage")
        if usage:
            self.usage, self._previous_raw = usage, None
        return chunk

    def reported_usage(self) -> Any:
        """The latest usage the worker reported, unchecked; None if it reported none."""
        for raw in (self._latest_raw, self._previous_raw):  # left by last_chunk(), newest first
            if raw is not None:
                try:
                    chunk = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(chunk, dict) and chunk.get("usage"):
                    return chunk["usage"]
        return self.usage

    async def _batches(self, parse: bool) -> AsyncIterator[list[Any]]:
        pending: list[bytes] = []  # the pieces of a chunk whose NUL has not arrived yet
        pending_size = 0
        try:
            async for data in raw_parts(self.response):
                if time.monotonic() > self.deadline:
                    raise overdue("worker", self.url)
                *complete, rest = data.split(b"\0")
                if complete:
                    if pending:
                        pending.append(complete[0])
                        complete[0], pending, pending_size = b"".join(pending), [], 0
                    batch: list[Any] = []
                    try:
                        for raw in complete:
                            if raw.strip():
                                batch.append(self._parse(raw) if parse else raw)
                    except BadAnswer:
                        if batch:  # the chunks before the bad one are the reader's first
                            yield batch
                        raise
                    if batch:
                        yield batch
                if rest:
                    pending.append(rest)
                    pending_size += len(rest)
                    if pending_size > self.max_bytes:
                        raise too_large("worker's stream chunk", self.max_bytes, self.url)
        except httpx.HTTPError as exc:
            error = translate_transport_error(exc, self.url, "worker")
            if isinstance(error, WorkerGone):
                error = UpstreamFailure("The worker closed the stream before it finished.", log_detail=self.url)
            raise error from exc
        raw = b"".join(pending)
        if raw.strip():
            yield [self._parse(raw) if parse else raw]

    def _parse(self, raw: bytes) -> dict[str, Any]:
        chunk = parse_chunk(raw)
        usage = chunk.get("usage")
        if usage:
            self.usage = usage
        return chunk

    async def aclose(self) -> None:
        await self.response.aclose()


def parse_chunk(raw: bytes) -> dict[str, Any]:
    try:
        chunk = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadAnswer("The worker sent an invalid stream chunk.") from None
    if not isinstance(chunk, dict):
        raise BadAnswer("The worker sent an invalid stream chunk.")
    return chunk
