"""The demo worker speaks FastChat 0.2.36's worker protocol, quirks and failure modes included."""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.procs import (
    free_port,
    start_controller,
    start_demo_worker,
    stop_process,
    wait_for_models,
)
from upstreams.fastchat.demo_worker import REPLY, SERVER_ERROR_MSG

PROMPT = "USER: Hi there ASSISTANT:"  # 4 words + BOS = 5 tokens
FULL_REPLY = " ".join(REPLY)


@pytest.fixture(scope="module")
def worker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("demo_worker") / "worker.log"
    proc = start_demo_worker(port, None, ["demo-chat", "demo-embed"], log_path=log)
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


@pytest.fixture
def client(worker_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=worker_url, timeout=5) as client:
        client.post("/_fake/reset").raise_for_status()
        yield client


def configure(client: httpx.Client, **settings: Any) -> None:
    client.post("/_fake/config", json=settings).raise_for_status()


def stream_chunks(client: httpx.Client, params: dict[str, Any]) -> list[dict[str, Any]]:
    response = client.post("/worker_generate_stream", json=params)
    assert response.status_code == 200
    assert response.content.endswith(b"\0")
    return [json.loads(part) for part in response.content.split(b"\0")[:-1]]


def generate(client: httpx.Client, **params: Any) -> dict[str, Any]:
    response = client.post("/worker_generate", json={"prompt": PROMPT, **params})
    assert response.status_code == 200
    return response.json()


def wait_for_log(client: httpx.Client, predicate: Any, timeout: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        entries = client.get("/_fake/log").json()["requests"]
        found = [entry for entry in entries if predicate(entry)]
        if found or time.monotonic() > deadline:
            assert found, entries
            return found[-1]
        time.sleep(0.02)


def test_it_streams_cumulative_nul_delimited_chunks(client: httpx.Client) -> None:
    chunks = stream_chunks(client, {"prompt": PROMPT, "max_new_tokens": 5, "echo": False})

    # Tokens 0, 2 and 4 (stream_interval 2, the last allowed token), then the final duplicate.
    assert [c["text"] for c in chunks] == [
        "Hello", "Hello wörld! I", "Hello wörld! I am a", "Hello wörld! I am a",
    ]  # fmt: skip
    assert [c["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 2, 4, 4]
    assert all(list(c) == ["text", "error_code", "usage", "finish_reason", "logprobs"] for c in chunks)


def test_it_escapes_non_ascii_in_stream_chunks(client: httpx.Client) -> None:
    response = client.post("/worker_generate_stream", json={"prompt": "", "echo": False})

    assert b"w\\u00f6rld" in response.content


def test_it_stops_after_its_sentence(client: httpx.Client) -> None:
    result = generate(client, echo=False)

    assert result["text"] == FULL_REPLY
    assert result["finish_reason"] == "stop"
    assert result["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}


def test_it_reports_one_completion_token_less_at_the_length_limit(client: httpx.Client) -> None:
    configure(client, reply_words=20)
    result = generate(client, echo=False, max_new_tokens=16)

    assert result["usage"] == {"prompt_tokens": 5, "completion_tokens": 15, "total_tokens": 20}
    assert result["finish_reason"] == "length"
    assert result["text"].split() == (REPLY * 2)[:16]


def test_it_echoes_the_prompt_when_echo_is_missing(client: httpx.Client) -> None:
    assert generate(client, max_new_tokens=3)["text"] == f"{PROMPT} Hello wörld! I"
    assert generate(client, max_new_tokens=3, echo=False)["text"] == "Hello wörld! I"


def test_it_cuts_stop_strings(client: httpx.Client) -> None:
    assert generate(client, echo=False, stop="friendly")["text"] == "Hello wörld! I am a "
    result = generate(client, echo=False, stop=["nowhere", "am"])
    assert result["text"] == "Hello wörld! I "
    assert result["finish_reason"] == "stop"


def test_it_ignores_stop_strings_inside_the_echoed_prompt(client: httpx.Client) -> None:
    result = generate(client, stop="USER", max_new_tokens=2)

    assert result["text"] == f"{PROMPT} Hello wörld!"
    assert result["finish_reason"] == "length"


def test_it_holds_back_a_partial_stop_string(client: httpx.Client) -> None:
    chunks = stream_chunks(client, {"prompt": PROMPT, "echo": False, "stop": "I am not"})

    assert "Hello wörld! I" not in [c["text"] for c in chunks]


def test_it_stops_on_a_stop_token_id_and_keeps_it(client: httpx.Client) -> None:
    result = generate(client, echo=False, stop_token_ids=[1002])  # REPLY[2]

    assert result["text"] == "Hello wörld! I"
    assert result["finish_reason"] == "stop"


def test_it_returns_cumulative_logprobs(client: httpx.Client) -> None:
    plain = generate(client, echo=False, max_new_tokens=3, logprobs=1)["logprobs"]
    echoed = generate(client, max_new_tokens=3, logprobs=1)["logprobs"]

    assert plain["tokens"] == ["Hello", " wörld!", " I"]
    assert plain["text_offset"] == [0, 5, 12]
    assert None not in plain["token_logprobs"]
    assert plain["top_logprobs"] == [{}, {}, {}]
    assert echoed["tokens"][0] == "<s>"
    assert len(echoed["tokens"]) == len(echoed["token_logprobs"]) == 5 + 3
    assert echoed["token_logprobs"][0] is None
    assert None not in echoed["token_logprobs"][1:]
    assert generate(client, max_new_tokens=3)["logprobs"] is None


def test_it_counts_words_plus_bos(client: httpx.Client) -> None:
    for prompt, count in [("", 1), ("one", 2), ("a  b\nc", 4), ("wörld 😀", 3)]:
        body = client.post("/count_token", json={"model": "demo-chat", "prompt": prompt}).json()
        assert body == {"count": count, "error_code": 0}
        assert count <= len(prompt.encode()) + 1


def test_it_describes_itself(client: httpx.Client) -> None:
    status = client.post("/worker_get_status").json()
    conv = client.post("/worker_get_conv_template", json={"model": "demo-chat"}).json()["conv"]

    assert status == {"model_names": ["demo-chat", "demo-embed"], "speed": 1, "queue_length": 0}
    assert client.post("/model_details", json={}).json() == {"context_length": 2048}
    assert conv["name"] == "vicuna_v1.1"
    assert conv["sep_style"] == 2
    assert conv["roles"] == ["USER", "ASSISTANT"]


def test_it_returns_normalised_embeddings(client: httpx.Client) -> None:
    body = {"model": "demo-embed", "input": ["hello world", "bye"]}
    floats = client.post("/worker_get_embeddings", json=body).json()
    encoded = client.post("/worker_get_embeddings", json={**body, "encoding_format": "base64"}).json()

    assert floats["token_num"] == 3 + 2
    assert [len(vector) for vector in floats["embedding"]] == [8, 8]
    assert all(math.isclose(math.hypot(*v), 1, rel_tol=1e-6) for v in floats["embedding"])
    assert floats["embedding"][0] != floats["embedding"][1]
    decoded = [list(struct.unpack("<8f", base64.b64decode(s))) for s in encoded["embedding"]]
    assert decoded == floats["embedding"]


def test_it_reports_max_new_tokens_beyond_the_context_as_error_chunk(client: httpx.Client) -> None:
    result = generate(client, max_new_tokens=5000)

    assert result["error_code"] == 50001
    assert result["text"].startswith(SERVER_ERROR_MSG + "\n\n(")
    assert "usage" not in result


def test_it_leaks_a_slot_per_bad_request_and_then_hangs(client: httpx.Client) -> None:
    bad_requests = [
        ("/worker_generate", {"prompt": PROMPT, "max_new_tokens": 0}),
        ("/worker_generate", {"max_new_tokens": 5}),
        ("/worker_get_embeddings", {"input": "a bare string"}),
        ("/worker_generate", {"prompt": PROMPT, "max_new_tokens": -1}),
        ("/worker_get_embeddings", {"input": "another"}),
    ]
    for path, params in bad_requests:
        response = client.post(path, json=params)
        assert (response.status_code, response.text) == (500, "Internal Server Error")

    log = client.get("/_fake/log").json()
    assert (log["leaked_slots"], log["queue_length"]) == (5, 5)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/worker_generate", json={"prompt": PROMPT}, timeout=0.5)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/worker_get_embeddings", json={"input": ["x"]}, timeout=0.5)
    assert client.post("/count_token", json={"prompt": "still up"}).json()["count"] == 3
    client.post("/_fake/reset")
    assert generate(client, echo=False)["text"] == FULL_REPLY


def test_it_drops_a_stream_that_fails_after_its_headers(client: httpx.Client) -> None:
    with client.stream("POST", "/worker_generate_stream", json={"max_new_tokens": 5}) as response:
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            response.read()

    assert client.get("/_fake/log").json()["leaked_slots"] == 1


def test_it_does_not_leak_on_error_chunks(client: httpx.Client) -> None:
    generate(client, max_new_tokens=5000)
    generate(client, temperature="hot")

    assert client.get("/_fake/log").json()["leaked_slots"] == 0


def test_it_injects_an_error_chunk_after_some_chunks(client: httpx.Client) -> None:
    configure(client, fail_after_chunks=2)
    chunks = stream_chunks(client, {"prompt": PROMPT, "echo": False})

    assert [c["error_code"] for c in chunks] == [0, 0, 50001]
    assert chunks[-1] == {"text": f"{SERVER_ERROR_MSG}\n\n(injected)", "error_code": 50001}
    assert generate(client)["error_code"] == 50001


def test_it_crashes_mid_stream(client: httpx.Client) -> None:
    configure(client, crash_after_chunks=2)
    received = b""
    with client.stream("POST", "/worker_generate_stream", json={"prompt": PROMPT}) as response:
        with pytest.raises(httpx.RemoteProtocolError):
            for data in response.iter_raw():
                received += data

    assert received.count(b"\0") == 2
    with pytest.raises(httpx.RemoteProtocolError):
        client.post("/worker_generate", json={"prompt": PROMPT})
    assert client.get("/_fake/log").json()["queue_length"] == 0


def test_it_answers_injected_http_statuses(client: httpx.Client) -> None:
    configure(client, http_status=503, count_token_status=502)

    assert client.post("/worker_generate", json={"prompt": PROMPT}).status_code == 503
    assert client.post("/worker_generate_stream", json={"prompt": PROMPT}).status_code == 503
    assert client.post("/worker_get_embeddings", json={"input": ["x"]}).status_code == 503
    assert client.post("/count_token", json={"prompt": "x"}).status_code == 502


def test_it_applies_context_length_and_reply_words(client: httpx.Client) -> None:
    configure(client, context_length=8, reply_words=3)

    assert client.post("/model_details", json={}).json() == {"context_length": 8}
    result = generate(client, echo=False, max_new_tokens=4)
    assert result["text"] == "Hello wörld! I"
    # The prompt keeps its last 8 - 4 - 1 = 3 tokens, as FastChat truncates it.
    assert result["usage"]["prompt_tokens"] == 3


def test_it_rejects_unknown_settings(client: httpx.Client) -> None:
    response = client.post("/_fake/config", json={"token_dealy": 1})

    assert response.status_code == 400
    assert "token_dealy" in response.json()["error"]


def test_it_stalls_before_answering(client: httpx.Client) -> None:
    configure(client, stall_seconds=0.4)
    started = time.monotonic()
    generate(client)

    assert time.monotonic() - started >= 0.4


def test_it_notices_a_client_that_drops_a_slow_stream(worker_url: str) -> None:
    with httpx.Client(base_url=worker_url, timeout=5) as client:
        client.post("/_fake/reset")
        configure(client, token_delay=1.0)
        with client.stream("POST", "/worker_generate_stream", json={"prompt": PROMPT}) as response:
            next(response.iter_raw())  # the first chunk, after one token delay
        closed_at = time.time()

    with httpx.Client(base_url=worker_url, timeout=5) as client:
        entry = wait_for_log(client, lambda e: e["client_disconnected"])
        assert entry["path"] == "/worker_generate_stream"
        assert entry["disconnected_at"] - closed_at < 0.5
        assert client.get("/_fake/log").json()["queue_length"] == 0


def test_a_stream_whose_client_gives_up_on_a_stall_frees_its_slot_at_once(client: httpx.Client) -> None:
    configure(client, stall_seconds=30)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/worker_generate_stream", json={"prompt": PROMPT}, timeout=0.3)
    gave_up_at = time.time()

    entry = wait_for_log(client, lambda e: e["client_disconnected"])
    assert entry["disconnected_at"] - gave_up_at < 0.5
    assert client.get("/_fake/log").json()["queue_length"] == 0


def test_a_generation_whose_client_gives_up_runs_to_its_end_like_fastchats(client: httpx.Client) -> None:
    """FastChat's worker generates /worker_generate answers in a thread that a client leaving does
    not stop: the slot stays taken until the whole answer is generated."""
    configure(client, stall_seconds=0.6, token_delay=0.1)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/worker_generate", json={"prompt": PROMPT, "echo": False}, timeout=0.3)
    entry = wait_for_log(client, lambda e: e["client_disconnected"])
    assert entry["path"] == "/worker_generate"
    log = client.get("/_fake/log").json()
    assert (log["queue_length"], log["generating"]) == (1, 0)  # still stalling, before generating
    time.sleep(0.5)
    log = client.get("/_fake/log").json()
    assert (log["queue_length"], log["generating"]) == (1, 1)
    deadline = time.monotonic() + 4
    while client.get("/_fake/log").json()["queue_length"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/_fake/log").json()["queue_length"] == 0
    assert client.get("/_fake/log").json()["generating"] == 0


def test_it_logs_requests(client: httpx.Client) -> None:
    generate(client, max_new_tokens=2)
    log = client.get("/_fake/log").json()

    assert log["counts"] == {"/worker_generate": 1}
    (entry,) = log["requests"]
    assert entry["body"] == {"prompt": PROMPT, "max_new_tokens": 2}
    assert entry["started"] <= entry["ended"]
    assert entry["client_disconnected"] is False


def test_it_registers_with_the_real_controller(tmp_path: Any) -> None:
    controller_port, worker_port = free_port(), free_port()
    controller_url = f"http://127.0.0.1:{controller_port}"
    controller = start_controller(controller_port, log_path=tmp_path / "controller.log")
    worker = start_demo_worker(
        worker_port, controller_url, ["demo-chat", "demo-embed"],
        extra_args=["--heartbeat-interval", "0.5"], log_path=tmp_path / "worker.log",
    )  # fmt: skip
    try:
        assert sorted(wait_for_models(controller_url, ["demo-chat", "demo-embed"])) == [
            "demo-chat", "demo-embed",
        ]  # fmt: skip
        address = httpx.post(f"{controller_url}/get_worker_address", json={"model": "demo-chat"})
        assert address.json() == {"address": f"http://127.0.0.1:{worker_port}"}

        # A restarted controller answers the heartbeat with exist=false; the worker re-registers.
        stop_process(controller)
        controller = start_controller(controller_port, log_path=tmp_path / "controller2.log")
        wait_for_models(controller_url, ["demo-chat"], timeout=10)
    finally:
        stop_process(worker)
        stop_process(controller)
