"""2,000 requests against one gateway process (uvicorn) whose PostgreSQL is made slow on purpose:
every byte between the gateway and the database is held back by a proxy, so each query costs
at least a second. A quarter of the requests are streamed and cut off by their client after the
first content chunk. Afterwards the database holds exactly 2,000 usage rows with the token
counts the responses reported, while the requests themselves never waited on the database:
their latency stays far below one query's round trip (docs/decisions.md#usage-rows: usage is written in
batches off the request path).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import Iterator

import aiohttp
import httpx
import psycopg
import pytest

from keys.hashing import hash_key
from tests.gateway_process import start_gateway
from tests.procs import free_port, start_controller, start_demo_worker, stop_process, wait_for_models
from tests.services import HOST, ServiceUnavailable, postgres, require_service

pytestmark = pytest.mark.e2e

MODEL = "demo-chat"
REQUESTS = 2000
CONCURRENCY = 32
ONE_WAY_DELAY = 0.5  # seconds each way: a query costs at least one second
ROUND_TRIP = 2 * ONE_WAY_DELAY
MESSAGES = [{"role": "user", "content": "Hello there"}]
PLAIN = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4}
STREAM_TOKENS = 100  # a whole stream takes a second (token_delay 0.01); it is cut long before
# FastChat counts completion tokens as the 0-based index of the last token, so its first chunk
# says 0: the client hangs up after the second content chunk, whose count is at least 1.
CUT_AFTER_CHUNKS = 2
STREAMED = {"model": MODEL, "messages": MESSAGES, "max_tokens": STREAM_TOKENS, "stream": True}


class DelayProxy:
    """A TCP proxy that delivers every chunk, in order, `delay` seconds after it arrived
    (latency without a throughput limit), in either direction. `delay` may change at any time."""

    def __init__(self, target_port: int, delay: float = 0.0):
        self.target_port = target_port
        self.delay = delay
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="delay-proxy", daemon=True)
        self.server = None

    def start(self) -> DelayProxy:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.handle, HOST, self.port), self.loop).result(10)
        return self

    def stop(self) -> None:
        async def close():
            self.server.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self.pipe(client_reader, server_writer), self.pipe(server_reader, client_writer),
                             return_exceptions=True)

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    break
                writer.write(data)
                await writer.drain()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + self.delay, data))
            queue.put_nowait((loop.time() + self.delay, b""))
            await delivering
        finally:
            delivering.cancel()
            writer.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("usage-load")
    processes, gateway, proxy = [], None, None
    try:
        with postgres() as pg:
            try:
                controller_port, worker_port = free_port(), free_port()
                controller_url = f"http://127.0.0.1:{controller_port}"
                processes.append(start_controller(controller_port, log_path=tmp / "controller.log"))
                processes.append(start_demo_worker(
                    worker_port, controller_url, [MODEL], log_path=tmp / "worker.log",
                    extra_args=["--limit-worker-concurrency", "64", "--token-delay", "0.01", "--reply-words", "200"]))
                wait_for_models(controller_url, [MODEL], timeout=20)
                proxy = DelayProxy(pg.port).start()  # no delay yet: migrate at full speed
                gateway = start_gateway(tmp, controller_url, server="uvicorn", extra_env={
                    "DATABASE_URL": pg.url_for(port=proxy.port),
                    "REDIS_URL": "",
                    # The key is read once: the timed phase's only database traffic is usage.
                    "GATEWAY_KEY_CACHE_SECONDS": "600",
                })
                yield {"gateway": gateway, "pg": pg, "proxy": proxy, "tmp": tmp}
            finally:
                if gateway is not None:
                    gateway.stop()
                if proxy is not None:
                    proxy.stop()
                for process in reversed(processes):
                    stop_process(process)
    except ServiceUnavailable as exc:
        require_service("PostgreSQL", False, str(exc))


async def plain_request(session: aiohttp.ClientSession) -> dict:
    started = time.monotonic()
    async with session.post("chat/completions", json=PLAIN) as response:
        body = await response.json()
    elapsed = time.monotonic() - started
    assert response.status == 200, body
    return {"id": response.headers["X-Request-ID"], "streamed": False, "latency": elapsed, "usage": body["usage"]}


async def cut_stream(session: aiohttp.ClientSession) -> dict:
    """Read CUT_AFTER_CHUNKS content chunks, then hang up; latency is the first content's."""
    started, elapsed, chunks = time.monotonic(), None, 0
    async with session.post("chat/completions", json=STREAMED) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices")
                if choices and choices[0]["delta"].get("content"):
                    chunks += 1
                    elapsed = elapsed or time.monotonic() - started
                    if chunks == CUT_AFTER_CHUNKS:
                        break
        else:
            raise AssertionError("the stream ended before it was cut")
        response.close()  # drop the connection: the client is gone
    return {"id": response.headers["X-Request-ID"], "streamed": True, "latency": elapsed}


async def drive(base_url: str, key: str, requests: int = REQUESTS) -> list[dict]:
    """`requests` requests from CONCURRENCY clients; every fourth one is a stream cut short."""
    jobs = iter(range(requests))
    results: list[dict] = []

    async def runner(session):
        for i in jobs:
            results.append(await (cut_stream(session) if i % 4 == 0 else plain_request(session)))

    async with aiohttp.ClientSession(base_url=base_url + "/", headers={"Authorization": f"Bearer {key}"},
                                     connector=aiohttp.TCPConnector(limit=CONCURRENCY),
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(runner(session) for _ in range(CONCURRENCY)))
    return results


def usage_rows(pg, key: str) -> dict[str, tuple]:
    with psycopg.connect(pg.url) as connection:  # straight to PostgreSQL, not through the proxy
        rows = connection.execute(
            "SELECT u.request_id, u.status, u.error_code, u.prompt_tokens, u.completion_tokens, u.streamed"
            " FROM keys_usagerecord u JOIN keys_apikey k ON k.id = u.key_id WHERE k.hashed_key = %s",
            [hash_key(key)]).fetchall()
    by_id = {row[0]: row[1:] for row in rows}
    assert len(by_id) == len(rows), "two rows share a request id"
    return by_id


def wait_for_rows(pg, key: str, count: int, timeout: float) -> dict[str, tuple]:
    deadline = time.monotonic() + timeout
    while True:
        rows = usage_rows(pg, key)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def test_2000_requests_give_2000_usage_rows_and_never_wait_on_the_slow_database(stack):
    gateway, pg, proxy = stack["gateway"], stack["pg"], stack["proxy"]
    # Warm the stack up (connections, caches) with a key of its own, at full database speed;
    # these requests are also the latency baseline.
    baseline = [result["latency"] for result in asyncio.run(drive(gateway.base_url, gateway.create_key("warm-up"), 400))]
    key = gateway.create_key("load")

    proxy.delay = ONE_WAY_DELAY
    with httpx.Client(base_url=gateway.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        started = time.monotonic()
        first = client.get("/models")  # loads the key through the slow database
        first_query = time.monotonic() - started
        assert first.status_code == 200
        warmup_ids = {first.headers["X-Request-ID"]} | {client.get("/models").headers["X-Request-ID"] for _ in range(3)}
    assert first_query >= ROUND_TRIP, f"the database is not slow: the key loaded in {first_query:.2f} s"
    warmup_rows = len(wait_for_rows(pg, key, 4, timeout=60))
    assert warmup_rows == 4

    started = time.monotonic()
    results = asyncio.run(drive(gateway.base_url, key))
    load_seconds = time.monotonic() - started
    rows = wait_for_rows(pg, key, warmup_rows + REQUESTS, timeout=120)
    settled_seconds = time.monotonic() - started

    # No request waited on the database: a single query takes ROUND_TRIP seconds.
    latencies = [result["latency"] for result in results]
    p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
    report = (f"{REQUESTS} requests in {load_seconds:.1f} s ({REQUESTS / load_seconds:.0f}/s), all rows stored "
              f"{settled_seconds - load_seconds:.1f} s later; latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
              f"max {max(latencies) * 1000:.0f} ms; one database round trip {ROUND_TRIP * 1000:.0f} ms; "
              f"baseline at full database speed: p50 {statistics.median(baseline) * 1000:.0f} ms, "
              f"p99 {percentile(baseline, 0.99) * 1000:.0f} ms")
    print(report)
    assert p50 < ROUND_TRIP / 4, report
    assert p99 < ROUND_TRIP, report

    # Exactly one row per request, none lost, none doubled.
    assert len(results) == REQUESTS
    sent = {result["id"] for result in results}
    assert len(sent) == REQUESTS
    assert len(rows) == warmup_rows + REQUESTS
    assert set(rows) == sent | warmup_ids

    # Token counts as the responses reported them.
    plain = [result for result in results if not result["streamed"]]
    cut = [result for result in results if result["streamed"]]
    assert (len(plain), len(cut)) == (REQUESTS * 3 // 4, REQUESTS // 4)
    for result in plain:
        status, error_code, prompt_tokens, completion_tokens, streamed = rows[result["id"]]
        assert (status, error_code, streamed) == (200, "", False)
        assert (prompt_tokens, completion_tokens) == (result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"])
    prompt_tokens_of_the_messages = plain[0]["usage"]["prompt_tokens"]
    for result in cut:
        status, error_code, prompt_tokens, completion_tokens, streamed = rows[result["id"]]
        assert (status, error_code, streamed) == (499, "client_disconnected", True)
        assert prompt_tokens == prompt_tokens_of_the_messages
        assert 0 < completion_tokens < STREAM_TOKENS - 1  # cut: the whole reply counts 99

    log = (stack["tmp"] / "gateway-uvicorn.log").read_text()
    assert "Usage flush failed" not in log and "Traceback" not in log, log[-3000:]
