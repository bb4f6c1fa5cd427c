"""An ASGI handler for the OpenAI API path with its own, async-only middleware chain."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import set_script_prefix

from openai_api.errors import OpenAIError, PayloadTooLargeError, error_body

logger = logging.getLogger(__name__)

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


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

    def create_request(self, scope: dict, body_file: Any) -> tuple[Any, Any]:
        request, error_response = super().create_request(scope, body_file)
        if request is not None:
            # Only the API's routes: the root URLconf would import the admin and DRF (23 MB).
            request.urlconf = settings.API_URLCONF
        return request, error_response

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        # Refuse an oversized body before reading it (Django would spool it all first).
        if declared_length(scope) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            await send_error(send, 413, PayloadTooLargeError())
            return
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            return
        await self.respond_until_disconnect(request, receive, send)
        body_file.close()

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


def declared_length(scope: dict) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


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
