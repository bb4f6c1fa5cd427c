"""The gateway's real HTTP transport against the demo worker (served in this process), which,
like FastChat's worker, stops a stream's generation when the stream is closed and finishes a
/worker_generate one whatever its client does: timeouts measure silence, every upstream call has
an overall deadline, and a non-streamed request the gateway abandons frees the worker at once."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import httpx
from aiohttp import web
from asgiref.testing import ApplicationCommunicator
from django.test import override_settings

from gateway_project.asgi import application
from keys.usage import usage_writer
from tests.asgi import http_scope
from tests.base import GatewayTestCase
from tests.procs import free_port
from tests.sse import parse_sse, read_stream
from upstreams.fastchat.demo_worker import DemoWorker, parse_args
from upstreams.transport import get_transport, reset_http_client

CHAT = "/v1/chat/completions"


class Router(httpx.AsyncBaseTransport):
    """Controller calls to the fake, worker calls over the network (the production transport)."""

    def __init__(self, fake: httpx.AsyncBaseTransport):
        self.fake = fake
        reset_http_client()
        self.network = get_transport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "controller.test":
            return await self.fake.handle_async_request(request)
        return await self.network.handle_async_request(request)

    async def aclose(self) -> None:
        await self.network.aclose()


class DemoWorkerTransportTests(GatewayTestCase):
    @contextlib.asynccontextmanager
    async def demo_worker(self, *args: str) -> AsyncIterator[DemoWorker]:
        port = free_port()
        worker = DemoWorker(parse_args(["--no-register", "--host", "127.0.0.1", "--port", str(port),
                                        "--model-names", "m1", *args]))
        runner = web.AppRunner(worker.make_app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self.fake.workers = [f"http://127.0.0.1:{port}"]
        router = Router(self.fake.transport())
        reset_http_client(router)
        try:
            yield worker
        finally:
            await router.aclose()
            await runner.cleanup()

    async def wait_for_idle(self, worker: DemoWorker, timeout: float = 2.0) -> float:
        """Seconds until the worker has no generation running and no slot taken."""
        started = time.monotonic()
        while worker.generating or worker.queue_length():
            if time.monotonic() - started > timeout:
                self.fail(f"the worker is still busy: {worker.generating} generating, queue {worker.queue_length()}")
            await asyncio.sleep(0.01)
        return time.monotonic() - started

    async def test_a_client_leaving_a_non_streamed_request_frees_the_worker_at_once(self):
        await self.get("/v1/models")  # warm the key cache (the handler's thread cannot see the test's rows)
        async with self.demo_worker("--token-delay", "0.05", "--reply-words", "200") as worker:
            body = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200}
            communicator = ApplicationCommunicator(application, http_scope(CHAT, self.auth))
            await communicator.send_input({"type": "http.request", "body": json.dumps(body).encode()})
            await asyncio.sleep(0.5)  # about 10 of the 200 tokens (10 s) generated
            self.assertEqual(worker.generating, 1)
            await communicator.send_input({"type": "http.disconnect"})
            await communicator.wait(timeout=2)
            self.assertLess(await self.wait_for_idle(worker), 0.5)
            [entry] = [e for e in worker.log if e["path"] == "/worker_generate_stream"]
            self.assertTrue(entry["client_disconnected"])
        event = usage_writer.pending[-1]
        self.assertEqual((event.status, event.streamed), (499, False))
        self.assertGreater(event.completion_tokens, 2)
        self.assertLess(event.completion_tokens, 100)

    @override_settings(FASTCHAT_WORKER_API_TIMEOUT=0.4)
    async def test_the_worker_timeout_measures_silence_not_the_whole_answer(self):
        async with self.demo_worker("--token-delay", "0.1", "--reply-words", "12") as worker:
            started = time.monotonic()
            response = await self.post(CHAT, {"model": "m1", "messages": [{"role": "user", "content": "Hi"}]})
            self.assertEqual(response.status_code, 200, response.content)
            self.assertGreater(time.monotonic() - started, 1.0)  # longer than the timeout, never silent that long
            self.assertEqual(response.json()["usage"]["completion_tokens"], 12)
            await self.wait_for_idle(worker)

    @override_settings(FASTCHAT_WORKER_API_TIMEOUT=0.3)
    async def test_a_silent_worker_times_out_and_its_generation_stops(self):
        async with self.demo_worker("--token-delay", "1.0", "--reply-words", "50") as worker:
            started = time.monotonic()
            self.assertError(await self.post(CHAT, {"model": "m1", "messages": [{"role": "user", "content": "Hi"}]}),
                             504, code=50006)
            self.assertLess(time.monotonic() - started, 1.0)
            self.assertLess(await self.wait_for_idle(worker), 0.5)

    @override_settings(GATEWAY_UPSTREAM_DEADLINE=0.8)
    async def test_a_worker_trickling_forever_is_cut_at_the_deadline(self):
        async with self.demo_worker("--token-delay", "0.05", "--reply-words", "1000", "--stream-interval", "1") as worker:
            body = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1000}
            started = time.monotonic()
            self.assertError(await self.post(CHAT, body), 504, code=50006)
            self.assertLess(time.monotonic() - started, 1.5)
            await self.wait_for_idle(worker)
            self.assertGreater(usage_writer.pending[-1].completion_tokens, 0)

            response = await self.post(CHAT, {**body, "stream": True})
            events = parse_sse(await read_stream(response))
            self.assertEqual(events[-1], "[DONE]")
            self.assertEqual(events[-2]["error"]["code"], "timeout")
            await self.wait_for_idle(worker)
