"""Per-key limits: requests/minute, tokens/minute, parallel requests, token budget per period.

A request takes a Lease before it reaches a worker and gives it back, with the tokens it used,
on every path (success, error, timeout, client disconnect). Two stores share one contract:
MemoryLimitStore (one process) and RedisLimitStore (atomic Lua scripts, shared by every
process), chosen by REDIS_URL. Windows are sliding: requests are counted over the last 60 s,
tokens in one-second buckets over the last 60 s.

A refused request raises LimitExceeded; a store that cannot decide (Redis unreachable, a
budget's usage unreadable) raises LimitsUnavailable (keys/exceptions.py). The Redis store
waits at most its socket timeout for Redis, then answers at once for a second (no request
queues behind a dead server), and retries the releases that failed in the background, so no
parallel slot stays taken once Redis is back.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from asgiref.sync import sync_to_async
from django.db import Error as DatabaseError
from django.utils import timezone

from gateway_project import state
from keys.exceptions import LimitExceeded, LimitsUnavailable

logger = logging.getLogger(__name__)

WINDOW = 60.0
# A parallel slot older than this is presumed leaked by a dead process (Redis store).
SLOT_TTL = 6 * 3600
# After Redis failed to answer, requests are refused (or admitted, failing open) at once for
# this long instead of each waiting for its own timeout.
OUTAGE_BACKOFF = 1.0
# Releases that failed wait in memory (oldest dropped beyond this) and are retried with a
# backoff growing from the first to the last delay.
MAX_QUEUED_RELEASES = 100_000
RELEASE_RETRY_DELAYS = (0.25, 5.0)


@dataclass(frozen=True)
class Limits:
    """The limits of one key; None means unlimited."""

    key_id: int
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    parallel_requests: int | None = None
    token_budget: int | None = None
    budget_period: str = "month"

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.requests_per_minute, self.tokens_per_minute,
                                           self.parallel_requests, self.token_budget))


@dataclass
class Lease:
    """A request's admission: released exactly once, with the tokens it used."""

    limits: Limits
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    headers: dict[str, str] = field(default_factory=dict)
    released: bool = False


def budget_period_start(period: str, now: datetime | None = None) -> datetime:
    now = timezone.localtime(now or timezone.now())
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return start if period == "day" else start.replace(day=1)


def budget_period_name(period: str, now: datetime | None = None) -> str:
    return budget_period_start(period, now).strftime("%Y-%m-%d")


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{int(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    return f"{int(seconds // 60)}m{int(seconds % 60)}s"


def rate_headers(limits: Limits, requests_used: int, tokens_used: int, request_reset: float, token_reset: float) -> dict[str, str]:
    headers = {}
    if limits.requests_per_minute is not None:
        headers.update({
            "x-ratelimit-limit-requests": str(limits.requests_per_minute),
            "x-ratelimit-remaining-requests": str(max(0, limits.requests_per_minute - requests_used)),
            "x-ratelimit-reset-requests": format_reset(request_reset),
        })
    if limits.tokens_per_minute is not None:
        headers.update({
            "x-ratelimit-limit-tokens": str(limits.tokens_per_minute),
            "x-ratelimit-remaining-tokens": str(max(0, limits.tokens_per_minute - tokens_used)),
            "x-ratelimit-reset-tokens": format_reset(token_reset),
        })
    return headers


class LimitStore(Protocol):
    async def acquire(self, limits: Limits) -> Lease:
        """Admit a request, or raise LimitExceeded (refused) or LimitsUnavailable (cannot tell)."""

    async def release(self, lease: Lease, tokens: int) -> None:
        """Give back a lease and count the tokens the request used."""


@dataclass
class KeyState:
    requests: deque = field(default_factory=deque)  # admission times
    token_buckets: dict[int, int] = field(default_factory=dict)  # second -> tokens
    parallel: int = 0
    budget_period: str = ""
    budget_used: int | None = None


class MemoryLimitStore:
    """Limits for one process. The event loop is single-threaded, so no locks are needed
    except around the one await (loading a budget's usage from the database)."""

    def __init__(self, clock=time.time, load_budget_used=None):
        self.clock = clock
        self.states: dict[int, KeyState] = {}
        self._load_budget_used = load_budget_used or default_budget_loader

    async def acquire(self, limits: Limits) -> Lease:
        state = self.states.setdefault(limits.key_id, KeyState())
        if limits.token_budget is not None:
            await self._ensure_budget(state, limits)
        now = self.clock()
        self._prune(state, now)
        tokens_used = sum(state.token_buckets.values())
        request_reset = state.requests[0] + WINDOW - now if state.requests else 0.0
        token_reset = min(state.token_buckets) + WINDOW - now if state.token_buckets else 0.0
        headers = rate_headers(limits, len(state.requests) + 1, tokens_used, request_reset, token_reset)
        if limits.token_budget is not None and state.budget_used >= limits.token_budget:
            raise LimitExceeded("budget", limits, 0, headers)
        if limits.parallel_requests is not None and state.parallel >= limits.parallel_requests:
            raise LimitExceeded("parallel", limits, 1, headers)
        if limits.requests_per_minute is not None and len(state.requests) >= limits.requests_per_minute:
            raise LimitExceeded("requests", limits, request_reset, rate_headers(limits, len(state.requests), tokens_used, request_reset, token_reset))
        if limits.tokens_per_minute is not None and tokens_used >= limits.tokens_per_minute:
            raise LimitExceeded("tokens", limits, token_reset, headers)
        state.requests.append(now)
        state.parallel += 1
        return Lease(limits, headers=headers)

    async def release(self, lease: Lease, tokens: int) -> None:
        if lease.released:
            return
        lease.released = True
        state = self.states.setdefault(lease.limits.key_id, KeyState())
        state.parallel = max(0, state.parallel - 1)
        if tokens:
            second = int(self.clock())
            state.token_buckets[second] = state.token_buckets.get(second, 0) + tokens
            if state.budget_used is not None:
                state.budget_used += tokens

    def release_soon(self, lease: Lease, tokens: int) -> None:
        """Release from synchronous code (a request's finish hooks): here it is immediate."""
        _run_now(self.release(lease, tokens))

    def _prune(self, state: KeyState, now: float) -> None:
        while state.requests and state.requests[0] <= now - WINDOW:
            state.requests.popleft()
        for second in [s for s in state.token_buckets if s <= now - WINDOW]:
            del state.token_buckets[second]

    async def _ensure_budget(self, state: KeyState, limits: Limits) -> None:
        period = budget_period_name(limits.budget_period)
        if state.budget_period != period or state.budget_used is None:
            used = await load_budget(self._load_budget_used, limits)
            if state.budget_period != period or state.budget_used is None:
                state.budget_period, state.budget_used = period, used

    async def parallel_in_use(self, key_id: int) -> int:
        """Parallel slots held now (releases are immediate in memory)."""
        return self.states.get(key_id, KeyState()).parallel


async def load_budget(loader, limits: Limits) -> int:
    """The tokens a key used in its budget's period so far; LimitsUnavailable if the database
    cannot tell."""
    try:
        return await loader(limits)
    except DatabaseError as exc:
        raise LimitsUnavailable(f"the budget's usage could not be read ({type(exc).__name__})") from None


async def default_budget_loader(limits: Limits) -> int:
    from keys.usage import tokens_used_since

    since = budget_period_start(limits.budget_period)
    return await sync_to_async(tokens_used_since, thread_sensitive=True)(limits.key_id, since)


# Redis: one script admits (checks every limit, then counts the request), one releases.
# Keys: 1 requests zset (member: lease id, score: ms), 2 token hash (second -> tokens),
# 3 parallel zset (member: lease id, score: ms), 4 budget counter.
ACQUIRE_SCRIPT = """
local now = tonumber(ARGV[1])
local rpm, tpm, par, budget = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local lease, window, slot_ttl = ARGV[6], 60000, tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local requests = redis.call('ZCARD', KEYS[1])
local request_reset = 0
if requests > 0 then
  request_reset = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]) + window - now
end
local tokens, oldest = 0, nil
local buckets = redis.call('HGETALL', KEYS[2])
for i = 1, #buckets, 2 do
  local second = tonumber(buckets[i])
  if second * 1000 <= now - window then
    redis.call('HDEL', KEYS[2], buckets[i])
  else
    tokens = tokens + tonumber(buckets[i + 1])
    if oldest == nil or second < oldest then oldest = second end
  end
end
local token_reset = 0
if oldest ~= nil then token_reset = oldest * 1000 + window - now end
local verdict = 'ok'
if budget >= 0 and tonumber(redis.call('GET', KEYS[4]) or '0') >= budget then
  verdict = 'budget'
elseif par >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - slot_ttl * 1000)
  if redis.call('ZCARD', KEYS[3]) >= par then verdict = 'parallel' end
end
if verdict == 'ok' and rpm >= 0 and requests >= rpm then verdict = 'requests' end
if verdict == 'ok' and tpm >= 0 and tokens >= tpm then verdict = 'tokens' end
if verdict == 'ok' then
  redis.call('ZADD', KEYS[1], now, lease)
  redis.call('PEXPIRE', KEYS[1], window)
  requests = requests + 1
  if par >= 0 then
    redis.call('ZADD', KEYS[3], now, lease)
    redis.call('EXPIRE', KEYS[3], slot_ttl)
  end
end
return {verdict, requests, tokens, tostring(request_reset), tostring(token_reset)}
"""

RELEASE_SCRIPT = """
redis.call('ZREM', KEYS[3], ARGV[1])
local tokens = tonumber(ARGV[2])
if tokens > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], tokens)
  redis.call('EXPIRE', KEYS[2], 120)
  if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('INCRBY', KEYS[4], tokens) end
end
return 1
"""


class RedisLimitStore:
    """Limits shared by every process through Redis; each decision is one atomic script.

    Redis unreachable: acquire raises LimitsUnavailable within `timeout` seconds (and at once
    for OUTAGE_BACKOFF seconds after a failure); a release that failed is queued and retried
    until Redis answers. A release whose answer was lost (a timeout after Redis ran it) may
    count its tokens twice; its slot is freed either way.
    """

    def __init__(self, url: str, clock=time.time, load_budget_used=None, prefix: str = "gw",
                 timeout: float = 1.0, monotonic=time.monotonic):
        self.url = url
        self.clock = clock
        self.monotonic = monotonic
        self.prefix = prefix
        self.timeout = timeout
        self._load_budget_used = load_budget_used or default_budget_loader
        self._clients: dict[asyncio.AbstractEventLoop, object] = {}
        self._down_until = float("-inf")
        self._queued: deque[tuple[list[str], list]] = deque()
        self._retrier: asyncio.Task | None = None
        self.dropped_releases = 0
        from redis.exceptions import RedisError

        self._failures = (RedisError, OSError)

    def client(self):
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # One immediate retry, on a broken connection only (a pooled connection Redis closed
            # while restarting); redis-py's default retries with backoff for seconds.
            client = self._clients[loop] = redis.Redis.from_url(
                self.url, socket_connect_timeout=self.timeout, socket_timeout=self.timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(ConnectionError,)),
            )
            client._acquire = client.register_script(ACQUIRE_SCRIPT)
            client._release = client.register_script(RELEASE_SCRIPT)
        return client

    def keys(self, limits: Limits) -> list[str]:
        base = f"{self.prefix}:{{{limits.key_id}}}"  # one hash slot per key (Redis Cluster)
        period = budget_period_name(limits.budget_period)
        return [f"{base}:requests", f"{base}:tokens", f"{base}:parallel", f"{base}:budget:{period}"]

    @property
    def available(self) -> bool:
        """False for OUTAGE_BACKOFF seconds after Redis failed to answer."""
        return self.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> LimitsUnavailable:
        if self.available:
            logger.warning("Redis did not answer (%s): limits cannot be checked", type(exc).__name__)
        self._down_until = self.monotonic() + OUTAGE_BACKOFF
        return LimitsUnavailable(f"the limit store did not answer ({type(exc).__name__})", OUTAGE_BACKOFF)

    async def acquire(self, limits: Limits) -> Lease:
        if not self.available:
            raise LimitsUnavailable("the limit store did not answer", self._down_until - self.monotonic())
        try:
            return await self._acquire(limits)
        except self._failures as exc:
            raise self._failed(exc) from None

    async def _acquire(self, limits: Limits) -> Lease:
        client, keys = self.client(), self.keys(limits)
        if limits.token_budget is not None and not await client.exists(keys[3]):
            used = await load_budget(self._load_budget_used, limits)
            await client.set(keys[3], used, nx=True, ex=40 * 86400)
        lease = Lease(limits)
        verdict, requests, tokens, request_reset, token_reset = await client._acquire(keys=keys, args=[
            int(self.clock() * 1000),
            *(-1 if v is None else v for v in (limits.requests_per_minute, limits.tokens_per_minute,
                                                limits.parallel_requests, limits.token_budget)),
            lease.id, SLOT_TTL,
        ])
        request_reset, token_reset = float(request_reset) / 1000, float(token_reset) / 1000
        lease.headers = rate_headers(limits, int(requests), int(tokens), request_reset, token_reset)
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        if verdict != "ok":
            retry_after = {"requests": request_reset, "tokens": token_reset, "parallel": 1}.get(verdict, 0)
            raise LimitExceeded(verdict, limits, retry_after, lease.headers)
        return lease

    async def release(self, lease: Lease, tokens: int) -> None:
        """Give the lease back; if Redis cannot take it now, queue it for the retrier."""
        if lease.released:
            return
        lease.released = True
        release = (self.keys(lease.limits), [lease.id, int(tokens), int(self.clock())])
        if self.available and not self._queued:
            try:
                await self._send_release(release)
                return
            except self._failures as exc:
                self._failed(exc)
        self._queue_release(release)

    async def _send_release(self, release: tuple[list[str], list]) -> None:
        keys, args = release
        await self.client()._release(keys=keys, args=args)

    def _queue_release(self, release: tuple[list[str], list]) -> None:
        if len(self._queued) >= MAX_QUEUED_RELEASES:
            self._queued.popleft()
            self.dropped_releases += 1  # its slot expires after SLOT_TTL
        self._queued.append(release)
        loop = asyncio.get_running_loop()
        if self._retrier is None or self._retrier.done() or self._retrier.get_loop() is not loop:
            self._retrier = loop.create_task(self._retry_releases())

    async def _retry_releases(self) -> None:
        """Send the queued releases in order, backing off while Redis does not answer."""
        delay, longest = RELEASE_RETRY_DELAYS
        while self._queued:
            await asyncio.sleep(delay)
            try:
                while self._queued:
                    await self._send_release(self._queued[0])
                    self._queued.popleft()
            except self._failures:
                delay = min(delay * 2, longest)
        self._down_until = float("-inf")  # it answered: requests need not wait out the backoff
        logger.info("Redis answers again: the releases that had failed are done")

    @property
    def queued_releases(self) -> int:
        return len(self._queued)

    def release_soon(self, lease: Lease, tokens: int) -> None:
        """Release from synchronous code: a task of its own, so a cancelled request still releases."""
        task = asyncio.get_running_loop().create_task(self.release(lease, tokens))
        _pending_releases.add(task)
        task.add_done_callback(_pending_releases.discard)

    async def parallel_in_use(self, key_id: int) -> int:
        """Parallel slots held now, after the releases already under way have landed."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(t for t in _pending_releases if t.get_loop() is loop), return_exceptions=True)
        return await self.client().zcard(f"{self.prefix}:{{{key_id}}}:parallel")


_pending_releases: set[asyncio.Task] = set()


def _run_now(coroutine) -> None:
    """Run a coroutine that never awaits anything to completion, synchronously."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise RuntimeError("release awaited unexpectedly")


def build_limit_store() -> MemoryLimitStore | RedisLimitStore:
    """Redis when REDIS_URL is set, process memory otherwise (one per process:
    gateway_project/state.py)."""
    from django.conf import settings

    if settings.REDIS_URL:
        return RedisLimitStore(settings.REDIS_URL, timeout=settings.GATEWAY_REDIS_TIMEOUT)
    return MemoryLimitStore()


def get_limit_store() -> MemoryLimitStore | RedisLimitStore:
    return state.get("limit_store")


def reset_limit_store(store: MemoryLimitStore | RedisLimitStore | None = None) -> None:
    state.put("limit_store", store)
