"""Request bodies as a real server (uvicorn) hands them over: a chunked body is refused as soon
as it passes GATEWAY_MAX_BODY_BYTES, and a bad key's big body is answered before it is sent.
Nothing here reaches FastChat (the controller address points nowhere)."""
from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator

import pytest

from tests.gateway_process import HOST, Gateway, start_gateway
from tests.procs import free_port

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("bounds"), f"http://127.0.0.1:{free_port()}", server="uvicorn",
                            extra_env={"GATEWAY_MAX_BODY_BYTES": str(4 * MiB)})
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def key(gateway: Gateway) -> str:
    return gateway.create_key("bounds")


def upload(port: int, headers: dict[str, str], parts: Iterator[bytes], timeout: float = 10,
           path: str = CHAT) -> tuple[int, dict, int]:
    """Send a request's body part by part until the server answers; returns the status, the
    JSON body and how many bytes of the body were sent before the answer came."""
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    head = "".join(f"{name}: {value}\r\n" for name, value in {"Host": "gateway", **headers}.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
    sent, answer, deadline = 0, b"", time.monotonic() + timeout
    pending = next(parts, None)
    try:
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 0.05)
            if readable:
                data = sock.recv(65536)
                answer += data
                if not data or complete(answer):
                    break
            elif writable and pending:
                count = sock.send(pending)
                sent += count
                pending = pending[count:] or next(parts, None)
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return int(head.split()[1]), json.loads(body), sent


def complete(answer: bytes) -> bool:
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    if b"transfer-encoding: chunked" in head.lower():
        return body.endswith(b"0\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2:]


def chunked(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"%x\r\n" % size + b"x" * size + b"\r\n"
    yield b"0\r\n\r\n"


def test_a_chunked_body_is_refused_once_it_passes_the_limit(gateway: Gateway, key: str) -> None:
    status, body, sent = upload(gateway.port, {"Authorization": f"Bearer {key}", "Transfer-Encoding": "chunked",
                                               "Content-Type": "application/json"}, chunked(64 * MiB))
    assert status == 413, body
    assert body["error"]["code"] == "request_too_large"
    # The limit is 4 MiB: the answer came long before the 64 MiB were sent (socket buffers hold a few).
    assert sent < 24 * MiB, sent


def test_a_bad_keys_body_is_answered_before_it_is_sent(gateway: Gateway) -> None:
    def parts() -> Iterator[bytes]:
        yield b"x" * 65536  # then nothing: the client waits for its answer

    status, body, sent = upload(gateway.port, {"Authorization": "Bearer sk-not-a-key", "Content-Length": str(4 * MiB),
                                               "Content-Type": "application/json"}, parts())
    assert status == 401, body
    assert sent == 65536


def test_a_huge_seed_is_a_400_naming_it(gateway: Gateway, key: str) -> None:
    raw = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "seed": 1e20}).encode()
    status, body, _ = upload(gateway.port, {"Authorization": f"Bearer {key}", "Content-Length": str(len(raw)),
                                            "Content-Type": "application/json"}, iter([raw]))
    assert status == 400, body
    assert body["error"]["param"] == "seed"
