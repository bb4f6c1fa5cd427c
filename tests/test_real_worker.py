"""The gateway in front of FastChat's REAL model_worker.

FastChat 0.2.36's own `fastchat.serve.model_worker` runs on the CPU with tiny random Llama
models built by tests/tiny_model.py (docs/fastchat-protocol.md, "Worker failure modes"), behind
FastChat's real controller; the gateway runs as a daphne process and is driven with the official
openai client.

* Two workers are reached through a recording HTTP proxy in this process: each worker registers
  the proxy's address with the controller (`--worker-address`), so the gateway talks to the proxy,
  which forwards everything to the worker and records every request body. That shows what the
  worker really received: the generate payloads are compared with what FastChat's own
  openai_api_server builds (its Conversation class, fed the template the worker itself serves),
  and the requests that would wedge a worker (docs/fastchat-protocol.md, "Worker failure
  modes") are shown never to reach it.
* A third worker, reached directly, is first wedged on purpose (five bad requests sent straight
  to it: the premise above, shown on the real thing), then SIGKILLed while the controller still
  lists it: the gateway must answer 503 JSON at once.

Needs torch, transformers and friends: pip install -r requirements-realworker.txt.
"""
from __future__ import annotations

import base64
import contextlib
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.services import requires_service

MISSING = [name for name in ("torch", "transformers", "accelerate") if find_spec(name) is None]
pytestmark = [pytest.mark.real_worker, pytest.mark.e2e,
              requires_service("torch", not MISSING, f"missing: {', '.join(MISSING)}")]

from tests.fastchat_reference import fastchat_conversation  # noqa: E402
from tests.gateway_process import Gateway  # noqa: E402
from tests.procs import HOST  # noqa: E402
from tests.stacks import RecordingProxy, StackBuilder  # noqa: E402

VICUNA, LLAMA2, DOOMED = "tiny-vicuna", "tiny-llama2", "tiny-doomed"
TEMPLATES = {VICUNA: "vicuna_v1.1", LLAMA2: "llama-2"}
CONTEXT_LENGTH = 2048  # max_position_embeddings of the tiny models
GENERATE_PATHS = {"/worker_generate", "/worker_generate_stream", "/worker_get_embeddings"}
MESSAGES = [{"role": "user", "content": "Hello there"}]


# The stack


@dataclass
class Stack:
    gateway: Gateway
    key: str
    controller_url: str
    proxies: dict[str, RecordingProxy]
    worker_ports: dict[str, int]
    workers: dict[str, subprocess.Popen]
    log_dir: Path

    def worker(self, model: str) -> str:
        """A worker's own address, bypassing the proxy (for status and reference calls)."""
        return f"http://{HOST}:{self.worker_ports[model]}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("real_worker")
    with StackBuilder(tmp) as build:
        controller_url = build.controller()
        # the doomed worker (a vicuna too) is reached directly: it is wedged, then killed
        workers = {name: build.real_worker(template, name, proxied=name != DOOMED)
                   for name, template in {**TEMPLATES, DOOMED: "vicuna_v1.1"}.items()}
        build.wait_for_workers(*workers.values())
        gateway = build.gateway("daphne", {"FASTCHAT_WORKER_API_TIMEOUT": "30"})
        yield Stack(gateway, gateway.create_key("real-worker"), controller_url,
                    {name: worker.proxy for name, worker in workers.items() if worker.proxy is not None},
                    {name: worker.port for name, worker in workers.items()},
                    {name: worker.proc for name, worker in workers.items()}, tmp)


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return stack.gateway.client(stack.key)


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    """Raw HTTP to the gateway, for bodies the openai client will not send."""
    with stack.gateway.http(stack.key) as client:
        yield client


# What FastChat 0.2.36's openai_api_server would send (its get_gen_params, without importing
# the module: it replaces sys.stdout and writes a log file on import)


def fastchat_template(stack: Stack, model: str) -> dict[str, Any]:
    """The template the worker itself serves, as FastChat's API server fetches it."""
    response = httpx.post(stack.worker(model) + "/worker_get_conv_template", json={"model": model}, timeout=10)
    return response.json()["conv"]


def fastchat_gen_params(conv_dict: dict[str, Any], model: str, messages: str | list[dict[str, Any]], *,
                        temperature: float = 0.7, top_p: float = 1.0, top_k: int = -1,
                        presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                        max_tokens: int, echo: bool = False, logprobs: int | None = None,
                        stop: str | list[str] | None = None, best_of: int | None = None,
                        use_beam_search: bool | None = None) -> dict[str, Any]:
    """fastchat.serve.openai_api_server.get_gen_params (release 0.2.36), line for line."""
    conv = fastchat_conversation(conv_dict)
    images: list[str] = []
    if isinstance(messages, str):
        prompt = messages
    else:
        for message in messages:
            role = message["role"]
            if role in ("system", "developer"):  # the gateway treats developer as system (docs/decisions.md)
                conv.set_system_message(message["content"])
            elif role == "user":
                if isinstance(message["content"], list):
                    image_list = [it["image_url"]["url"] for it in message["content"] if it["type"] == "image_url"]
                    text_list = [it["text"] for it in message["content"] if it["type"] == "text"]
                    conv.append_message(conv.roles[0], ("\n".join(text_list), image_list))
                else:
                    conv.append_message(conv.roles[0], message["content"])
            elif role == "assistant":
                conv.append_message(conv.roles[1], message["content"])
            else:
                raise ValueError(f"Unknown role: {role}")
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        images = conv.get_images()
    params: dict[str, Any] = {
        "model": model, "prompt": prompt, "temperature": temperature, "logprobs": logprobs,
        "top_p": top_p, "top_k": top_k, "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty, "max_new_tokens": max_tokens, "echo": echo,
        "stop_token_ids": conv.stop_token_ids,
    }
    if images:
        params["images"] = images
    if best_of is not None:
        params["best_of"] = best_of
    if use_beam_search is not None:
        params["use_beam_search"] = use_beam_search
    new_stop: set[str] = set()
    for value in (stop, conv.stop_str):
        if value:
            new_stop.update([value] if isinstance(value, str) else value)
    params["stop"] = list(new_stop)
    return params


def assert_same_payload(sent: dict[str, Any], expected: dict[str, Any], request_stop: list[str]) -> None:
    """Equal to FastChat's payload: same keys in the same order, same values. FastChat's stop list
    comes from a set (random order); the gateway's is the request's, then the template's."""
    assert sent["prompt"] == expected["prompt"]
    assert sent["stop_token_ids"] == expected["stop_token_ids"]
    assert sorted(sent["stop"]) == sorted(expected["stop"])
    assert sent["stop"][: len(dict.fromkeys(request_stop))] == list(dict.fromkeys(request_stop))
    assert list(sent) == list(expected)
    assert {**sent, "stop": None} == {**expected, "stop": None}


def count_tokens(stack: Stack, model: str, prompt: str) -> int:
    response = httpx.post(stack.worker(model) + "/count_token", json={"model": model, "prompt": prompt}, timeout=10)
    return response.json()["count"]


def worker_queue_length(stack: Stack, model: str) -> int:
    response = httpx.post(stack.worker(model) + "/worker_get_status", timeout=5)
    return response.json()["queue_length"]


def collect_chat_stream(stream) -> tuple[dict[int, str], dict[int, str], Any]:
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            assert choice.index not in finishes, "content after the finish chunk"
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, usage


def decode_base64_floats(value: str) -> list[float]:
    raw = base64.b64decode(value)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


# The tests


def test_the_worker_serves_fastchats_own_templates(stack: Stack):
    """The model directories' names make FastChat's adapters pick the wanted templates."""
    assert fastchat_template(stack, VICUNA)["name"] == "vicuna_v1.1"
    assert fastchat_template(stack, LLAMA2)["name"] == "llama-2"
    details = httpx.post(stack.worker(VICUNA) + "/model_details", json={"model": VICUNA}, timeout=10).json()
    assert details["context_length"] == CONTEXT_LENGTH


def test_models_list_shows_the_real_workers(client):
    ids = [model.id for model in client.models.list()]
    assert {VICUNA, LLAMA2, DOOMED} <= set(ids)
    assert ids == sorted(ids)
    assert client.models.retrieve(LLAMA2).id == LLAMA2


@pytest.mark.parametrize("model", [VICUNA, LLAMA2])
def test_chat(client, model):
    completion = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert completion.object == "chat.completion"
    assert completion.model == model
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.prompt_tokens > 0
    assert 0 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("model", [VICUNA, LLAMA2])
def test_chat_stream_matches_the_non_streamed_answer(client, model):
    """Greedy decoding: the streamed deltas add up to the non-streamed text."""
    request = {"model": model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    reference = client.chat.completions.create(**request)
    stream = client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    texts, finishes, usage = collect_chat_stream(stream)
    assert texts == {0: reference.choices[0].message.content.replace("\ufffd", "")}
    assert finishes == {0: reference.choices[0].finish_reason}
    assert usage is not None
    assert usage.prompt_tokens == reference.usage.prompt_tokens
    assert usage.completion_tokens == reference.usage.completion_tokens


def test_chat_stream_with_two_choices(client):
    stream = client.chat.completions.create(model=VICUNA, messages=MESSAGES, max_tokens=8, n=2, stream=True)
    texts, finishes, _ = collect_chat_stream(stream)
    assert set(texts) == set(finishes) == {0, 1}
    assert all(reason in ("stop", "length") for reason in finishes.values())


def test_completions_with_echo_logprobs_and_two_prompts(client):
    prompts = ["def hello", "The quick brown fox"]
    completion = client.completions.create(model=VICUNA, prompt=prompts, echo=True, logprobs=1,
                                           max_tokens=6, temperature=0)
    assert completion.object == "text_completion"
    assert [choice.index for choice in completion.choices] == [0, 1]
    for prompt, choice in zip(prompts, completion.choices, strict=True):
        assert choice.text.startswith(prompt)
        assert choice.finish_reason in ("stop", "length")
        logprobs = choice.logprobs
        assert logprobs.tokens
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset)
        assert all(lp is None or lp <= 0 for lp in logprobs.token_logprobs)
    assert completion.usage.prompt_tokens > 0


def test_streaming_completions(client):
    prompts = ["def hello", "The quick brown fox"]
    request = {"model": LLAMA2, "prompt": prompts, "max_tokens": 8, "temperature": 0}
    reference = client.completions.create(**request)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in client.completions.create(**request, stream=True):
        assert chunk.object == "text_completion"
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text.replace("\ufffd", "") for c in reference.choices}
    assert finishes == {c.index: c.finish_reason for c in reference.choices}


def test_embeddings_float_and_base64(stack: Stack, client):
    inputs = ["hello world", "The quick brown fox", "def f(x): return x", "four", "five", "six"]
    mark = stack.proxies[VICUNA].mark()
    floats = client.embeddings.create(model=VICUNA, input=inputs, encoding_format="float")
    decoded = client.embeddings.create(model=VICUNA, input=inputs)  # the client asks for base64, decodes it
    raw = client.embeddings.create(model=VICUNA, input=inputs, encoding_format="base64")  # left as strings
    assert [item.index for item in floats.data] == list(range(len(inputs)))
    assert floats.usage.prompt_tokens > len(inputs)
    for a, b, c in zip(floats.data, decoded.data, raw.data, strict=True):
        assert len(a.embedding) == 64
        assert sum(x * x for x in a.embedding) == pytest.approx(1.0, abs=1e-4)  # L2-normalised
        assert b.embedding == pytest.approx(a.embedding, abs=1e-5)
        assert decode_base64_floats(c.embedding) == pytest.approx(a.embedding, abs=1e-5)
    # Six inputs in batches of FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE (4), as FastChat sends them.
    payloads = [record.body for record in stack.proxies[VICUNA].since(mark, "/worker_get_embeddings")]
    expected_formats = ["float", "float", "base64", "base64", "base64", "base64"]
    assert sorted(len(p["input"]) for p in payloads) == [2, 2, 2, 4, 4, 4]
    assert sorted(p["encoding_format"] for p in payloads) == sorted(expected_formats)
    for payload in payloads:
        assert payload == {"model": VICUNA, "input": payload["input"], "encoding_format": payload["encoding_format"]}


def test_a_bare_string_embeddings_input_reaches_the_worker_as_a_list(stack: Stack, client):
    """A bare string makes the real worker fail with 500 and leak a slot: it must go as [str]."""
    mark = stack.proxies[LLAMA2].mark()
    result = client.embeddings.create(model=LLAMA2, input="just one string", encoding_format="float")
    assert len(result.data) == 1 and len(result.data[0].embedding) == 64
    [record] = stack.proxies[LLAMA2].since(mark, "/worker_get_embeddings")
    assert record.body["input"] == ["just one string"]


# The prompt and parameters the worker receives are FastChat's

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hello there"}],
    "system and several turns": [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "again"},
    ],
    "system message last": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Ünïcödé ✓ and\nnew lines"},
        {"role": "system", "content": "Be brief."},
    ],
    "developer as system": [
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": "Why?"},
    ],
    "text content parts": [  # (llama-2 in FastChat 0.2.36 crashes on list content: vicuna only)
        {"role": "user", "content": [{"type": "text", "text": "First"}, {"type": "text", "text": "second"}]},
    ],
}


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
@pytest.mark.parametrize("model", [VICUNA, LLAMA2])
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_chat_payload_equals_fastchats(stack: Stack, client, model, case, stream):
    if case == "text content parts" and model == LLAMA2:
        pytest.skip("FastChat 0.2.36 cannot render list content with the llama-2 template (TypeError)")
    messages = CONVERSATIONS[case]
    stop = ["\nUSER", "###", "\nUSER"]
    request = {"temperature": 0.5, "top_p": 0.9, "max_tokens": 4, "stop": stop}
    proxy = stack.proxies[model]
    mark = proxy.mark()
    if stream:
        texts, finishes, _ = collect_chat_stream(
            client.chat.completions.create(model=model, messages=messages, stream=True, **request))
        assert finishes.get(0) in ("stop", "length")
    else:
        client.chat.completions.create(model=model, messages=messages, **request)
    [record] = proxy.since(mark, *GENERATE_PATHS)
    assert record.path == "/worker_generate_stream"  # non-streamed answers are assembled from a stream too
    expected = fastchat_gen_params(fastchat_template(stack, model), model, messages, **request)
    assert_same_payload(record.body, expected, stop)


def test_chat_default_parameters_equal_fastchats(stack: Stack, client):
    """No sampling parameters but max_tokens: FastChat's defaults (temperature 0.7, top_p 1,
    top_k -1, no penalties, no stop) are what the worker gets."""
    proxy = stack.proxies[LLAMA2]
    mark = proxy.mark()
    client.chat.completions.create(model=LLAMA2, messages=CONVERSATIONS["system and several turns"], max_tokens=3)
    [record] = proxy.since(mark, *GENERATE_PATHS)
    expected = fastchat_gen_params(fastchat_template(stack, LLAMA2), LLAMA2,
                                   CONVERSATIONS["system and several turns"], max_tokens=3)
    assert_same_payload(record.body, expected, [])


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "stream"])
def test_completions_payload_equals_fastchats(stack: Stack, client, stream):
    prompts = ["def hello", "USER: raw prompt, no template ASSISTANT:"]
    request = {"temperature": 0.3, "top_p": 0.8, "max_tokens": 5, "stop": "###", "echo": True}
    if not stream:
        request["logprobs"] = 1
    proxy = stack.proxies[VICUNA]
    mark = proxy.mark()
    result = client.completions.create(model=VICUNA, prompt=prompts, stream=stream, **request)
    if stream:
        list(result)
    records = proxy.since(mark, *GENERATE_PATHS)
    assert {record.path for record in records} == {"/worker_generate_stream"}
    conv = fastchat_template(stack, VICUNA)
    # FastChat's non-streaming completions pass best_of and use_beam_search (default False); the
    # streaming path does not.
    extra = {} if stream else {"use_beam_search": False}
    for prompt in prompts:
        [sent] = [record.body for record in records if record.body["prompt"] == prompt]
        expected = fastchat_gen_params(conv, VICUNA, prompt, **request, **extra)
        assert_same_payload(sent, expected, ["###"])


def long_prompt(stack: Stack, model: str, tokens: int) -> tuple[str, int]:
    """A prompt of close to `tokens` tokens (by the worker's own count_token) and its count."""
    unit = "def f(x): return x + 1\n"
    per_unit = count_tokens(stack, model, unit * 2) - count_tokens(stack, model, unit)
    repeats = tokens // per_unit
    prompt = unit * repeats
    count = count_tokens(stack, model, prompt)
    while count > tokens:
        repeats -= 1
        prompt = unit * repeats
        count = count_tokens(stack, model, prompt)
    return prompt, count


def test_max_tokens_is_clamped_to_the_context_like_fastchat(stack: Stack, client):
    """FastChat's check_length: a max_tokens that does not fit is lowered to what the context
    leaves, and every prompt of a completions request gets the smallest such value."""
    prompt, count = long_prompt(stack, VICUNA, CONTEXT_LENGTH - 6)
    assert CONTEXT_LENGTH - 16 < count <= CONTEXT_LENGTH - 6
    proxy = stack.proxies[VICUNA]
    mark = proxy.mark()
    completion = client.completions.create(model=VICUNA, prompt=["short one", prompt], max_tokens=16, temperature=0)
    assert len(completion.choices) == 2
    sent = [record.body for record in proxy.since(mark, "/worker_generate_stream")]
    assert sorted(p["max_new_tokens"] for p in sent) == [CONTEXT_LENGTH - count] * 2


def test_max_tokens_beyond_the_context_is_a_200_in_chat_too(stack: Stack, client):
    proxy = stack.proxies[LLAMA2]
    mark = proxy.mark()
    completion = client.chat.completions.create(model=LLAMA2, messages=MESSAGES, max_tokens=10**6, temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length")
    [sent] = [record.body for record in proxy.since(mark, "/worker_generate_stream")]
    assert sent["max_new_tokens"] == CONTEXT_LENGTH - count_tokens(stack, LLAMA2, sent["prompt"])


# A non-streamed request the gateway abandons frees the worker: FastChat's worker finishes a
# /worker_generate generation whatever its client does, but stops a stream that is closed.

def usage_rows(stack: Stack) -> list[tuple[int, int, int]]:
    """(status, completion_tokens, streamed) of the gateway's usage rows, oldest first."""
    import sqlite3

    path = stack.gateway.env["DATABASE_URL"].removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT status, completion_tokens, streamed FROM keys_usagerecord ORDER BY id").fetchall()


def seconds_until_idle(stack: Stack, model: str, timeout: float) -> float:
    started = time.monotonic()
    while worker_queue_length(stack, model) and time.monotonic() - started < timeout:
        time.sleep(0.05)
    return time.monotonic() - started


def test_an_abandoned_non_streamed_request_frees_the_real_worker(stack: Stack, http):
    body = {"model": VICUNA, "prompt": "def hello", "max_tokens": 1900, "temperature": 0}
    # The same generation sent straight to the worker's /worker_generate, abandoned by its client,
    # keeps the worker busy: the premise, shown on the real thing.
    params = {"model": VICUNA, "prompt": "def hello", "temperature": 0.0, "max_new_tokens": 1000, "echo": False,
              "stop": [], "stop_token_ids": None}  # a shorter one: the test waits for it to end
    try:
        httpx.post(stack.worker(VICUNA) + "/worker_generate", json=params, timeout=0.3)
    except httpx.ReadTimeout:
        pass  # the client left while the worker generates
    else:
        pytest.skip("the tiny model ended this generation within 0.3 s: nothing to abandon")
    time.sleep(0.5)
    if worker_queue_length(stack, VICUNA) == 0:
        pytest.skip("the tiny model ended this generation within a second: nothing to abandon")
    busy_for = seconds_until_idle(stack, VICUNA, timeout=120)
    assert busy_for > 0.5

    rows_before = len(usage_rows(stack))
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=1.0)
    left_at = time.monotonic()
    seconds_until_idle(stack, VICUNA, timeout=10)
    freed_after = time.monotonic() - left_at
    print(f"worker busy {busy_for:.1f} s after a /worker_generate client left; "
          f"free {freed_after:.2f} s after a gateway client left")  # shown with pytest -s
    assert freed_after < 1.5, "the worker kept generating after the client left"
    deadline = time.monotonic() + 5
    while len(usage_rows(stack)) == rows_before and time.monotonic() < deadline:
        time.sleep(0.1)
    status, completion_tokens, streamed = usage_rows(stack)[-1]
    assert (status, streamed) == (499, 0)
    assert completion_tokens > 0  # charged for what the worker produced before the client left


def test_context_overflow_is_a_400_without_generation(stack: Stack, http):
    prompt, count = long_prompt(stack, VICUNA, CONTEXT_LENGTH + 60)
    assert count > CONTEXT_LENGTH
    proxy = stack.proxies[VICUNA]
    mark = proxy.mark()
    response = http.post("/v1/completions", json={"model": VICUNA, "prompt": prompt, "max_tokens": 4})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert not proxy.since(mark, *GENERATE_PATHS)


# Requests that would wedge a real worker never reach it

WEDGING_REQUESTS = [
    # (path, body): each one is refused by the gateway with a 4xx JSON error.
    ("/v1/chat/completions", {"model": VICUNA, "messages": MESSAGES, "max_tokens": 0}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": MESSAGES, "max_tokens": 0, "stream": True}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": MESSAGES, "max_completion_tokens": 0}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": MESSAGES, "max_tokens": -5}),
    ("/v1/chat/completions", {"model": VICUNA}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": None}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": []}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": MESSAGES, "n": 0}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": MESSAGES, "temperature": -1}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": MESSAGES, "top_p": 1.5}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": MESSAGES, "top_k": 0}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": MESSAGES, "stop": 5}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": [{"role": "tool", "content": "x"}]}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": [{"role": "user", "content": [{"text": "no type"}]}]}),
    ("/v1/chat/completions", {"model": VICUNA, "messages": MESSAGES,
                              "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("/v1/chat/completions", {"model": LLAMA2, "messages": MESSAGES, "max_tokens": 0}),
    ("/v1/chat/completions", {"model": LLAMA2, "messages": [{"role": "ghost", "content": "boo"}]}),
    ("/v1/completions", {"model": VICUNA, "prompt": "Hi", "max_tokens": 0}),
    ("/v1/completions", {"model": VICUNA, "prompt": "Hi", "max_tokens": 0, "stream": True}),
    ("/v1/completions", {"model": VICUNA}),
    ("/v1/completions", {"model": VICUNA, "prompt": []}),
    ("/v1/completions", {"model": VICUNA, "prompt": "Hi", "n": 0, "stream": True}),
    ("/v1/completions", {"model": LLAMA2, "prompt": "Hi", "temperature": -1}),
    ("/v1/embeddings", {"model": VICUNA, "input": []}),
    ("/v1/embeddings", {"model": VICUNA}),
    ("/v1/embeddings", {"model": VICUNA, "input": {"text": "not a list"}}),
    ("/v1/embeddings", {"model": LLAMA2, "input": [None]}),
    ("/v1/engines/tiny-vicuna/embeddings", {"input": [1.5, 2.5]}),
]


def test_requests_that_would_wedge_a_worker_never_reach_it(stack: Stack, http, client):
    assert len(WEDGING_REQUESTS) >= 20
    marks = {model: proxy.mark() for model, proxy in stack.proxies.items()}
    failures = []
    for path, body in WEDGING_REQUESTS:
        started = time.monotonic()
        response = http.post(path, json=body)
        elapsed = time.monotonic() - started
        try:
            error = response.json()["error"]
            ok = (400 <= response.status_code < 500 and response.headers["content-type"].startswith("application/json")
                  and isinstance(error, dict) and error.get("message") and elapsed < 5)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            failures.append(f"{path} {body} -> {response.status_code} {response.text[:300]} ({elapsed:.1f} s)")
    # An unparsable body too.
    response = http.post("/v1/chat/completions", content=b'{"model": "tiny-vicuna", "messages": [',
                         headers={"content-type": "application/json"})
    if response.status_code != 400 or "error" not in response.json():
        failures.append(f"invalid JSON -> {response.status_code} {response.text[:300]}")
    assert not failures, "\n".join(failures)

    for model, proxy in stack.proxies.items():
        reached = proxy.since(marks[model], *GENERATE_PATHS, "/count_token")
        assert not reached, f"{model} received {[(r.path, r.body) for r in reached]}"
        assert worker_queue_length(stack, model) == 0  # no leaked slot
    # Both workers still serve (after five leaked slots, a real worker hangs for good).
    for model in (VICUNA, LLAMA2):
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, timeout=20)
        assert chat.choices[0].finish_reason in ("stop", "length")
        embedding = client.embeddings.create(model=model, input=["still alive"], timeout=20)
        assert len(embedding.data[0].embedding) == 64


# The third worker: wedged on purpose, then killed while the controller still lists it (these
# two tests come last and leave the other workers alone)


def test_the_real_worker_really_wedges_after_five_bad_requests(stack: Stack, client):
    """The premise of the test above, shown on FastChat's real worker (reached directly, not
    through the gateway): five `max_new_tokens: 0` requests fail with HTTP 500 and leak the
    worker's five slots, after which it hangs every generate call."""
    before = client.chat.completions.create(model=DOOMED, messages=MESSAGES, max_tokens=4)
    assert before.choices[0].finish_reason in ("stop", "length")  # the gateway knows this worker
    worker = stack.worker(DOOMED)
    good = {"model": DOOMED, "prompt": "USER: Hi ASSISTANT:", "temperature": 0.0, "max_new_tokens": 4,
            "echo": False, "stop": [], "stop_token_ids": None}
    assert httpx.post(worker + "/worker_generate", json=good, timeout=10).status_code == 200
    for _ in range(5):
        response = httpx.post(worker + "/worker_generate", json={**good, "max_new_tokens": 0}, timeout=10)
        assert response.status_code == 500
    assert worker_queue_length(stack, DOOMED) == 5
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(worker + "/worker_generate", json=good, timeout=2)


def test_a_killed_but_listed_worker_gives_503_json(stack: Stack, client, http):
    proc = stack.workers[DOOMED]
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    controller = httpx.post(stack.controller_url + "/get_worker_address", json={"model": DOOMED}, timeout=5).json()
    assert controller["address"] == stack.worker(DOOMED)  # still listed and handed out

    requests = [
        ("/v1/chat/completions", {"model": DOOMED, "messages": MESSAGES, "max_tokens": 4}),
        ("/v1/chat/completions", {"model": DOOMED, "messages": MESSAGES, "max_tokens": 4, "stream": True}),
        ("/v1/completions", {"model": DOOMED, "prompt": "Hi", "max_tokens": 4}),
        ("/v1/completions", {"model": DOOMED, "prompt": "Hi", "max_tokens": 4, "stream": True}),
        ("/v1/embeddings", {"model": DOOMED, "input": ["hello"]}),
    ]
    for path, body in requests:
        started = time.monotonic()
        response = http.post(path, json=body, timeout=15)
        elapsed = time.monotonic() - started
        assert response.status_code == 503, f"{path} {body} -> {response.status_code} {response.text[:300]}"
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert isinstance(error, dict) and error["message"] and error["type"]
        assert elapsed < 10, f"{path} took {elapsed:.1f} s"

    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model=DOOMED, messages=MESSAGES, max_tokens=4, timeout=15)
    assert raised.value.status_code == 503
    assert httpx.post(stack.controller_url + "/list_models", timeout=5).json()["models"].count(DOOMED) == 1
    # The other workers are unaffected.
    assert client.chat.completions.create(model=VICUNA, messages=MESSAGES, max_tokens=4).choices
