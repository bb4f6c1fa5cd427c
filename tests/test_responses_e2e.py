"""The Responses API (/v1/responses) end to end, with the official openai client.

One stack for the module: FastChat's real controller and model_worker serving the tiny vicuna model
(tests/tiny_model.py), the demo worker (upstreams/fastchat/demo_worker.py: a canned reply that
ends, where the random tiny model never stops before max_output_tokens), and llama.cpp's server (llama-cpp-python, `--chat_format
chatml-function-calling`) serving it as GGUF for tools; each behind a recording proxy
(tests/stacks.py RecordingProxy), so the tests see what the gateway sent upstream: the
prompt FastChat's worker got, the chat body llama.cpp got. The gateway (a uvicorn process) has both
registered with `manage.py upstreams apply`. The OpenAI Agents SDK runs from its own venv
(`make install-agents`) as a subprocess (tests/agents_script.py).

Generations are short (max_output_tokens) and greedy (temperature 0), so the same request gives
the same answer, streamed or not, through either endpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway_process import Gateway
from tests.llama_server import missing
from tests.procs import REPO_ROOT
from tests.services import requires_service
from tests.stacks import RecordingProxy, StackBuilder

MISSING = missing()
pytestmark = [pytest.mark.e2e, pytest.mark.real_worker,
              requires_service("llama.cpp and torch", not MISSING, f"missing: {', '.join(MISSING)}")]

VICUNA, DEMO, TOOLS = "tiny-vicuna", "demo-chat", "tiny-tools"  # FastChat only (real, demo); llama.cpp with tools
AGENTS_PYTHON = Path(os.environ.get("AGENTS_VENV", REPO_ROOT / ".venv-agents")) / "bin" / "python"
GREEDY = {"temperature": 0, "max_output_tokens": 12}
# Every string bounded (maxLength or enum): the random model would never close an unbounded one.
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 12},
               "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
           }, "required": ["city", "unit"]}}
FORCED = {"type": "function", "name": "get_weather"}
# No free strings: llama.cpp's grammar lets the tiny model put a raw control character (U+0001)
# into one, which strict JSON parsers refuse (docs/openai-upstreams.md).
SCHEMA = {"type": "object", "properties": {
    "color": {"type": "string", "enum": ["red", "green", "blue"]},
    "ok": {"type": "boolean"},
    "sizes": {"type": "array", "items": {"type": "string", "enum": ["s", "m", "l"]}, "maxItems": 3},
}, "required": ["color", "ok", "sizes"]}
ASK_WEATHER = {"model": TOOLS, "input": "Weather in Paris?", "tools": [WEATHER], "tool_choice": FORCED,
               "temperature": 0, "max_output_tokens": 64}
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta", "response.output_text.done",
               "response.content_part.done", "response.output_item.done"]
CALL_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.function_call_arguments.delta", "response.function_call_arguments.done",
               "response.output_item.done"]
GENERATE_PATHS = ("/worker_generate", "/worker_generate_stream")


@dataclass
class Stack:
    gateway: Gateway
    key: str
    other_key: str
    agents_key: str
    fastchat: RecordingProxy  # in front of the worker
    llama: RecordingProxy  # in front of llama.cpp's server
    worker_url: str
    demo_url: str  # the demo worker's own address (its /_fake/config)
    log_dir: Path


def upstreams(controller_url: str, llama_url: str) -> list[dict]:
    return [
        {"name": "fastchat", "kind": "fastchat", "base_url": controller_url, "discover_models": False,
         "models": [VICUNA, DEMO]},
        {"name": "llama-tools", "kind": "openai", "base_url": llama_url, "discover_models": False,
         "models": [{"public_name": TOOLS, "upstream_name": "tools-gguf",
                     "capabilities": ["tools", "json_schema", "json_mode"]}]},
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("responses_e2e")
    with StackBuilder(tmp) as build:
        controller_url = build.controller()
        # FastChat's worker loads torch for a while: llama.cpp's server starts meanwhile.
        worker = build.real_worker("vicuna_v1.1", VICUNA, proxied=True)
        demo = build.demo_worker([DEMO], extra_args=["--reply-words", "6"])
        tools = build.llama_server(alias="tools-gguf", chat_format="chatml-function-calling", n_ctx=1024)
        llama = build.proxy(tools.port)
        build.wait_for_workers(worker, demo)
        # llama-cpp-python's server cuts a stream in flight when any request comes in (its
        # interrupt_requests, on by default): `[DONE]` with no finish_reason. The gateway's health
        # probe (GET /v1/models every GATEWAY_UPSTREAM_PROBE_SECONDS) would cut a stream now and
        # then, so it probes once, at its start, here.
        gateway = build.gateway("uvicorn", {"FASTCHAT_WORKER_API_TIMEOUT": "30",
                                            "GATEWAY_UPSTREAM_PROBE_SECONDS": "3600"})
        gateway.apply_upstreams(tmp / "upstreams.json", upstreams(controller_url, llama.address + "/v1"))
        key = gateway.create_key("responses-e2e")
        gateway.wait_for_models(key, {VICUNA, DEMO, TOOLS})
        yield Stack(gateway, key, gateway.create_key("responses-other"), gateway.create_key("responses-agents"),
                    worker.proxy, llama, worker.url, demo.url, tmp)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return stack.gateway.client(stack.key)


@pytest.fixture(scope="module")
def other_client(stack: Stack) -> openai.OpenAI:
    return stack.gateway.client(stack.other_key)


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    """Raw HTTP to the gateway, for bodies the openai client will not send."""
    with stack.gateway.http(stack.key) as client:
        yield client


# What the upstreams received


def worker_payloads(stack: Stack, mark: int) -> list[dict[str, Any]]:
    return [record.body for record in stack.fastchat.since(mark, *GENERATE_PATHS)]


def llama_bodies(stack: Stack, mark: int) -> list[dict[str, Any]]:
    return [record.body for record in stack.llama.since(mark, "/v1/chat/completions")]


def fastchat_payload(stack: Stack, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    """What FastChat's own openai_api_server sends the worker for these chat messages."""
    from tests.test_real_worker import fastchat_gen_params

    conv = httpx.post(stack.worker_url + "/worker_get_conv_template", json={"model": VICUNA}, timeout=10).json()["conv"]
    return fastchat_gen_params(conv, VICUNA, messages, **params)


def usage_row(stack: Stack, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The gateway's usage row of one request (written in batches off the request path: waited for)."""
    path = stack.gateway.env["DATABASE_URL"].removeprefix("sqlite:///")
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM keys_usagerecord WHERE request_id = ?", (request_id,)).fetchone()
        if row is not None:
            return dict(row)
        if time.monotonic() > deadline:
            raise AssertionError(f"no usage row for request {request_id}")
        time.sleep(0.1)


# Streams


def collapsed(types: list[str]) -> list[str]:
    """Event types with each run of one type (the deltas) shown once."""
    return [kind for i, kind in enumerate(types) if i == 0 or types[i - 1] != kind]


def printable(text: str) -> str:
    return text.replace("\ufffd", "")


def output_shape(item: Any) -> tuple:
    if item.type == "message":
        return item.type, item.role, item.status, "".join(part.text for part in item.content)
    return item.type, item.status, item.name, item.arguments


def assert_sequence(events: list[Any]) -> None:
    numbers = [event.sequence_number for event in events]
    assert all(a < b for a, b in zip(numbers, numbers[1:], strict=False)), numbers


def raw_stream(stack: Stack, body: dict[str, Any]) -> tuple[httpx.Headers, list[tuple[str, dict[str, Any]]]]:
    """POST a streamed /v1/responses request; its headers and (event name, data) frames, checked to
    be well formed: `event:` names the data's type, and no `[DONE]` (Responses streams have none)."""
    frames = []
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", stack.gateway.url + "/v1/responses", json={**body, "stream": True},
            headers={"Authorization": f"Bearer {stack.key}"}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        assert set(fields) == {"event", "data"}, block
        data = json.loads(fields["data"])
        assert data["type"] == fields["event"]
        frames.append((fields["event"], data))
    return response.headers, frames


# 1. The official client on a FastChat worker


def test_create_with_a_string_input(stack, client):
    mark = stack.fastchat.mark()
    response = client.responses.create(model=VICUNA, input="Hello there", **GREEDY)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.model == VICUNA
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert (response.temperature, response.max_output_tokens) == (0, 12)
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    [part] = message.content
    assert part.type == "output_text" and part.text and response.output_text == part.text
    usage = response.usage
    # (FastChat's worker counts one token less than it made when it stops at max_new_tokens)
    assert 0 < usage.output_tokens <= 12 and usage.input_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    [sent] = worker_payloads(stack, mark)
    assert sent["prompt"] == fastchat_payload(stack, [{"role": "user", "content": "Hello there"}],
                                              max_tokens=12)["prompt"]


def test_create_with_an_item_list_and_instructions(stack, client):
    items = [
        {"role": "user", "content": "Hi"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "How "},
                                                        {"type": "input_text", "text": "are you?"}]},
    ]
    mark = stack.fastchat.mark()
    response = client.responses.create(model=VICUNA, input=items, instructions="Be brief.", **GREEDY)
    assert response.instructions == "Be brief."
    assert response.output_text
    [sent] = worker_payloads(stack, mark)
    expected = fastchat_payload(stack, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                        {"role": "assistant", "content": "Hello!"},
                                        {"role": "user", "content": "How are you?"}],
                                temperature=0, max_tokens=12)
    assert sent["prompt"] == expected["prompt"]
    assert "Be brief." in sent["prompt"] and "How are you?" in sent["prompt"]


def test_stream_agrees_with_the_non_streamed_answer(stack, client):
    body = {"model": VICUNA, "input": "Hello there", **GREEDY}
    answer = client.responses.create(**body)
    with client.responses.stream(**body) as stream:
        events = list(stream)
    assert_sequence(events)
    # max_output_tokens is reached: the stream ends with response.incomplete (no response.completed)
    assert collapsed([event.type for event in events]) == [*TEXT_EVENTS, "response.incomplete"]
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    [done] = [event for event in events if event.type == "response.output_text.done"]
    assert deltas == done.text == final.output_text
    # FastChat's worker holds back a streamed piece that ends in U+FFFD (a byte token that is no
    # whole character), its non-streamed answer keeps it: the rest is identical.
    assert printable(final.output_text) == printable(answer.output_text) and len(printable(deltas)) > 5
    assert final.usage.model_dump() == answer.usage.model_dump()
    assert [(item.type, item.role, item.status) for item in final.output] == \
        [(item.type, item.role, item.status) for item in answer.output] == [("message", "assistant", "incomplete")]
    assert final.id != answer.id


def test_stream_to_completed_agrees_with_the_non_streamed_answer(stack, client):
    """The SDK's own accumulation (get_final_response, which needs response.completed) on an
    answer that ends by itself: the demo worker's canned reply."""
    body = {"model": DEMO, "input": "Hello there", "instructions": "Be brief.", "temperature": 0,
            "max_output_tokens": 32}
    answer = client.responses.create(**body)
    assert answer.status == "completed" and answer.incomplete_details is None and answer.completed_at
    with client.responses.stream(**body) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert_sequence(events)
    assert collapsed([event.type for event in events]) == [*TEXT_EVENTS, "response.completed"]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text == answer.output_text
    assert final.status == "completed" and final.usage.model_dump() == answer.usage.model_dump()
    assert answer.usage.output_tokens == 6  # the reply's words (FastChat does not count its EOS)
    assert [output_shape(item) for item in final.output] == [output_shape(item) for item in answer.output] == \
        [("message", "assistant", "completed", answer.output_text)]
    assert final.instructions == answer.instructions == "Be brief."


def test_json_with_a_schema_streamed_and_not(stack, client):
    """text.format json_schema -> response_format: llama.cpp's grammar makes valid JSON that ends."""
    body = {"model": TOOLS, "input": "A color, please.", "temperature": 0, "max_output_tokens": 64,
            "text": {"format": {"type": "json_schema", "name": "pick", "schema": SCHEMA}}}
    answer = client.responses.create(**body)
    assert answer.status == "completed" and answer.text.format.type == "json_schema"
    value = json.loads(answer.output_text)
    assert value["color"] in ("red", "green", "blue") and isinstance(value["ok"], bool)
    with client.responses.stream(**body) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert_sequence(events)
    assert collapsed([event.type for event in events]) == [*TEXT_EVENTS, "response.completed"]
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == \
        final.output_text == answer.output_text
    # (llama.cpp's streams carry no usage: the gateway counts the output, estimates the input)
    assert final.status == "completed" and final.usage.output_tokens == answer.usage.output_tokens
    assert [output_shape(item) for item in final.output] == [output_shape(item) for item in answer.output]


def test_a_worker_failing_mid_stream_ends_it_with_response_failed(stack, client):
    with httpx.Client(base_url=stack.demo_url, timeout=5) as worker:
        worker.post("/_fake/config", json={"fail_after_chunks": 3}).raise_for_status()
        try:
            with client.responses.stream(model=DEMO, input="Hello there", max_output_tokens=32) as stream:
                events = list(stream)
        finally:
            worker.post("/_fake/reset").raise_for_status()
    assert_sequence(events)
    types = collapsed([event.type for event in events])
    assert types == [*TEXT_EVENTS[:5], "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.error.message
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert [output_shape(item) for item in failed.output] == [("message", "assistant", "in_progress", text)]


def test_stream_frames_are_openais(stack):
    headers, frames = raw_stream(stack, {"model": VICUNA, "input": "Hello there", **GREEDY})
    numbers = [data["sequence_number"] for _, data in frames]
    assert numbers == sorted(set(numbers)), numbers
    added = [data for name, data in frames if name == "response.output_item.added"]
    assert [data["output_index"] for data in added] == [0]
    deltas = [data for name, data in frames if name == "response.output_text.delta"]
    assert {(data["item_id"], data["output_index"], data["content_index"]) for data in deltas} == \
        {(added[0]["item"]["id"], 0, 0)}
    assert frames[-1][1]["response"]["id"] == frames[0][1]["response"]["id"]


def test_two_turns_with_previous_response_id(stack, client):
    first = client.responses.create(model=VICUNA, input="Hello there", **GREEDY)
    mark = stack.fastchat.mark()
    second = client.responses.create(model=VICUNA, input="Tell me more.", previous_response_id=first.id, **GREEDY)
    assert second.previous_response_id == first.id
    [sent] = worker_payloads(stack, mark)
    expected = fastchat_payload(stack, [{"role": "user", "content": "Hello there"},
                                        {"role": "assistant", "content": first.output_text},
                                        {"role": "user", "content": "Tell me more."}], temperature=0, max_tokens=12)
    assert sent["prompt"] == expected["prompt"]
    # and a third turn carries both before it
    mark = stack.fastchat.mark()
    client.responses.create(model=VICUNA, input="Thanks", previous_response_id=second.id, **GREEDY)
    [sent] = worker_payloads(stack, mark)
    assert sent["prompt"] == fastchat_payload(stack, [
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Tell me more."}, {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "Thanks"}], temperature=0, max_tokens=12)["prompt"]


def test_retrieve_input_items_and_delete(stack, client):
    items = [{"role": "user", "content": f"Message {i}"} for i in range(3)]
    response = client.responses.create(model=VICUNA, input=items, metadata={"case": "store"}, **GREEDY)
    stored = client.responses.retrieve(response.id)
    assert stored.model_dump() == response.model_dump()
    listed = client.responses.input_items.list(response.id)  # newest first by default
    assert [item.content[0].text for item in listed.data] == ["Message 2", "Message 1", "Message 0"]
    assert all(item.type == "message" and item.role == "user" and item.id for item in listed.data)
    assert (listed.first_id, listed.last_id, listed.has_more) == (listed.data[0].id, listed.data[-1].id, False)
    page = client.responses.input_items.list(response.id, order="asc", limit=2)
    assert [item.content[0].text for item in page.data] == ["Message 0", "Message 1"] and page.has_more
    rest = client.responses.input_items.list(response.id, order="asc", limit=2, after=page.last_id)
    assert [item.content[0].text for item in rest.data] == ["Message 2"] and not rest.has_more
    every = [item.content[0].text for item in client.responses.input_items.list(response.id, limit=1)]
    assert every == ["Message 2", "Message 1", "Message 0"]  # the SDK follows has_more/after
    client.responses.delete(response.id)
    for call in (client.responses.retrieve, client.responses.input_items.list, client.responses.delete):
        with pytest.raises(openai.NotFoundError):
            call(response.id)
    # ids are never metric labels: the routes' templates are
    metrics = httpx.get(stack.gateway.url + "/metrics", timeout=10).text
    assert 'endpoint="/v1/responses/{id}"' in metrics and 'endpoint="/v1/responses/{id}/input_items"' in metrics
    assert "resp_" not in metrics


def test_another_key_gets_404_for_all_three(stack, client, other_client):
    response = client.responses.create(model=VICUNA, input="Hello there", **GREEDY)
    absent = "resp_" + "0" * len(response.id.removeprefix("resp_"))
    for call in (other_client.responses.retrieve, other_client.responses.input_items.list,
                 other_client.responses.delete):
        with pytest.raises(openai.NotFoundError) as error:
            call(response.id)
        with pytest.raises(openai.NotFoundError) as missing_error:
            call(absent)
        # as if it did not exist: the same answer as for an id nobody has
        assert error.value.response.json() == json.loads(
            missing_error.value.response.text.replace(absent, response.id))
        assert error.value.response.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as error:
        other_client.responses.create(model=VICUNA, input="Hi", previous_response_id=response.id, **GREEDY)
    assert error.value.param == "previous_response_id"
    # nothing was deleted: the owner still has it
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_store_false_stores_nothing(stack, client):
    response = client.responses.create(model=VICUNA, input="Hello there", store=False, **GREEDY)
    assert response.store is False and response.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(response.id)
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model=VICUNA, input="Hi", previous_response_id=response.id, **GREEDY)
    assert error.value.param == "previous_response_id"


def test_max_output_tokens_reached_is_incomplete(stack, client):
    response = client.responses.create(model=VICUNA, input="Hello there", temperature=0, max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert 0 < response.usage.output_tokens <= 3 and response.max_output_tokens == 3
    # and a stored incomplete response is read back as such
    assert client.responses.retrieve(response.id).status == "incomplete"


def test_usage_rows_of_responses(stack, client):
    raw = client.responses.with_raw_response.create(model=VICUNA, input="Hello there", **GREEDY)
    response = raw.parse()
    row = usage_row(stack, raw.headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["model"], row["streamed"]) == ("/v1/responses", 200, VICUNA, 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (response.usage.input_tokens,
                                                                response.usage.output_tokens)
    headers, frames = raw_stream(stack, {"model": VICUNA, "input": "Hello there", **GREEDY})
    final = frames[-1][1]["response"]
    row = usage_row(stack, headers["x-request-id"])
    assert (row["endpoint"], row["status"], row["streamed"]) == ("/v1/responses", 200, 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (final["usage"]["input_tokens"],
                                                                final["usage"]["output_tokens"])


def test_truncation_auto_drops_the_oldest_items(stack, client):
    """A conversation longer than the worker's context (2,048 tokens): "disabled" (the default) is
    a 400 before any generation, "auto" drops the oldest turn and answers."""
    unit = "def f(x): return x + 1\n"
    per_unit = httpx.post(stack.worker_url + "/count_token", json={"model": VICUNA, "prompt": unit * 10},
                          timeout=10).json()["count"] / 10
    long_text = unit * int(1100 / per_unit)
    items = [{"role": "user", "content": "OLDEST " + long_text}, {"role": "assistant", "content": "Noted."},
             {"role": "user", "content": "NEWEST " + long_text}]
    mark = stack.fastchat.mark()
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=VICUNA, input=items, **GREEDY)
    assert error.value.code == "context_length_exceeded" and error.value.param == "input"
    assert not worker_payloads(stack, mark)
    response = client.responses.create(model=VICUNA, input=items, truncation="auto", **GREEDY)
    assert response.truncation == "auto" and response.output_text
    [sent] = worker_payloads(stack, mark)
    assert "NEWEST" in sent["prompt"] and "OLDEST" not in sent["prompt"]
    # what was stored is the request's input as sent (OpenAI's input_items)
    assert len(client.responses.input_items.list(response.id).data) == 3


# 2. Tools, with llama.cpp's real server


def test_a_function_tool_round_trip(stack, client):
    call_response = client.responses.create(**ASK_WEATHER)
    assert call_response.status == "completed"
    [call] = call_response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    arguments = json.loads(call.arguments)
    assert arguments["unit"] in ("celsius", "fahrenheit") and len(arguments["city"]) <= 12
    mark = stack.llama.mark()
    answer = client.responses.create(
        model=TOOLS, previous_response_id=call_response.id, tools=[WEATHER], tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}], **GREEDY)
    assert [item.type for item in answer.output] == ["message"]
    assert answer.output_text == answer.output[0].content[0].text
    # llama.cpp got the whole conversation: the call (as an assistant tool call) and its output
    [body] = llama_bodies(stack, mark)
    user, assistant, tool = body["messages"]
    assert user == {"role": "user", "content": "Weather in Paris?"}
    assert not assistant.get("content")  # (null to OpenAI; llama.cpp's server takes only a string)
    assert {**assistant, "content": None} == {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]}
    assert tool == {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"}
    assert body["tool_choice"] == "none"


def test_a_streamed_function_tool_round_trip(stack, client):
    reference = client.responses.create(**ASK_WEATHER).output[0]
    with client.responses.stream(**ASK_WEATHER) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert_sequence(events)
    assert collapsed([event.type for event in events]) == [*CALL_EVENTS, "response.completed"]
    [added] = [event for event in events if event.type == "response.output_item.added"]
    assert added.item.type == "function_call" and added.item.name == "get_weather" and added.item.call_id
    deltas = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    [done] = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert len(deltas) > 1  # really streamed
    assert "".join(deltas) == done.arguments == reference.arguments  # exactly, greedy
    [call] = final.output
    assert (call.arguments, call.call_id, call.name) == (reference.arguments, added.item.call_id, "get_weather")
    mark = stack.llama.mark()
    with client.responses.stream(
            model=TOOLS, previous_response_id=final.id, tools=[WEATHER], tool_choice="none",
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
            **GREEDY) as stream:
        answer_events = list(stream)
    assert_sequence(answer_events)
    assert collapsed([event.type for event in answer_events])[:-1] == TEXT_EVENTS
    answer = answer_events[-1].response
    assert answer.output[0].type == "message" and answer.previous_response_id == final.id
    [body] = llama_bodies(stack, mark)
    assert body["messages"][1]["tool_calls"][0]["function"]["arguments"] == reference.arguments
    assert body["messages"][2] == {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"}


def test_a_tool_sent_to_a_fastchat_model_is_a_400(stack, client):
    mark = stack.fastchat.mark()
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(model=VICUNA, input="Weather in Paris?", tools=[WEATHER], **GREEDY)
    assert error.value.param == "tools" and error.value.code == "unsupported_parameter"
    assert not worker_payloads(stack, mark)


# 3. The OpenAI Agents SDK


@requires_service("the OpenAI Agents SDK", AGENTS_PYTHON.exists(), f"no {AGENTS_PYTHON}: make install-agents")
def test_the_agents_sdk(stack):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(stack.log_dir),
           "OPENAI_BASE_URL": stack.gateway.base_url, "OPENAI_API_KEY": stack.agents_key,
           "OPENAI_AGENTS_DISABLE_TRACING": "1"}
    mark = stack.llama.mark()
    result = subprocess.run([str(AGENTS_PYTHON), str(REPO_ROOT / "tests" / "agents_script.py"),
                             "--tools-model", TOOLS, "--text-model", DEMO],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(result.stdout)
    tool = runs["tool"]
    # the tool was called with the model's arguments, its result went back to the model, which answered
    assert tool["calls"] and tool["calls"][0]["unit"] in ("celsius", "fahrenheit")
    assert tool["items"][:2] == ["ToolCallItem", "ToolCallOutputItem"] and tool["items"][-1] == "MessageOutputItem"
    assert tool["tool_outputs"][0] == f"Sunny, 21 degrees in {tool['calls'][0]['city']}"
    assert isinstance(tool["final_output"], str) and tool["final_output"] == tool["messages"][-1]
    bodies = llama_bodies(stack, mark)
    assert any({"role": "tool", "tool_call_id": message.get("tool_call_id"), "content": tool["tool_outputs"][0]}
               == message for body in bodies for message in body["messages"])
    # the stop_on_first_tool agent's final output is the tool's result itself
    assert runs["stop"]["final_output"] == runs["stop"]["tool_outputs"][0] == tool["tool_outputs"][0]
    text = runs["text"]
    assert text["items"] == ["MessageOutputItem"] and text["final_output"] == text["messages"][0]
    assert text["final_output"] and text["usage"][0][1] > 0
    # streamed runs (the SDK accumulating the gateway's events) end as the non-streamed ones (greedy;
    # llama.cpp's streams carry no usage: the gateway estimates their input tokens, docs/openai-upstreams.md)
    for name in ("tool", "text"):
        streamed, plain = runs[f"streamed_{name}"], runs[name]
        assert [streamed[field] for field in ("final_output", "items", "tool_calls", "tool_outputs")] == \
            [plain[field] for field in ("final_output", "items", "tool_calls", "tool_outputs")]
        assert [output for _, output in streamed["usage"]] == [output for _, output in plain["usage"]]
    assert runs["streamed_text"]["usage"] == text["usage"]
    # every model call went through /v1/responses with the agents' key, and was stored for it
    for response_id in [rid for run in runs.values() for rid in run["response_ids"]]:
        stored = httpx.get(f"{stack.gateway.base_url}/responses/{response_id}", timeout=10,
                           headers={"Authorization": f"Bearer {stack.agents_key}"})
        assert stored.status_code == 200, stored.text


# 4. Differential: /v1/responses and /v1/chat/completions on FastChat's real worker


CONVERSATION = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
                {"role": "user", "content": "Tell me a story"}]


@pytest.mark.parametrize("stream", [False, True])
def test_responses_and_chat_give_the_same_answer(stack, client, stream):
    mark = stack.fastchat.mark()
    chat_request = {"model": VICUNA, "messages": [{"role": "system", "content": "You are brief."}, *CONVERSATION],
                    "temperature": 0, "max_tokens": 12}
    responses_request = {"model": VICUNA, "instructions": "You are brief.", "input": CONVERSATION,
                         "temperature": 0, "max_output_tokens": 12}
    if stream:
        chunks = list(client.chat.completions.create(**chat_request, stream=True,
                                                     stream_options={"include_usage": True}))
        chat_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        chat_usage = chunks[-1].usage
        with client.responses.stream(**responses_request) as events:
            response = list(events)[-1].response
    else:
        chat = client.chat.completions.create(**chat_request)
        chat_text, chat_usage = chat.choices[0].message.content, chat.usage
        response = client.responses.create(**responses_request)
    assert response.output_text == chat_text and len(chat_text) > 3
    assert response.usage.input_tokens == chat_usage.prompt_tokens
    assert response.usage.output_tokens == chat_usage.completion_tokens
    chat_payload, responses_payload = worker_payloads(stack, mark)
    assert responses_payload == chat_payload  # the very same prompt and parameters


# 5. Bad input through the real server: OpenAI's errors, never a 500


def bad_requests() -> list[tuple[str, dict[str, Any], int, str]]:
    """(case, body, status, param) for the bad-input test."""
    call = {"type": "function_call_output", "call_id": "call_nowhere", "output": "1"}
    return [
        ("unknown item type", {"model": VICUNA, "input": [{"type": "reasoning_trace", "text": "x"}]}, 400,
         "input[0].type"),
        ("unknown content part", {"model": VICUNA, "input": [{"role": "user", "content": [{"type": "input_audio"}]}]},
         400, "input[0].content[0].type"),
        ("output without its call", {"model": TOOLS, "input": [call], "tools": [WEATHER]}, 400, "input"),
        ("missing previous response", {"model": VICUNA, "input": "Hi", "previous_response_id": "resp_nope"}, 404,
         "previous_response_id"),
        ("too many items", {"model": VICUNA, "input": [{"role": "user", "content": "x"}] * 2049}, 400, "input"),
        ("input missing", {"model": VICUNA}, 400, "input"),
        ("hosted tool", {"model": VICUNA, "input": "Hi", "tools": [{"type": "web_search"}]}, 400, "tools"),
        ("background", {"model": VICUNA, "input": "Hi", "background": True}, 400, "background"),
    ]


@pytest.mark.parametrize("case, body, status, param", bad_requests(), ids=[case[0] for case in bad_requests()])
def test_bad_input_gets_openais_errors(stack, http, case, body, status, param):
    mark = stack.fastchat.mark()
    for stream in (False, True):
        response = http.post("/v1/responses", json={**body, "stream": stream})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"]
        assert error["param"] == param, error
    assert not worker_payloads(stack, mark)


def test_unknown_ids_are_404s(stack, http):
    for method, path in (("GET", "/v1/responses/resp_nope"), ("DELETE", "/v1/responses/resp_nope"),
                         ("GET", "/v1/responses/resp_nope/input_items")):
        response = http.request(method, path)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
