"""The benchmark's own tools: the fast fake worker answers like the demo worker, the fast fake
OpenAI-compatible server answers like an OpenAI server (checked with the official client), and
the wrk load generator counts what it should (bench/fast_worker.py, bench/fast_openai.py,
bench/wrkgen.py)."""
from __future__ import annotations

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
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args) -> None:
        pass


@requires_service("wrk", shutil.which("wrk") is not None)
@pytest.mark.parametrize("failing", [False, True])
def test_wrkgen_counts_answers_and_failures(failing):
    server = ThreadingHTTPServer(("127.0.0.1", 0), CannedAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        key = "fail" if failing else "sk-test"
        result = subprocess.run(
            [sys.executable, str(BENCH / "wrkgen.py"), "--base-url", f"http://127.0.0.1:{server.server_port}",
             "--api-key", key, "--scenario", "chat", "--concurrency", "2", "--warmup", "1", "--duration", "1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    cell = json.loads(result.stdout)
    if failing:
        assert cell["requests"] == 0 and cell["failures"] > 10 and cell["warmup_failures"] > 0
        assert cell["error_samples"][0].startswith("500 ")
    else:
        assert cell["failures"] == 0 and cell["requests"] > 10 and cell["rps"] > 10
        assert 0 < cell["p50_ms"] <= cell["p99_ms"]
