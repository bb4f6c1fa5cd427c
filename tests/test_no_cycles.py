"""The API path leaves no reference cycles behind: a finished request's objects are freed when it
ends, not by the cyclic garbage collector (which then runs rarely: gateway_project/asgi.py's
tune_garbage_collector). Driven as a server drives the application (Django's test client makes
cycles of its own)."""
from __future__ import annotations

import asyncio
import gc
import json

from django.test import override_settings

from gateway_project.asgi import application
from tests.asgi import http_scope
from tests.base import GatewayTestCase

URL = "/v1/chat/completions"
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}


async def served(body: dict, headers: dict[str, str]) -> tuple[int, bytes]:
    raw, sent, never = json.dumps(body).encode(), [], asyncio.Event()

    async def receive() -> dict:
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": raw, "more_body": False}
        await never.wait()

    messages = []

    async def send(message: dict) -> None:
        messages.append(message)

    await application(http_scope(URL, headers), receive, send)
    return messages[0]["status"], b"".join(message.get("body", b"") for message in messages[1:])


@override_settings(GATEWAY_ACCESS_LOG=True)
class NoCyclesTests(GatewayTestCase):
    async def test_chat_requests_leave_no_cyclic_garbage(self):
        for body in (CHAT, {**CHAT, "stream": True}):  # warm: caches, first imports
            self.assertEqual((await served(body, self.auth))[0], 200)
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                for body in (CHAT, {**CHAT, "stream": True}):
                    status, answer = await served(body, self.auth)
                    self.assertEqual(status, 200, answer)
            found = gc.collect()
        finally:
            gc.enable()
        # A cycle made per request (a frame kept by its own local, holding the request, the
        # response and the context: 20 objects a request) would show here as hundreds.
        self.assertLess(found, 40)
