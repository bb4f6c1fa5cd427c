"""RedisLimitStore: limits shared by every process through Redis (REDIS_URL), each decision one
atomic Lua script. The contract and the shared types: keys/limits.py; the rules:
docs/decisions.md#limits; Redis outages: README "When PostgreSQL or Redis fail" and
docs/reliability.md.

The store waits at most its socket timeout for Redis, then answers at once for a second (no
request queues behind a dead server), and retries the releases that failed in the background,
so no parallel slot stays taken once Redis is back.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from keys.exceptions import LimitExceeded, LimitsUnavailable
from keys.limits import (
    NOTHING,
    SLOT_TTL,
    Lease,
    Limits,
    Worst,
    budget_period_name,
    default_budget_loader,
    load_budget,
    rate_headers,
)

logger = logging.getLogger(__name__)

# Each process refreshes the slots and reservations it holds every SLOT_REFRESH seconds in one
# pipelined call (RedisLimitStore._refresh_leases), so a killed process's slots come back within
# SLOT_TTL, with no Redis call per request.
SLOT_REFRESH = 10.0
# After Redis failed to answer, requests are refused (or admitted, failing open) at once for
# this long instead of each waiting for its own timeout.
OUTAGE_BACKOFF = 1.0
# Releases that failed wait in memory (oldest dropped beyond this) and are retried with a
# backoff growing from the first to the last delay.
MAX_QUEUED_RELEASES = 100_000
RELEASE_RETRY_DELAYS = (0.25, 5.0)


# Both scripts: a level's budget reservation of `id` given back (tokens and money), if it holds
# one; true if it did. KEYS[k + 6] is the level's reservations hash (see ACQUIRE_SCRIPT).
GIVE_BACK = """
local function give_back(k, id)
  local held = redis.call('HGET', KEYS[k + 6], 'l:' .. id)
  if not held then return false end
  local t, n = string.match(held, '(%d+) (%d+)')
  redis.call('HINCRBY', KEYS[k + 6], 'tokens', 0 - tonumber(t))
  redis.call('HINCRBY', KEYS[k + 6], 'nanos', 0 - tonumber(n))
  redis.call('HDEL', KEYS[k + 6], 'l:' .. id)
  return true
end
"""

# Redis: one script admits (checks every limit of every level, then counts the request at each),
# one settles. Per level, 7 keys: 1 requests zset (member: lease id, score: ms), 2 token hash
# (second -> tokens), 3 parallel zset (member: lease id, score: ms), 4 tokens spent in the budget
# period, 5 billionths spent in the period, 6 reservations hash ("tokens", "nanos": totals;
# "l:<lease>": "<tokens> <nanos>"), 7 reservation times zset (lease -> ms, for leaked ones).
# Per level, 7 arguments: rpm, tpm, parallel, token budget, money budget (billionths), worst
# tokens, worst billionths (-1: none; a money budget refuses an unpriced request, "unpriced").
ACQUIRE_SCRIPT = GIVE_BACK + """
local now, lease, slot_ttl, levels = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local window = 60000
local verdict, refusing, out = 'ok', 0, {}
local function over(spent, reserved, worst, budget)
  return spent + reserved >= budget or spent + reserved + worst > budget
end
for level = 1, levels do
  local k, a = (level - 1) * 7, 4 + (level - 1) * 7
  local rpm, tpm, par = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local tbudget, mbudget = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local wtokens, wnanos = tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 1], '-inf', now - window)
  local requests = redis.call('ZCARD', KEYS[k + 1])
  local request_reset = 0
  if requests > 0 then
    request_reset = tonumber(redis.call('ZRANGE', KEYS[k + 1], 0, 0, 'WITHSCORES')[2]) + window - now
  end
  local tokens, oldest = 0, nil
  local buckets = redis.call('HGETALL', KEYS[k + 2])
  for i = 1, #buckets, 2 do
    local second = tonumber(buckets[i])
    if second * 1000 <= now - window then
      redis.call('HDEL', KEYS[k + 2], buckets[i])
    else
      tokens = tokens + tonumber(buckets[i + 1])
      if oldest == nil or second < oldest then oldest = second end
    end
  end
  local token_reset = 0
  if oldest ~= nil then token_reset = oldest * 1000 + window - now end
  if tbudget >= 0 or mbudget >= 0 then
    -- reservations of requests whose process died are given back after the slot TTL
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[k + 7], '-inf', now - slot_ttl * 1000)) do
      give_back(k, id)
      redis.call('ZREM', KEYS[k + 7], id)
    end
  end
  local v = 'ok'
  if tbudget >= 0 and over(tonumber(redis.call('GET', KEYS[k + 4]) or '0'),
      tonumber(redis.call('HGET', KEYS[k + 6], 'tokens') or '0'), wtokens, tbudget) then
    v = 'budget'
  elseif mbudget >= 0 and wnanos < 0 then
    v = 'unpriced'
  elseif mbudget >= 0 and over(tonumber(redis.call('GET', KEYS[k + 5]) or '0'),
      tonumber(redis.call('HGET', KEYS[k + 6], 'nanos') or '0'), wnanos, mbudget) then
    v = 'money'
  elseif par >= 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now - slot_ttl * 1000)
    if redis.call('ZCARD', KEYS[k + 3]) >= par then v = 'parallel' end
  end
  if v == 'ok' and rpm >= 0 and requests >= rpm then v = 'requests' end
  if v == 'ok' and tpm >= 0 and tokens >= tpm then v = 'tokens' end
  if v ~= 'ok' and verdict == 'ok' then verdict, refusing = v, level end
  out[level] = {requests, tokens, request_reset, token_reset}
end
local result = {verdict, refusing}
for level = 1, levels do
  local k, a = (level - 1) * 7, 4 + (level - 1) * 7
  local requests = out[level][1]
  if verdict == 'ok' then
    redis.call('ZADD', KEYS[k + 1], now, lease)
    redis.call('PEXPIRE', KEYS[k + 1], window)
    requests = requests + 1
    if tonumber(ARGV[a + 3]) >= 0 then
      redis.call('ZADD', KEYS[k + 3], now, lease)
      redis.call('EXPIRE', KEYS[k + 3], slot_ttl)
    end
    if tonumber(ARGV[a + 4]) >= 0 or tonumber(ARGV[a + 5]) >= 0 then
      local wtokens, wnanos = tonumber(ARGV[a + 6]), math.max(0, tonumber(ARGV[a + 7]))
      redis.call('HSET', KEYS[k + 6], 'l:' .. lease, string.format('%d %d', wtokens, wnanos))
      redis.call('HINCRBY', KEYS[k + 6], 'tokens', wtokens)
      redis.call('HINCRBY', KEYS[k + 6], 'nanos', wnanos)
      redis.call('ZADD', KEYS[k + 7], now, lease)
    end
  end
  table.insert(result, requests)
  table.insert(result, out[level][2])
  table.insert(result, tostring(out[level][3]))
  table.insert(result, tostring(out[level][4]))
end
return result
"""

# Settles a lease at every level: frees its slot, counts what it used, gives back its reservation.
# ARGV: lease, second, tokens, billionths, levels.
RELEASE_SCRIPT = GIVE_BACK + """
local lease, second, tokens, nanos = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
for level = 1, tonumber(ARGV[5]) do
  local k = (level - 1) * 7
  redis.call('ZREM', KEYS[k + 3], lease)
  if tokens > 0 then
    redis.call('HINCRBY', KEYS[k + 2], second, tokens)
    redis.call('EXPIRE', KEYS[k + 2], 120)
    if redis.call('EXISTS', KEYS[k + 4]) == 1 then redis.call('INCRBY', KEYS[k + 4], tokens) end
  end
  if nanos > 0 and redis.call('EXISTS', KEYS[k + 5]) == 1 then redis.call('INCRBY', KEYS[k + 5], nanos) end
  if give_back(k, lease) then redis.call('ZREM', KEYS[k + 7], lease) end
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
        self._held: dict[str, list[str]] = {}  # lease id -> its slot and reservation-time keys
        self._refresher: asyncio.Task | None = None
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

    def level_base(self, limits: Limits) -> str:
        # One hash slot per team (Redis Cluster): a key of a team keeps its counters in its team's slot.
        if limits.scope == "team":
            return f"{self.prefix}:{{t{limits.key_id}}}"
        if limits.team_id is not None:
            return f"{self.prefix}:{{t{limits.team_id}}}:k{limits.key_id}"
        return f"{self.prefix}:{{{limits.key_id}}}"

    def keys(self, limits: Limits) -> list[str]:
        """The Redis keys of every level of `limits`, 7 per level (see ACQUIRE_SCRIPT)."""
        keys = []
        for level in limits.levels:
            base, period = self.level_base(level), budget_period_name(level.budget_period)
            keys += [f"{base}:requests", f"{base}:tokens", f"{base}:parallel", f"{base}:budget:{period}",
                     f"{base}:money:{period}", f"{base}:reserved", f"{base}:reserved_at"]
        return keys

    @property
    def available(self) -> bool:
        """False for OUTAGE_BACKOFF seconds after Redis failed to answer."""
        return self.monotonic() >= self._down_until

    def _failed(self, exc: BaseException) -> LimitsUnavailable:
        if self.available:
            logger.warning("Redis did not answer (%s): limits cannot be checked", type(exc).__name__)
        self._down_until = self.monotonic() + OUTAGE_BACKOFF
        return LimitsUnavailable(f"the limit store did not answer ({type(exc).__name__})", OUTAGE_BACKOFF)

    async def acquire(self, limits: Limits, worst: Worst = NOTHING) -> Lease:
        """Complete-or-release: the script runs in a task of its own, so a caller cancelled (its
        client gone) does not stop it half-way; a lease it took for a caller that is gone is
        given back. An acquire whose answer did not come (Redis timed out) may still run when
        Redis resumes, so its lease id is released too, through the release retrier."""
        if not self.available:
            raise LimitsUnavailable("the limit store did not answer", self._down_until - self.monotonic())
        lease = Lease(limits, worst=worst)
        attempt = asyncio.ensure_future(self._acquire(lease))
        try:
            taken = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(lambda done: self._settle_abandoned(done, lease))
            raise
        except self._failures as exc:
            self._queue_release(self._release_args(lease, 0, 0))
            raise self._failed(exc) from None
        self._hold(taken)
        return taken

    def _settle_abandoned(self, attempt: asyncio.Future, lease: Lease) -> None:
        """An acquire whose caller left: give back whatever it took (see acquire)."""
        if attempt.cancelled():
            return
        exc = attempt.exception()
        if exc is None:
            self.release_soon(lease, 0)
        elif isinstance(exc, self._failures):
            self._failed(exc)
            self._queue_release(self._release_args(lease, 0, 0))

    def _hold(self, lease: Lease) -> None:
        """Count the lease among the ones this process refreshes while it lives (SLOT_TTL)."""
        keys = self.keys(lease.limits)
        self._held[lease.id] = [keys[i * 7 + j] for i in range(len(lease.limits.levels)) for j in (2, 6)]
        loop = asyncio.get_running_loop()
        if self._refresher is None or self._refresher.done() or self._refresher.get_loop() is not loop:
            self._refresher = loop.create_task(self._refresh_leases())

    async def _refresh_leases(self) -> None:
        """Every SLOT_REFRESH s, one pipeline renews the slots and reservations this process holds
        (ZADD XX: a slot released meanwhile is not brought back)."""
        while self._held:
            await asyncio.sleep(SLOT_REFRESH)
            if not self._held or not self.available:
                continue
            now, parallel_keys = int(self.clock() * 1000), set()
            try:
                async with self.client().pipeline(transaction=False) as pipe:
                    for lease_id, keys in list(self._held.items()):
                        for key in keys:
                            pipe.zadd(key, {lease_id: now}, xx=True)
                        parallel_keys.update(keys[0::2])
                    for key in parallel_keys:
                        pipe.expire(key, SLOT_TTL)
                    await pipe.execute()
            except self._failures as exc:
                logger.info("The parallel slots held could not be refreshed (%s)", type(exc).__name__)

    async def _acquire(self, lease: Lease) -> Lease:
        limits, worst = lease.limits, lease.worst
        client, keys, levels = self.client(), self.keys(limits), limits.levels
        for index, level in enumerate(levels):
            spent_keys = keys[index * 7 + 3 : index * 7 + 5]
            if level.has_budget and await client.exists(*spent_keys) < 2:
                spent = await load_budget(self._load_budget_used, level)
                await client.set(spent_keys[0], spent.tokens, nx=True, ex=40 * 86400)
                await client.set(spent_keys[1], spent.nanos, nx=True, ex=40 * 86400)
        args: list = [int(self.clock() * 1000), lease.id, SLOT_TTL, len(levels)]
        for level in levels:
            args += [-1 if v is None else v for v in (level.requests_per_minute, level.tokens_per_minute,
                                                      level.parallel_requests, level.token_budget,
                                                      level.money_budget_nanos)]
            nanos = worst.nanos_in(level.currency)
            args += [worst.tokens, -1 if nanos is None else nanos]
        verdict, refusing, *counts = await client._acquire(keys=keys, args=args)
        for index in reversed(range(len(levels))):  # the key's headers over its team's
            requests, tokens, request_reset, token_reset = counts[index * 4 : index * 4 + 4]
            lease.headers.update(rate_headers(levels[index], int(requests), int(tokens),
                                              float(request_reset) / 1000, float(token_reset) / 1000))
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        if verdict != "ok":
            index = int(refusing) - 1
            request_reset, token_reset = (float(v) / 1000 for v in counts[index * 4 + 2 : index * 4 + 4])
            retry_after = {"requests": request_reset, "tokens": token_reset, "parallel": 1}.get(verdict, 0)
            raise LimitExceeded(verdict, levels[index], retry_after, lease.headers)
        return lease

    async def release(self, lease: Lease, tokens: int, nanos: int = 0) -> None:
        """Give the lease back; if Redis cannot take it now, queue it for the retrier."""
        if lease.released:
            return
        lease.released = True
        self._held.pop(lease.id, None)
        release = self._release_args(lease, tokens, nanos)
        if self.available and not self._queued:
            try:
                await self._send_release(release)
                return
            except self._failures as exc:
                self._failed(exc)
        self._queue_release(release)

    def _release_args(self, lease: Lease, tokens: int, nanos: int) -> tuple[list[str], list]:
        return (self.keys(lease.limits),
                [lease.id, int(self.clock()), int(tokens), int(nanos), len(lease.limits.levels)])

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

    def release_soon(self, lease: Lease, tokens: int, nanos: int = 0) -> None:
        """Release from synchronous code: a task of its own, so a cancelled request still releases."""
        task = asyncio.get_running_loop().create_task(self.release(lease, tokens, nanos))
        _pending_releases.add(task)
        task.add_done_callback(_pending_releases.discard)

    async def parallel_in_use(self, key_id: int, scope: str = "key", team_id: int | None = None) -> int:
        """Parallel slots held now, after the releases already under way have landed."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(t for t in _pending_releases if t.get_loop() is loop), return_exceptions=True)
        base = self.level_base(Limits(key_id, scope=scope, team_id=team_id))
        return await self.client().zcard(f"{base}:parallel")


_pending_releases: set[asyncio.Task] = set()
