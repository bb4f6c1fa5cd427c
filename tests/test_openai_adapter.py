"""The OpenAI-compatible adapter (upstreams/openai/) against FakeOpenAI.

Calls are parsed by the face's own parser (openai_api/protocol.py), so `body` and `needs` are
what production passes. The adapter's transport is the fake's MockTransport, or, for timeouts and
refused connections, the real aiohttp transport against the fake served on a port.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from httpx_aiohttp import AiohttpTransport

from gateway_project import state
from openai_api.protocol import parse_chat, parse_completion, parse_embeddings
from tests.base import GatewayTestCase
from tests.fake_openai_server import OPENAI_UPSTREAM, FakeOpenAI, combined_transport
from upstreams.base import Route
from upstreams.errors import (
    BadAnswer,
    ClientFailure,
    CredentialsRejected,
    RateLimited,
    ServerFailure,
    Unreachable,
    UpstreamTimeout,
)
from upstreams.models import Upstream, UpstreamModel
from upstreams.openai import adapter as adapter_module
from upstreams.openai import deviations
from upstreams.openai.adapter import OpenAIAdapter
from upstreams.openai.rewrite import rewrite_model
from upstreams.openai.sse import EventTooLarge, SSEParser
from upstreams.registry import UpstreamSpec

PUBLIC, SERVED = "public-model", "served-model"
MESSAGES = [{"role": "user", "content": "Hello there"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}


def spec(base_url: str = OPENAI_UPSTREAM, **fields: Any) -> UpstreamSpec:
    return UpstreamSpec(name="vllm-a", kind="openai", base_url=base_url, **fields)


def route(upstream_model: str = SERVED) -> Route:
    return Route(upstream="vllm-a", kind="openai", public_model=PUBLIC, upstream_model=upstream_model)


def chat_call(**fields: Any):
    return parse_chat({"model": PUBLIC, "messages": MESSAGES, **fields})


async def each_chunk(stream) -> AsyncIterator[bytes]:
    """A stream's chunks one at a time, however they were batched (upstreams/base.py)."""
    async for batch in stream:
        for chunk in batch:
            yield chunk


class Harness:
    """An adapter whose transport is `transport` (the fake's MockTransport by default)."""

    def __init__(self, monkeypatch, fake: FakeOpenAI, transport: httpx.AsyncBaseTransport | None = None, *,
                 adapter: OpenAIAdapter | None = None, **spec_fields: Any):
        self.fake = fake
        flavor = spec_fields.pop("flavor", None)
        self.adapter = adapter or OpenAIAdapter(spec(fake.base_url, **spec_fields), deadline=30, max_bytes=1 << 20)
        if flavor:
            self.adapter.flavor = deviations.named(flavor)  # as a registry spec's `flavor` would
        monkeypatch.setattr(adapter_module, "transport", lambda: transport or fake.transport())

    def run(self, coroutine):
        return asyncio.run(coroutine)

    async def collect(self, stream) -> list[dict]:
        chunks = []
        try:
            async for raw in each_chunk(stream):
                assert isinstance(raw, bytes)
                chunks.append(orjson.loads(raw))
        finally:
            await stream.aclose()
        return chunks


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
def llama() -> FakeOpenAI:
    return FakeOpenAI(llama_cpp=True, owned_by="me", send_usage=True)


# Pass-through


def test_every_field_the_client_sent_is_forwarded_with_only_model_rewritten(monkeypatch, fake):
    h = Harness(monkeypatch, fake)
    fields = {
        "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "logprobs": True, "top_logprobs": 2, "logit_bias": {"50256": -100}, "seed": 7, "stop": ["\n"], "n": 2,
        "user": "u-1", "max_completion_tokens": 12, "metadata": {"who": "me"}, "a_field_nobody_knows": [1, {"x": 2}],
    }
    answer = h.run(h.adapter.chat(chat_call(**fields), route()))
    sent = fake.bodies()[0]
    assert sent == {"model": SERVED, "messages": MESSAGES, **fields}
    assert answer.body["model"] == PUBLIC
    assert answer.body["system_fingerprint"] == "fp_fake"  # the rest as the upstream sent it
    assert [choice["index"] for choice in answer.body["choices"]] == [0, 1]
    assert answer.usage.prompt_tokens == 7 and not answer.usage.estimated


def test_the_configured_upstream_model_is_sent_whatever_the_client_named(monkeypatch, fake):
    h = Harness(monkeypatch, fake)
    h.run(h.adapter.chat(chat_call(), route("org/Model-7B")))
    assert fake.bodies()[0]["model"] == "org/Model-7B"


def test_api_key_and_extra_headers_are_sent(monkeypatch, fake):
    h = Harness(monkeypatch, fake, api_key="sk-upstream-secret", extra_headers=(("X-Team", "research"),))
    h.run(h.adapter.chat(chat_call(), route()))
    headers = fake.requests[-1].headers
    assert headers["authorization"] == "Bearer sk-upstream-secret"
    assert headers["x-team"] == "research"
    assert headers["content-type"] == "application/json"


def test_a_stream_comes_back_chunk_for_chunk_with_the_public_model(monkeypatch, fake):
    h = Harness(monkeypatch, fake)

    async def scenario():
        stream = await h.adapter.chat_stream(chat_call(stream=True), route())
        raw = [chunk async for chunk in each_chunk(stream)]
        await stream.aclose()
        return raw, stream.usage

    raw, usage = h.run(scenario())
    expected = [json.dumps({**chunk, "model": PUBLIC}, separators=(",", ":")).encode()
                for chunk in fake.chunks("chat", {"model": SERVED})]
    assert raw == expected  # byte for byte, only the model replaced
    assert fake.bodies()[0]["stream_options"] == {"include_usage": True}  # the gateway asked for usage
    assert usage.prompt_tokens == 7 and usage.completion_tokens == 4 and not usage.estimated


def test_a_streams_batches_are_the_chunks_each_read_completed(monkeypatch, fake):
    """What arrives in one read leaves as one batch (one write to the client); a chunk split over
    two reads comes alone, when its second half arrives, never held for the next one."""

    async def batches(h):
        stream = await h.adapter.chat_stream(chat_call(stream=True), route())
        try:
            return [batch async for batch in stream]
        finally:
            await stream.aclose()

    h_apart = Harness(monkeypatch, fake)  # the fake sends each event in two reads
    apart = h_apart.run(batches(h_apart))
    assert [len(batch) for batch in apart] == [1] * len(fake.chunks("chat", {"model": SERVED}))
    together = b"".join(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"
                        for chunk in fake.chunks("chat", {"model": SERVED, "stream_options": {"include_usage": True}}))
    h_together = Harness(monkeypatch, FakeOpenAI(raw_stream=together + b"data: [DONE]\n\n"))
    one = h_together.run(batches(h_together))
    # the same chunks (the usage chunk the gateway asked for, not the client, dropped), in one batch
    assert len(one) == 1 and one[0] == [chunk for batch in apart for chunk in batch]


def test_the_usage_chunk_reaches_the_client_only_if_it_asked(monkeypatch, fake):
    h = Harness(monkeypatch, fake)

    async def chunks(**fields):
        return await h.collect(await h.adapter.chat_stream(chat_call(stream=True, **fields), route()))

    without = h.run(chunks())
    assert all("usage" not in chunk for chunk in without)
    asked = h.run(chunks(stream_options={"include_usage": True}))
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] == 4
    assert asked[-1]["model"] == PUBLIC


def test_completions_and_embeddings_pass_through(monkeypatch, fake):
    h = Harness(monkeypatch, fake)
    answer = h.run(h.adapter.completions(parse_completion({"model": PUBLIC, "prompt": "Hi", "echo": False,
                                                           "suffix": "x"}), route()))
    assert answer.body["choices"][0]["text"] == "Hello from the fake" and answer.body["model"] == PUBLIC
    assert fake.bodies("/v1/completions")[0]["suffix"] == "x"
    chunks = h.run(_stream(h, h.adapter.completions_stream,
                           parse_completion({"model": PUBLIC, "prompt": "Hi", "stream": True})))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "Hello from the fake"
    embeddings = h.run(h.adapter.embeddings(parse_embeddings({"model": PUBLIC, "input": ["a", "b"],
                                                              "dimensions": 2}), route()))
    assert len(embeddings.body["data"]) == 2 and embeddings.usage.prompt_tokens == 6
    assert fake.bodies("/v1/embeddings")[0] == {"model": SERVED, "input": ["a", "b"], "dimensions": 2}


async def _stream(h: Harness, method, call) -> list[dict]:
    return await h.collect(await method(call, route()))


def test_an_upstream_without_usage_is_counted_and_marked_estimated(monkeypatch):
    fake = FakeOpenAI(send_usage=False)
    h = Harness(monkeypatch, fake)
    answer = h.run(h.adapter.chat(chat_call(), route()))
    assert answer.usage.estimated and answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 0

    async def scenario():
        stream = await h.adapter.chat_stream(chat_call(stream=True, stream_options={"include_usage": True}), route())
        chunks = await h.collect(stream)
        return chunks, stream.usage

    chunks, usage = h.run(scenario())
    assert usage.estimated and usage.completion_tokens == 4  # one per text-bearing delta
    assert chunks[-1]["usage"] == usage.block() and chunks[-1]["model"] == PUBLIC


# Failures


@pytest.mark.parametrize("status, failure, retryable", [
    (401, CredentialsRejected, True), (403, CredentialsRejected, True), (429, RateLimited, True),
    (500, ServerFailure, True), (503, ServerFailure, True), (400, ClientFailure, False), (404, ClientFailure, False),
    (422, ClientFailure, False),
])
def test_upstream_statuses_become_the_contracts_failures(monkeypatch, status, failure, retryable):
    fake = FakeOpenAI(status=status, headers={"retry-after": "7"})
    h = Harness(monkeypatch, fake)
    for call in (h.adapter.chat(chat_call(), route()), h.adapter.chat_stream(chat_call(stream=True), route())):
        with pytest.raises(failure) as caught:
            h.run(call)
        assert caught.value.retryable is retryable
        assert "openai.test" not in caught.value.message
    if failure is ClientFailure:
        assert caught.value.status == status and caught.value.message == f"fake failure {status}"
    if failure is RateLimited:
        assert caught.value.retry_after == 7


def test_garbage_and_oversized_answers_are_bad_answers(monkeypatch):
    h = Harness(monkeypatch, FakeOpenAI(raw_answer=b"<html>oops</html>"))
    with pytest.raises(BadAnswer):
        h.run(h.adapter.chat(chat_call(), route()))
    h = Harness(monkeypatch, FakeOpenAI(raw_answer=b"x" * 2048),
                adapter=OpenAIAdapter(spec(), deadline=30, max_bytes=1024))
    with pytest.raises(BadAnswer, match="exceeded"):
        h.run(h.adapter.chat(chat_call(), route()))
    h = Harness(monkeypatch, FakeOpenAI(raw_stream=b"data: {not json}\n\n"))
    with pytest.raises(BadAnswer):
        h.run(h.adapter.chat_stream(chat_call(stream=True), route()))
    h = Harness(monkeypatch, FakeOpenAI(raw_stream=b"data: " + b"x" * 4096),
                adapter=OpenAIAdapter(spec(), deadline=30, max_bytes=1024))
    with pytest.raises(BadAnswer, match="exceeded"):
        h.run(h.adapter.chat_stream(chat_call(stream=True), route()))


def test_mid_stream_failures_are_raised_after_the_chunks_before_them(monkeypatch):
    for fake, failure in ((FakeOpenAI(error_after=3), ServerFailure), (FakeOpenAI(cut_after=3), BadAnswer)):
        h = Harness(monkeypatch, fake)

        async def scenario(h=h, failure=failure):
            stream = await h.adapter.chat_stream(chat_call(stream=True), route())
            seen = []
            with pytest.raises(failure) as caught:
                async for raw in each_chunk(stream):
                    seen.append(raw)
            await stream.aclose()
            return seen, caught.value

        seen, error = h.run(scenario())
        assert len(seen) == 3 and error.retryable is False


def test_done_without_a_finish_reason_is_a_cut_stream_not_a_finished_one(monkeypatch):
    """llama.cpp's server (llama-cpp-python) ends a stream it interrupts (another request came in)
    with `[DONE]` and no finish_reason: a client must not take it for a whole answer."""
    cut = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
           b'"delta":{"content":"hi"},"finish_reason":null}]}\n\ndata: [DONE]\n\n')
    h = Harness(monkeypatch, FakeOpenAI(raw_stream=cut))

    async def scenario():
        stream = await h.adapter.chat_stream(chat_call(stream=True), route())
        seen = []
        with pytest.raises(BadAnswer, match="before it finished") as caught:
            async for raw in each_chunk(stream):
                seen.append(raw)
        await stream.aclose()
        return seen, caught.value

    seen, error = h.run(scenario())
    assert len(seen) == 1 and error.retryable is False


def test_an_error_event_before_any_chunk_is_retryable(monkeypatch):
    h = Harness(monkeypatch, FakeOpenAI(error_after=0))
    with pytest.raises(ServerFailure) as caught:
        h.run(h.adapter.chat_stream(chat_call(stream=True), route()))
    assert caught.value.retryable


def test_timeouts_on_a_real_connection(monkeypatch):
    """Connect refused, first byte late (retryable), silence mid-stream (not retryable)."""
    async def with_real_transport(base_url: str, coroutine_factory, **spec_fields):
        transport = AiohttpTransport()
        adapter = OpenAIAdapter(spec(base_url, **spec_fields), deadline=30, max_bytes=1 << 20)
        monkeypatch.setattr(adapter_module, "transport", lambda: transport)
        try:
            return await coroutine_factory(adapter)
        finally:
            await transport.aclose()

    from tests.procs import free_port

    with pytest.raises(Unreachable):
        asyncio.run(with_real_transport(f"http://127.0.0.1:{free_port()}/v1",
                                        lambda a: a.chat(chat_call(), route())))
    late = FakeOpenAI(first_delay=1.0)
    with late.serving() as base_url, pytest.raises(UpstreamTimeout) as caught:
        asyncio.run(with_real_transport(base_url, lambda a: a.chat_stream(chat_call(stream=True), route()),
                                        first_byte_timeout=0.3))
    assert caught.value.retryable
    silent = FakeOpenAI(chunk_delay=1.0)

    async def read_all(adapter):
        stream = await adapter.chat_stream(chat_call(stream=True), route())
        try:
            return [chunk async for chunk in each_chunk(stream)]
        finally:
            await stream.aclose()

    with silent.serving() as base_url, pytest.raises(UpstreamTimeout) as caught:
        asyncio.run(with_real_transport(base_url, read_all, first_byte_timeout=5, idle_timeout=0.3))
    assert not caught.value.retryable


# Model list and probes


def test_list_models_and_probe(monkeypatch, fake):
    h = Harness(monkeypatch, fake)
    models = h.run(h.adapter.list_models())
    assert [model.name for model in models] == ["served-model"]
    probe = h.run(h.adapter.probe())
    assert probe.ok and probe.failure is None and probe.latency_ms >= 0
    assert fake.requests[-1].method == "GET" and fake.requests[-1].path == "/v1/models"
    h = Harness(monkeypatch, FakeOpenAI(status=401, fail_models=True))
    assert h.run(h.adapter.probe()).failure == "credentials"
    h = Harness(monkeypatch, FakeOpenAI(status=200, fail_models=True, raw_answer=b"x"))
    monkeypatch.setattr(h.fake, "models", [])
    from tests.procs import free_port

    async def refused():
        transport = AiohttpTransport()
        monkeypatch.setattr(adapter_module, "transport", lambda: transport)
        try:
            return await OpenAIAdapter(spec(f"http://127.0.0.1:{free_port()}/v1")).probe()
        finally:
            await transport.aclose()

    assert asyncio.run(refused()).failure == "unreachable"


# Byte-level pieces


def test_model_rewrite_is_byte_level_and_only_at_the_top():
    assert rewrite_model(b'{"id":"a","model":"x","choices":[]}', b'"pub"') == b'{"id":"a","model":"pub","choices":[]}'
    assert rewrite_model(b'{"id": "a", "model" : "x\\"y", "c": 1}', b'"p"') == b'{"id": "a", "model":"p", "c": 1}'
    assert rewrite_model(b'{"choices":[{"model":"inner"}],"model":"x"}', b'"p"') is None  # nested first: parse
    assert rewrite_model(b'{"id":"a","model":null}', b'"p"') is None


def test_sse_parser_handles_crlf_split_reads_comments_and_the_size_cap():
    parser = SSEParser(max_bytes=100)
    events = []
    for piece in (b": ping\r", b"\n\r\nevent: error\r\ndata: {\"a\"", b":1}\r", b"\n\r", b"\ndata: [DONE]\n\n"):
        events += parser.feed(piece)
    assert events == [(b"error", b'{"a":1}'), (b"", b"[DONE]")]
    with pytest.raises(EventTooLarge):
        SSEParser(max_bytes=10).feed(b"data: " + b"x" * 20)


# llama.cpp's deviations


def test_llama_cpp_is_detected_from_its_model_list(monkeypatch, llama):
    h = Harness(monkeypatch, llama)
    assert h.run(h.adapter.deviations()).name == "llama.cpp"
    assert h.run(h.adapter.deviations()).name == "llama.cpp"
    assert [r.path for r in llama.requests] == ["/v1/models"]  # asked once, then remembered
    h = Harness(monkeypatch, FakeOpenAI(owned_by="vllm"))
    assert h.run(h.adapter.deviations()).name == "generic"


def test_llama_cpp_tool_call_deltas_come_back_as_openai_sends_them(monkeypatch, llama):
    h = Harness(monkeypatch, llama)
    call = chat_call(stream=True, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = h.run(_stream(h, h.adapter.chat_stream, call))
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
             if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert calls[0]["id"] == "call_1" and calls[0]["type"] == "function" and calls[0]["function"]["name"] == "get_weather"
    assert all(set(later) == {"index", "function"} and set(later["function"]) == {"arguments"} for later in calls[1:])
    assert "".join(call["function"]["arguments"] for call in calls) == '{"city": "Paris"}'
    assert all("function_call" not in c["choices"][0]["delta"] for c in chunks if c["choices"])


def test_llama_cpp_streams_get_estimated_usage(monkeypatch, llama):
    h = Harness(monkeypatch, llama)

    async def scenario():
        stream = await h.adapter.chat_stream(chat_call(stream=True, stream_options={"include_usage": True}), route())
        return await h.collect(stream), stream.usage

    chunks, usage = h.run(scenario())
    assert usage.estimated and usage.completion_tokens == len(llama.words)
    assert chunks[-1]["usage"]["completion_tokens"] == len(llama.words)


def test_the_prompt_estimate_counts_the_tools_and_calls_a_template_writes_out():
    from upstreams.openai.chunks import estimated_prompt_tokens

    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tool = {"type": "function", "function": {"name": "get_weather", "description": "The weather now in a city " * 8,
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris, France, Europe, Earth"}'}}]}
    plain = estimated_prompt_tokens({"messages": messages})
    with_tools = estimated_prompt_tokens({"messages": messages, "tools": [tool]})
    with_call = estimated_prompt_tokens({"messages": [*messages, call], "tools": [tool]})
    assert with_tools >= plain + 60  # the definition is longer than 240 characters
    assert with_call >= with_tools + 15


def test_llama_cpp_n_is_fanned_out_and_merged(monkeypatch, llama):
    h = Harness(monkeypatch, llama)
    answer = h.run(h.adapter.chat(chat_call(n=3), route()))
    assert [choice["index"] for choice in answer.body["choices"]] == [0, 1, 2]
    assert answer.usage.completion_tokens == 3 * len(llama.words) and answer.usage.prompt_tokens == 7
    assert [body["n"] for body in llama.bodies()] == [1, 1, 1]

    async def scenario():
        stream = await h.adapter.chat_stream(chat_call(n=2, stream=True, stream_options={"include_usage": True}),
                                             route())
        return await h.collect(stream), stream.usage

    chunks, usage = h.run(scenario())
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    assert texts == {0: "Hello from the fake", 1: "Hello from the fake"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[-1]["usage"]["completion_tokens"] == 2 * len(llama.words) == usage.completion_tokens


def test_llama_cpp_json_schema_is_sent_as_its_json_object_with_schema(monkeypatch, llama):
    h = Harness(monkeypatch, llama)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    h.run(h.adapter.chat(chat_call(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema}}), route()))
    assert llama.bodies()[-1]["response_format"] == {"type": "json_object", "schema": schema}


def test_llama_cpp_tool_choice_required_names_the_one_tool(monkeypatch, llama):
    h = Harness(monkeypatch, llama)
    h.run(h.adapter.chat(chat_call(tools=[TOOL], tool_choice="required"), route()))
    assert llama.bodies()[-1]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    other = {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}
    with pytest.raises(ClientFailure) as caught:
        h.run(h.adapter.chat(chat_call(tools=[TOOL, other], tool_choice="required"), route()))
    assert caught.value.param == "tool_choice" and caught.value.status == 400


def test_llama_cpp_validation_errors_answered_500_are_reported_as_400(monkeypatch):
    validation = (b'{"error": {"message": "1 validation error:\\n  {\'type\': \'int_parsing\', \'loc\': (\'body\', '
                  b'\'max_tokens\'), \'msg\': \'Input should be a valid integer\', \'input\': \'many\'}\\n\\n  File '
                  b'\\"/srv/llama_cpp/server/app.py\\", line 376", "type": "internal_server_error"}}')
    h = Harness(monkeypatch, FakeOpenAI(status=500, error_body=validation), flavor="llama.cpp")
    with pytest.raises(ClientFailure) as caught:
        h.run(h.adapter.chat(chat_call(), route()))
    assert caught.value.status == 400 and caught.value.param == "max_tokens" and not caught.value.retryable
    assert caught.value.message == "Invalid request: max_tokens: Input should be a valid integer"
    assert "/srv" not in caught.value.message
    # Not certain: a real 500 stays a retryable server failure; and other servers' 500s are never reread.
    h = Harness(monkeypatch, FakeOpenAI(status=500, error_body=b'{"error": {"message": "CUDA error"}}'),
                flavor="llama.cpp")
    with pytest.raises(ServerFailure):
        h.run(h.adapter.chat(chat_call(), route()))
    h = Harness(monkeypatch, FakeOpenAI(status=500, error_body=validation))
    with pytest.raises(ServerFailure):
        h.run(h.adapter.chat(chat_call(), route()))


# Through the gateway (the production request path, the registry and the router)


class ThroughTheGateway(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.openai = FakeOpenAI(owned_by="me", llama_cpp=True)
        upstream = Upstream(name="llama", kind="openai", base_url=OPENAI_UPSTREAM)
        upstream.save_by()
        UpstreamModel(upstream=upstream, public_name=PUBLIC, upstream_name=SERVED,
                      capabilities=["tools", "json_schema"]).save_by()
        state.reset(transport=combined_transport(self.openai, self.fake))

    async def test_answers_and_streams_come_back_with_the_public_model(self):
        response = await self.post("/v1/chat/completions", {"model": PUBLIC, "messages": MESSAGES, "seed": 3,
                                                            "logit_bias": {"1": 2}})
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response.json()["model"], PUBLIC)
        self.assertEqual(response.json()["choices"][0]["message"]["content"], "Hello from the fake")
        sent = self.openai.bodies()[-1]
        self.assertEqual((sent["model"], sent["seed"], sent["logit_bias"]), (SERVED, 3, {"1": 2}))
        response = await self.post("/v1/chat/completions", {"model": PUBLIC, "messages": MESSAGES, "stream": True,
                                                            "stream_options": {"include_usage": True}})
        events = [json.loads(line[6:]) for line in b"".join([c async for c in response.streaming_content])
                  .decode().split("\n\n") if line.startswith("data: {")]
        self.assertTrue(all(event["model"] == PUBLIC for event in events))
        self.assertEqual(events[-1]["usage"]["completion_tokens"], len(self.openai.words))

    async def test_usage_rows_say_whether_the_upstream_counted_the_tokens(self):
        from asgiref.sync import sync_to_async

        from keys.models import UsageRecord
        from keys.usage import usage_writer

        await self.post("/v1/chat/completions", {"model": PUBLIC, "messages": MESSAGES})
        response = await self.post("/v1/chat/completions", {"model": PUBLIC, "messages": MESSAGES, "stream": True})
        b"".join([c async for c in response.streaming_content])
        await sync_to_async(usage_writer.flush)()
        rows = [(row.streamed, row.tokens_estimated, row.completion_tokens, row.upstream)
                async for row in UsageRecord.objects.order_by("id")]
        # llama.cpp reports usage in answers, never in streams: there the gateway counted
        self.assertEqual(rows, [(False, False, 4, "llama"), (True, True, 4, "llama")])

    async def test_streamed_tool_calls_join_to_the_arguments(self):
        tool_choice = {"type": "function", "function": {"name": "get_weather"}}
        response = await self.post("/v1/chat/completions", {"model": PUBLIC, "messages": MESSAGES, "stream": True,
                                                            "tools": [TOOL], "tool_choice": tool_choice})
        events = [json.loads(line[6:]) for line in b"".join([c async for c in response.streaming_content])
                  .decode().split("\n\n") if line.startswith("data: {")]
        calls = [call for event in events for choice in event["choices"]
                 for call in (choice["delta"].get("tool_calls") or ())]
        self.assertEqual("".join(call.get("function", {}).get("name", "") for call in calls), "get_weather")
        self.assertEqual("".join(call["function"]["arguments"] for call in calls), '{"city": "Paris"}')

    async def test_an_upstream_validation_error_is_a_400_with_its_message(self):
        response = await self.post("/v1/chat/completions", {"model": PUBLIC, "messages": MESSAGES,
                                                            "response_format": {"type": "json_schema"}})
        # The adapter turns json_schema into llama.cpp's json_object; a format it does not know is refused.
        self.assertEqual(response.status_code, 200, response.content)
        self.openai.status = 422
        response = await self.post("/v1/chat/completions", {"model": PUBLIC, "messages": MESSAGES})
        self.assertError(response, 422)
        self.assertEqual(response.json()["error"]["message"], "fake failure 422")


def test_usage_sent_inside_the_last_choice_chunk_still_gives_the_client_a_usage_chunk(monkeypatch):
    stream = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
              b'"delta":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,'
              b'"total_tokens":4}}\n\ndata: [DONE]\n\n')
    h = Harness(monkeypatch, FakeOpenAI(raw_stream=stream))
    chunks = h.run(_stream(h, h.adapter.chat_stream, chat_call(stream=True, stream_options={"include_usage": True})))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 1,
                                                                    "total_tokens": 4}
    assert len(chunks) == 2


def test_a_fanned_out_stream_left_early_closes_every_upstream_stream(monkeypatch, llama):
    h = Harness(monkeypatch, llama)

    async def scenario():
        stream = await h.adapter.chat_stream(chat_call(n=3, stream=True), route())
        first = await stream.__anext__()
        await stream.aclose()
        return first, stream.streams

    first, streams = h.run(scenario())
    assert first and all(orjson.loads(chunk)["model"] == PUBLIC for chunk in first)
    assert len(streams) == 3 and all(stream.response.is_closed for stream in streams)


def test_a_server_without_a_model_list_is_generic_and_not_asked_again(monkeypatch):
    fake = FakeOpenAI(status=404, fail_models=True)
    h = Harness(monkeypatch, fake)
    for _ in range(2):
        assert h.run(h.adapter.deviations()).name == "generic"
    assert [record.path for record in fake.requests] == ["/v1/models"]


def test_capabilities_and_context_lengths_are_read_where_the_server_tells_them():
    from upstreams.openai.adapter import context_length, told_capabilities

    generic, llama_cpp = deviations.GENERIC, deviations.LLAMA_CPP
    assert told_capabilities({"id": "m"}, generic) == frozenset()
    assert told_capabilities({"id": "m", "capabilities": ["function_calling", "vision", "teleport"]}, generic) == \
        {"tools", "vision"}
    assert told_capabilities({"id": "m", "capabilities": {"json_schema": True, "vision": False}}, generic) == \
        {"json_schema"}
    assert told_capabilities({"id": "e", "type": "embeddings"}, generic) == {"embeddings"}
    assert told_capabilities({"id": "m"}, llama_cpp) == {"json_mode", "json_schema"}
    assert context_length({"id": "m", "max_model_len": 8192}) == 8192  # vLLM
    assert context_length({"id": "m", "meta": {"n_ctx_train": 4096}}) == 4096  # llama-server
    assert context_length({"id": "m", "context_length": -1}) is None
    assert context_length({"id": "m", "max_model_len": True}) is None


def test_an_upstream_echoing_the_gateways_key_or_its_own_address_is_never_passed_on(monkeypatch):
    key = "sk-upstream-very-secret-1234"
    echo = json.dumps({"error": {"message": f"Incorrect API key provided: {key} at {OPENAI_UPSTREAM}/x"}}).encode()
    h = Harness(monkeypatch, FakeOpenAI(status=400, error_body=echo), api_key=key)
    with pytest.raises(ClientFailure) as caught:
        h.run(h.adapter.chat(chat_call(), route()))
    for text in (caught.value.message, caught.value.log_detail):
        assert key not in text
    assert "openai.test" not in caught.value.message and "[redacted]" in caught.value.message
    event = ('data: {"error": {"message": "bad key ' + key + '"}}\n\n').encode()
    h = Harness(monkeypatch, FakeOpenAI(raw_stream=event), api_key=key)
    with pytest.raises(ServerFailure) as caught:
        h.run(h.adapter.chat_stream(chat_call(stream=True), route()))
    assert key not in caught.value.message and key not in caught.value.log_detail
