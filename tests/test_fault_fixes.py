"""What the fault suite (bench/faults.py) found, each reproduced in-process: a client leaving
during its key's look-up or before its stream is sent, roll-ups written in a fixed order, the
usage pruning during a database outage, a model id no route can match."""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from unittest import mock

from asgiref.sync import sync_to_async
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext

from gateway_project.asgi import application
from keys import usage
from keys.models import APIKey, UsageRecord
from keys.usage import UsageEvent, usage_writer
from openai_api import auth
from openai_api.auth import key_cache
from tests.asgi import http_scope
from tests.base import GatewayTestCase

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
flush = sync_to_async(usage_writer.flush)


async def wait_for(condition, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


class ClientLeavingTests(GatewayTestCase):
    async def rows(self) -> list[UsageRecord]:
        await flush()
        return [row async for row in UsageRecord.objects.filter(key=self.key)]

    async def test_a_client_leaving_during_its_keys_look_up_still_gets_a_usage_row(self):
        """The look-up is shared and outlives the client: its 499 is counted against the key."""
        key_cache.clear()
        slow_load = auth.load_key

        def load_key(digest):
            time.sleep(0.3)
            return slow_load(digest)

        with mock.patch.object(auth, "load_key", load_key):
            scope = http_scope(CHAT, self.auth)
            messages = asyncio.Queue()
            await messages.put({"type": "http.request", "body": json.dumps(BODY).encode()})

            async def receive():
                message = await messages.get()
                return message

            sent = []

            async def send(message):
                sent.append(message)

            app = asyncio.ensure_future(application(scope, receive, send))
            await asyncio.sleep(0.1)  # in the look-up
            await messages.put({"type": "http.disconnect"})
            await asyncio.wait_for(app, 5)

            async def counted():
                return bool(await self.rows())

            await wait_for(counted)
        rows = await self.rows()
        self.assertEqual([(r.status, r.error_code) for r in rows], [(499, "client_disconnected")])

    async def test_a_stream_never_sent_is_finished_when_the_client_leaves(self):
        """The client leaves while the server is still sending the status line (a slow socket):
        the stream the view started is closed and counted, not left suspended."""
        self.fake.chunk_delay = 0.05
        scope = http_scope(CHAT, self.auth)
        messages = asyncio.Queue()
        await messages.put({"type": "http.request", "body": json.dumps({**BODY, "stream": True}).encode()})
        started = asyncio.Event()

        async def receive():
            return await messages.get()

        async def send(message):
            started.set()
            await asyncio.sleep(3600)  # the socket never drains

        app = asyncio.ensure_future(application(scope, receive, send))
        await asyncio.wait_for(started.wait(), 5)
        await messages.put({"type": "http.disconnect"})
        await asyncio.wait_for(app, 5)
        rows = await self.rows()
        self.assertEqual([(r.status, r.streamed) for r in rows], [(499, True)])


class UsageWriterTests(GatewayTestCase):
    def test_roll_ups_and_keys_are_updated_in_a_fixed_order(self):
        """Two processes flushing at once must lock the same rows in the same order (else
        PostgreSQL aborts one of them as a deadlock)."""
        other, _ = APIKey.objects.create_key("other")
        first, second = sorted([self.key.pk, other.pk])
        events = [UsageEvent(key_id=key_id, model=model, endpoint=CHAT, request_id=f"r{key_id}{model}", status=200)
                  for key_id, model in ((second, "m2"), (first, "m2"), (second, "m1"), (first, "m1"))]
        usage.write_batch(events)  # creates the roll-ups
        with CaptureQueriesContext(connection) as queries:
            usage.write_batch(events)
        rollups = [q["sql"] for q in queries if q["sql"].startswith('UPDATE "keys_usagedaily"')]
        keys = [q["sql"] for q in queries if q["sql"].startswith('UPDATE "keys_apikey"')]
        self.assertEqual(len(rollups), 4)
        order = [(int(re.search(r'"key_id" = (\d+)', sql)[1]), re.search(r'"model" = \'(\w+)\'', sql)[1])
                 for sql in rollups]
        self.assertEqual(order, [(first, "m1"), (first, "m2"), (second, "m1"), (second, "m2")])
        self.assertEqual([int(re.search(r'"id" = (\d+)', sql)[1]) for sql in keys], [first, second])

    def test_pruning_during_a_database_outage_warns_and_is_retried_soon(self):
        with self.settings(USAGE_RETENTION_DAYS=7), \
                mock.patch.object(usage, "prune", side_effect=OperationalError("connection refused")), \
                self.assertLogs("keys.usage", "WARNING") as logs:
            self.assertFalse(usage_writer._prune_safely())
        self.assertEqual([r.levelno for r in logs.records], [logging.WARNING])
        self.assertIsNone(logs.records[0].exc_info)
        self.assertLess(usage.PRUNE_RETRY, usage.PRUNE_INTERVAL / 24)
        with self.settings(USAGE_RETENTION_DAYS=7):
            self.assertTrue(usage_writer._prune_safely())


class ModelIdTests(GatewayTestCase):
    async def test_a_model_id_with_a_newline_is_answered_by_the_api_with_a_usage_row(self):
        response = await self.get("/v1/models/a%0Ab")
        self.assertEqual(response.status_code, 404)
        self.assertEqual(response.json()["error"]["code"], "model_not_found")
        await flush()
        rows = [row async for row in UsageRecord.objects.filter(key=self.key)]
        self.assertEqual([(r.status, r.endpoint) for r in rows], [(404, "/v1/models/a\nb")])
