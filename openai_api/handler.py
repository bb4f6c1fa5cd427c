"""An ASGI handler for the OpenAI API path with its own, async-only middleware chain."""
from __future__ import annotations

from typing import Any, Awaitable, Callable

import orjson
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class APIHandler(ASGIHandler):
    """Django's ASGI handler, built from settings.API_MIDDLEWARE instead of MIDDLEWARE."""

    def load_middleware(self, is_async: bool = False) -> None:
        # BaseHandler.load_middleware reads settings.MIDDLEWARE; swap it for the build only.
        full_stack = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full_stack

    async def handle(self, scope: dict, receive: Any, send: Any) -> None:
        # Refuse an oversized body before reading it (Django would spool it all first).
        if declared_length(scope) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
            await send_payload_too_large(send)
            return
        await super().handle(scope, receive, send)


def declared_length(scope: dict) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def send_payload_too_large(send: Any) -> None:
    from openai_api.errors import PayloadTooLargeError, error_body

    body = orjson.dumps(error_body(PayloadTooLargeError()))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
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
