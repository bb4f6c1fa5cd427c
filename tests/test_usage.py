"""Usage rows: one per request, written in batches off the request path, with roll-ups."""
from __future__ import annotations

from datetime import timedelta
from unittest import mock

from asgiref.sync import sync_to_async
from django.db import OperationalError
from django.utils import timezone

from keys import usage
from keys.models import APIKey, UsageDaily, UsageRecord
from keys.usage import usage_writer
from tests.asgi import stream_then_disconnect
from tests.base import GatewayTestCase
from tests.sse import read_stream

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

flush = sync_to_async(usage_writer.flush)


class UsageTests(GatewayTestCase):
    async def test_each_request_queues_one_event_and_writes_nothing_itself(self):
        await self.post(CHAT, BODY)
        self.assertEqual(len(usage_writer.pending), 1)
        self.assertEqual(await UsageRecord.objects.acount(), 0)

    async def test_rows_carry_tokens_status_and_request_id(self):
        response = await self.post(CHAT, BODY)
        body = response.json()
        await self.post(CHAT, {**BODY, "temperature": 9})
        self.assertEqual(await flush(), 2)
        ok, bad = [r async for r in UsageRecord.objects.order_by("id")]
        self.assertEqual((ok.key_id, ok.model, ok.endpoint, ok.status), (self.key.pk, "m1", CHAT, 200))
        self.assertEqual(ok.request_id, response["X-Request-ID"])
        self.assertEqual((ok.prompt_tokens, ok.completion_tokens), (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]))
        self.assertFalse(ok.streamed)
        self.assertEqual((bad.status, bad.error_code, bad.prompt_tokens), (400, "invalid_value", 0))
        self.assertTrue(ok.upstream)  # the upstream the router chose; the refused request reached none
        self.assertEqual((bad.upstream, bad.route, bad.cost, bad.currency), ("", "", None, ""))
        rollups = [r async for r in UsageDaily.objects.filter(key=self.key, model="m1").order_by("upstream")]
        self.assertEqual([(r.upstream, r.requests, r.errors) for r in rollups], [("", 1, 1), (ok.upstream, 1, 0)])
        self.assertEqual(rollups[1].prompt_tokens, ok.prompt_tokens)
        self.assertIsNotNone((await APIKey.objects.aget(pk=self.key.pk)).last_used_at)

    async def test_streams_are_recorded_with_their_tokens_and_time_to_first_token(self):
        response = await self.post(CHAT, {**BODY, "stream": True, "stream_options": {"include_usage": True}})
        await read_stream(response)
        await flush()
        row = await UsageRecord.objects.aget()
        self.assertTrue(row.streamed)
        self.assertEqual(row.status, 200)
        self.assertGreater(row.completion_tokens, 0)
        self.assertIsNotNone(row.ttft_ms)

    async def test_a_disconnected_stream_is_recorded_with_the_tokens_produced(self):
        await self.get("/v1/models")  # warm the key cache for the ASGI path
        self.fake.reply = " ".join(f"w{i}" for i in range(40))
        self.fake.chunk_delay = 0.05
        await stream_then_disconnect(CHAT, {**BODY, "max_tokens": 40, "stream": True}, self.auth, body_messages=3)
        await flush()
        row = await UsageRecord.objects.aget(endpoint=CHAT, streamed=True)
        self.assertEqual((row.status, row.error_code), (499, "client_disconnected"))
        self.assertGreater(row.completion_tokens, 0)
        self.assertLess(row.completion_tokens, 39)

    async def test_a_flush_that_cannot_reach_the_database_keeps_its_events(self):
        await self.post(CHAT, BODY)
        with mock.patch.object(usage, "write_batch", side_effect=OperationalError("database down")):
            with self.assertRaises(OperationalError):
                await flush()
        self.assertEqual(len(usage_writer.pending), 1)
        self.assertEqual(await flush(), 1)
        self.assertEqual(await UsageRecord.objects.acount(), 1)

    async def test_a_batch_larger_than_one_insert_statement_is_written_whole_and_in_order(self):
        events = [usage.UsageEvent(key_id=self.key.pk, model="m1", endpoint=CHAT, request_id=f"r{i}", status=200,
                                   prompt_tokens=i, completion_tokens=1, ttft_ms=None if i % 2 else i)
                  for i in range(usage.ROWS_PER_INSERT + 37)]
        with mock.patch.object(usage, "ROWS_PER_INSERT", 100):
            await sync_to_async(usage.write_batch)(events)
        rows = [r async for r in UsageRecord.objects.order_by("id")]
        self.assertEqual([r.request_id for r in rows], [e.request_id for e in events])
        self.assertEqual([(r.prompt_tokens, r.ttft_ms) for r in rows], [(e.prompt_tokens, e.ttft_ms) for e in events])
        rollup = await UsageDaily.objects.aget(key=self.key, model="m1")
        self.assertEqual((rollup.requests, rollup.prompt_tokens), (len(events), sum(range(len(events)))))

    async def test_old_rows_are_pruned_but_rollups_kept(self):
        await self.post(CHAT, BODY)
        await flush()
        await UsageRecord.objects.aupdate(created_at=timezone.now() - timedelta(days=100))
        self.assertEqual(await sync_to_async(usage.prune)(90), 1)
        self.assertEqual(await UsageRecord.objects.acount(), 0)
        self.assertEqual(await UsageDaily.objects.acount(), 1)


class RetentionTests(GatewayTestCase):
    async def test_the_writer_applies_the_retention_setting(self):
        await self.post(CHAT, BODY)
        await flush()
        await UsageRecord.objects.aupdate(created_at=timezone.now() - timedelta(days=10))
        with self.settings(USAGE_RETENTION_DAYS=0):
            await sync_to_async(usage_writer._prune_safely)()
        self.assertEqual(await UsageRecord.objects.acount(), 1)
        with self.settings(USAGE_RETENTION_DAYS=7):
            await sync_to_async(usage_writer._prune_safely)()
        self.assertEqual(await UsageRecord.objects.acount(), 0)
