"""Small tables of upstream state that every gateway process sees: cooldown marks and probe
results (upstreams/cooldown.py, upstreams/health.py).

A table maps an upstream name to a JSON object. Reads are plain dict look-ups in this process
(the hot path never waits for Redis). With REDIS_URL set, each table is a Redis hash mirrored
into the process by one daemon thread that reads every table at most every REFRESH_SECONDS
(0.5 s) and writes this process's changes as soon as they are made, so a change reaches every
process within a second. Redis unreachable: the process keeps its last copy plus its own
changes (per-process state, never an error) and replays its queued writes when Redis is back.
Without REDIS_URL the tables live in the process. See docs/routing.md#shared-state.
"""
from __future__ import annotations

import atexit
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 0.5
MAX_QUEUED_WRITES = 1000


class Tables(Protocol):
    def get(self, table: str, name: str) -> dict | None: ...
    def items(self, table: str) -> dict[str, dict]: ...
    def set(self, table: str, name: str, value: dict) -> None: ...
    def delete(self, table: str, name: str) -> None: ...
    def claim(self, token: str, seconds: float) -> bool: ...
    def release(self, token: str) -> None: ...


class MemoryTables:
    """One process's tables; `claim` is a lease with an expiry, as Redis's SET NX PX."""

    blocking = False  # claim() returns at once

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._tables: dict[str, dict[str, dict]] = {}
        self._claims: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, table: str, name: str) -> dict | None:
        return self._tables.get(table, {}).get(name)

    def items(self, table: str) -> dict[str, dict]:
        return dict(self._tables.get(table, {}))

    def set(self, table: str, name: str, value: dict) -> None:
        self._tables.setdefault(table, {})[name] = value

    def delete(self, table: str, name: str) -> None:
        self._tables.get(table, {}).pop(name, None)

    def claim(self, token: str, seconds: float) -> bool:
        with self._lock:
            now = self.clock()
            if self._claims.get(token, float("-inf")) > now:
                return False
            self._claims[token] = now + seconds
            return True

    def release(self, token: str) -> None:
        self._claims.pop(token, None)

    def clear(self) -> None:
        self._tables.clear()
        self._claims.clear()

    def stop(self) -> None:
        pass


class RedisTables:
    """Tables shared through Redis hashes `<prefix>:upstreams:<table>`, mirrored per process."""

    blocking = True  # claim() waits for Redis: async callers run it in a thread

    def __init__(self, url: str, tables: tuple[str, ...], *, prefix: str = "gw", timeout: float = 1.0,
                 refresh_seconds: float = REFRESH_SECONDS):
        import redis

        self.url, self.prefix, self.timeout, self.refresh_seconds = url, prefix, timeout, refresh_seconds
        self.client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        self._failures = (redis.RedisError, OSError)
        self._names = tables
        self._data: dict[str, dict[str, dict]] = {table: {} for table in tables}
        self._writes: deque[tuple[str, str, dict | None]] = deque(maxlen=MAX_QUEUED_WRITES)
        self._local = MemoryTables()  # claims while Redis is down
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._down = False
        self.refreshed_at = 0.0  # time.monotonic() of the last successful read
        self.refresh_now()  # a process shows the shared state from its start
        self._thread = threading.Thread(target=self._run, name="upstream-state", daemon=True)
        self._thread.start()
        atexit.register(self.flush_at_exit)  # a command's probe result must reach Redis

    def flush_at_exit(self) -> None:
        try:
            self._flush()
        except self._failures:
            pass

    def key(self, table: str) -> str:
        return f"{self.prefix}:upstreams:{table}"

    # Reads: this process's copy.
    def get(self, table: str, name: str) -> dict | None:
        return self._data[table].get(name)

    def items(self, table: str) -> dict[str, dict]:
        return dict(self._data[table])

    # Writes: applied here at once, sent to Redis by the thread.
    def set(self, table: str, name: str, value: dict) -> None:
        with self._lock:
            self._data[table] = {**self._data[table], name: value}
            self._writes.append((table, name, value))
        self._wake.set()

    def delete(self, table: str, name: str) -> None:
        with self._lock:
            rest = dict(self._data[table])
            rest.pop(name, None)
            self._data[table] = rest
            self._writes.append((table, name, None))
        self._wake.set()

    def claim(self, token: str, seconds: float) -> bool:
        """One holder across every process (SET NX PX); Redis down: one in this process.
        Blocking (at most the Redis timeout): async callers run it in a thread."""
        if not self._down:
            try:
                return bool(self.client.set(self.key(f"claim:{token}"), "1", nx=True,
                                            px=max(1, int(seconds * 1000))))
            except self._failures as exc:
                self._went_down(exc)
        return self._local.claim(token, seconds)

    def release(self, token: str) -> None:
        self._local.release(token)
        self._writes.append(("claim", token, None))
        self._wake.set()

    # The thread.
    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._flush()
                self._refresh()
                if self._down:
                    logger.info("Redis answers again: upstream state is shared again")
                self._down = False
            except self._failures as exc:
                self._went_down(exc)
            except Exception:  # never let the thread die: the process would stop seeing changes
                logger.exception("Upstream state: unexpected failure")
            self._wake.wait(self.refresh_seconds if not self._down else max(1.0, self.refresh_seconds))
            self._wake.clear()

    def _went_down(self, exc: BaseException) -> None:
        if not self._down:
            logger.warning("Redis did not answer (%s): upstream state is per process until it does",
                           type(exc).__name__)
        self._down = True

    def _flush(self) -> None:
        with self._flush_lock:  # the thread, and a process's exit
            self._flush_queued()

    def _flush_queued(self) -> None:
        while self._writes:
            table, name, value = self._writes[0]
            if table == "claim":
                self.client.delete(self.key(f"claim:{name}"))
            elif value is None:
                self.client.hdel(self.key(table), name)
            else:
                self.client.hset(self.key(table), name, json.dumps(value))
            self._writes.popleft()

    def _refresh(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        for table in self._names:
            pipe.hgetall(self.key(table))
        answers = pipe.execute()
        with self._lock:
            self._merge(answers)
        self.refreshed_at = time.monotonic()

    def _merge(self, answers: list) -> None:
        pending = {(table, name) for table, name, _ in self._writes}
        for table, raw in zip(self._names, answers, strict=True):
            fresh: dict[str, dict] = {}
            for name, value in raw.items():
                try:
                    fresh[name.decode()] = json.loads(value)
                except ValueError:
                    continue
            for (pending_table, name) in pending:  # a change not yet written stays as made here
                if pending_table == table:
                    mine = self._data[table].get(name)
                    if mine is None:
                        fresh.pop(name, None)
                    else:
                        fresh[name] = mine
            self._data[table] = fresh

    def refresh_now(self) -> None:
        """Read Redis now (tests, and a command that wants the freshest view)."""
        try:
            self._flush()
            self._refresh()
        except self._failures as exc:
            self._went_down(exc)

    def clear(self) -> None:
        self._writes.clear()
        self._local.clear()
        for table in self._names:
            self._data[table] = {}

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()


def build_tables(tables: tuple[str, ...]) -> Any:
    from django.conf import settings

    if settings.REDIS_URL:
        return RedisTables(settings.REDIS_URL, tables, timeout=settings.GATEWAY_REDIS_TIMEOUT)
    return MemoryTables()
