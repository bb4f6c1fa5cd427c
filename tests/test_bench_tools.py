"""The benchmark's own tools: the fast fake worker answers like the demo worker, and the wrk
load generator counts what it should (bench/fast_worker.py, bench/wrkgen.py)."""
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

from tests.procs import free_port, start_demo_worker, stop_process
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
