"""The API path leaves no reference cycles behind: a finished request's objects are freed when it
ends, not by the cyclic garbage collector (which then runs rarely: gateway_project/asgi.py's
tune_garbage_collector). Driven as a server drives the application (Django's test client makes
cycles of its own)."""
from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path
from types import FrameType

from django.test import override_settings

from gateway_project.asgi import application
from openai_api.context import RequestContext
from tests.asgi import http_scope
from tests.base import GatewayTestCase

REPO = str(Path(__file__).resolve().parent.parent)
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


def own_code(obj: object) -> bool:
    """A frame of the gateway's code, or one of its request objects."""
    if isinstance(obj, FrameType):
        path = obj.f_code.co_filename
        return path.startswith(REPO) and "/.venv" not in path and "/site-packages/" not in path
    return isinstance(obj, RequestContext)


@override_settings(GATEWAY_ACCESS_LOG=True)
class NoCyclesTests(GatewayTestCase):
    async def test_chat_requests_leave_no_cyclic_garbage(self):
        for body in (CHAT, {**CHAT, "stream": True}):  # warm: caches, first imports
            self.assertEqual((await served(body, self.auth))[0], 200)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds is kept in gc.garbage, to look at
        try:
            for _ in range(20):
                for body in (CHAT, {**CHAT, "stream": True}):
                    status, answer = await served(body, self.auth)
                    self.assertEqual(status, 200, answer)
            gc.collect()
            found = list(gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        # A cycle made per request (a frame kept by its own local, holding the request, the response
        # and the context) would show here as the gateway's frames and contexts. Libraries make a few
        # cycles of their own that are not per request (redis-py: each new connection's refused
        # CLIENT MAINT_NOTIFICATIONS leaves its traceback, ~32 objects; the pool grows on a loaded
        # machine), so those are bounded, not required absent.
        ours = [obj for obj in found if own_code(obj)]
        self.assertEqual([obj.f_code.co_name if isinstance(obj, FrameType) else type(obj).__name__ for obj in ours], [])
        self.assertLess(len(found), 40 * 20)  # a per-request cycle of a library would exceed this
