"""RedisLimitStore against a real Redis: the memory store's contract (tests/test_limits.py),
exactness under concurrency, and parallel slots released on every path through the API.

The Redis is the one `python -m tests.services` started (REDIS_URL, flushed before each test),
or else a throwaway redis-server of this module's own.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from django.test import override_settings

from keys import limit_store_redis
from keys.exceptions import LimitExceeded, LimitsUnavailable
from keys.limit_store_redis import RedisLimitStore, _pending_releases
from keys.limits import SLOT_TTL, Limits, get_limit_store, reset_limit_store
from keys.models import APIKey
from openai_api.auth import key_cache
from tests.asgi import stream_then_disconnect
from tests.base import GatewayTestCase
from tests.procs import HOST, wait_for_port
from tests.services import Redis, ServiceUnavailable, redis_server, require_service, under_services_wrapper
from tests.sse import read_stream

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(redis_url) -> Iterator[RedisLimitStore]:
    """A store with a fake clock, a fake budget loader and a prefix of its own."""
    clock = Clock()
    used = {"tokens": 0}

    async def budget_used(limits: Limits) -> int:
        return used["tokens"]

    # The tests are about exactness, not time-outs: a loaded machine may take over the 1 s default
    # to open 100 connections at once.
    store = RedisLimitStore(redis_url, clock=clock, load_budget_used=budget_used, prefix=f"t{uuid.uuid4().hex[:8]}",
                            timeout=5.0)
    store.clock_ = clock
    store.used_ = used
    yield store


def run(store: RedisLimitStore, coroutine):
    """Run a coroutine on a fresh event loop, closing the store's client for that loop."""
    async def main():
        try:
            return await coroutine
        finally:
            client = store._clients.pop(asyncio.get_running_loop(), None)
            if client is not None:
                await client.aclose()

    return asyncio.run(main())


def test_the_request_window_slides(store):
    limits = Limits(1, requests_per_minute=2)

    async def scenario():
        first = await store.acquire(limits)
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        store.clock_.now += 30
        await store.acquire(limits)
        with pytest.raises(LimitExceeded) as refused:
            await store.acquire(limits)
        assert (refused.value.kind, refused.value.retry_after) == ("requests", 30)
        assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
        store.clock_.now += 30.5
        await store.acquire(limits)  # the first request left the window

    run(store, scenario())


def test_tokens_leave_the_window_after_a_minute(store):
    limits = Limits(1, tokens_per_minute=100)

    async def scenario():
        lease = await store.acquire(limits)
        await store.release(lease, 100)
        with pytest.raises(LimitExceeded) as refused:
            await store.acquire(limits)
        assert refused.value.kind == "tokens"
        assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"
        store.clock_.now += 61
        await store.acquire(limits)

    run(store, scenario())


def test_the_budget_starts_from_the_database_usage(store):
    store.used_["tokens"] = 90
    limits = Limits(1, token_budget=100, budget_period="month")

    async def scenario():
        lease = await store.acquire(limits)
        await store.release(lease, 10)
        with pytest.raises(LimitExceeded) as refused:
            await store.acquire(limits)
        assert (refused.value.kind, refused.value.limits) == ("budget", limits)

    run(store, scenario())


def test_the_budget_is_loaded_once_and_then_counted_in_redis(store):
    calls = []

    async def budget_used(limits):
        calls.append(limits.key_id)
        return 0

    store._load_budget_used = budget_used
    limits = Limits(7, token_budget=50, budget_period="day")

    async def scenario():
        for _ in range(4):
            await store.release(await store.acquire(limits), 12)  # 48 tokens
        await store.release(await store.acquire(limits), 5)  # 53: over the budget now
        with pytest.raises(LimitExceeded) as refused:
            await store.acquire(limits)
        assert refused.value.kind == "budget"

    run(store, scenario())
    assert calls == [7]


def test_a_lease_is_released_once(store):
    limits = Limits(1, parallel_requests=1)

    async def scenario():
        lease = await store.acquire(limits)
        assert await store.parallel_in_use(1) == 1
        await store.release(lease, 0)
        await store.release(lease, 0)
        assert await store.parallel_in_use(1) == 0
        await store.acquire(limits)
        with pytest.raises(LimitExceeded) as refused:
            await store.acquire(limits)
        assert (refused.value.kind, refused.value.retry_after) == ("parallel", 1)
        assert await store.parallel_in_use(1) == 1

    run(store, scenario())


def test_keys_do_not_share_counters(store):
    async def scenario():
        await store.acquire(Limits(1, requests_per_minute=1))
        await store.acquire(Limits(2, requests_per_minute=1))
        with pytest.raises(LimitExceeded):
            await store.acquire(Limits(1, requests_per_minute=1))

    run(store, scenario())


def test_release_soon_releases_from_synchronous_code_even_if_the_caller_is_cancelled(store):
    limits = Limits(1, parallel_requests=1)

    async def scenario():
        lease = await store.acquire(limits)

        async def request():
            store.release_soon(lease, 3)
            raise asyncio.CancelledError  # the request's task dies right after its finish hook

        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(request())
        # parallel_in_use waits for this loop's releases under way (not earlier tests' loops).
        assert await store.parallel_in_use(1) == 0

    run(store, scenario())


def test_100_concurrent_acquires_admit_exactly_20(store):
    limits = Limits(1, requests_per_minute=20)

    async def attempt():
        try:
            await store.acquire(limits)
            return True
        except LimitExceeded:
            return False

    async def scenario():
        return await asyncio.gather(*(attempt() for _ in range(100)))

    assert sum(run(store, scenario())) == 20


def test_concurrent_acquires_from_several_clients_are_exact(store):
    """Four threads, each with its own event loop and Redis connections (as separate processes
    would have): 4 x 25 attempts at 20 requests/minute and 5 parallel slots."""
    rpm = Limits(1, requests_per_minute=20)
    parallel = Limits(2, parallel_requests=5)
    results: dict[str, list[bool]] = {"rpm": [], "parallel": []}
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    async def attempt(limits):
        try:
            await store.acquire(limits)
            return True
        except LimitExceeded:
            return False

    async def attempts():
        return await asyncio.gather(*(attempt(rpm) for _ in range(25)), *(attempt(parallel) for _ in range(25)))

    def worker():
        barrier.wait()
        outcome = run(store, attempts())
        with lock:
            results["rpm"] += outcome[:25]
            results["parallel"] += outcome[25:]

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results["rpm"]) == 100
    assert sum(results["rpm"]) == 20
    assert sum(results["parallel"]) == 5
    assert run(store, store.parallel_in_use(2)) == 5


class RedisApiLimitTests(GatewayTestCase):
    """The API's limits with the Redis store: parallel slots come back on every path."""

    @pytest.fixture(autouse=True)
    def _redis(self, redis_url):
        self.redis_url = redis_url

    def setUp(self):
        super().setUp()
        self.override = override_settings(REDIS_URL=self.redis_url)
        self.override.enable()
        reset_limit_store(RedisLimitStore(self.redis_url, prefix=f"t{uuid.uuid4().hex[:8]}"))

    def tearDown(self):
        self.override.disable()
        super().tearDown()

    async def limit(self, **fields) -> None:
        await APIKey.objects.filter(pk=self.key.pk).aupdate(**fields)
        key_cache.clear()

    async def in_use(self) -> int:
        return await get_limit_store().parallel_in_use(self.key.pk)

    async def test_parallel_slots_are_released_on_every_path(self):
        await self.limit(parallel_requests=1)
        self.assertIsInstance(get_limit_store(), RedisLimitStore)
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        self.assertEqual(await self.in_use(), 0)
        self.fake.worker_error = httpx.ReadTimeout
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 504)
        self.assertEqual(await self.in_use(), 0)
        self.fake.worker_error = None
        self.fake.error_chunk_after = 2
        await read_stream(await self.post(CHAT, {**BODY, "stream": True}))
        self.fake.error_chunk_after = None
        self.assertEqual(await self.in_use(), 0)
        self.fake.chunk_delay = 0.05  # a stream abandoned by its client
        await stream_then_disconnect(CHAT, {**BODY, "stream": True}, self.auth, body_messages=2)
        self.assertEqual(self.fake.stream_closed[-1], True)
        self.assertEqual(await self.in_use(), 0)
        self.fake.chunk_delay = 0
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)

    async def test_requests_per_minute_give_429_with_headers(self):
        await self.limit(requests_per_minute=3)
        responses = [await self.post(CHAT, BODY) for _ in range(5)]
        self.assertEqual([r.status_code for r in responses], [200, 200, 200, 429, 429])
        self.assertEqual(responses[0]["x-ratelimit-remaining-requests"], "2")
        self.assertError(responses[3], 429, code="rate_limit_exceeded")
        self.assertGreaterEqual(int(responses[3]["Retry-After"]), 1)

    async def test_tokens_per_minute_count_what_requests_used(self):
        await self.limit(tokens_per_minute=5)
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        await self.in_use()  # the tokens are counted by the release
        refused = await self.post(CHAT, BODY)
        self.assertError(refused, 429)
        self.assertEqual(refused["x-ratelimit-remaining-tokens"], "0")


@pytest.mark.skipif(not under_services_wrapper(), reason="only under python -m tests.services")
def test_the_suite_really_runs_on_postgresql_and_redis():
    from django.db import connection

    assert connection.vendor == "postgresql"
    reset_limit_store()
    try:
        assert isinstance(get_limit_store(), RedisLimitStore)
    finally:
        reset_limit_store()


# Redis outages: a throwaway Redis of this module's own, stopped and started again by the tests.

@pytest.fixture(scope="module")
def own_redis() -> Iterator[Redis]:
    try:
        with redis_server() as server:
            yield server
    except ServiceUnavailable as exc:
        require_service("Redis", False, str(exc))


def stop(server: Redis) -> None:
    """Stop Redis as a crash would, keeping its data on disk (SAVE: this Redis saves nothing
    by itself) so that a restart finds the parallel slots that were taken."""
    client = server.client()
    try:
        client.save()
    finally:
        client.close()
    server.proc.kill()
    server.proc.wait(10)


def start_again(server: Redis) -> None:
    """Start the stopped Redis on the same port and directory; it loads the saved data."""
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    server.proc = subprocess.Popen(
        [binary, "--port", str(server.port), "--bind", HOST, "--save", "", "--appendonly", "no",
         "--dir", str(server.directory), "--daemonize", "no", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(server.port, 20, proc=server.proc, what="redis-server")


class RedisOutageTests(GatewayTestCase):
    """Redis down or hung: keys with limits get 503 + Retry-After quickly (or are admitted,
    failing open), keys without limits are served, and no parallel slot stays taken."""

    @pytest.fixture(autouse=True)
    def _redis(self, own_redis):
        self.redis = own_redis

    def setUp(self):
        super().setUp()
        self.override = override_settings(REDIS_URL=self.redis.url)
        self.override.enable()
        reset_limit_store()  # built from the settings: GATEWAY_REDIS_TIMEOUT
        self.unlimited, self.unlimited_plaintext = APIKey.objects.create_key("unlimited")

    def tearDown(self):
        if self.redis.proc.poll() is not None:
            start_again(self.redis)
        self.redis.proc.send_signal(signal.SIGCONT)
        self.redis.client().flushdb()
        self.override.disable()
        super().tearDown()

    async def limit(self, **fields) -> None:
        await APIKey.objects.filter(pk=self.key.pk).aupdate(**fields)
        key_cache.clear()

    async def timed_post(self, body=BODY, **headers) -> tuple[object, float]:
        started = time.monotonic()
        response = await self.post(CHAT, body, **headers)
        return response, time.monotonic() - started

    async def test_a_key_with_limits_gets_503_and_a_key_without_is_served(self):
        await self.limit(requests_per_minute=100, parallel_requests=2)
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        stop(self.redis)
        with self.assertLogs("keys.limit_store_redis", "WARNING"):
            response, elapsed = await self.timed_post()
        body = self.assertError(response, 503, code="limits_unavailable")
        self.assertEqual(response["Retry-After"], "1")
        self.assertLess(elapsed, 1.0)
        self.assertNotIn(str(self.redis.port), body["message"])
        response, elapsed = await self.timed_post()  # refused at once while Redis is down
        self.assertError(response, 503, code="limits_unavailable")
        self.assertLess(elapsed, 0.1)
        unlimited = {"Authorization": f"Bearer {self.unlimited_plaintext}"}
        self.assertEqual((await self.post(CHAT, BODY, **unlimited)).status_code, 200)
        start_again(self.redis)
        await asyncio.sleep(1.1)  # the store tries Redis again a second after it failed
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)

    async def test_a_hung_redis_answers_503_within_the_socket_timeout(self):
        await self.limit(requests_per_minute=100)
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        self.redis.proc.send_signal(signal.SIGSTOP)
        try:
            with self.assertLogs("keys.limit_store_redis", "WARNING"):
                response, elapsed = await self.timed_post()
        finally:
            self.redis.proc.send_signal(signal.SIGCONT)
        self.assertError(response, 503, code="limits_unavailable")
        self.assertLess(elapsed, 1.5)  # GATEWAY_REDIS_TIMEOUT is 1 s

    @override_settings(GATEWAY_LIMITS_FAIL_OPEN=True)
    async def test_failing_open_admits_keys_with_limits(self):
        await self.limit(parallel_requests=1)
        stop(self.redis)
        with self.assertLogs("keys.limit_store_redis", "WARNING"):
            response, elapsed = await self.timed_post()
        self.assertEqual(response.status_code, 200, response.content)
        self.assertNotIn("x-ratelimit-limit-requests", response)
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)

    async def test_releases_that_failed_are_retried_once_redis_is_back(self):
        await self.limit(parallel_requests=1)
        store = get_limit_store()
        self.fake.chunk_delay = 0.1
        request = asyncio.create_task(self.post(CHAT, {**BODY, "stream": True}))
        while await store.parallel_in_use(self.key.pk) == 0:  # the request holds its slot
            await asyncio.sleep(0.01)
        stop(self.redis)
        with self.assertLogs("keys.limit_store_redis", "WARNING"):
            self.assertEqual((await request).status_code, 200)
            await asyncio.gather(*(t for t in _pending_releases if t.get_loop() is asyncio.get_running_loop()))
        self.assertEqual(store.queued_releases, 1)
        start_again(self.redis)
        self.assertEqual(self.redis.client().zcard(f"gw:{{{self.key.pk}}}:parallel"), 1)  # the saved slot
        deadline = time.monotonic() + 5
        while store.queued_releases and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.assertEqual(store.queued_releases, 0)
        self.assertEqual(await store.parallel_in_use(self.key.pk), 0)
        self.fake.chunk_delay = 0
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)


def test_an_acquire_that_timed_out_is_given_back_when_redis_resumes(own_redis):
    """Redis hung (SIGSTOP): the acquire times out and is refused with 503, but Redis runs its
    script when it resumes; the store releases that lease id then, so no slot stays taken."""
    store = RedisLimitStore(own_redis.url, timeout=0.3, prefix=f"t{uuid.uuid4().hex[:8]}")
    limits = Limits(1, parallel_requests=2)

    async def scenario():
        await store.parallel_in_use(1)  # the connection is open before Redis stops
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(LimitsUnavailable):
                await store.acquire(limits)
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 5
        while store.queued_releases and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return await store.parallel_in_use(1)

    assert run(store, scenario()) == 0


def test_an_acquire_whose_caller_is_cancelled_completes_and_gives_its_slot_back(own_redis):
    """A client leaving while its lease is being taken: the script still runs (Redis was slow),
    and the lease it took for nobody is released."""
    store = RedisLimitStore(own_redis.url, timeout=2.0, prefix=f"t{uuid.uuid4().hex[:8]}")
    limits = Limits(1, parallel_requests=2)

    async def scenario():
        await store.parallel_in_use(1)
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            caller = asyncio.ensure_future(store.acquire(limits))
            await asyncio.sleep(0.2)  # the script is on Redis's socket
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.3)
        return await store.parallel_in_use(1)

    assert run(store, scenario()) == 0


def test_a_dead_processes_slots_expire_and_a_live_ones_are_refreshed(store, monkeypatch):
    """Each process renews the slots it holds every SLOT_REFRESH s; a slot nobody renewed for
    SLOT_TTL s (its process was killed) is free again, instead of 6 hours later."""
    monkeypatch.setattr(limit_store_redis, "SLOT_REFRESH", 0.05)
    other = RedisLimitStore(store.url, clock=store.clock_, prefix=store.prefix)
    limits = Limits(1, parallel_requests=1)

    async def scenario():
        await store.acquire(limits)
        store.clock_.now += SLOT_TTL - 5
        await asyncio.sleep(0.2)  # refreshed at the new time
        store.clock_.now += 10  # older than SLOT_TTL since taken, not since refreshed
        with pytest.raises(LimitExceeded):
            await other.acquire(limits)
        store._refresher.cancel()  # the process is killed: nobody refreshes its slot
        store.clock_.now += SLOT_TTL + 1
        lease = await other.acquire(limits)
        await other.release(lease, 0)
        other._refresher.cancel()
        client = other._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    run(store, scenario())
