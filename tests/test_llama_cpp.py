"""End to end with a real OpenAI-compatible inference server: llama.cpp's (llama-cpp-python 0.3.36).

The tests' tiny vicuna model runs twice on the CPU: in FastChat's real model_worker (behind its
controller), and converted to GGUF (tests/gguf_model.py) in llama.cpp's server with
`--chat_format vicuna`. The gateway (a uvicorn process) has both registered with
`manage.py upstreams apply`: one public model served by both kinds, and one name for each kind
alone, so the same greedy text can be asked of either route. A second llama.cpp server runs
`--chat_format chatml-function-calling` for tool calls and JSON with a schema. Clients are the
official openai package. docs/openai-upstreams.md lists what the gateway corrects of llama.cpp.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.llama_server import LlamaServer, missing
from tests.services import requires_service

MISSING = missing()
pytestmark = [pytest.mark.e2e, pytest.mark.real_worker,
              requires_service("llama.cpp", not MISSING, f"missing: {', '.join(MISSING)}")]

BOTH, FASTCHAT_ONLY, LLAMA_ONLY, TOOLS = "tiny-vicuna", "tiny-vicuna-fastchat", "tiny-vicuna-llama", "tiny-tools"
MESSAGES = [{"role": "user", "content": "Hello there"}]
GREEDY = {"temperature": 0, "max_tokens": 12}
# Every string bounded (maxLength or enum): the random model would never close an unbounded one.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    }, "required": ["city", "unit"]},
}}
FORCED = {"type": "function", "function": {"name": "get_weather"}}
# No free strings: llama.cpp's grammar lets the tiny model put a raw control character (U+0001)
# into one, which strict JSON parsers refuse (docs/openai-upstreams.md).
SCHEMA = {"type": "object", "properties": {
    "color": {"type": "string", "enum": ["red", "green", "blue"]},
    "ok": {"type": "boolean"},
    "sizes": {"type": "array", "items": {"type": "string", "enum": ["s", "m", "l"]}, "maxItems": 3},
}, "required": ["color", "ok", "sizes"]}


@dataclass
class Stack:
    gateway_url: str
    key: str
    vicuna: LlamaServer
    tools: LlamaServer
    log_dir: Path


def upstreams(controller_url: str, vicuna_url: str, tools_url: str) -> list[dict]:
    return [
        {"name": "fastchat", "kind": "fastchat", "base_url": controller_url, "discover_models": False,
         "models": [BOTH, FASTCHAT_ONLY]},
        {"name": "llama", "kind": "openai", "base_url": vicuna_url, "discover_models": False,
         "models": [{"public_name": BOTH, "upstream_name": "vicuna-gguf"},
                    # llama.cpp serves its one model whatever id is asked: this name is not its alias
                    {"public_name": LLAMA_ONLY, "upstream_name": "vicuna-gguf-2"}]},
        {"name": "llama-tools", "kind": "openai", "base_url": tools_url, "discover_models": False,
         "models": [{"public_name": TOOLS, "upstream_name": "tools-gguf",
                     "capabilities": ["tools", "json_schema", "json_mode"]}]},
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    from tests.stacks import StackBuilder

    tmp = tmp_path_factory.mktemp("llama_cpp")
    with StackBuilder(tmp) as build:
        controller_url = build.controller()
        # FastChat's worker loads torch for a while: the llama.cpp servers start meanwhile.
        worker = build.real_worker("vicuna_v1.1", BOTH, FASTCHAT_ONLY)
        vicuna = build.llama_server(alias="vicuna-gguf", chat_format="vicuna")
        tools = build.llama_server(alias="tools-gguf", chat_format="chatml-function-calling", n_ctx=1024)
        build.wait_for_workers(worker)
        gateway = build.gateway("uvicorn", {"FASTCHAT_WORKER_API_TIMEOUT": "30"})
        gateway.apply_upstreams(tmp / "upstreams.json", upstreams(controller_url, vicuna.base_url, tools.base_url))
        key = gateway.create_key("llama-e2e")
        gateway.wait_for_models(key, {BOTH, FASTCHAT_ONLY, LLAMA_ONLY, TOOLS})
        yield Stack(gateway.url, key, vicuna, tools, tmp)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway_url + "/v1", api_key=stack.key, max_retries=0, timeout=60)


def direct(server) -> openai.OpenAI:
    """A client of the llama.cpp server itself, bypassing the gateway."""
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def printable(text: str) -> str:
    # A random model emits byte tokens that are not whole UTF-8 characters: FastChat's worker
    # decodes them as U+FFFD, llama.cpp's server leaves them out. The rest must be identical.
    return text.replace("\ufffd", "")


def test_one_public_model_gives_the_same_greedy_text_from_either_kind(stack, client):
    from_llama = client.chat.completions.create(model=LLAMA_ONLY, messages=MESSAGES, **GREEDY)
    from_fastchat = client.chat.completions.create(model=FASTCHAT_ONLY, messages=MESSAGES, **GREEDY)
    reference = direct(stack.vicuna).chat.completions.create(model="vicuna-gguf", messages=MESSAGES, **GREEDY)
    text = reference.choices[0].message.content
    assert len(printable(text)) > 5
    assert from_llama.choices[0].message.content == text
    assert from_llama.model == LLAMA_ONLY
    assert printable(from_fastchat.choices[0].message.content) == printable(text)
    assert from_llama.usage.prompt_tokens == from_fastchat.usage.prompt_tokens == reference.usage.prompt_tokens
    streamed = client.chat.completions.create(model=FASTCHAT_ONLY, messages=MESSAGES, stream=True, **GREEDY)
    # (FastChat's stream holds back a piece that ends in U+FFFD, its answer keeps it)
    assert printable("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)) == \
        printable(from_fastchat.choices[0].message.content)
    # The name both kinds serve (weights 1:1): whichever route the router picks, the same text.
    before = upstream_attempts(stack.gateway_url)
    answers = {printable(client.chat.completions.create(model=BOTH, messages=MESSAGES, **GREEDY)
                         .choices[0].message.content) for _ in range(12)}
    after = upstream_attempts(stack.gateway_url)
    assert answers == {printable(text)}
    served = {name: after.get(name, 0) - before.get(name, 0) for name in ("fastchat", "llama")}
    assert sum(served.values()) == 12 and min(served.values()) > 0, served  # both took some (1 - 2**-11)


def upstream_attempts(gateway_url: str) -> dict[str, float]:
    """gateway_upstream_requests_total per upstream, from the process's /metrics (the tests talk
    to it directly from the host, which /metrics answers without a token)."""
    found = {}
    for line in httpx.get(gateway_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("gateway_upstream_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('upstream="', 1)[1].split('"', 1)[0]] = float(value)
    return found


def test_streamed_and_non_streamed_through_the_llama_route(stack, client):
    answer = client.chat.completions.create(model=LLAMA_ONLY, messages=MESSAGES, **GREEDY)
    stream = client.chat.completions.create(model=LLAMA_ONLY, messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert {chunk.model for chunk in chunks} == {LLAMA_ONLY}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    # llama.cpp's streams carry no usage: the gateway counted the chunks (one token each there)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    completion = client.completions.create(model=LLAMA_ONLY, prompt="def main", **GREEDY)
    assert completion.model == LLAMA_ONLY and completion.usage.completion_tokens > 0
    texts = "".join(c.choices[0].text for c in client.completions.create(
        model=LLAMA_ONLY, prompt="def main", stream=True, **GREEDY) if c.choices)
    assert texts == completion.choices[0].text


def test_n_choices_from_a_server_that_gives_one(stack, client):
    answer = client.chat.completions.create(model=LLAMA_ONLY, messages=MESSAGES, n=2, **GREEDY)
    assert [choice.index for choice in answer.choices] == [0, 1]
    assert answer.choices[0].message.content == answer.choices[1].message.content  # greedy: the same twice


def test_a_forced_tool_call_comes_back_as_the_server_gives_it(stack, client):
    ask = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
           "tool_choice": FORCED, "temperature": 0, "max_tokens": 64}
    reference = direct(stack.tools).chat.completions.create(model="tools-gguf", **ask).choices[0].message.tool_calls[0]
    through = client.chat.completions.create(model=TOOLS, **ask).choices[0].message.tool_calls[0]
    assert (through.function.name, through.function.arguments) == (reference.function.name,
                                                                   reference.function.arguments)
    json.loads(through.function.arguments)
    deltas = [call for chunk in client.chat.completions.create(model=TOOLS, stream=True, **ask) if chunk.choices
              for call in (chunk.choices[0].delta.tool_calls or ())]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    assert all(delta.id is None and delta.function.name is None for delta in deltas[1:])  # as OpenAI sends them
    assert "".join(delta.function.arguments or "" for delta in deltas) == reference.function.arguments
    # tool_choice "required" (llama.cpp answers 500): with one tool, the gateway names it
    required = client.chat.completions.create(model=TOOLS, **{**ask, "tool_choice": "required"})
    assert required.choices[0].message.tool_calls[0].function.arguments == reference.function.arguments


def test_json_with_a_schema_is_valid_json(stack, client):
    answer = client.chat.completions.create(
        model=TOOLS, messages=[{"role": "user", "content": "A color, please."}], temperature=0, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}})
    value = json.loads(answer.choices[0].message.content)
    assert value["color"] in ("red", "green", "blue") and isinstance(value["ok"], bool)
    assert set(value["sizes"]) <= {"s", "m", "l"} and len(value["sizes"]) <= 3


def test_a_bad_request_that_llama_cpp_answers_500_is_a_400(stack):
    response = httpx.post(stack.gateway_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {stack.key}"},
                          json={"model": LLAMA_ONLY, "messages": MESSAGES, "logit_bias": {"x": "high"}}, timeout=30)
    direct_status = httpx.post(stack.vicuna.base_url + "/chat/completions",
                               json={"model": "x", "messages": MESSAGES, "logit_bias": {"x": "high"}},
                               timeout=30).status_code
    assert direct_status == 500
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "logit_bias" and "File" not in error["message"]


def test_the_server_was_started_with_a_clean_environment(stack):
    # MODEL or API_KEY in the tests' environment would have changed what llama.cpp serves.
    environ = Path(f"/proc/{stack.vicuna.proc.pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0] for entry in environ if entry}
    assert names <= {b"PATH", b"HOME", b"PYTHONUNBUFFERED", b"OMP_NUM_THREADS"}
