"""An ASGI handler for the OpenAI API path with its own, async-only middleware chain."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from io import BytesIO
from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import get_resolver, set_script_prefix, set_urlconf

from openai_api.auth import authenticate
from openai_api.errors import OpenAIError, error_body

logger = logging.getLogger(__name__)

# path -> (the resolver that matched it, its ResolverMatch); the resolver changes with the URLconf
_resolved: dict[str, tuple[Any, Any]] = {}
MAX_RESOLVED_PATHS = 1024
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
NO_BODY = b""


class APIHandler(ASGIHandler):
    """Django's ASGI handler, lean for the API path.

    - Its middleware chain is settings.API_MIDDLEWARE (async-only), not MIDDLEWARE, and its
      URLconf is settings.API_URLCONF.
    - No request signals and no thread hop per request: Django's handler runs the
      request_started receivers and response.close() (which sends request_finished) through
      sync_to_async, each inside a fresh ThreadSensitiveContext, which starts and joins a thread
      per request (about a third of a chat request's CPU, measured). Those receivers reset
      database connections, and the API path uses none on the event loop (keys come from a
      cache, usage is written by a thread of its own, both recycle their own connections); its
      responses hold no resources to close (streams close their generator themselves). The rest
      follows Django 5.2's ASGIHandler.handle.
    - The body is read only when the request can use it: not past the server's first message
      before the key is known to be good (a bad key's 16 MB body is not read, see take_body),
      and never past GATEWAY_MAX_BODY_BYTES, whatever Content-Length says or whether there is
      one (chunked bodies are counted as they arrive). A body that is too big is left unread
      and the request goes on with its length noted, so the view answers 413 as it answers
      every other error: with the request id, the key's usage row, metrics and the access log.
    """

    def load_middleware(self, is_async: bool = False) -> None:
        # BaseHandler.load_middleware reads settings.MIDDLEWARE; swap it for the build only.
        full_stack = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full_stack

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.handle(scope, receive, send)

    def resolve_request(self, request: Any) -> Any:
        """BaseHandler.resolve_request, with each path's match remembered (for the first
        MAX_RESOLVED_PATHS paths): the resolver tries every API route's regex in turn for each
        request. A ResolverMatch is never changed after it is made (the view gets copies of its
        arguments); a path that matches nothing raises Resolver404 each time."""
        urlconf = request.urlconf
        set_urlconf(urlconf)
        resolver = get_resolver(urlconf)
        path = request.path_info
        cached = _resolved.get(path)
        if cached is not None and cached[0] is resolver:
            match = cached[1]
        else:
            match = resolver.resolve(path)
            if len(_resolved) < MAX_RESOLVED_PATHS:
                _resolved[path] = (resolver, match)
        request.resolver_match = match
        return match

    def create_request(self, scope: dict, body_file: Any) -> tuple[Any, Any]:
        request, error_response = super().create_request(scope, body_file)
        if request is not None:
            # Only the API's routes: the root URLconf would import the admin and DRF (23 MB).
            request.urlconf = settings.API_URLCONF
        return request, error_response

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            body, too_large = await take_body(scope, receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, BytesIO(body or NO_BODY))
        if request is None:
            await self.send_response(error_response, send)
            return
        if too_large:  # request.body raises RequestDataTooBig (the view's 413) from this length
            request.META["CONTENT_LENGTH"] = str(too_large)
        if body is None:
            # Unread body parts are still in front of a disconnect, so nobody listens for one;
            # the answer (401, 413) comes at once, before any upstream call.
            await self.get_and_send_response(request, send)
        else:
            await self.respond_until_disconnect(request, receive, send)

    async def respond_until_disconnect(self, request: Any, receive: Any, send: Any) -> None:
        """Send the response; if the client disconnects first, cancel the view (which closes
        its upstream streams)."""
        responder = asyncio.create_task(self.get_and_send_response(request, send))
        listener = asyncio.create_task(self.listen_for_disconnect(receive))
        await asyncio.wait([responder, listener], return_when=asyncio.FIRST_COMPLETED)
        client_left = listener.done()
        for task in (listener, responder):
            if not task.done():
                task.cancel()
            try:
                await task
            except (asyncio.CancelledError, RequestAborted):
                pass
        await finish_unsent_stream(request)
        # A responder cancelled while the client stayed never sent anything (a cancellation
        # during the send is caught in get_and_send_response): the view was cancelled from
        # inside, a bug. Answer in the API's format rather than leave the server's plain 500.
        if responder.cancelled() and not client_left:
            logger.error("%s (request %s) ended without a response", request.path,
                         getattr(request, "request_id", ""))
            await send_error(send, 500, OpenAIError())

    async def get_and_send_response(self, request: Any, send: Any) -> Any:
        response = await self.run_get_response(request)
        try:
            await self.send_response(response, send)
        except asyncio.CancelledError:
            pass  # the client went away while we were sending
        return response


async def finish_unsent_stream(request: Any) -> None:
    """A stream whose response the server never iterated to its end (the responder cancelled
    before it started sending, or between the view's answer and the send) is closed here, so
    that its end (usage row, slot release, access line) runs however the response went."""
    ctx = getattr(request, "ctx", None)
    if ctx is None or ctx.finished or ctx.close_stream is None:
        return
    try:
        await ctx.close_stream()
    except Exception:
        logger.exception("Closing the stream of request %s failed", ctx.request_id)
    ctx.finish(499, "client_disconnected")  # if its end did not run: no-op otherwise


def body_headers(scope: dict) -> tuple[int, bytes]:
    """The declared Content-Length (-1 if there is none, as with chunked bodies; 0 if it is
    not a number, which the server refuses anyway) and the Authorization header."""
    length, authorization = -1, b""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            length = int(value) if value.isdigit() else 0
        elif name == b"authorization":
            authorization = value
    return length, authorization


class HeadersOnly:
    """What openai_api.auth.authenticate reads of a request, before the request exists."""

    __slots__ = ("META",)

    def __init__(self, authorization: bytes):
        self.META = {"HTTP_AUTHORIZATION": authorization.decode("latin1")}


async def key_is_good(authorization: bytes) -> bool:
    """Whether the body is worth reading: the view checks the key again, from the same cache,
    and answers with whatever error this check met (401, or 503 if keys cannot be read)."""
    if not authorization:
        return False
    try:
        await authenticate(HeadersOnly(authorization))
    except OpenAIError:
        return False
    except Exception:
        # Not an answer about the key: read the body, and let the view's own check decide.
        logger.exception("The key check before reading a body failed")
    return True


async def take_body(scope: dict, receive: Any) -> tuple[bytes | None, int]:
    """(the body, 0) when it is read whole; (None, its length, as declared or counted so far)
    when it is too big; (None, 0) when the key is bad. RequestAborted if the client leaves
    while sending it.

    The server's first body message is taken as it comes: it holds what the server has
    already read, which for a usual request is the whole body (so the hot path checks no key
    here). Only when more is to come is the key checked before another byte is read.
    """
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    declared, authorization = body_headers(scope)
    if declared > limit:
        return None, declared
    first = await receive_part(receive)
    chunk = first.get("body", NO_BODY)
    if not first.get("more_body", False):
        return (chunk, 0) if len(chunk) <= limit else (None, len(chunk))
    if not await key_is_good(authorization):
        return None, 0
    return await read_rest_within(receive, chunk, limit)


async def receive_part(receive: Any) -> dict:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise RequestAborted()
    return message


async def read_rest_within(receive: Any, first: bytes, limit: int) -> tuple[bytes | None, int]:
    """(the body, 0), or (None, bytes received) as soon as more than `limit` bytes came,
    whatever Content-Length said (the rest is left unread)."""
    chunks, size = [first], len(first)
    while size <= limit:
        message = await receive_part(receive)
        chunk = message.get("body", NO_BODY)
        size += len(chunk)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return (b"".join(chunks), 0) if size <= limit else (None, size)
    return None, size


async def send_error(send: Any, status: int, error: OpenAIError) -> None:
    """An OpenAI-style JSON error, straight to the ASGI server."""
    body = orjson.dumps(error_body(error))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def route_by_path(api: ASGIApp, default: ASGIApp) -> ASGIApp:
    """Send HTTP requests under settings.API_PATH_PREFIXES to `api`, the rest to `default`."""
    prefixes = tuple(settings.API_PATH_PREFIXES)

    async def application(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(prefixes):
            await api(scope, receive, send)
        else:
            await default(scope, receive, send)

    return application
