"""Drive the real ASGI application in-process, as a server would.

`ProductionAsyncClient` is the test client of every API test (tests/base.py): requests under
settings.API_PATH_PREFIXES go through `gateway_project.asgi.application`, so through the API
handler (openai_api/handler.py) and its own middleware chain, exactly as uvicorn calls it.
Other paths (the admin, /api/keys/) keep Django's test handler, which carries the test's
session cookies. The helpers below also test client disconnects as a server sees them.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

from asgiref.testing import ApplicationCommunicator
from django.conf import settings
from django.core.signals import got_request_exception
from django.http import HttpResponse, StreamingHttpResponse
from django.test import AsyncClient

from gateway_project.asgi import application

# A test that waits longer than this for a response is stuck, not slow.
RESPONSE_TIMEOUT = 60.0


def http_scope(path: str, headers: dict[str, str], method: str = "POST") -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                    *((name.lower().encode(), value.encode()) for name, value in headers.items())],
    }


async def stream_then_disconnect(path: str, body: dict, headers: dict[str, str], body_messages: int = 1) -> list[bytes]:
    """POST a streaming request, read the status and `body_messages` body parts, then
    disconnect like a client closing its socket; returns the parts read."""
    communicator = ApplicationCommunicator(application, http_scope(path, headers))
    await communicator.send_input({"type": "http.request", "body": json.dumps(body).encode()})
    start = await communicator.receive_output(timeout=5)
    assert start["status"] == 200, start
    parts = [(await communicator.receive_output(timeout=5))["body"] for _ in range(body_messages)]
    await communicator.send_input({"type": "http.disconnect"})
    await communicator.wait(timeout=2)
    return parts


async def request(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, bytes]:
    """One request through the real ASGI application; returns (status, body)."""
    communicator = ApplicationCommunicator(application, http_scope(path, headers or {}, method))
    await communicator.send_input({"type": "http.request", "body": body})
    start = await communicator.receive_output(timeout=5)
    chunks = []
    while True:
        message = await communicator.receive_output(timeout=5)
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    await communicator.wait(timeout=1)
    return start["status"], b"".join(chunks)


async def serve(scope: dict, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], list[bytes]]:
    """Run the application for one request, the client reading everything and staying
    connected; returns the status, the headers and the body parts."""
    sent: list[dict] = []
    delivered = False
    stay = asyncio.Event()  # never set: the client does not leave

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await stay.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(application(scope, receive, send), RESPONSE_TIMEOUT)
    start = next(message for message in sent if message["type"] == "http.response.start")
    parts = [message.get("body", b"") for message in sent if message["type"] == "http.response.body"]
    return start["status"], list(start.get("headers", [])), parts


async def replay(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        if part:
            yield part


def as_response(status: int, headers: list[tuple[bytes, bytes]], parts: list[bytes]) -> HttpResponse:
    """Django's response classes as containers of what the server sent, so tests read it
    as they read the test client's responses (response["X"], .content, async iteration)."""
    names = {name.decode("latin1").lower(): value.decode("latin1") for name, value in headers}
    if names.get("content-type", "").startswith("text/event-stream"):
        response: HttpResponse = StreamingHttpResponse(replay(parts), status=status)
    else:
        response = HttpResponse(b"".join(parts), status=status)
    del response["Content-Type"]
    for name, value in headers:
        response.headers[name.decode("latin1")] = value.decode("latin1")
    return response


def is_api_path(path: str) -> bool:
    return path.startswith(tuple(settings.API_PATH_PREFIXES))


class ProductionAsyncClient(AsyncClient):
    """Django's AsyncClient whose API requests go through the production ASGI application.

    Its scope is the one Django's client builds (headers, query string, body); the view runs
    in the test's event loop and thread, so it sees the test's database transaction. An
    exception a view lets escape is re-raised in the test, as Django's client does.
    """

    async def request(self, **request: Any) -> HttpResponse:
        if not is_api_path(request["path"]):
            return await super().request(**request)
        scope = self._base_scope(**request)
        body_file = scope.pop("_body_file", None)
        body = body_file.read() if body_file is not None else b""
        scope.setdefault("query_string", "")
        if isinstance(scope["query_string"], str):
            scope["query_string"] = scope["query_string"].encode()
        scope.setdefault("raw_path", scope["path"].encode())
        scope.setdefault("root_path", "")
        exception_uid = f"request-exception-{id(request)}"
        got_request_exception.connect(self.store_exc_info, dispatch_uid=exception_uid)
        try:
            response = as_response(*await serve(scope, body))
        finally:
            got_request_exception.disconnect(dispatch_uid=exception_uid)
        self.check_exception(response)
        response.client = self
        response.request = request
        response.json = partial(self._parse_json, response)
        return response
