"""Upstream faults cost nothing and leak nothing: abandoned requests stop the worker's generation
and are charged for what it produced; garbage from a controller or worker is a 502 (never a 500);
finish hooks all run, the lease release first; worker addresses are checked; error answers never
name an internal address. All through the production request path, against FakeFastChat."""
from __future__ import annotations

import asyncio
import json
import logging
from unittest import mock

import httpx
from asgiref.testing import ApplicationCommunicator
from django.test import override_settings

from gateway_project.asgi import application
from keys.limits import get_limit_store
from keys.models import APIKey
from keys.usage import usage_writer
from openai_api.auth import key_cache
from tests.asgi import http_scope
from tests.base import GatewayTestCase
from tests.fakes import CONTROLLER, WORKER
from tests.sse import parse_sse, read_stream
from upstreams.adapters import reset_adapters
from upstreams.transport import reset_http_client

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40}
LONG_REPLY = " ".join(f"w{i}" for i in range(40))


async def leave_after(path: str, body: dict, headers: dict[str, str], seconds: float) -> None:
    """Send a request, then disconnect after `seconds` without reading the answer."""
    communicator = ApplicationCommunicator(application, http_scope(path, headers))
    await communicator.send_input({"type": "http.request", "body": json.dumps(body).encode()})
    await asyncio.sleep(seconds)
    await communicator.send_input({"type": "http.disconnect"})
    await communicator.wait(timeout=2)


class AbandonedRequestTests(GatewayTestCase):
    """A non-streamed request the gateway abandons stops the worker's generation (it was a
    stream) and is charged for the tokens produced up to then."""

    async def test_a_client_leaving_a_non_streamed_request_stops_the_generation(self):
        await self.get("/v1/models")  # warm the key cache (the handler's thread cannot see the test's rows)
        self.fake.reply, self.fake.chunk_delay = LONG_REPLY, 0.05
        await leave_after(CHAT, BODY, self.auth, 0.3)
        self.assertEqual(self.fake.paths()[-1], "/worker_generate_stream")
        self.assertEqual(self.fake.stream_closed, [True])
        self.assertEqual(self.fake.in_flight, 0)
        event = usage_writer.pending[-1]
        self.assertEqual((event.status, event.error_code, event.streamed), (499, "client_disconnected", False))
        self.assertGreater(event.completion_tokens, 0)
        self.assertLess(event.completion_tokens, 39)
        self.assertGreater(event.prompt_tokens, 0)

    async def test_a_silent_worker_times_out_a_non_streamed_request_which_is_charged(self):
        self.fake.reply, self.fake.silent_after_chunks = LONG_REPLY, 4
        self.assertError(await self.post(CHAT, BODY), 504, code=50006)
        self.assertEqual(self.fake.stream_closed, [True])
        self.assertEqual(self.fake.in_flight, 0)
        event = usage_writer.pending[-1]
        self.assertEqual(event.status, 504)
        self.assertGreater(event.completion_tokens, 0)

    async def test_an_error_in_one_choice_stops_the_others(self):
        self.fake.reply, self.fake.chunk_delay = LONG_REPLY, 0.02
        handle = self.fake.handle
        opened = []

        async def second_generation_fails(request):
            if request.url.path == "/worker_generate_stream":
                opened.append(1)
                if len(opened) == 2:
                    return httpx.Response(200, stream=httpx.ByteStream(b'{"text": "boom", "error_code": 50001}\0'))
            return await handle(request)

        reset_http_client(httpx.MockTransport(second_generation_fails))
        self.assertError(await self.post(CHAT, {**BODY, "n": 2}), 502)
        self.assertEqual(self.fake.stream_closed, [True])
        self.assertEqual(self.fake.in_flight, 0)

    async def test_the_fake_worker_like_fastchats_finishes_a_generation_whose_client_left(self):
        """What the gateway no longer does: a /worker_generate call, abandoned, keeps the worker busy."""
        self.fake.reply, self.fake.chunk_delay = LONG_REPLY, 0.02
        params = {"prompt": "Hi", "max_new_tokens": 40, "echo": False}
        call = asyncio.ensure_future(self.fake.handle(httpx.Request("POST", WORKER + "/worker_generate", json=params)))
        await asyncio.sleep(0.1)
        call.cancel()
        await asyncio.sleep(0.05)
        self.assertEqual(self.fake.in_flight, 1)
        for _ in range(100):
            if not self.fake.in_flight:
                break
            await asyncio.sleep(0.02)
        self.assertEqual(self.fake.in_flight, 0)


class LimitedKeyTests(GatewayTestCase):
    async def limit_to_one_parallel_request(self) -> None:
        await APIKey.objects.filter(pk=self.key.pk).aupdate(parallel_requests=1)
        key_cache.clear()

    async def assertSlotFree(self) -> None:
        self.assertEqual(await get_limit_store().parallel_in_use(self.key.pk), 0)


class InvalidTokenCountTests(LimitedKeyTests):
    """The seen case: a worker reporting completion_tokens -1 made the metrics hook raise, the client
    got a plain 500, no usage row was written and a key limited to one parallel request got 429
    until its lease expired; streamed, the client got completion_tokens -1 and no [DONE]."""

    def report(self, **usage) -> None:
        self.fake.mutate_chunk = lambda chunk: {**chunk, "usage": {**chunk["usage"], **usage}} if "usage" in chunk else chunk

    async def test_a_negative_count_is_a_502_and_costs_no_slot(self):
        await self.limit_to_one_parallel_request()
        self.report(completion_tokens=-1)
        body = self.assertError(await self.post(CHAT, BODY), 502, code="upstream_error")
        self.assertIn("token count", body["message"])
        await self.assertSlotFree()
        event = usage_writer.pending[-1]
        self.assertEqual((event.status, event.completion_tokens), (502, 0))
        self.assertGreater(event.prompt_tokens, 0)  # the valid count is kept
        self.fake.mutate_chunk = None
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)

    async def test_streamed_the_usage_chunk_becomes_an_error_event_then_done(self):
        await self.limit_to_one_parallel_request()
        self.report(completion_tokens=-1)
        response = await self.post(CHAT, {**BODY, "stream": True, "stream_options": {"include_usage": True}})
        self.assertEqual(response.status_code, 200)
        raw = await read_stream(response)
        events = parse_sse(raw)
        self.assertEqual(events[-1], "[DONE]")
        self.assertIn("error", events[-2])
        self.assertNotIn(b"-1", raw)
        await self.assertSlotFree()
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 502)  # admitted: the slot was free

    async def test_streamed_without_usage_the_stream_ends_normally_and_is_recorded(self):
        self.report(completion_tokens=-1)
        response = await self.post(CHAT, {**BODY, "stream": True})
        events = parse_sse(await read_stream(response))
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(events[-2]["choices"][0]["finish_reason"], "stop")
        event = usage_writer.pending[-1]
        self.assertEqual((event.status, event.completion_tokens), (200, 0))

    async def test_counts_beyond_32_bits_fractions_and_strings_are_refused(self):
        for value in (3_000_000_000, 1.5, "7", True, None):
            with self.subTest(value=value):
                self.report(prompt_tokens=value)
                self.assertError(await self.post(COMPLETIONS, {"model": "m1", "prompt": "Hi"}), 502)
                event = usage_writer.pending[-1]
                self.assertEqual(event.prompt_tokens, 0)
                self.assertLessEqual(event.completion_tokens, 2**31 - 1)


class GarbageTests(GatewayTestCase):
    """Whatever a worker or the controller sends, the answer is an OpenAI-style error, never a 500."""

    async def assertBadGateway(self, *bodies: tuple[str, dict], streams_may_ignore_it: bool = False) -> None:
        """A 502, or for a stream, an error event then [DONE] (or, if the garbage is in a field the
        stream does not use, such as usage without include_usage, a clean end)."""
        for path, body in bodies:
            with self.subTest(path=path, stream=body.get("stream", False)):
                response = await self.post(path, body)
                if response.status_code == 200 and response.streaming:  # an error after the stream started
                    events = parse_sse(await read_stream(response))
                    self.assertEqual(events[-1], "[DONE]")
                    if not (streams_may_ignore_it and "choices" in events[-2]):
                        self.assertEqual(events[-2]["error"]["type"], "server_error")
                else:
                    self.assertError(response, 502)

    def all_kinds(self) -> list[tuple[str, dict]]:
        completion = {"model": "m1", "prompt": "Hi", "logprobs": 1}
        return [(CHAT, BODY), (CHAT, {**BODY, "stream": True}), (COMPLETIONS, completion),
                (COMPLETIONS, {**completion, "stream": True})]

    async def test_chunks_that_are_not_json_objects(self):
        for raw in (b"{not json\0", b"[1, 2]\0", b"42\0", b'"text"\0', b'{"a": 1e999}\0'):
            self.fake.raw_stream = raw
            await self.assertBadGateway(*self.all_kinds())

    async def test_chunk_fields_of_the_wrong_type(self):
        for field, value in (("text", 5), ("text", ["a"]), ("finish_reason", {"x": 1}), ("error_code", "x"),
                             ("error_code", [1])):
            self.fake.mutate_chunk = lambda chunk, field=field, value=value: {**chunk, field: value}
            await self.assertBadGateway(*self.all_kinds())
        for field, value in (("logprobs", "x"), ("logprobs", {"tokens": 5}), ("usage", "lots"), ("usage", [1])):
            self.fake.mutate_chunk = lambda chunk, field=field, value=value: {**chunk, field: value}
            await self.assertBadGateway(*self.all_kinds(), streams_may_ignore_it=True)

    async def test_an_error_chunk_with_garbage_text_is_still_a_clean_error(self):
        self.fake.mutate_chunk = lambda chunk: {"text": {"nested": True}, "error_code": 10**30}
        body = self.assertError(await self.post(CHAT, BODY), 502)
        self.assertEqual(body["code"], 50001)
        self.assertIsInstance(body["message"], str)

    @override_settings(GATEWAY_UPSTREAM_MAX_BYTES=4096)
    async def test_a_chunk_growing_without_its_nul_is_cut_off(self):
        self.fake.raw_stream = b'{"text": "' + b"a" * 10_000
        await self.assertBadGateway(*self.all_kinds())
        self.fake.raw_stream = None
        reset_adapters()  # forget the template fetched above
        self.fake.answers["/worker_get_conv_template"] = {"conv": {"padding": "x" * 10_000}}
        body = self.assertError(await self.post(CHAT, BODY), 502)
        self.assertIn("GATEWAY_UPSTREAM_MAX_BYTES", body["message"])

    async def test_worker_answers_of_the_wrong_shape(self):
        cases = {
            "/model_details": [{"context_length": "big"}, {"context_length": -5}, {"context_length": 0}, [], None],
            "/count_token": [{"count": -3}, {"count": "3"}, {"count": 2**40}, {}],
            "/worker_get_conv_template": [{"conv": "vicuna"}, {"conv": {"name": 1}}, {"conv": {**_conv(), "sep": 5}}, 7],
        }
        for path, answers in cases.items():
            for answer in answers:
                with self.subTest(path=path, answer=answer):
                    reset_adapters()  # nothing cached from an earlier case
                    self.fake.answers = {path: answer}
                    body = {"model": "m1", "messages": BODY["messages"]}  # no max_tokens: count_token is asked
                    self.assertError(await self.post(CHAT, body), 502)

    async def test_controller_answers_of_the_wrong_shape(self):
        for path, answer in (("/list_models", {"models": "m1"}), ("/list_models", [1]), ("/list_models", {"models": [1]}),
                             ("/get_worker_address", {"address": 5}), ("/get_worker_address", None)):
            with self.subTest(path=path, answer=answer):
                reset_adapters()
                self.fake.answers = {path: answer}
                self.assertError(await self.post(CHAT, BODY), 502)


def _conv() -> dict:
    from tests.fakes import worker_template

    return worker_template("vicuna_v1.1")


class FinishHookTests(LimitedKeyTests):
    """Each finish hook runs even when another raises; the lease is released first."""

    async def test_a_failing_metrics_hook_neither_fails_the_request_nor_keeps_the_slot(self):
        await self.limit_to_one_parallel_request()
        with mock.patch("openai_api.endpoint.observe", side_effect=ValueError("Counters can only be incremented")), \
                self.assertLogs("openai_api.context", logging.ERROR) as logs:
            response = await self.post(CHAT, BODY)
            self.assertEqual(response.status_code, 200, response.content)
            streamed = await self.post(CHAT, {**BODY, "stream": True})
            self.assertEqual(parse_sse(await read_stream(streamed))[-1], "[DONE]")
        self.assertEqual(len([line for line in logs.output if "Finish hook" in line]), 2)
        self.assertEqual([event.status for event in usage_writer.pending], [200, 200])  # usage hook still ran
        await self.assertSlotFree()
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)

    async def test_the_lease_is_released_before_the_other_hooks_run(self):
        await self.limit_to_one_parallel_request()
        order = []
        store = get_limit_store()
        real_release = store.release_soon

        def release(*args, **kwargs):
            order.append("release")
            return real_release(*args, **kwargs)

        def record(ctx):
            order.append("usage")
            raise RuntimeError("the usage queue broke")

        with mock.patch.object(store, "release_soon", release), mock.patch("openai_api.endpoint.record_usage", record), \
                self.assertLogs("openai_api.context", logging.ERROR):
            self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        self.assertEqual(order, ["release", "usage"])
        await self.assertSlotFree()


class WorkerAddressTests(GatewayTestCase):
    async def test_addresses_that_are_not_http_are_refused(self):
        for address in ("ftp://worker.test", "file:///etc/passwd", "worker.test:21002", "http://", "javascript:alert(1)"):
            with self.subTest(address=address):
                reset_adapters()
                self.fake.workers = [address]
                body = self.assertError(await self.post(CHAT, BODY), 502, code="invalid_worker_address")
                self.assertIn("worker address", body["message"])
                self.assertNotIn(address, json.dumps(body))
        self.assertNotIn("/worker_generate_stream", self.fake.paths())

    async def test_the_allow_list_is_applied_when_set(self):
        # The fake controller hands these out in turn, starting with the second.
        self.fake.workers = ["https://elsewhere.test:8443", "http://worker.test"]
        with self.settings(GATEWAY_WORKER_ALLOWED_HOSTS=["worker.test", "other.test:9000"]):
            reset_adapters()
            self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
            self.assertError(await self.post(CHAT, BODY), 502, code="invalid_worker_address")
        with self.settings(GATEWAY_WORKER_ALLOWED_HOSTS=["elsewhere.test:8443"]):
            reset_adapters()
            self.assertError(await self.post(CHAT, BODY), 502, code="invalid_worker_address")


class NoInternalAddressTests(GatewayTestCase):
    """Error answers (bodies and stream error events) never name the controller or a worker."""

    FAULTS = {
        "controller down": {"controller_error": httpx.ConnectError},
        "controller timeout": {"controller_error": httpx.ReadTimeout},
        "worker refuses": {"worker_error": httpx.ConnectError},
        "worker timeout": {"worker_error": httpx.ReadTimeout},
        "worker HTTP 500": {"generate_status": 500},
        "no worker": {"no_worker": True},
        "invalid JSON": {"raw_stream": b"<html>oops</html>\0"},
        "error chunk": {"error_chunk_after": 0},
        "error mid-stream": {"error_chunk_after": 2},
        "silent mid-stream": {"silent_after_chunks": 2},
        "bad address": {"workers": ["gopher://worker.test"]},
    }

    async def test_no_error_answer_contains_an_upstream_address(self):
        for name, fault in self.FAULTS.items():
            for path, body in ((CHAT, BODY), (CHAT, {**BODY, "stream": True}),
                               (COMPLETIONS, {"model": "m1", "prompt": "Hi", "stream": True}),
                               ("/v1/embeddings", {"model": "embed", "input": ["x"]})):
                with self.subTest(fault=name, path=path, stream=body.get("stream", False)):
                    reset_adapters()
                    self.fake = type(self.fake)(**fault)
                    reset_http_client(self.fake.transport())
                    response = await self.post(path, body)
                    raw = await read_stream(response) if response.streaming else response.content
                    if response.status_code == 200 and b'"error"' not in raw:
                        continue  # this fault does not touch this route
                    self.assertIn(b'"error"', raw)
                    for address in (CONTROLLER, WORKER, "controller.test", "worker.test"):
                        self.assertNotIn(address.encode(), raw)

    async def test_the_access_log_keeps_the_address(self):
        self.fake.worker_error = httpx.ConnectError
        with self.assertLogs("gateway.access", logging.INFO) as logs:
            await self.post(CHAT, BODY)
        self.assertIn(WORKER, logs.output[-1])
