"""Drive the real ASGI application in-process, to test client disconnects as a server sees them."""
from __future__ import annotations

import json

from asgiref.testing import ApplicationCommunicator

from gateway_project.asgi import application


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
