"""POST /v1/responses through the production path (tests/base.py): against FakeFastChat, and
against FakeOpenAI as a tool-capable OpenAI-compatible upstream; with the official openai client
where its own parsing and stream accumulation matter."""
from __future__ import annotations

import json

import httpx
import openai
from asgiref.sync import sync_to_async
from django.test import override_settings

from gateway_project import state
from keys.models import APIKey, UsageRecord
from keys.usage import usage_writer
from openai_api.auth import key_cache
from tests.asgi import stream_then_disconnect
from tests.base import GatewayTestCase
from tests.fake_openai_server import OPENAI_UPSTREAM, FakeOpenAI, combined_transport
from tests.sse import read_stream
from upstreams.models import Upstream, UpstreamModel

URL = "/v1/responses"
TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"]}}
flush = sync_to_async(usage_writer.flush)


def parse_events(raw: bytes) -> list[dict]:
    """Responses SSE: `event: <type>` + `data: <json>` blocks, never `[DONE]`."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data[len("data: "):])
        assert event["type"] == kind[len("event: "):]
        events.append(event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return events


class SDKMixin:
    """The official openai client, its HTTP calls going through the gateway's production path."""

    def sdk(self, key: str | None = None) -> openai.AsyncOpenAI:
        async def handle(request: httpx.Request) -> httpx.Response:
            headers = {"Authorization": request.headers["authorization"]}
            if request.method == "POST":
                response = await self.async_client.post(request.url.path, request.content,
                                                        content_type="application/json", headers=headers)
            elif request.method == "DELETE":
                response = await self.async_client.delete(request.url.path, headers=headers)
            else:
                response = await self.async_client.get(request.url.path, dict(request.url.params), headers=headers)
            body = await read_stream(response) if response.streaming else response.content
            return httpx.Response(response.status_code, headers={"content-type": response["Content-Type"]},
                                  content=body)

        return openai.AsyncOpenAI(base_url="http://gateway.test/v1", api_key=key or self.plaintext, max_retries=0,
                                  http_client=httpx.AsyncClient(transport=httpx.MockTransport(handle)))


class FastChatResponses(SDKMixin, GatewayTestCase):
    async def test_a_string_input_answers_the_workers_text(self):
        response = await self.post(URL, {"model": "m1", "input": "Hi there", "store": False})
        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        self.assertTrue(body["id"].startswith("resp_"))
        self.assertEqual((body["object"], body["status"], body["model"]), ("response", "completed", "m1"))
        (item,) = body["output"]
        self.assertEqual(item["content"][0]["text"], self.fake.reply)
        usage = body["usage"]
        self.assertEqual(usage["total_tokens"], usage["input_tokens"] + usage["output_tokens"])
        self.assertGreater(usage["output_tokens"], 0)
        self.assertNotIn("output_text", body)

    async def test_the_worker_sees_exactly_the_equivalent_chat_requests_prompt(self):
        await self.post(URL, {"model": "m1", "store": False, "instructions": "SYS", "max_output_tokens": 10,
                              "input": [{"role": "user", "content": "Hi there"},
                                        {"role": "assistant", "content": [{"type": "output_text", "text": "Yo"}]},
                                        {"role": "user", "content": [{"type": "input_text", "text": "again"}]}]})
        await self.post("/v1/chat/completions", {"model": "m1", "max_tokens": 10, "messages": [
            {"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "again"}]})
        responses, chat = self.fake.payloads("/worker_generate_stream")
        self.assertEqual(responses, chat)
        self.assertEqual(responses["prompt"], "SYS USER: Hi there ASSISTANT: Yo</s>USER: again ASSISTANT:")

    async def test_the_sdk_stream_accumulates_to_the_non_streamed_answer(self):
        client = self.sdk()
        plain = await client.responses.create(model="m1", input="Hi there", instructions="Be brief", store=False)
        async with client.responses.stream(model="m1", input="Hi there", instructions="Be brief",
                                           store=False) as stream:
            kinds = [event.type async for event in stream]
            streamed = await stream.get_final_response()
        self.assertEqual(streamed.output_text, plain.output_text)
        self.assertEqual(plain.output_text, self.fake.reply)
        self.assertEqual(streamed.usage.model_dump(), plain.usage.model_dump())
        self.assertEqual([item.type for item in streamed.output], [item.type for item in plain.output])
        self.assertEqual((streamed.status, streamed.instructions), ("completed", "Be brief"))
        self.assertEqual(kinds[:4], ["response.created", "response.in_progress", "response.output_item.added",
                                     "response.content_part.added"])
        self.assertEqual(kinds[-4:], ["response.output_text.done", "response.content_part.done",
                                      "response.output_item.done", "response.completed"])

    async def test_a_stream_is_responses_events_without_done(self):
        response = await self.post(URL, {"model": "m1", "input": "Hi there", "store": False, "stream": True})
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["Content-Type"], "text/event-stream; charset=utf-8")
        raw = await read_stream(response)
        self.assertNotIn(b"[DONE]", raw)
        events = parse_events(raw)
        self.assertEqual(events[-1]["type"], "response.completed")
        text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
        self.assertEqual(text, self.fake.reply)
        self.assertGreater(events[-1]["response"]["usage"]["output_tokens"], 0)

    async def test_max_output_tokens_reached_is_incomplete(self):
        client = self.sdk()
        response = await client.responses.create(model="m1", input="Hi", max_output_tokens=2, store=False)
        self.assertEqual(response.status, "incomplete")
        self.assertEqual(response.incomplete_details.reason, "max_output_tokens")
        self.assertEqual(response.max_output_tokens, 2)
        raw = await read_stream(await self.post(URL, {"model": "m1", "input": "Hi", "max_output_tokens": 2,
                                                      "store": False, "stream": True}))
        events = parse_events(raw)
        self.assertEqual(events[-1]["type"], "response.incomplete")
        self.assertEqual(events[-1]["response"]["incomplete_details"], {"reason": "max_output_tokens"})

    async def test_a_mid_stream_failure_is_response_failed_and_the_stream_ends(self):
        self.fake.error_chunk_after = 1
        response = await self.post(URL, {"model": "m1", "input": "Hi", "store": False, "stream": True})
        self.assertEqual(response.status_code, 200)
        raw = await read_stream(response)
        self.assertNotIn(b"[DONE]", raw)
        events = parse_events(raw)
        self.assertEqual(events[-1]["type"], "response.failed")
        failed = events[-1]["response"]
        self.assertEqual(failed["status"], "failed")
        self.assertEqual(failed["error"]["code"], "server_error")
        self.assertIn("NETWORK ERROR", failed["error"]["message"])
        await flush()
        row = await UsageRecord.objects.aget()
        self.assertEqual((row.endpoint, row.status, row.streamed), (URL, 502, True))

    async def test_a_client_leaving_mid_stream_stops_the_worker_and_is_recorded(self):
        self.fake.chunk_delay = 0.05
        parts = await stream_then_disconnect(URL, {"model": "m1", "input": "Hi", "stream": True}, self.auth,
                                             body_messages=2)
        self.assertIn(b"event: response.created", parts[0])
        self.assertEqual(self.fake.stream_closed, [True])
        await flush()
        row = await UsageRecord.objects.aget()
        self.assertEqual((row.endpoint, row.status), (URL, 499))
        # Nothing was stored: the response never finished
        from openai_api.models import StoredResponse
        self.assertEqual(await StoredResponse.objects.acount(), 0)

    async def test_usage_rows_name_the_responses_endpoint(self):
        await self.post(URL, {"model": "m1", "input": "Hi", "store": False})
        await read_stream(await self.post(URL, {"model": "m1", "input": "Hi", "store": False, "stream": True}))
        await flush()
        rows = [(row.endpoint, row.model, row.status, row.streamed, row.completion_tokens > 0)
                async for row in UsageRecord.objects.order_by("id")]
        self.assertEqual(rows, [(URL, "m1", 200, False, True), (URL, "m1", 200, True, True)])

    async def test_a_tool_sent_to_a_fastchat_only_model_gets_the_400(self):
        response = await self.post(URL, {"model": "m1", "input": "Weather?", "tools": [TOOL]})
        self.assertError(response, 400, param="tools")
        self.assertEqual(self.fake.payloads("/worker_generate_stream"), [])
        response = await self.post(URL, {"model": "m1", "input": [
            {"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]})
        self.assertError(response, 400, param="input")

    async def test_bad_input_gets_openai_style_errors_never_a_500(self):
        cases = [
            ({"input": [{"type": "mystery"}]}, 400, "input[0].type"),
            ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, 400, "input"),
            ({"tools": [{"type": "web_search_preview"}]}, 400, "tools"),
            ({"background": True}, 400, "background"),
            ({"input": None}, 400, "input"),
            ({"model": "nope"}, 404, "model"),
        ]
        for fields, status, param in cases:
            with self.subTest(fields=fields):
                response = await self.post(URL, {"model": "m1", "input": "Hi", **fields})
                self.assertError(response, status, param=param)
        with override_settings(GATEWAY_MAX_RESPONSE_ITEMS=2):
            response = await self.post(URL, {"model": "m1", "input": [{"role": "user", "content": "x"}] * 3})
            self.assertError(response, 400, param="input")
        response = await self.post(URL, b"[1, 2]")
        self.assertError(response, 400)
        self.assertEqual(self.fake.payloads("/worker_generate_stream"), [])

    async def test_a_context_too_small_is_a_400_unless_truncation_is_auto(self):
        self.fake.context_length = 40
        history = []
        for i in range(6):
            history += [{"role": "user", "content": f"question number {i} with some padding words"},
                        {"role": "assistant", "content": f"answer number {i} with some padding words"}]
        body = {"model": "m1", "store": False, "instructions": "SYS",
                "input": [*history, {"role": "user", "content": "last"}]}
        self.assertError(await self.post(URL, body), 400, param="input", code="context_length_exceeded")
        response = await self.post(URL, {**body, "truncation": "auto"})
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response.json()["truncation"], "auto")
        prompt = self.fake.payloads("/worker_generate_stream")[-1]["prompt"]
        self.assertTrue(prompt.startswith("SYS "), prompt)  # the instructions are never dropped
        self.assertIn("USER: last ASSISTANT:", prompt)
        self.assertNotIn("number 0", prompt)
        # Streamed: the retries happen before the first byte
        raw = await read_stream(await self.post(URL, {**body, "truncation": "auto", "stream": True}))
        self.assertEqual(parse_events(raw)[-1]["type"], "response.completed")

    async def test_limits_apply_as_for_chat(self):
        await APIKey.objects.filter(pk=self.key.pk).aupdate(requests_per_minute=2)
        key_cache.clear()
        statuses = [(await self.post(URL, {"model": "m1", "input": "Hi", "store": False})).status_code
                    for _ in range(3)]
        self.assertEqual(statuses, [200, 200, 429])

    async def test_a_model_the_key_may_not_use_is_403(self):
        await APIKey.objects.filter(pk=self.key.pk).aupdate(allowed_models=["other"])
        key_cache.clear()
        self.assertError(await self.post(URL, {"model": "m1", "input": "Hi"}), 403)


class StoredResponses(SDKMixin, GatewayTestCase):
    async def test_a_two_turn_conversation_via_previous_response_id(self):
        client = self.sdk()
        first = await client.responses.create(model="m1", input="My name is Ada.", instructions="FIRST")
        second = await client.responses.create(model="m1", input="What is my name?", previous_response_id=first.id)
        self.assertEqual(second.previous_response_id, first.id)
        self.assertIsNone(second.instructions)
        prompt = self.fake.payloads("/worker_generate_stream")[-1]["prompt"]
        # The stored conversation is prepended; its instructions are not carried over
        self.assertEqual(prompt, f"A chat between a curious user and an artificial intelligence assistant. "
                                 f"The assistant gives helpful, detailed, and polite answers to the user's questions. "
                                 f"USER: My name is Ada. ASSISTANT: {self.fake.reply}</s>USER: What is my name? "
                                 f"ASSISTANT:")

    async def test_a_streamed_response_is_saved_before_completed_is_sent(self):
        from openai_api.responses import store

        raw = await read_stream(await self.post(URL, {"model": "m1", "input": "Hi", "stream": True}))
        final = parse_events(raw)[-1]["response"]
        stored = json.loads(await store.get(self.key, final["id"]))
        self.assertEqual(stored["output"], final["output"])
        self.assertEqual(stored["status"], "completed")

    async def test_store_false_stores_nothing(self):
        from openai_api.errors import NotFoundError
        from openai_api.responses import store

        body = (await self.post(URL, {"model": "m1", "input": "Hi", "store": False})).json()
        with self.assertRaises(NotFoundError):
            await store.get(self.key, body["id"])

    async def test_a_previous_response_id_that_does_not_exist_is_a_404(self):
        response = await self.post(URL, {"model": "m1", "input": "Hi", "previous_response_id": "resp_nothere"})
        self.assertError(response, 404, param="previous_response_id")


class ToolUpstreamResponses(SDKMixin, GatewayTestCase):
    """A tool-capable OpenAI-compatible upstream (with llama.cpp's server's ways)."""

    def setUp(self) -> None:
        super().setUp()
        self.openai = FakeOpenAI(owned_by="me", llama_cpp=True)
        upstream = Upstream(name="llama", kind="openai", base_url=OPENAI_UPSTREAM)
        upstream.save_by()
        UpstreamModel(upstream=upstream, public_name="tools-model", upstream_name="served-model",
                      capabilities=["tools", "json_schema"]).save_by()
        state.reset(transport=combined_transport(self.openai, self.fake))

    async def test_a_function_tool_round_trip_streamed_and_not(self):
        client = self.sdk()
        forced = {"type": "function", "name": "get_weather"}
        plain = await client.responses.create(model="tools-model", input="Weather in Paris?", tools=[TOOL],
                                              tool_choice=forced, store=False)
        (call,) = plain.output
        self.assertEqual((call.type, call.name, call.arguments), ("function_call", "get_weather", '{"city": "Paris"}'))
        sent = self.openai.bodies()[-1]
        self.assertEqual(sent["tools"], [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather in a city", "parameters": TOOL["parameters"]}}])
        self.assertEqual(sent["tool_choice"], {"type": "function", "function": {"name": "get_weather"}})

        async with client.responses.stream(model="tools-model", input="Weather in Paris?", tools=[TOOL],
                                           tool_choice=forced, store=False) as stream:
            deltas = [event.delta async for event in stream if event.type == "response.function_call_arguments.delta"]
            streamed = await stream.get_final_response()
        self.assertEqual("".join(deltas), call.arguments)
        self.assertEqual(streamed.output[0].arguments, call.arguments)
        self.assertEqual(self.openai.bodies()[-1]["stream_options"], {"include_usage": True})

        # The client's output for the call; the model's next answer
        self.openai.tool_arguments = []
        answer = await client.responses.create(model="tools-model", store=False, input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
        self.assertEqual(answer.output_text, "Hello from the fake")
        self.assertEqual(self.openai.bodies()[-1]["messages"][1:], [
            {"role": "assistant", "content": "", "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}])

    async def test_the_round_trip_through_previous_response_id(self):
        client = self.sdk()
        first = await client.responses.create(model="tools-model", input="Weather in Paris?", tools=[TOOL],
                                              tool_choice={"type": "function", "name": "get_weather"})
        call = first.output[0]
        second = await client.responses.create(model="tools-model", previous_response_id=first.id, input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
        self.assertEqual(second.output_text, "Hello from the fake")
        messages = self.openai.bodies()[-1]["messages"]
        self.assertEqual([m["role"] for m in messages], ["user", "assistant", "tool"])
        self.assertEqual(messages[1]["tool_calls"][0]["id"], call.call_id)

    async def test_text_format_json_schema_reaches_the_upstream_as_response_format(self):
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
        response = await self.post(URL, {"model": "tools-model", "input": "x", "store": False, "text": {
            "format": {"type": "json_schema", "name": "answer", "schema": schema}}})
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response.json()["text"]["format"]["name"], "answer")
        # llama.cpp takes json_schema as json_object with its schema (the adapter's deviation)
        self.assertEqual(self.openai.bodies()[-1]["response_format"], {"type": "json_object", "schema": schema})
