"""The benchmark's own tools: the fast fake worker answers like the demo worker, the fast fake
OpenAI-compatible server answers like an OpenAI server (checked with the official client), and
the wrk load generator counts what it should, and the Python one's checks of Responses API answers
pass real answers and fail broken ones (bench/fast_worker.py, bench/fast_openai.py, bench/wrkgen.py,
bench/loadgen.py)."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.procs import free_port, start_demo_worker, start_process, stop_process, wait_for_port
from tests.services import requires_service

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parent.parent / "bench"
PROMPT = "A chat between a curious user and an artificial intelligence assistant. USER: Say hi. ASSISTANT:"
REQUESTS = [
    ("/worker_generate", {"model": "demo-chat", "prompt": PROMPT, "max_new_tokens": 16, "echo": False,
                          "stop": None, "stop_token_ids": None, "temperature": 0.7, "top_p": 1.0}),
    ("/worker_generate_stream", {"model": "demo-chat", "prompt": PROMPT, "max_new_tokens": 64, "echo": False,
                                 "stop": "</s>", "logprobs": 1}),
    ("/worker_get_embeddings", {"model": "demo-embed", "input": ["one", "two words"]}),
    ("/count_token", {"model": "demo-chat", "prompt": PROMPT}),
    ("/model_details", {"model": "demo-chat"}),
    ("/worker_get_conv_template", {"model": "demo-chat"}),
    ("/worker_generate", {"model": "demo-chat", "prompt": PROMPT, "max_new_tokens": 0}),  # FastChat's 500
]


@pytest.fixture(scope="module")
def workers():
    ports = free_port(), free_port()
    demo = start_demo_worker(ports[0], None, ["demo-chat", "demo-embed"], extra_args=["--reply-words", "40"])
    try:
        fast = start_demo_worker(ports[1], None, ["demo-chat", "demo-embed"], extra_args=["--reply-words", "40"],
                                 program=[str(BENCH / "fast_worker.py")])
    except BaseException:
        stop_process(demo)
        raise
    yield [f"http://127.0.0.1:{port}" for port in ports]
    stop_process(fast)
    stop_process(demo)


def test_the_fast_worker_answers_what_the_demo_worker_answers(workers):
    demo, fast = workers
    with httpx.Client(timeout=10) as client:
        for path, body in REQUESTS:
            expected = client.post(demo + path, json=body)
            for _ in range(2):  # computed, then remembered
                answer = client.post(fast + path, json=body)
                assert (answer.status_code, answer.content) == (expected.status_code, expected.content), path
        assert client.post(fast + "/worker_get_status", json={}).json()["model_names"] == ["demo-chat", "demo-embed"]
        assert client.post(fast + "/nowhere", json={}).status_code == 404


@pytest.fixture(scope="module")
def fake_openai():
    port = free_port()
    proc = start_process([sys.executable, str(BENCH / "fast_openai.py"), "--port", str(port), "--reply-words", "64"])
    try:
        wait_for_port(port, timeout=20, proc=proc, what="bench/fast_openai.py")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(proc)


def test_the_fake_openai_server_answers_the_official_client(fake_openai):
    import openai

    client = openai.OpenAI(base_url=fake_openai, api_key="sk-any", max_retries=0)
    assert [m.id for m in client.models.list()] == ["demo-chat", "demo-embed"]
    messages = [{"role": "user", "content": "Say hello to the benchmark."}]
    for _ in range(2):  # computed, then remembered: the same answer
        answer = client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=16)
        assert answer.object == "chat.completion" and answer.model == "demo-chat"
        assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason == "length"
        assert len(answer.choices[0].message.content.split()) == 16
        assert (answer.usage.completion_tokens, answer.usage.total_tokens) == (16, answer.usage.prompt_tokens + 16)
    full = client.chat.completions.create(model="demo-chat", messages=messages)
    assert full.choices[0].finish_reason == "stop" and full.usage.completion_tokens == 64

    chunks = list(client.chat.completions.create(
        model="demo-chat", messages=messages, max_tokens=64, stream=True, stream_options={"include_usage": True}))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 64 and "".join(content) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 64
    assert all(c.object == "chat.completion.chunk" and c.model == "demo-chat" for c in chunks)
    plain = list(client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=64, stream=True))
    assert len(plain) == len(chunks) - 1 and all(c.usage is None and c.choices for c in plain)

    embedded = client.embeddings.create(model="demo-embed", input=["one", "two words"])
    assert [e.index for e in embedded.data] == [0, 1] and len(embedded.data[0].embedding) == 16
    assert embedded.data[0].embedding != embedded.data[1].embedding and embedded.usage.prompt_tokens == 3

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=messages)
    assert missing.value.code == "model_not_found"
    garbage = httpx.post(fake_openai + "/chat/completions", content=b"{not json")
    assert garbage.status_code == 400 and garbage.json()["error"]["type"] == "invalid_request_error"


class CannedAPI(BaseHTTPRequestHandler):
    """Chat answers on keep-alive connections; a key that says "fail" gets a 500."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        failing = "fail" in self.headers.get("Authorization", "") or b'"model"' not in body
        status, answer = (500, b'{"error": {}}') if failing else (200, b'{"choices": [{"index": 0}]}')
        if self.path == "/v1/responses":  # a stream's last event (a Response always has "error")
            end = b"response.failed" if failing else b"response.completed"
            status, answer = 200, b'event: %s\ndata: {"type":"%s","response":{"error":null}}\n\n' % (end, end)
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


@requires_service("wrk", shutil.which("wrk") is not None)
@pytest.mark.parametrize("failing", [False, True])
@pytest.mark.parametrize("scenario", ["chat", "responses_stream"])
def test_wrkgen_counts_answers_and_failures(failing, scenario):
    server = ThreadingHTTPServer(("127.0.0.1", 0), CannedAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        key = "fail" if failing else "sk-test"
        result = subprocess.run(
            [sys.executable, str(BENCH / "wrkgen.py"), "--base-url", f"http://127.0.0.1:{server.server_port}",
             "--api-key", key, "--scenario", scenario, "--concurrency", "2", "--warmup", "1", "--duration", "1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    cell = json.loads(result.stdout)
    if failing:
        assert cell["requests"] == 0 and cell["failures"] > 10 and cell["warmup_failures"] > 0
        assert cell["error_samples"][0].startswith("200 " if scenario == "responses_stream" else "500 ")
    else:
        assert cell["failures"] == 0 and cell["requests"] > 10 and cell["rps"] > 10
        assert 0 < cell["p50_ms"] <= cell["p99_ms"]


# The load generator's checks of the Responses API's answers (bench/loadgen.py), on real answers
# of a gateway process (in front of the demo worker) and on broken copies of them.

def loadgen():
    sys.path.insert(0, str(BENCH))
    import loadgen

    return loadgen


@pytest.fixture(scope="module")
def real_responses(gateway_stack):
    """The gateway, a key, and its real answers to the benchmark's two Responses requests."""
    gateway = gateway_stack.gateway
    key = gateway.create_key("bench")
    scenarios = loadgen().SCENARIOS
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        plain = client.post("/v1/responses", json=scenarios["responses"].body)
        stream = client.post("/v1/responses", json=scenarios["responses_stream"].body)
    assert plain.status_code == stream.status_code == 200, (plain.text, stream.text)
    return gateway, key, plain.content, stream.content


def feed(stream_bytes: bytes) -> None:
    checker = loadgen().ResponseStream()
    for line in stream_bytes.splitlines(keepends=True):
        checker.feed(line)
    checker.close()


def frames(stream_bytes: bytes) -> list[bytes]:
    return [frame + b"\n\n" for frame in stream_bytes.split(b"\n\n") if frame]


def test_the_load_generator_passes_real_responses_and_measures_them(real_responses):
    gen = loadgen()
    gateway, key, plain, stream = real_responses
    gen.check_response_answer(plain)
    feed(stream)
    assert json.loads(plain)["output"][0]["content"][0]["text"]
    assert frames(stream)[-1].split(b"\n")[0] in (b"event: response.completed", b"event: response.incomplete")

    async def send_both():
        import aiohttp

        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            results = {}
            for name in ("responses", "responses_stream", "chat_stream"):
                send = gen.request_function(gen.SCENARIOS[name])
                url = gateway.url + gen.SCENARIOS[name].path
                results[name] = await send(session, url, json.dumps(gen.SCENARIOS[name].body).encode())
            return results

    results = asyncio.run(send_both())
    assert results["responses"] == (None, 1)
    ttft, events = results["responses_stream"]
    assert 0 < ttft < 30 and events == len(frames(stream))
    assert results["chat_stream"][0] > 0  # the chat check still passes beside them


def test_the_load_generator_fails_broken_responses(real_responses):
    gen = loadgen()
    _, _, plain, stream = real_responses
    answer = json.loads(plain)
    broken_answers = [
        {**answer, "object": "chat.completion"},
        {**answer, "status": "failed", "error": {"code": "server_error", "message": "boom"}},
        {**answer, "status": "incomplete", "incomplete_details": {"reason": "content_filter"}},
        {**answer, "output": [{**answer["output"][0], "content": [{"type": "output_text", "text": ""}]}]},
        {"error": {"message": "no"}},
    ]
    for broken in broken_answers:
        with pytest.raises(gen.RequestFailed):
            gen.check_response_answer(json.dumps(broken).encode())
    with pytest.raises(gen.RequestFailed):
        gen.check_response_answer(b"not json")

    events = frames(stream)
    final = json.loads(events[-1].split(b"data: ", 1)[1])
    failed = {"type": "response.failed", "sequence_number": final["sequence_number"],
              "response": {**final["response"], "status": "failed", "error": {"code": "server_error", "message": "x"}}}
    error = {"type": "error", "sequence_number": final["sequence_number"], "code": "server_error", "message": "x"}
    broken_streams = {
        "ends in response.failed": events[:-1] + [b"event: response.failed\ndata: " + json.dumps(failed).encode() + b"\n\n"],
        "ends in error": events[:-1] + [b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"],
        "ends without its final event": events[:-1],
        "events out of order": [events[0], events[2], events[1], *events[3:]],
        "a repeated sequence_number": [*events[:5], events[4], *events[5:]],
        "an event after the end": [*events, events[-1]],
        "no text deltas": [e for e in events if not e.startswith(b"event: response.output_text.delta\n")],
    }
    for name, broken in broken_streams.items():
        with pytest.raises(gen.RequestFailed):
            feed(b"".join(broken))
            pytest.fail(name)
