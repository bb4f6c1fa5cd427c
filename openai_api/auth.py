"""API-key authentication for the OpenAI endpoints, served from a short-lived memory cache.

The hot path makes no database query: a key's state is read once per
GATEWAY_KEY_CACHE_SECONDS per process, so revocations and edits apply everywhere within
that time, and tokens that are no key are remembered too, so repeating one costs no query.
The cache is built to survive abuse and outages (KeyCache).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import Error as DatabaseError
from django.db import close_old_connections
from django.http import HttpRequest
from django.utils import timezone

from gateway_project.single_flight import SingleFlight
from keys.hashing import hash_key
from keys.limits import Limits
from keys.models import APIKey
from keys.teams import key_limits, team_models
from openai_api.errors import AuthenticationError, KeyLookupUnavailableError, PermissionDeniedError

logger = logging.getLogger(__name__)

# Known keys kept in memory at most (the least recently read is forgotten first).
MAX_KNOWN_KEYS = 100_000
# Look-ups of tokens the cache does not know, in the database thread at one time: a flood of
# random tokens waits here, never in front of the refresh of a known key.
UNKNOWN_LOOKUPS_AT_ONCE = 2
# How long a known key's request waits for its refresh before it is served from memory.
REFRESH_WAIT = 0.5
# After a database error, no look-up is tried for this long (known keys are served from memory,
# unknown tokens get 503 at once instead of each waiting for its own connection timeout).
OUTAGE_BACKOFF = 1.0


@dataclass(frozen=True)
class KeyInfo:
    """What the API path needs to know about a key: a snapshot, never a model instance."""

    id: int
    name: str
    prefix: str
    allowed_models: tuple[str, ...]
    expires_at: datetime | None
    revoked: bool
    requests_per_minute: int | None
    tokens_per_minute: int | None
    parallel_requests: int | None
    token_budget: int | None
    budget_period: str
    limits: Limits  # the key's, with its team's (keys/teams.py)
    team_models: tuple[str, ...] = ()  # the team's allow-list (empty: every model)

    @classmethod
    def from_model(cls, key: APIKey) -> KeyInfo:
        return cls(
            id=key.id, name=key.name, prefix=key.prefix,
            allowed_models=tuple(key.allowed_models or ()),
            expires_at=key.expires_at, revoked=key.is_revoked,
            requests_per_minute=key.requests_per_minute, tokens_per_minute=key.tokens_per_minute,
            parallel_requests=key.parallel_requests, token_budget=key.token_budget,
            budget_period=key.budget_period, limits=key_limits(key), team_models=team_models(key),
        )

    def allows_model(self, model: str) -> bool:
        return (not self.allowed_models or model in self.allowed_models) and (
            not self.team_models or model in self.team_models)


def load_key(digest: str) -> KeyInfo | None:
    close_old_connections()  # this thread has no request cycle to recycle broken connections
    key = APIKey.objects.select_related("team").filter(hashed_key=digest).first()
    return KeyInfo.from_model(key) if key else None


class KeyCache:
    """digest -> KeyInfo (or "no such key"), read from the database at most once per `ttl` s.

    - Known keys are refreshed after `ttl`. While the database cannot be read (or is slower
      than REFRESH_WAIT), a known key keeps working from memory until `grace` seconds after it
      was last read.
    - Tokens that are no key live in their own LRU of `negative_size` entries, so a flood of
      random tokens never evicts known keys; their look-ups run UNKNOWN_LOOKUPS_AT_ONCE at a
      time, so the flood cannot delay known keys' refreshes either.
    - A request waits at most `lookup_timeout` s for its key, then gets 503 with Retry-After,
      as do unknown tokens while the database is failing.
    """

    def __init__(self, ttl: float, grace: float = 300.0, lookup_timeout: float = 2.0,
                 negative_size: int = 10_000, clock=time.monotonic):
        self.ttl = ttl
        self.grace = grace
        self.lookup_timeout = lookup_timeout
        self.negative_size = negative_size
        self.clock = clock
        self._known: dict[str, tuple[KeyInfo, float]] = {}  # digest -> (key, read at)
        self._unknown: OrderedDict[str, float] = OrderedDict()  # digest -> read at, LRU order
        self._loads = SingleFlight()
        self._down_until = self._slow_until = float("-inf")
        self._outage = False
        self._gate: tuple[asyncio.AbstractEventLoop | None, asyncio.Semaphore | None] = (None, None)

    async def get(self, digest: str) -> KeyInfo | None:
        """The key with this digest, None if there is none; KeyLookupUnavailableError (503)
        when the database cannot tell."""
        now = self.clock()
        entry = self._known.get(digest)
        if entry is not None:
            if now - entry[1] < self.ttl:
                return entry[0]
            return await self._refresh(digest, entry, now)
        seen = self._unknown.get(digest)
        if seen is not None:
            if now - seen < self.ttl or (not self._database_up(now) and now - seen < self.grace):
                self._unknown.move_to_end(digest)
                return None
        return await self._look_up(digest, now)

    def __len__(self) -> int:
        return len(self._known) + len(self._unknown)

    async def _refresh(self, digest: str, entry: tuple[KeyInfo, float], now: float) -> KeyInfo | None:
        if self._database_up(now) and now >= self._slow_until:
            try:
                # Concurrent requests with the same key share one query; one of them leaving
                # (its client gone) does not cancel it for the others.
                return await asyncio.wait_for(self._loads.run(digest, lambda: self._load(digest)),
                                              min(REFRESH_WAIT, self.lookup_timeout))
            except TimeoutError:
                # A hung database: the other known keys do not wait for it in the next second.
                self._slow_until = self.clock() + OUTAGE_BACKOFF
            except KeyLookupUnavailableError:
                pass
        if now - entry[1] < max(self.grace, self.ttl):
            return entry[0]
        raise self._unavailable()

    async def _look_up(self, digest: str, now: float) -> KeyInfo | None:
        if not self._database_up(now):
            raise self._unavailable()
        try:
            return await asyncio.wait_for(self._loads.run(digest, lambda: self._load(digest, gated=True)),
                                          self.lookup_timeout)
        except TimeoutError:  # waiting for its turn, or for the database
            raise self._unavailable() from None

    async def _load(self, digest: str, gated: bool = False) -> KeyInfo | None:
        if not gated:
            return await self._query(digest)
        gate = self._gate_of_this_loop()
        try:
            await asyncio.wait_for(gate.acquire(), self.lookup_timeout)
        except TimeoutError:
            raise self._unavailable() from None
        try:
            if not self._database_up(self.clock()):
                raise self._unavailable()
            return await self._query(digest)
        finally:
            gate.release()

    async def _query(self, digest: str) -> KeyInfo | None:
        # Stamped before the query: a change committed while it runs is seen within the TTL.
        loaded_at = self.clock()
        query = asyncio.ensure_future(sync_to_async(load_key, thread_sensitive=True)(digest))
        try:
            info = await asyncio.wait_for(asyncio.shield(query), self.lookup_timeout)
        except (DatabaseError, TimeoutError) as exc:
            # A database that fails or does not answer in time (the thread stays with it): the
            # next look-ups do not wait for it too.
            self._database_failed(exc)
            query.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise self._unavailable() from None
        if self._outage:
            self._outage = False
            logger.warning("The database answers key look-ups again")
        self._store(digest, info, loaded_at)
        return info

    def _store(self, digest: str, info: KeyInfo | None, loaded_at: float) -> None:
        if info is None:
            self._known.pop(digest, None)  # a rotated key's old digest
            self._unknown[digest] = loaded_at
            self._unknown.move_to_end(digest)
            while len(self._unknown) > self.negative_size:
                self._unknown.popitem(last=False)
            return
        self._unknown.pop(digest, None)
        self._known.pop(digest, None)  # re-inserted last: the dict's order is the order of reads
        self._known[digest] = (info, loaded_at)
        if len(self._known) > MAX_KNOWN_KEYS:
            del self._known[next(iter(self._known))]

    def _gate_of_this_loop(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._gate[0] is not loop:
            self._gate = (loop, asyncio.Semaphore(UNKNOWN_LOOKUPS_AT_ONCE))
        return self._gate[1]

    def _database_up(self, now: float) -> bool:
        return now >= self._down_until

    def _database_failed(self, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            logger.warning("The database failed a key look-up (%s): known keys are served from memory for "
                           "up to %s s, unknown ones get 503", type(exc).__name__, self.grace)
        self._down_until = self.clock() + OUTAGE_BACKOFF

    def _unavailable(self) -> KeyLookupUnavailableError:
        wait = max(OUTAGE_BACKOFF, self._down_until - self.clock())
        return KeyLookupUnavailableError(headers={"Retry-After": str(math.ceil(wait))})

    def clear(self) -> None:
        self._known.clear()
        self._unknown.clear()
        self._down_until = self._slow_until = float("-inf")
        self._outage = False


key_cache = KeyCache(
    ttl=settings.GATEWAY_KEY_CACHE_SECONDS, grace=settings.GATEWAY_KEY_GRACE_SECONDS,
    lookup_timeout=settings.GATEWAY_KEY_LOOKUP_TIMEOUT, negative_size=settings.GATEWAY_KEY_NEGATIVE_CACHE_SIZE,
)


def bearer_token(request: HttpRequest) -> str | None:
    header = request.META.get("HTTP_AUTHORIZATION", "")  # request.headers would parse every header name
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def authenticate(request: HttpRequest) -> KeyInfo:
    """The request's key, or AuthenticationError (401)."""
    token = bearer_token(request)
    if token is None:
        raise AuthenticationError(
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key", fastchat_code=40101,
        )
    key = await key_cache.get(hash_key(token))
    if key is None:
        raise AuthenticationError(f"Incorrect API key provided: {mask(token)}.", fastchat_code=40102)
    if key.revoked:
        raise AuthenticationError("This API key has been revoked.", code="revoked_api_key", fastchat_code=40102)
    if key.expires_at is not None and key.expires_at <= timezone.now():
        raise AuthenticationError("This API key has expired.", code="expired_api_key", fastchat_code=40102)
    return key


def mask(token: str) -> str:
    """Enough of a key to recognise it, never enough to use it (as OpenAI prints it)."""
    if len(token) <= 10:
        return "*" * len(token)
    return f"{token[:3]}{'*' * 6}{token[-4:]}"


def require_model_access(key: KeyInfo, model: str) -> None:
    if not key.allows_model(model):
        raise PermissionDeniedError(f"This API key may not use the model '{model}'.", param="model")
