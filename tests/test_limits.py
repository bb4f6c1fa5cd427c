"""Per-key limits through the API (memory store) and the store's own contract."""
from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
from django.db import OperationalError
from django.test import SimpleTestCase, override_settings

from keys.exceptions import LimitExceeded
from keys.limit_store_memory import MemoryLimitStore
from keys.limits import Limits, format_reset, get_limit_store, reset_limit_store
from keys.models import APIKey
from openai_api.accounting import demand_of, limit_error
from openai_api.auth import key_cache
from tests.asgi import stream_then_disconnect
from tests.base import GatewayTestCase
from tests.sse import read_stream

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


class ApiLimitTests(GatewayTestCase):
    async def limit(self, **fields) -> None:
        await APIKey.objects.filter(pk=self.key.pk).aupdate(**fields)
        key_cache.clear()

    async def test_requests_per_minute_give_429_with_headers(self):
        await self.limit(requests_per_minute=3)
        statuses = [(await self.post(CHAT, BODY)) for _ in range(5)]
        self.assertEqual([r.status_code for r in statuses], [200, 200, 200, 429, 429])
        self.assertEqual(statuses[0]["x-ratelimit-limit-requests"], "3")
        self.assertEqual(statuses[0]["x-ratelimit-remaining-requests"], "2")
        refused = statuses[3]
        body = self.assertError(refused, 429, code="rate_limit_exceeded")
        self.assertEqual(body["code"], 42901)
        self.assertEqual(refused["x-ratelimit-remaining-requests"], "0")
        self.assertGreaterEqual(int(refused["Retry-After"]), 1)
        self.assertIn("x-ratelimit-reset-requests", refused)

    async def test_an_exhausted_budget_is_insufficient_quota(self):
        # Exactly one request's worst case (docs/decisions.md#limits): the first is admitted, and
        # once it spent anything the second's worst case no longer fits.
        worst = demand_of(SimpleNamespace(sampling=SimpleNamespace(max_tokens=4, n=1)), len(json.dumps(BODY)))
        await self.limit(token_budget=worst.prompt_tokens + worst.completion_tokens, budget_period="day")
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        refused = await self.post(CHAT, BODY)
        body = self.assertError(refused, 429, code="insufficient_quota")
        self.assertEqual(body["error"]["type"], "insufficient_quota")
        self.assertIn("Key budget", body["error"]["message"])
        self.assertEqual(refused["x-should-retry"], "false")

    async def test_a_request_whose_worst_case_exceeds_the_budget_is_refused_at_once(self):
        await self.limit(token_budget=5, budget_period="day")
        body = self.assertError(await self.post(CHAT, BODY), 429, code="insufficient_quota")
        self.assertIn("Key budget exhausted", body["error"]["message"])

    async def test_tokens_per_minute_count_what_requests_used(self):
        await self.limit(tokens_per_minute=5)
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        refused = await self.post(CHAT, BODY)
        body = self.assertError(refused, 429)
        self.assertEqual(body["error"]["type"], "tokens")
        self.assertEqual(refused["x-ratelimit-remaining-tokens"], "0")

    async def test_parallel_slots_are_released_on_every_path(self):
        await self.limit(parallel_requests=1)
        store = get_limit_store()
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        self.fake.worker_error = httpx.ReadTimeout
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 504)
        self.fake.worker_error = None
        self.fake.error_chunk_after = 2
        response = await self.post(CHAT, {**BODY, "stream": True})
        await read_stream(response)
        self.fake.error_chunk_after = None
        self.assertEqual(await store.parallel_in_use(self.key.pk), 0)
        # A stream abandoned by its client.
        self.fake.chunk_delay = 0.05
        await stream_then_disconnect(CHAT, {**BODY, "stream": True}, self.auth, body_messages=2)
        self.assertEqual(self.fake.stream_closed[-1], True)
        self.assertEqual(await store.parallel_in_use(self.key.pk), 0)
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)

    async def test_keys_without_limits_get_no_headers(self):
        response = await self.post(CHAT, BODY)
        self.assertNotIn("x-ratelimit-limit-requests", response)


class MemoryStoreTests(GatewayTestCase):
    def setUp(self):
        super().setUp()
        self.now = 1000.0
        self.store = MemoryLimitStore(clock=lambda: self.now, load_budget_used=self.budget_used)
        self.used = 0

    async def budget_used(self, limits):
        return self.used

    async def test_the_request_window_slides(self):
        limits = Limits(1, requests_per_minute=2)
        await self.store.acquire(limits)
        self.now += 30
        await self.store.acquire(limits)
        with self.assertRaises(LimitExceeded) as refused:
            await self.store.acquire(limits)
        self.assertEqual((refused.exception.kind, refused.exception.retry_after), ("requests", 30))
        self.assertEqual(refused.exception.headers["x-ratelimit-remaining-requests"], "0")
        self.now += 30.5
        await self.store.acquire(limits)

    async def test_tokens_leave_the_window_after_a_minute(self):
        limits = Limits(1, tokens_per_minute=100)
        lease = await self.store.acquire(limits)
        await self.store.release(lease, 100)
        with self.assertRaises(LimitExceeded) as refused:
            await self.store.acquire(limits)
        self.assertEqual(refused.exception.kind, "tokens")
        self.now += 61
        await self.store.acquire(limits)

    async def test_the_budget_starts_from_the_database_usage(self):
        self.used = 90
        limits = Limits(1, token_budget=100, budget_period="month")
        lease = await self.store.acquire(limits)
        await self.store.release(lease, 10)
        with self.assertRaises(LimitExceeded) as refused:
            await self.store.acquire(limits)
        self.assertEqual((refused.exception.kind, refused.exception.limits), ("budget", limits))

    async def test_a_lease_is_released_once(self):
        limits = Limits(1, parallel_requests=1)
        lease = await self.store.acquire(limits)
        await self.store.release(lease, 0)
        await self.store.release(lease, 0)
        self.assertEqual(await self.store.parallel_in_use(1), 0)
        await self.store.acquire(limits)
        with self.assertRaises(LimitExceeded) as refused:
            await self.store.acquire(limits)
        self.assertEqual((refused.exception.kind, refused.exception.retry_after), ("parallel", 1))

    def test_reset_times_use_openais_format(self):
        self.assertEqual([format_reset(s) for s in (0.02, 1.5, 360)], ["20ms", "1.5s", "6m0s"])


class UnavailableLimitsTests(GatewayTestCase):
    """A budget whose usage cannot be read (the database down): 503, or admitted failing open."""

    def setUp(self):
        super().setUp()

        async def database_down(limits):
            raise OperationalError("connection refused")

        reset_limit_store(MemoryLimitStore(load_budget_used=database_down))

    async def test_a_key_whose_limits_cannot_be_checked_gets_503(self):
        await APIKey.objects.filter(pk=self.key.pk).aupdate(token_budget=1000)
        key_cache.clear()
        response = await self.post(CHAT, BODY)
        body = self.assertError(response, 503, code="limits_unavailable")
        self.assertEqual(response["Retry-After"], "1")
        self.assertNotIn("connection refused", body["message"])

    @override_settings(GATEWAY_LIMITS_FAIL_OPEN=True)
    async def test_failing_open_admits_it(self):
        await APIKey.objects.filter(pk=self.key.pk).aupdate(token_budget=1000)
        key_cache.clear()
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)


class LimitErrorTests(SimpleTestCase):
    """How the API maps what keys/ raises."""

    def test_each_kind_maps_to_its_429(self):
        limits = Limits(1, requests_per_minute=3, tokens_per_minute=10, parallel_requests=1, token_budget=5)
        headers = {"x-ratelimit-limit-requests": "3"}
        requests = limit_error(LimitExceeded("requests", limits, 12.2, headers))
        self.assertEqual((requests.status_code, requests.error_type, requests.code), (429, "requests", "rate_limit_exceeded"))
        self.assertEqual(requests.headers, {"Retry-After": "13", "x-ratelimit-limit-requests": "3"})
        self.assertEqual(limit_error(LimitExceeded("tokens", limits, 0.2, {})).error_type, "tokens")
        self.assertEqual(limit_error(LimitExceeded("tokens", limits, 0.2, {})).headers["Retry-After"], "1")
        self.assertIn("at most 1", limit_error(LimitExceeded("parallel", limits, 1, {})).message)
        budget = limit_error(LimitExceeded("budget", limits, 0, headers))
        self.assertEqual((budget.code, budget.headers["x-should-retry"]), ("insufficient_quota", "false"))
        self.assertNotIn("Retry-After", budget.headers)
        with self.assertRaises(ValueError):
            LimitExceeded("galaxies", limits, 0, {})

    def test_keys_never_imports_openai_api(self):
        """keys/ is the domain; the API face maps its exceptions (comments may name openai_api)."""
        keys_dir = Path(__file__).resolve().parent.parent / "keys"
        offenders = []
        for path in keys_dir.rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(keys_dir)}: {name}" for name in names if name.split(".")[0] == "openai_api"]
        self.assertEqual(offenders, [])
