"""Upstream faults: no worker, worker down, timeouts, worker errors, errors mid-stream, disconnects."""
from __future__ import annotations

import asyncio
import json
import time
from unittest import mock

import httpx
from asgiref.testing import ApplicationCommunicator

from gateway_project.asgi import application
from tests.asgi import http_scope, request, stream_then_disconnect
from tests.base import GatewayTestCase
from tests.sse import parse_sse, read_stream
from upstreams.transport import reset_http_client

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}]}


class FaultTests(GatewayTestCase):
    async def test_no_worker_gives_503(self):
        self.fake.no_worker = True
        self.assertError(await self.post(CHAT, BODY), 503, code=50005)

    async def test_a_refused_connection_is_retried_then_gives_503(self):
        self.fake.worker_error = httpx.ConnectError
        body = self.assertError(await self.post(CHAT, BODY), 503, code="worker_unreachable")
        self.assertIn("could be reached", body["message"])
        self.assertEqual(self.fake.paths().count("/get_worker_address"), 3)

    async def test_a_controller_that_is_down_gives_503(self):
        self.fake.controller_error = httpx.ConnectError
        self.assertError(await self.post(CHAT, BODY), 503, code="controller_unreachable")

    async def test_a_worker_timeout_gives_504(self):
        self.fake.worker_error = httpx.ReadTimeout
        self.assertError(await self.post(CHAT, BODY), 504, code=50006)

    async def test_a_worker_http_error_gives_502(self):
        self.fake.generate_status = 500
        self.assertError(await self.post(CHAT, BODY), 502, code=50001)
        self.assertError(await self.post(CHAT, {**BODY, "stream": True}), 502, code=50001)

    async def test_a_worker_error_chunk_gives_502_with_its_text(self):
        self.fake.error_chunk_after = 0
        body = self.assertError(await self.post(CHAT, BODY), 502)
        self.assertIn("injected", body["message"])

    async def test_an_error_before_the_first_token_is_a_plain_http_error(self):
        self.fake.error_chunk_after = 0
        self.assertError(await self.post(CHAT, {**BODY, "stream": True}), 502)

    async def test_an_error_mid_stream_gives_one_error_event_then_done(self):
        self.fake.error_chunk_after = 2
        response = await self.post(CHAT, {**BODY, "stream": True})
        self.assertEqual(response.status_code, 200)
        events = parse_sse(await read_stream(response))
        self.assertEqual(events[-1], "[DONE]")
        errors = [event for event in events if isinstance(event, dict) and "error" in event]
        self.assertEqual(len(errors), 1)
        self.assertEqual(events[-2], errors[0])
        self.assertEqual(errors[0]["error"]["type"], "server_error")
        self.assertIn("injected", errors[0]["error"]["message"])
        self.assertEqual(self.fake.stream_closed, [True])

    async def test_a_client_disconnect_closes_the_upstream_stream_at_once(self):
        # Warm the key cache: the ASGI handler's DB thread can't see this test's transaction.
        self.assertEqual((await self.get("/v1/models")).status_code, 200)
        self.fake.chunk_delay = 0.05
        parts = await stream_then_disconnect(CHAT, {**BODY, "stream": True}, self.auth, body_messages=2)
        self.assertIn(b"assistant", parts[0])
        self.assertEqual(self.fake.stream_closed, [True])


class PartialOpenTests(GatewayTestCase):
    async def test_streams_opened_before_a_failure_are_closed(self):
        calls = []
        handle = self.fake.handle

        async def second_stream_fails(request):
            if request.url.path == "/worker_generate_stream":
                calls.append(1)
                if len(calls) == 2:
                    return httpx.Response(500, text="boom")
            return await handle(request)

        reset_http_client(httpx.MockTransport(second_stream_fails))
        response = await self.post(CHAT, {**BODY, "stream": True, "n": 2})
        self.assertError(response, 502)
        self.assertEqual(self.fake.stream_closed, [True])


class CancellationTests(GatewayTestCase):
    """A client that leaves cancels its own request, never another's."""

    async def test_a_client_leaving_during_the_key_lookup_does_not_fail_the_others_waiting_for_it(self):
        from openai_api import auth

        real_load_key = auth.load_key

        def slow_load_key(digest):
            time.sleep(0.3)
            return real_load_key(digest)

        auth.key_cache.clear()
        body = json.dumps(BODY).encode()
        with mock.patch.object(auth, "load_key", slow_load_key):
            leaving = ApplicationCommunicator(application, http_scope(CHAT, self.auth))
            staying = ApplicationCommunicator(application, http_scope(CHAT, self.auth))
            await leaving.send_input({"type": "http.request", "body": body})
            await asyncio.sleep(0.05)  # the first request now loads the key; the second will wait for it
            await staying.send_input({"type": "http.request", "body": body})
            await asyncio.sleep(0.05)
            await leaving.send_input({"type": "http.disconnect"})
            start = await staying.receive_output(timeout=5)
            answer = await staying.receive_output(timeout=5)
            await leaving.wait(timeout=2)
        self.assertEqual(start["status"], 200, answer)
        self.assertIn("choices", json.loads(answer["body"]))
        self.assertTrue(await leaving.receive_nothing())  # nothing sent to a client that left

    async def test_a_view_cancelled_from_inside_still_answers_with_a_json_error(self):
        with mock.patch("openai_api.endpoint.authenticate", side_effect=asyncio.CancelledError), \
                self.assertLogs("openai_api.handler", "ERROR"):
            status, body = await request("POST", CHAT, self.auth, json.dumps(BODY).encode())
        self.assertEqual(status, 500)
        self.assertEqual(json.loads(body)["error"]["code"], "internal_error")
