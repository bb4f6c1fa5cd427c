"""The official openai client, sync and async, against a real gateway process (daphne) in
front of FastChat's real controller and the demo worker."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.gateway_process import StackSpec, WorkerSpec
from tests.procs import free_port, start_demo_worker, wait_for_models

pytestmark = pytest.mark.e2e

CHAT_MODEL, EMBED_MODEL, FAULT_MODEL = "demo-chat", "demo-embed", "fault-chat"
WORKER_TIMEOUT = 2
MESSAGES = [{"role": "user", "content": "Hello there"}]


STACK = StackSpec(
    workers=(WorkerSpec((CHAT_MODEL, EMBED_MODEL)), WorkerSpec((FAULT_MODEL,))),
    env={"FASTCHAT_WORKER_API_TIMEOUT": str(WORKER_TIMEOUT)},
)


@pytest.fixture(scope="module")
def stack(gateway_stack) -> dict:
    gateway = gateway_stack.gateway
    return {"gateway": gateway, "key": gateway.create_key("e2e"), "controller_url": gateway_stack.controller_url,
            "fault_worker": gateway_stack.worker_urls[1]}


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return stack["gateway"].client(stack["key"], timeout=30)


@pytest.fixture
def fault_worker(stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack["fault_worker"], timeout=5) as worker:
        worker.post("/_fake/reset").raise_for_status()
        yield worker
        worker.post("/_fake/reset").raise_for_status()


def test_models_list(client):
    ids = [model.id for model in client.models.list()]
    assert ids == sorted(ids)
    assert {CHAT_MODEL, EMBED_MODEL, FAULT_MODEL} <= set(ids)


@pytest.mark.parametrize("n", [1, 3])
def test_chat(client, n):
    completion = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, n=n, max_tokens=8)
    assert completion.object == "chat.completion"
    assert [choice.index for choice in completion.choices] == list(range(n))
    for choice in completion.choices:
        assert choice.message.role == "assistant"
        assert choice.message.content
        assert choice.finish_reason in ("stop", "length")
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True, max_tokens=8,
                                            n=2, stream_options={"include_usage": True})
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    reference = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=8)
    assert texts == {0: reference.choices[0].message.content, 1: reference.choices[0].message.content}
    assert set(finishes) == {0, 1}
    assert usage is not None and usage.prompt_tokens == reference.usage.prompt_tokens
    assert usage.completion_tokens == 2 * reference.usage.completion_tokens


def test_completions_with_prompt_list_echo_and_logprobs(client):
    completion = client.completions.create(model=CHAT_MODEL, prompt=["Once upon", "A time"], echo=True,
                                           logprobs=1, max_tokens=5)
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert completion.choices[0].text.startswith("Once upon")
    assert completion.choices[1].text.startswith("A time")
    assert completion.choices[0].logprobs.tokens


def test_streaming_completions(client):
    stream = client.completions.create(model=CHAT_MODEL, prompt="Once upon", max_tokens=6, stream=True)
    text, finish = "", None
    for chunk in stream:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    reference = client.completions.create(model=CHAT_MODEL, prompt="Once upon", max_tokens=6)
    assert text == reference.choices[0].text
    assert finish == reference.choices[0].finish_reason


def test_embeddings_float_and_base64(client):
    inputs = ["one", "two words", "three more words", "four", "five"]
    floats = client.embeddings.create(model=EMBED_MODEL, input=inputs, encoding_format="float")
    base64s = client.embeddings.create(model=EMBED_MODEL, input=inputs)  # the client asks for base64
    assert [item.index for item in floats.data] == list(range(5))
    for a, b in zip(floats.data, base64s.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert floats.usage.prompt_tokens > 0


def test_errors_map_to_the_clients_exceptions(stack, client):
    bad = openai.OpenAI(base_url=stack["gateway"].base_url, api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, temperature=3)
    assert error.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "word " * 3000}])
    assert error.value.code == "context_length_exceeded"


def test_async_client(stack):
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=stack["gateway"].base_url, api_key=stack["key"], max_retries=0)
        models = await client.models.list()
        assert CHAT_MODEL in [model.id for model in models.data]
        completions = await asyncio.gather(*(
            client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=4) for _ in range(8)
        ))
        assert all(c.choices[0].message.content for c in completions)
        stream = await client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text
        embedding = await client.embeddings.create(model=EMBED_MODEL, input="hello")
        assert len(embedding.data[0].embedding) > 0
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, top_p=2)
        await client.close()

    asyncio.run(run())


# Faults (docs/fastchat-protocol.md#failure-modes), against a worker of their own


def test_a_worker_failing_mid_stream_gives_one_error_event_then_done(stack, fault_worker):
    fault_worker.post("/_fake/config", json={"fail_after_chunks": 2}).raise_for_status()
    lines = stream_lines(stack, {"model": FAULT_MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 12})
    assert lines[-1] == "data: [DONE]"
    errors = [line for line in lines if line.startswith('data: {"error"')]
    assert len(errors) == 1 and lines[-2] == errors[0]


def test_a_stalled_worker_gives_504(stack, fault_worker):
    fault_worker.post("/_fake/config", json={"stall_seconds": WORKER_TIMEOUT + 2}).raise_for_status()
    for stream in (False, True):
        started = time.monotonic()
        response = post(stack, "/v1/chat/completions", {"model": FAULT_MODEL, "messages": MESSAGES, "stream": stream})
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "server_error"
        assert time.monotonic() - started < WORKER_TIMEOUT + 1.5


def test_a_worker_answering_500_gives_502_json(stack, fault_worker):
    fault_worker.post("/_fake/config", json={"http_status": 500}).raise_for_status()
    response = post(stack, "/v1/chat/completions", {"model": FAULT_MODEL, "messages": MESSAGES})
    assert response.status_code == 502
    assert response.json()["code"] == 50001


def test_a_client_disconnect_reaches_the_worker_within_a_second(stack, fault_worker):
    fault_worker.post("/_fake/config", json={"token_delay": 0.2}).raise_for_status()
    gateway = stack["gateway"]
    body = {"model": FAULT_MODEL, "messages": MESSAGES, "stream": True, "max_tokens": 50}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {stack['key']}"}) as response:
            lines = response.iter_lines()
            while "content" not in next(lines):
                pass
            closed_at = time.time()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        entries = [e for e in fault_worker.get("/_fake/log").json()["requests"] if e["path"] == "/worker_generate_stream"]
        if entries and entries[-1]["client_disconnected"]:
            break
        time.sleep(0.05)
    assert entries[-1]["client_disconnected"], entries
    assert entries[-1]["disconnected_at"] - closed_at < 1.0


def test_a_killed_worker_still_listed_gives_503_json(stack, tmp_path):
    port = free_port()
    doomed = start_demo_worker(port, stack["controller_url"], ["doomed-chat"], log_path=tmp_path / "doomed.log")
    try:
        wait_for_models(stack["controller_url"], ["doomed-chat"], timeout=20)
        assert post(stack, "/v1/chat/completions", {"model": "doomed-chat", "messages": MESSAGES}).status_code == 200
    finally:
        doomed.kill()
        doomed.wait()
    started = time.monotonic()
    response = post(stack, "/v1/chat/completions", {"model": "doomed-chat", "messages": MESSAGES})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "worker_unreachable"
    assert time.monotonic() - started < 5


def post(stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(stack["gateway"].url + path, json=body, timeout=30,
                      headers={"Authorization": f"Bearer {stack['key']}"})


def stream_lines(stack, body: dict) -> list[str]:
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", stack["gateway"].url + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {stack['key']}"}) as response:
            assert response.status_code == 200
            return [line for line in response.iter_lines() if line]
