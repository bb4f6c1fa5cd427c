"""Usage is never lost or wedged (keys/usage.py, keys/usage_event.py).

Rows PostgreSQL refuses (a model longer than its column, a NUL, a count out of range) used to
fail their whole batch for ever; here they are written, bounded, and do not hold back the rows
around them. A batch the database still refuses is split until the bad row is alone and set
aside; a database that cannot be reached keeps every row; the queue is bounded. These tests run
on SQLite and, under `python -m tests.services`, on PostgreSQL, where the refusals are real.
"""
from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from unittest import mock

from asgiref.sync import sync_to_async
from django.db import DataError, IntegrityError, OperationalError
from django.test import TransactionTestCase
from django.utils import timezone
from prometheus_client import REGISTRY

from keys import usage
from keys.models import APIKey, UsageDaily, UsageRecord
from keys.usage import UsageEvent, UsageWriter, usage_writer
from keys.usage_event import bounded_int, bounded_text
from tests.base import GatewayTestCase
from tests.procs import REPO_ROOT

CHAT = "/v1/chat/completions"
INT_MAX = 2**31 - 1


def event(key_id: int, request_id: str = "r", **fields) -> UsageEvent:
    return UsageEvent(**{"key_id": key_id, "model": "m1", "endpoint": CHAT, "request_id": request_id,
                         "status": 200, **fields})


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


class RefusedByPostgresTests(GatewayTestCase):
    """The three rows that wedged the writer on PostgreSQL, each between two good rows."""

    def write_between_good_rows(self, **fields) -> UsageRecord:
        usage_writer.record(event(self.key.pk, "before"))
        usage_writer.record(event(self.key.pk, "odd", status=404, **fields))
        usage_writer.record(event(self.key.pk, "after"))
        self.assertEqual(usage_writer.flush(), 3)
        self.assertEqual(len(usage_writer.pending), 0)
        self.assertEqual(sorted(UsageRecord.objects.values_list("request_id", flat=True)), ["after", "before", "odd"])
        self.assertIsNotNone(APIKey.objects.get(pk=self.key.pk).last_used_at)
        return UsageRecord.objects.get(request_id="odd")

    def test_a_model_of_201_characters_is_stored_cut_to_its_column(self):
        row = self.write_between_good_rows(model="x" * 201)
        self.assertEqual(row.model, "x" * 200)
        rollup = UsageDaily.objects.get(key=self.key, model="x" * 200)  # keyed by the cleaned model
        self.assertEqual((rollup.requests, rollup.errors), (1, 1))

    def test_a_nul_in_the_model_is_removed(self):
        row = self.write_between_good_rows(model="m\x00odel")
        self.assertEqual(row.model, "model")
        self.assertTrue(UsageDaily.objects.filter(key=self.key, model="model").exists())

    def test_completion_tokens_of_three_billion_are_clamped_to_the_column(self):
        row = self.write_between_good_rows(completion_tokens=3_000_000_000, prompt_tokens=-1)
        self.assertEqual((row.completion_tokens, row.prompt_tokens), (INT_MAX, 0))
        rollup = UsageDaily.objects.get(key=self.key, model="m1")
        self.assertEqual((rollup.requests, rollup.completion_tokens), (3, INT_MAX))

    async def test_a_request_naming_a_201_character_model_is_answered_and_recorded(self):
        response = await self.post(CHAT, {"model": "x" * 201, "messages": [{"role": "user", "content": "Hi"}]})
        self.assertGreaterEqual(response.status_code, 400)
        self.assertLess(response.status_code, 500)
        await self.post(CHAT, {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        self.assertEqual(await sync_to_async(usage_writer.flush)(), 2)
        self.assertEqual(await UsageRecord.objects.filter(status=200).acount(), 1)


class EventBoundsTests(GatewayTestCase):
    def test_every_field_is_bounded_where_the_event_is_made(self):
        made = UsageEvent(key_id=1, model=None, endpoint="/v1/" + "e" * 200, request_id="id\ud800\x00",
                          status=70000, error_code=12, prompt_tokens=2.7, completion_tokens="9",
                          latency_ms=float("nan"), ttft_ms=-5, streamed=1, created_at="yesterday")
        self.assertEqual((made.model, made.endpoint, made.request_id, made.error_code),
                         ("", "/v1/" + "e" * 96, "id", "12"))
        self.assertEqual((made.status, made.prompt_tokens, made.completion_tokens, made.latency_ms, made.ttft_ms),
                         (32767, 2, 9, 0, 0))
        self.assertIs(made.streamed, True)
        self.assertLess(abs((timezone.now() - made.created_at).total_seconds()), 5)
        self.assertIsNone(event(1).ttft_ms)

    def test_the_bounds_come_from_the_columns(self):
        record = UsageRecord._meta
        self.assertEqual(len(event(1, model="é" * 500).model), record.get_field("model").max_length)
        self.assertEqual(len(event(1, "r" * 500).request_id), record.get_field("request_id").max_length)
        self.assertEqual(bounded_int(10**30, 0, INT_MAX), INT_MAX)
        self.assertEqual(bounded_int(float("inf"), 0, INT_MAX), 0)
        self.assertEqual(bounded_text("ok", 10), "ok")

    def test_an_ordinary_event_is_left_as_it_is(self):
        kept = event(1, "abc", model="demo-chat", prompt_tokens=5, ttft_ms=7, streamed=False)
        self.assertEqual((kept.model, kept.request_id, kept.prompt_tokens, kept.ttft_ms), ("demo-chat", "abc", 5, 7))


class BatchSplittingTests(GatewayTestCase):
    """A batch the database refuses is halved until the refused rows are alone."""

    def poisoned_writes(self, poison: set[str]):
        real_write, calls = usage.write_batch, []

        def write(events):
            calls.append(len(events))
            if poison & {e.request_id for e in events}:
                raise DataError("value refused")
            real_write(events)

        return mock.patch.object(usage, "write_batch", side_effect=write), calls

    def test_a_refused_row_is_set_aside_and_the_rest_written(self):
        for i in range(100):
            usage_writer.record(event(self.key.pk, f"r{i}"))
        patch, calls = self.poisoned_writes({"r37", "r80"})
        aside_before, metric_before = usage_writer.set_aside, metric("gateway_usage_rows_set_aside_total")
        with patch, self.assertLogs("keys.usage", logging.ERROR) as logs:
            self.assertEqual(usage_writer.flush(), 98)
        self.assertEqual(UsageRecord.objects.count(), 98)
        self.assertFalse(UsageRecord.objects.filter(request_id__in=["r37", "r80"]).exists())
        self.assertEqual(UsageDaily.objects.get(key=self.key).requests, 98)
        self.assertEqual(usage_writer.set_aside - aside_before, 2)
        self.assertEqual(metric("gateway_usage_rows_set_aside_total") - metric_before, 2)
        self.assertEqual(len(usage_writer.pending), 0)
        self.assertLess(len(calls), 30)  # about 2 log2(100) tries, not one per row
        self.assertIn("request_id=r37", logs.output[0])
        self.assertIn("DataError: value refused", logs.output[0])
        self.assertNotIn(self.plaintext, "".join(logs.output))

    def test_rows_written_keep_their_order(self):
        for i in range(10):
            usage_writer.record(event(self.key.pk, f"r{i}"))
        patch, _ = self.poisoned_writes({"r4"})
        with patch, self.assertLogs("keys.usage", logging.ERROR):
            usage_writer.flush()
        self.assertEqual(list(UsageRecord.objects.order_by("id").values_list("request_id", flat=True)),
                         [f"r{i}" for i in range(10) if i != 4])

    def test_an_unreachable_database_keeps_every_row_in_order(self):
        for i in range(10):
            usage_writer.record(event(self.key.pk, f"r{i}"))
        with mock.patch.object(usage, "write_batch", side_effect=OperationalError("connection refused")):
            with self.assertRaises(OperationalError):
                usage_writer.flush()
        self.assertEqual([e.request_id for e in usage_writer.pending], [f"r{i}" for i in range(10)])
        self.assertEqual(usage_writer.flush(), 10)

    def test_the_database_going_away_while_splitting_keeps_only_the_rows_not_written(self):
        for i in range(8):
            usage_writer.record(event(self.key.pk, f"r{i}"))
        real_write, calls = usage.write_batch, []

        def write(events):  # the whole batch is refused, then its first half written, then the database goes
            calls.append([e.request_id for e in events])
            if len(calls) == 1:
                raise IntegrityError("refused")
            if len(calls) == 3:
                raise OperationalError("server closed the connection unexpectedly")
            real_write(events)

        with mock.patch.object(usage, "write_batch", side_effect=write), self.assertRaises(OperationalError):
            usage_writer.flush()
        self.assertEqual(list(UsageRecord.objects.order_by("id").values_list("request_id", flat=True)),
                         ["r0", "r1", "r2", "r3"])
        self.assertEqual([e.request_id for e in usage_writer.pending], ["r4", "r5", "r6", "r7"])


class RefusedAtCommitTests(TransactionTestCase):
    """A refusal the database itself makes: a row whose key was deleted meanwhile fails its
    foreign key when the batch commits (Django's constraints are deferred to the commit)."""

    def test_a_row_of_a_deleted_key_is_set_aside_and_its_batch_written(self):
        key, _ = APIKey.objects.create_key("kept")
        gone, _ = APIKey.objects.create_key("deleted")
        writer = UsageWriter(flush_seconds=1, batch_size=50, max_pending=1000)
        for i in range(20):
            writer.record(event(gone.pk if i == 7 else key.pk, f"r{i}"))
        gone.delete()
        with self.assertLogs("keys.usage", logging.ERROR) as logs:
            self.assertEqual(writer.flush(), 19)
        self.assertEqual(UsageRecord.objects.count(), 19)
        self.assertEqual(writer.set_aside, 1)
        self.assertIn("request_id=r7", logs.output[0])
        self.assertIn("IntegrityError", logs.output[0])


class BoundedQueueTests(GatewayTestCase):
    def test_a_full_queue_drops_the_oldest_counts_them_and_warns_once(self):
        writer = UsageWriter(flush_seconds=1, batch_size=100, max_pending=5)
        before = metric("gateway_usage_rows_dropped_total")
        with self.assertLogs("keys.usage", logging.WARNING) as logs:
            for i in range(8):
                writer.record(event(1, f"r{i}"))
        self.assertEqual([e.request_id for e in writer.pending], ["r3", "r4", "r5", "r6", "r7"])
        self.assertEqual(writer.dropped, 3)
        self.assertEqual(metric("gateway_usage_rows_dropped_total") - before, 3)
        self.assertEqual(len(logs.output), 1)  # rate-limited
        self.assertIn("USAGE_MAX_PENDING=5", logs.output[0])

    def test_rows_put_back_after_a_failed_flush_respect_the_bound(self):
        writer = UsageWriter(flush_seconds=1, batch_size=3, max_pending=5)
        for i in range(5):
            writer.record(event(1, f"r{i}"))
        taken = [writer.pending.popleft() for _ in range(3)]
        for i in range(5, 8):  # the queue refills while the batch is out
            writer.record(event(1, f"r{i}"))
        with self.assertLogs("keys.usage", logging.WARNING):
            writer._put_back(taken)
        self.assertEqual([e.request_id for e in writer.pending], ["r3", "r4", "r5", "r6", "r7"])
        self.assertEqual(writer.dropped, 3)

    def test_the_default_holds_a_minute_at_2000_requests_per_second(self):
        self.assertEqual(usage_writer.max_pending, 120_000)

    def test_recording_is_a_deque_append_and_never_writes(self):
        writer = UsageWriter(flush_seconds=1, batch_size=2, max_pending=10)
        with mock.patch.object(usage, "write_batch") as write, self.settings(USAGE_WRITER_THREAD=False):
            for i in range(50):
                writer.record(event(1, f"r{i}"))
        write.assert_not_called()
        self.assertEqual(len(writer.pending), 10)


class WriterThreadTests(GatewayTestCase):
    """The thread, with write_batch replaced: an unreachable database is retried with growing
    pauses, even while requests keep filling batches."""

    def test_an_unreachable_database_is_retried_with_backoff_not_at_the_request_rate(self):
        writer = UsageWriter(flush_seconds=0.05, batch_size=1, max_pending=100_000, retry_max_seconds=0.4)
        tries, threads = [], set()

        def unreachable(events):
            tries.append(time.monotonic())
            threads.add(threading.current_thread().name)
            raise OperationalError("connection refused")

        failures_before = metric("gateway_usage_flush_failures_total")
        with mock.patch.object(usage, "write_batch", side_effect=unreachable), \
                self.assertLogs("keys.usage", logging.WARNING):
            writer.start()
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:  # a busy gateway: a full batch every millisecond
                writer.record(event(1))
                time.sleep(0.001)
            writer._stopping.set()
            writer._thread.join(5)
        self.assertEqual(threads, {"usage-writer"})
        self.assertLess(len(tries), 15)  # 0.05 * 2^n up to 0.4 s: ~7 tries in 2 s, not ~1,000
        gaps = [b - a for a, b in zip(tries, tries[1:], strict=False)]
        self.assertGreater(max(gaps), 0.25)
        self.assertGreater(len(writer.pending), 500)  # every row kept
        self.assertEqual(writer.dropped + writer.set_aside, 0)
        self.assertEqual(metric("gateway_usage_flush_failures_total") - failures_before, writer.failed_flushes)

    def test_the_pending_gauge_follows_the_queue(self):
        writer = UsageWriter(flush_seconds=1, batch_size=100, max_pending=100)
        for i in range(3):
            writer.record(event(self.key.pk, f"r{i}"))
        with mock.patch.object(usage, "write_batch", side_effect=OperationalError("down")), \
                self.assertRaises(OperationalError):
            writer.flush()
        self.assertEqual(metric("gateway_usage_pending_rows"), 3)
        writer.flush()
        self.assertEqual(metric("gateway_usage_pending_rows"), 0)


class ShutdownTests(GatewayTestCase):
    def test_the_asgi_lifespan_shutdown_writes_the_queue(self):
        messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message["type"])

        writer = mock.Mock()
        with mock.patch.object(usage, "usage_writer", writer):
            asyncio.run(usage.usage_lifespan({"type": "lifespan"}, receive, send))
        writer.stop.assert_called_once_with()
        self.assertEqual(sent, ["lifespan.startup.complete", "lifespan.shutdown.complete"])

    def test_the_last_flush_tries_an_unreachable_database_until_its_timeout_then_says_what_is_lost(self):
        writer = UsageWriter(flush_seconds=1, batch_size=10, max_pending=100)
        writer.record(event(self.key.pk))
        with mock.patch.object(usage, "write_batch", side_effect=OperationalError("down")) as write, \
                self.assertLogs("keys.usage", logging.ERROR) as logs:
            started = time.monotonic()
            writer.stop(timeout=0.5)
        self.assertLess(time.monotonic() - started, 2)
        self.assertGreater(write.call_count, 1)
        self.assertIn("1 usage row(s) lost", logs.output[-1])


class MetricsTests(GatewayTestCase):
    def test_the_usage_series_are_on_the_default_registry(self):
        text = "".join(sample.name for family in REGISTRY.collect() for sample in family.samples)
        for name in ("gateway_usage_pending_rows", "gateway_usage_rows_written_total",
                     "gateway_usage_flush_failures_total", "gateway_usage_rows_set_aside_total",
                     "gateway_usage_rows_dropped_total"):
            self.assertIn(name, text)

    def test_they_add_up_over_processes_in_multiprocess_mode(self):
        import tempfile

        from prometheus_client import CollectorRegistry, multiprocess

        with tempfile.TemporaryDirectory() as directory:
            script = ("from keys import usage_metrics as m\n"
                      "m.PENDING.set(7); m.DROPPED.inc(3); m.SET_ASIDE.inc(); m.FLUSH_FAILURES.inc(2)\n")
            env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
            for _ in range(2):
                subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, check=True, timeout=60)
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=directory)
            value = registry.get_sample_value
            self.assertEqual(value("gateway_usage_rows_dropped_total"), 6)
            self.assertEqual(value("gateway_usage_rows_set_aside_total"), 2)
            self.assertEqual(value("gateway_usage_flush_failures_total"), 4)
            self.assertEqual(value("gateway_usage_pending_rows"), 14)


class UsageTotalsTests(GatewayTestCase):
    """One helper over the roll-ups gives the budgets, the admin column, the dashboard and the API."""

    def test_the_budget_loader_counts_the_rollups_of_the_period(self):
        from keys.usage_totals import tokens_used_since

        today = timezone.now().date()
        for days_ago, prompt in ((0, 5), (1, 7), (40, 1000)):
            UsageDaily.objects.create(key=self.key, model="m1", day=today - timedelta(days=days_ago),
                                      requests=1, prompt_tokens=prompt, completion_tokens=1)
        start = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
        self.assertEqual(tokens_used_since(self.key.pk, start), 6)
        self.assertEqual(tokens_used_since(self.key.pk, start - timedelta(days=1)), 14)
        self.assertEqual(usage.tokens_used_since(self.key.pk, start - timedelta(days=1)), 14)

    def test_rows_written_by_the_writer_show_in_todays_totals(self):
        from keys.usage_totals import rollups, summed

        usage_writer.record(event(self.key.pk, prompt_tokens=3, completion_tokens=4))
        usage_writer.record(event(self.key.pk, status=500))
        usage_writer.flush()
        today = timezone.now().date()
        self.assertEqual(summed(rollups(since=today, until=today, keys=[self.key.pk]))[0],
                         {"requests": 2, "errors": 1, "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                          "cost": None, "unpriced_requests": 2, "unpriced_tokens": 7})  # no price: no cost
