"""Usage recording: the request path hands over an event; a writer thread stores them in batches.

The request path only appends to a deque (no database, no await, no lock), so no request waits
on a usage write. The writer thread flushes every USAGE_FLUSH_SECONDS or USAGE_BATCH_SIZE events,
a batch per transaction: the rows, the daily roll-ups and the keys' last-used times.

Nothing wedges it (README, "Usage rows"):
- events are bounded to the columns when they are made (keys/usage_event.py);
- a batch the database refuses is halved until the refused rows are alone; each of those is set
  aside (logged, counted in /metrics) and the others are written;
- a database that cannot be reached (connection errors) keeps every row queued, in order, and
  the writer retries with a growing pause, neither spinning nor touching the event loop;
- the queue holds at most USAGE_MAX_PENDING rows; beyond that the oldest are dropped, counted
  and logged;
- when the process stops (ASGI lifespan shutdown, openai_api_server, or at exit) the queue is
  written out.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import random
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, close_old_connections, connection, transaction
from django.db.models import F
from django.utils import timezone

from keys import usage_metrics as metrics
from keys.models import COST_FIELD, APIKey, UsageDaily, UsageRecord
from keys.pricing import get_price_book
from keys.usage_event import UsageEvent
from keys.usage_totals import tokens_used_since  # the budgets' loader (keys/limits.py) imports it from here

__all__ = ["UsageEvent", "UsageWriter", "usage_writer", "usage_lifespan", "tokens_used_since", "prune"]

logger = logging.getLogger(__name__)

# The writer thread applies the retention a minute after start, then once a day.
PRUNE_DELAY = 60.0
PRUNE_INTERVAL = 24 * 3600.0
# A pruning the database could not take (down) is tried again this soon, not a day later.
PRUNE_RETRY = 600.0
# Errors that say the database cannot be reached now, not that a row is wrong: the rows wait.
UNREACHABLE = (OperationalError, InterfaceError)
RETRY_MAX_SECONDS = 5.0  # the longest pause between tries while the database is unreachable
STOP_SECONDS = 10.0  # how long the last flush at exit keeps trying an unreachable database
WARNING_INTERVAL = 10.0  # at most one "queue full" warning this often
SET_ASIDE_LOG_BURST = 20  # rows set aside logged one by one per WARNING_INTERVAL, then summed up


RECORD_COLUMNS = ("key_id", "model", "endpoint", "request_id", "status", "error_code", "prompt_tokens",
                  "completion_tokens", "latency_ms", "ttft_ms", "streamed", "created_at", "upstream", "route",
                  "cost", "currency", "tokens_estimated")


ROWS_PER_INSERT = 500
COST_DIGITS = (COST_FIELD["max_digits"], COST_FIELD["decimal_places"])
COST_QUANTUM = Decimal(1).scaleb(-COST_FIELD["decimal_places"])


def insert_records(events: list[UsageEvent], costs: list[tuple[Decimal | None, str]]) -> None:
    """Multi-row INSERTs of up to ROWS_PER_INSERT rows, or on SQLite one statement run for every
    row (executemany). bulk_create would build a model instance per row, which made this thread
    (which shares the GIL with the event loop) cost 15% of the CPU under load; one statement per
    row cost PostgreSQL 0.1 ms per request (a round trip each). SQLite runs in this process: the
    one compiled statement is cheapest there, while a multi-row statement's SQL (at most 58 rows
    under its 999-parameter bound) is rewritten to its placeholder style and parsed each time
    (measured: 35 -> 26 us of this thread's CPU per row, batches of 500 and 150)."""
    table = connection.ops.quote_name(UsageRecord._meta.db_table)
    columns = ", ".join(connection.ops.quote_name(column) for column in RECORD_COLUMNS)
    row_placeholders = "(" + ", ".join(["%s"] * len(RECORD_COLUMNS)) + ")"
    adapt_datetime = connection.ops.adapt_datetimefield_value
    adapt_decimal = connection.ops.adapt_decimalfield_value
    rows = [
        (e.key_id, e.model, e.endpoint, e.request_id, e.status, e.error_code, e.prompt_tokens,
         e.completion_tokens, e.latency_ms, e.ttft_ms, e.streamed, adapt_datetime(e.created_at), e.upstream,
         e.route, None if cost is None else adapt_decimal(cost, *COST_DIGITS), currency, e.tokens_estimated)
        for e, (cost, currency) in zip(events, costs, strict=True)
    ]
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES {row_placeholders}", rows)
        return
    per_insert = ROWS_PER_INSERT
    if connection.features.max_query_params:  # a database's bound on parameters per statement
        per_insert = min(per_insert, connection.features.max_query_params // len(RECORD_COLUMNS))
    with connection.cursor() as cursor:
        for start in range(0, len(rows), per_insert):
            chunk = rows[start : start + per_insert]
            values = ", ".join([row_placeholders] * len(chunk))
            cursor.execute(f"INSERT INTO {table} ({columns}) VALUES {values}", [v for row in chunk for v in row])


def costs_of(events: list[UsageEvent]) -> list[tuple[Decimal | None, str]]:
    """Each event's cost and currency at the price in force at its time; (None, "") unpriced."""
    book = get_price_book().fresh()
    costs = []
    for event in events:
        price = book.price(event.model, event.upstream, event.created_at)
        costs.append((None, "") if price is None else
                     (price.cost(event.prompt_tokens, event.completion_tokens).quantize(COST_QUANTUM), price.currency))
    return costs


def write_batch(events: list[UsageEvent]) -> None:
    """Store events (priced), their daily roll-ups and the keys' last-used times, atomically."""
    costs = costs_of(events)
    with transaction.atomic():
        insert_records(events, costs)
        # In a fixed order (roll-ups, then keys, sorted): processes flushing at once take the
        # same rows' locks in the same order, so neither waits for the other in a deadlock.
        for group, totals in sorted(rollup(events, costs).items()):
            add_to_rollup(group, totals)
        last_used: dict[int, datetime] = {}
        for event in events:
            last_used[event.key_id] = max(last_used.get(event.key_id, event.created_at), event.created_at)
        for key_id, when in sorted(last_used.items()):
            APIKey.objects.filter(pk=key_id).update(last_used_at=when)


# A roll-up's group: key id, model, upstream, route, currency ("" unpriced), day.
Group = tuple[int, str, str, str, str, date]
ROLLUP_FIELDS = ("key_id", "model", "upstream", "route", "currency", "day")


def rollup(events: Iterable[UsageEvent], costs: Iterable[tuple[Decimal | None, str]]) -> dict[Group, Counter]:
    groups: dict[Group, Counter] = defaultdict(Counter)
    for event, (cost, currency) in zip(events, costs, strict=True):
        totals = groups[(event.key_id, event.model, event.upstream, event.route, currency, event.created_at.date())]
        totals["requests"] += 1
        totals["errors"] += event.is_error
        totals["prompt_tokens"] += event.prompt_tokens
        totals["completion_tokens"] += event.completion_tokens
        if cost is not None:
            totals["cost"] += cost
    return groups


def add_to_rollup(group: Group, totals: Counter) -> None:
    where = dict(zip(ROLLUP_FIELDS, group, strict=True))
    names = ("requests", "errors", "prompt_tokens", "completion_tokens")
    increments = {name: F(name) + totals[name] for name in names}
    priced = bool(where["currency"])
    if priced:  # the unpriced roll-ups (currency "") keep a NULL cost: never 0
        increments["cost"] = F("cost") + totals["cost"]
    if UsageDaily.objects.filter(**where).update(**increments):
        return
    try:
        with transaction.atomic():
            UsageDaily.objects.create(**where, **{k: totals[k] for k in names},
                                      cost=totals["cost"] if priced else None)
    except IntegrityError:  # another process created it first
        UsageDaily.objects.filter(**where).update(**increments)


class UsageWriter:
    """Buffers UsageEvents and writes them from a background thread (or on flush())."""

    def __init__(self, flush_seconds: float, batch_size: int, max_pending: int,
                 retry_max_seconds: float = RETRY_MAX_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.flush_seconds = flush_seconds
        self.batch_size = batch_size
        self.max_pending = max(max_pending, 1)
        self.retry_max_seconds = retry_max_seconds
        self.clock = clock
        self.pending: deque[UsageEvent] = deque()
        self.listeners: list[Callable[[UsageEvent], None]] = []
        # Counted since the process started (and in /metrics): rows written, set aside, dropped.
        self.written = self.set_aside = self.dropped = self.failed_flushes = 0
        self._failures = 0  # failed flushes in a row (database unreachable)
        self._retry_at = 0.0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._flush_lock = threading.Lock()
        self._dropped_warned_at = -WARNING_INTERVAL
        self._set_aside_log = [-WARNING_INTERVAL, 0, 0]  # window start, lines logged, lines held back

    # The request path --------------------------------------------------------------------

    def record(self, event: UsageEvent) -> None:
        """Queue an event; O(1), no lock, safe from any thread or event loop."""
        pending = self.pending
        if len(pending) >= self.max_pending:
            self._drop_oldest(len(pending) - self.max_pending + 1)
        pending.append(event)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("Usage listener failed")
        if self._thread is None and settings.USAGE_WRITER_THREAD:
            self.start()
        if len(pending) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    def _drop_oldest(self, count: int) -> None:
        dropped = 0
        for _ in range(count):
            try:
                self.pending.popleft()
            except IndexError:  # the writer took them meanwhile
                break
            dropped += 1
        if not dropped:
            return
        self.dropped += dropped
        metrics.DROPPED.inc(dropped)
        now = self.clock()
        if now - self._dropped_warned_at >= WARNING_INTERVAL:
            self._dropped_warned_at = now
            logger.warning("Usage queue full (USAGE_MAX_PENDING=%d): dropping the oldest rows, %d so far "
                           "in this process", self.max_pending, self.dropped)

    # Writing -------------------------------------------------------------------------------

    def flush(self) -> int:
        """Write everything queued now; returns how many rows were written. Rows the database
        refuses are set aside; if it cannot be reached, the rows not written stay queued, in
        order, and the connection error is raised."""
        written = 0
        try:
            with self._flush_lock:
                while self.pending:
                    batch = [self.pending.popleft() for _ in range(min(self.batch_size, len(self.pending)))]
                    written += self._write(batch)
        finally:
            metrics.PENDING.set(len(self.pending))
        return written

    def _write(self, batch: list[UsageEvent]) -> int:
        """Write a batch, halving any part the database refuses until each refused row is alone."""
        written = 0
        parts = deque([batch])
        while parts:
            part = parts.popleft()
            try:
                write_batch(part)
            except UNREACHABLE:
                self._put_back([event for unwritten in (part, *parts) for event in unwritten])
                raise
            except Exception as exc:
                if len(part) == 1:
                    self._set_aside(part[0], exc)
                else:
                    half = len(part) // 2
                    parts.extendleft((part[half:], part[:half]))
            else:
                written += len(part)
        self.written += written
        metrics.WRITTEN.inc(written)
        return written

    def _put_back(self, events: list[UsageEvent]) -> None:
        """Requeue unwritten rows ahead of the newer ones, then drop the oldest beyond the bound."""
        self.pending.extendleft(reversed(events))
        excess = len(self.pending) - self.max_pending
        if excess > 0:
            self._drop_oldest(excess)

    def _set_aside(self, event: UsageEvent, exc: Exception) -> None:
        """A row the database refuses even alone. The log names it without its content beyond
        the key id (events never hold a key's secret) and the database's reason."""
        self.set_aside += 1
        metrics.SET_ASIDE.inc()
        window = self._set_aside_log
        now = self.clock()
        if now - window[0] >= WARNING_INTERVAL:
            window[:] = [now, 0, window[2]]
        if window[1] >= SET_ASIDE_LOG_BURST:
            window[2] += 1
            return
        window[1] += 1
        held_back, window[2] = window[2], 0
        reason = (str(exc).splitlines() or [""])[0][:200]
        logger.error("Usage row set aside, the database refused it: key_id=%s request_id=%s endpoint=%s "
                     "status=%s model=%.60r: %s: %s%s", event.key_id, event.request_id, event.endpoint,
                     event.status, event.model, type(exc).__name__, reason,
                     f" ({held_back} more set aside without a log line)" if held_back else "")

    # The thread ------------------------------------------------------------------------------

    def start(self) -> None:
        with self._flush_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop the thread and write what is left (at exit and on graceful shutdown), trying an
        unreachable database until `timeout`; what still cannot be written is logged as lost."""
        written_before = self.written
        self._stopping.set()
        self._wake.set()  # the thread writes what is queued, then ends
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        deadline = self.clock() + timeout
        pause = 0.1
        while self.pending:
            try:
                close_old_connections()
                self.flush()
            except UNREACHABLE as exc:
                if self.clock() + pause > deadline:
                    logger.error("Usage database unreachable at exit (%s): %d usage row(s) lost",
                                 type(exc).__name__, len(self.pending))
                    break
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
            except Exception:
                logger.exception("Usage flush at exit failed: %d usage row(s) lost", len(self.pending))
                break
        if self.written > written_before:
            logger.info("Process %d wrote its %d queued usage row(s) at exit", os.getpid(), self.written - written_before)

    def _run(self) -> None:
        next_prune = self.clock() + PRUNE_DELAY
        while not self._stopping.is_set():
            waiting = self._retry_at - self.clock()
            if waiting > 0:
                # Backing off: only stop() interrupts the pause (a full batch must not, or a
                # busy gateway would retry a dead database at its request rate).
                self._stopping.wait(min(waiting, self.flush_seconds))
                metrics.PENDING.set(len(self.pending))
                continue
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self._flush_safely()
            if self.clock() >= next_prune:
                next_prune = self.clock() + (PRUNE_INTERVAL if self._prune_safely() else PRUNE_RETRY)

    def _flush_safely(self) -> None:
        try:
            close_old_connections()
            self.flush()
        except UNREACHABLE as exc:
            self._failures += 1
            self.failed_flushes += 1
            metrics.FLUSH_FAILURES.inc()
            pause = min(self.retry_max_seconds, self.flush_seconds * 2 ** min(self._failures, 16))
            pause *= random.uniform(0.75, 1.0)  # processes that lost the database together do not retry in step
            self._retry_at = self.clock() + pause
            logger.warning("Usage database unreachable (%s: %s); %d row(s) kept, next try in %.1f s",
                           type(exc).__name__, (str(exc).splitlines() or [""])[0][:200], len(self.pending), pause)
        except Exception:
            logger.exception("Usage flush failed; %d row(s) kept for the next try", len(self.pending))
        else:
            if self._failures:
                logger.info("Usage database reachable again after %d failed flush(es)", self._failures)
            self._failures, self._retry_at = 0, 0.0

    def _prune_safely(self) -> bool:
        """Apply USAGE_RETENTION_DAYS (0 keeps every row), then the other apps' retention
        (prune_steps). Every process does it once a day; a second delete of the same old rows
        finds nothing. False when the database was unreachable (an outage, not a bug: a
        warning, and another try in PRUNE_RETRY s)."""
        for name, step in (("usage", prune_usage_rows), *prune_steps.items()):
            try:
                deleted = step()
                if deleted:
                    logger.info("Pruned %d %s row(s) past their retention", deleted, name)
            except UNREACHABLE as exc:
                logger.warning("Pruning (%s): database unreachable (%s); tried again in %.0f s",
                               name, type(exc).__name__, PRUNE_RETRY)
                return False
            except Exception:
                logger.exception("Pruning (%s) failed; it is tried again in a day", name)
        return True


usage_writer = UsageWriter(
    flush_seconds=settings.USAGE_FLUSH_SECONDS,
    batch_size=settings.USAGE_BATCH_SIZE,
    max_pending=settings.USAGE_MAX_PENDING,
)
atexit.register(usage_writer.stop)


async def usage_lifespan(scope: dict, receive: Callable, send: Callable) -> None:
    """ASGI lifespan: write the queued rows when the server shuts down. uvicorn (one process or
    `--workers N`) ends a process on SIGTERM by raising the signal again once it has served,
    which skips atexit; the lifespan shutdown comes before that, after the last request."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await asyncio.to_thread(usage_writer.stop)
            await send({"type": "lifespan.shutdown.complete"})
            return


def prune(retention_days: int) -> int:
    """Delete usage rows older than the retention (roll-ups are kept). Returns rows deleted."""
    cutoff = timezone.now() - timedelta(days=retention_days)
    deleted, _ = UsageRecord.objects.filter(created_at__lt=cutoff).delete()
    return deleted


def prune_usage_rows() -> int:
    days = settings.USAGE_RETENTION_DAYS
    return prune(days) if days > 0 else 0  # module-level `prune`: tests replace it


# Other apps' retention, applied with the usage rows' by the writer thread: name -> a function
# that deletes its rows past their retention (its own setting) and returns how many. The
# openai_api app registers its stored responses' (keys/ imports nothing of openai_api).
prune_steps: dict[str, Callable[[], int]] = {}


def register_prune_step(name: str, step: Callable[[], int]) -> None:
    prune_steps[name] = step
