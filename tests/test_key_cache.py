"""The key cache under abuse and outages: a flood of random tokens, a failing or hung database.

The PostgreSQL outage with real processes is in tests/test_outages.py.
"""
from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections import Counter
from unittest import mock

from django.db import OperationalError

from keys.hashing import hash_key
from keys.models import APIKey
from openai_api import auth
from openai_api.auth import KeyCache, key_cache
from openai_api.errors import KeyLookupUnavailableError
from tests.base import GatewayTestCase

MODELS = "/v1/models"


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FloodTests(GatewayTestCase):
    async def test_20000_random_tokens_do_not_starve_a_valid_key(self):
        """Every random token costs a query; the valid key, refreshed every 50 ms meanwhile,
        keeps answering fast, and the cache keeps its bound."""
        digest = hash_key(self.plaintext)
        loads = Counter()
        real_load_key = auth.load_key

        def counting_load_key(d):
            loads["valid" if d == digest else "random"] += 1
            return real_load_key(d)

        outcomes = Counter()

        async def attacker(token: str) -> None:
            try:
                outcomes["401" if await key_cache.get(hash_key(token)) is None else "200"] += 1
            except KeyLookupUnavailableError:
                outcomes["503"] += 1

        async def flood() -> None:
            tokens = [f"sk-{secrets.token_urlsafe(24)}" for _ in range(20_000)]
            for start in range(0, len(tokens), 1000):  # 1,000 in flight at a time
                await asyncio.gather(*(attacker(token) for token in tokens[start:start + 1000]))

        latencies = []
        # A long lookup timeout: on a busy machine no random token gives up (503), so all of
        # them reach the database.
        with mock.patch.object(auth, "load_key", counting_load_key), mock.patch.object(key_cache, "ttl", 0.05), \
                mock.patch.object(key_cache, "negative_size", 5000), mock.patch.object(key_cache, "lookup_timeout", 30):
            self.assertEqual((await self.get(MODELS)).status_code, 200)
            attack = asyncio.create_task(flood())
            while not attack.done():
                started = time.monotonic()
                response = await self.get(MODELS)
                latencies.append(time.monotonic() - started)
                self.assertEqual(response.status_code, 200, response.content)
                await asyncio.sleep(0.01)
            await attack
        print(f"flood: {sum(outcomes.values())} random tokens ({dict(outcomes)}), {loads['random']} queries; "
              f"valid key: {len(latencies)} requests, {loads['valid']} refreshes, median "
              f"{statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
        self.assertEqual(sum(outcomes.values()), 20_000)
        self.assertEqual(outcomes["401"], 20_000)
        self.assertEqual(loads["random"], 20_000)  # the flood really reached the database
        self.assertGreater(len(latencies), 20)
        # Refreshed every 50 ms (one request in five), not served stale: behind the flood's
        # queries, refreshes would wait until REFRESH_WAIT and few would land.
        self.assertGreater(loads["valid"], len(latencies) // 8)
        self.assertLess(statistics.median(latencies), 0.05)
        self.assertLess(max(latencies), auth.REFRESH_WAIT)
        self.assertLessEqual(len(key_cache._unknown), 5000)
        self.assertIn(digest, key_cache._known)

    async def test_a_repeated_wrong_token_costs_one_query(self):
        calls = []
        real_load_key = auth.load_key
        with mock.patch.object(auth, "load_key", lambda d: calls.append(d) or real_load_key(d)):
            for _ in range(5):
                self.assertError(await self.get(MODELS, Authorization="Bearer sk-wrong-0123456789"), 401)
        self.assertEqual(len(calls), 1)


class NegativeCacheTests(GatewayTestCase):
    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.cache = KeyCache(ttl=1.0, negative_size=3, clock=self.clock)

    async def test_unknown_tokens_are_forgotten_least_recently_seen_first(self):
        for name in ("a", "b", "c"):
            self.assertIsNone(await self.cache.get(hash_key(name)))
        self.assertIsNone(await self.cache.get(hash_key("a")))  # seen again: now the most recent
        self.assertIsNone(await self.cache.get(hash_key("d")))
        self.assertEqual(list(self.cache._unknown), [hash_key(n) for n in ("c", "a", "d")])
        self.assertIsNotNone(await self.cache.get(hash_key(self.plaintext)))
        self.assertEqual(len(self.cache), 4)  # the known key is not counted against the bound

    async def test_a_rotated_keys_old_digest_stops_working_within_the_ttl(self):
        digest = hash_key(self.plaintext)
        self.assertIsNotNone(await self.cache.get(digest))
        await APIKey.objects.filter(pk=self.key.pk).aupdate(hashed_key=hash_key("sk-new-secret-0123456789"))
        self.clock.now += 1.5
        self.assertIsNone(await self.cache.get(digest))
        self.assertNotIn(digest, self.cache._known)


class DatabaseOutageTests(GatewayTestCase):
    """load_key fails (connection refused) or hangs, as a database that is down would."""

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.cache = KeyCache(ttl=1.0, grace=300.0, lookup_timeout=1.0, clock=self.clock)
        self.digest = hash_key(self.plaintext)
        self.queries = 0

    def failing(self, digest):
        self.queries += 1
        raise OperationalError("connection refused")

    def hanging(self, digest):
        self.queries += 1
        time.sleep(2)
        raise OperationalError("timeout expired")

    async def test_known_keys_work_for_the_grace_period_and_unknown_ones_get_503(self):
        key = await self.cache.get(self.digest)
        self.assertIsNone(await self.cache.get(hash_key("sk-seen-before-the-outage")))
        self.clock.now += 5  # past the TTL
        with mock.patch.object(auth, "load_key", self.failing), self.assertLogs("openai_api.auth", "WARNING"):
            self.assertEqual(await self.cache.get(self.digest), key)
            self.assertEqual(self.queries, 1)
            self.assertEqual(await self.cache.get(self.digest), key)  # no new query for a second
            self.assertIsNone(await self.cache.get(hash_key("sk-seen-before-the-outage")))
            with self.assertRaises(KeyLookupUnavailableError) as unavailable:
                await self.cache.get(hash_key("sk-never-seen"))
            self.assertEqual(self.queries, 1)
            self.assertEqual(unavailable.exception.status_code, 503)
            self.assertEqual(unavailable.exception.headers["Retry-After"], "1")
            self.clock.now += 290  # still within the grace period, the database is tried again
            self.assertEqual(await self.cache.get(self.digest), key)
            self.assertEqual(self.queries, 2)
            self.clock.now += 10  # past it
            with self.assertRaises(KeyLookupUnavailableError):
                await self.cache.get(self.digest)

    async def test_a_hung_database_delays_nobody_for_long(self):
        key = await self.cache.get(self.digest)
        self.clock.now += 5
        with mock.patch.object(auth, "load_key", self.hanging), self.assertLogs("openai_api.auth", "WARNING"):
            started = time.monotonic()
            self.assertEqual(await self.cache.get(self.digest), key)  # after REFRESH_WAIT
            self.assertLess(time.monotonic() - started, auth.REFRESH_WAIT + 0.3)
            started = time.monotonic()
            self.assertEqual(await self.cache.get(self.digest), key)  # the next ones do not wait
            self.assertLess(time.monotonic() - started, 0.05)
            started = time.monotonic()
            with self.assertRaises(KeyLookupUnavailableError):
                await self.cache.get(hash_key("sk-never-seen"))
            self.assertLess(time.monotonic() - started, self.cache.lookup_timeout + 0.3)
            await asyncio.sleep(2)  # the hung query ends (with an error)

    async def test_the_api_answers_503_with_retry_after_never_500(self):
        with mock.patch.object(auth, "load_key", self.failing), self.assertLogs("openai_api.auth", "WARNING"):
            started = time.monotonic()
            response = await self.get(MODELS, Authorization="Bearer sk-unknown-0123456789")
            elapsed = time.monotonic() - started
        body = self.assertError(response, 503, code="key_lookup_unavailable")
        self.assertEqual(response["Retry-After"], "1")
        self.assertLess(elapsed, 1.0)
        self.assertNotIn("connection refused", body["message"])
