"""Two gateway processes (uvicorn) sharing a PostgreSQL and a Redis of their own, in front of
FastChat's real controller and one demo worker (docs/decisions.md#limits, #keys):

- a key limited to 20 requests/minute gets exactly 20 successes out of 100 concurrent requests
  spread over both processes;
- a key revoked through one process is refused by the other within one second;
- the parallel-request count (Redis) returns to zero after streams cancelled by their client
  and after streams whose worker timed out.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from keys.hashing import hash_key
from tests.gateway_process import Gateway, StackSpec, WorkerSpec

pytestmark = pytest.mark.e2e

MODEL = "demo-chat"
WORKER_TIMEOUT = 1  # FASTCHAT_WORKER_API_TIMEOUT of both gateways
CHAT = "/v1/chat/completions"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


STACK = StackSpec(
    workers=(WorkerSpec((MODEL,), ("--limit-worker-concurrency", "64")),),
    gateways=2, server="uvicorn", backends=True,
    env={"FASTCHAT_WORKER_API_TIMEOUT": str(WORKER_TIMEOUT)},
)


@pytest.fixture(scope="module")
def cluster(gateway_stack) -> dict:
    return {"gateways": gateway_stack.gateways, "pg": gateway_stack.backends.pg,
            "redis": gateway_stack.backends.redis, "worker": gateway_stack.worker_urls[0]}


@pytest.fixture
def worker(cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster["worker"], timeout=5) as client:
        client.post("/_fake/reset").raise_for_status()
        yield client
        client.post("/_fake/reset").raise_for_status()


def key_id(cluster, plaintext: str) -> int:
    with psycopg.connect(cluster["pg"].url) as connection:
        return connection.execute("SELECT id FROM keys_apikey WHERE hashed_key = %s", [hash_key(plaintext)]).fetchone()[0]


def parallel_in_use(cluster, key: int) -> int:
    client = cluster["redis"].client()
    try:
        return client.zcard(f"gw:{{{key}}}:parallel")
    finally:
        client.close()


def wait_for_parallel(cluster, key: int, expected: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = parallel_in_use(cluster, key)
        if count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_rate_limit_is_exact_across_both_processes(cluster):
    a, b = cluster["gateways"]
    key = a.create_key("rpm20", "--rpm", "20")

    async def send(client: httpx.AsyncClient, gateway: Gateway) -> tuple[str, httpx.Response]:
        return gateway.url, await client.post(gateway.url + CHAT, json=BODY, headers=headers(key))

    async def burst():
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            return await asyncio.gather(*(send(client, (a, b)[i % 2]) for i in range(100)))

    results = asyncio.run(burst())
    statuses = [response.status_code for _, response in results]
    assert statuses.count(200) == 20, statuses
    assert statuses.count(429) == 80, statuses
    for _, response in results:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.headers["x-ratelimit-remaining-requests"] == "0"
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
    # Each process alone would have admitted 20: both refused part of their 50.
    for gateway in (a, b):
        mine = [r.status_code for url, r in results if url == gateway.url]
        assert len(mine) == 50 and mine.count(429) >= 30


# A staff member who may change keys (the key API checks Django's model permissions).
STAFF_KEY = """
from django.contrib.auth.models import Permission, User
from keys.models import APIKey
staff = User.objects.create_user("staff", is_staff=True)
staff.user_permissions.add(Permission.objects.get(codename="change_apikey"))
print(APIKey.objects.create_key("staff", user=staff)[1])
"""


def test_a_key_revoked_through_one_process_is_refused_by_the_other_within_a_second(cluster):
    """Revoke through A's key-management API (POST /api/keys/{id}/revoke/) while B is polled
    every 50 ms: B serves the key until the revocation and refuses every request it is sent
    from one second after the revocation on."""
    a, b = cluster["gateways"]
    plaintext = a.create_key("to-revoke")
    key = key_id(cluster, plaintext)
    staff_key = a.manage("shell", "-c", STAFF_KEY).strip().splitlines()[-1]
    polls: list[tuple[float, float, int]] = []  # (sent, answered, status), monotonic
    stop = threading.Event()

    def poll_b():
        with httpx.Client(base_url=b.url, headers=headers(plaintext), timeout=5) as client:
            while not stop.is_set():
                sent = time.monotonic()
                status = client.get("/v1/models").status_code
                polls.append((sent, time.monotonic(), status))
                stop.wait(0.05)

    poller = threading.Thread(target=poll_b)
    poller.start()
    try:
        time.sleep(1.5)  # B has the key cached and serves it
        revoke_started = time.monotonic()
        response = httpx.post(f"{a.url}/api/keys/{key}/revoke/", headers=headers(staff_key), timeout=10)
        revoked = time.monotonic()
        assert response.status_code == 200, response.text
        assert response.json()["revoked_at"]
        time.sleep(1.5)  # past the one second, and a few more polls
    finally:
        stop.set()
        poller.join(10)

    before = [status for sent, answered, status in polls if answered < revoke_started]
    assert before and set(before) == {200}, before
    assert any(answered > revoke_started - 0.2 for sent, answered, status in polls if status == 200), \
        "B did not accept the key just before the revoke"
    first_refusal = next(answered for sent, answered, status in polls if status == 401)
    last_acceptance = max(sent for sent, answered, status in polls if status == 200)
    print(f"revoke: B's last acceptance was sent {last_acceptance - revoked:+.3f} s and its first refusal "
          f"answered {first_refusal - revoked:+.3f} s after A's revoke returned")
    assert last_acceptance < revoked + 1.0, "B accepted a request sent more than 1 s after the revoke"
    assert first_refusal <= revoked + 1.0 + 0.1  # the next poll after the second is up
    assert all(status == 401 for sent, answered, status in polls if answered >= first_refusal)
    assert any(sent > revoked + 1.0 for sent, answered, status in polls)
    with httpx.Client(timeout=5) as client:  # and A refuses it too
        refused = client.post(a.url + CHAT, json=BODY, headers=headers(plaintext))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "revoked_api_key"


async def open_stream(client: httpx.AsyncClient, gateway: Gateway, key: str, body: dict):
    """Start a streamed chat request and read up to its first content chunk; returns the
    response, still open, and its line iterator."""
    request = client.build_request("POST", gateway.url + CHAT, json={**body, "stream": True}, headers=headers(key))
    response = await client.send(request, stream=True)
    assert response.status_code == 200, await response.aread()
    lines = response.aiter_lines()
    async for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                return response, lines
    raise AssertionError("the stream ended before any content")


def test_parallel_slots_come_back_after_cancelled_streams(cluster, worker):
    a, b = cluster["gateways"]
    plaintext = a.create_key("parallel-cancel", "--parallel", "50")
    key = key_id(cluster, plaintext)
    worker.post("/_fake/config", json={"token_delay": 0.2, "reply_words": 100}).raise_for_status()  # 40 tokens: 8 s
    n = 10

    async def scenario():
        async with httpx.AsyncClient(timeout=30) as client:
            streams = await asyncio.gather(*(open_stream(client, (a, b)[i % 2], plaintext, {**BODY, "max_tokens": 40})
                                             for i in range(n)))
            in_flight = parallel_in_use(cluster, key)
            for response, _ in streams:
                await response.aclose()  # the client goes away mid-stream
            return in_flight

    started = time.monotonic()
    assert asyncio.run(scenario()) == n
    assert wait_for_parallel(cluster, key, 0) == 0
    assert time.monotonic() - started < 5, "slots came back only when the streams would have ended"


def test_parallel_slots_come_back_after_worker_timeouts(cluster, worker):
    a, b = cluster["gateways"]
    plaintext = a.create_key("parallel-timeout", "--parallel", "50")
    key = key_id(cluster, plaintext)
    n = 10

    async def stream_until_done(client: httpx.AsyncClient, gateway: Gateway) -> tuple[int, str]:
        async with client.stream("POST", gateway.url + CHAT, json={**BODY, "stream": True},
                                 headers=headers(plaintext)) as response:
            return response.status_code, (await response.aread()).decode()

    async def scenario():
        async with httpx.AsyncClient(timeout=30) as client:
            tasks = [asyncio.create_task(stream_until_done(client, (a, b)[i % 2])) for i in range(n)]
            await asyncio.sleep(0.5)  # every request is waiting on the stalled worker
            in_flight = parallel_in_use(cluster, key)
            return in_flight, await asyncio.gather(*tasks)

    # A worker that accepts the request and stays silent; one whose first token comes too late.
    for phase, config in (("stalled", {"stall_seconds": WORKER_TIMEOUT + 3}),
                          ("slow first token", {"token_delay": WORKER_TIMEOUT + 1.5})):
        worker.post("/_fake/reset").raise_for_status()
        worker.post("/_fake/config", json=config).raise_for_status()
        in_flight, results = asyncio.run(scenario())
        assert in_flight == n, phase
        for status, text in results:
            # 504 before the stream starts, or one error event then [DONE] once it has.
            assert status == 504 or (status == 200 and '"error"' in text and text.rstrip().endswith("data: [DONE]")), (phase, status, text)
        assert wait_for_parallel(cluster, key, 0) == 0, phase
    worker.post("/_fake/reset").raise_for_status()
    with httpx.Client(timeout=10) as client:  # the slots are really free
        assert client.post(a.url + CHAT, json=BODY, headers=headers(plaintext)).status_code == 200


def test_the_gateways_logged_no_errors(cluster):
    for gateway in cluster["gateways"]:
        log = gateway.log_path.read_text()
        assert "Traceback" not in log, log[-3000:]
