"""API-key authentication for the OpenAI endpoints, served from a short-lived memory cache.

The hot path makes no database query: a key's state is read once per
GATEWAY_KEY_CACHE_SECONDS per process, so revocations and edits apply everywhere within
that time (SPEC.md 5), and unknown keys are cached too, so guessing costs no queries.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections
from django.http import HttpRequest
from django.utils import timezone

from keys.hashing import hash_key
from keys.limits import Limits
from keys.models import APIKey
from openai_api.errors import AuthenticationError, PermissionDeniedError
from openai_api.single_flight import SingleFlight

MAX_CACHED_KEYS = 10_000


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

    @classmethod
    def from_model(cls, key: APIKey) -> KeyInfo:
        return cls(
            id=key.id, name=key.name, prefix=key.prefix,
            allowed_models=tuple(key.allowed_models or ()),
            expires_at=key.expires_at, revoked=key.is_revoked,
            requests_per_minute=key.requests_per_minute, tokens_per_minute=key.tokens_per_minute,
            parallel_requests=key.parallel_requests, token_budget=key.token_budget,
            budget_period=key.budget_period,
        )

    def allows_model(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    @property
    def limits(self) -> Limits:
        return Limits(self.id, self.requests_per_minute, self.tokens_per_minute, self.parallel_requests,
                      self.token_budget, self.budget_period)


def load_key(digest: str) -> KeyInfo | None:
    close_old_connections()  # this thread has no request cycle to recycle broken connections
    key = APIKey.objects.filter(hashed_key=digest).first()
    return KeyInfo.from_model(key) if key else None


class KeyCache:
    """digest -> (KeyInfo or None, fetched_at), refreshed after `ttl` seconds."""

    def __init__(self, ttl: float, clock=time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[str, tuple[KeyInfo | None, float]] = {}
        self._loads = SingleFlight()

    async def get(self, digest: str) -> KeyInfo | None:
        entry = self._entries.get(digest)
        if entry is not None and self.clock() - entry[1] < self.ttl:
            return entry[0]
        # Concurrent requests with the same key share one query; one of them leaving (its
        # client gone) does not cancel it for the others.
        return await self._loads.run(digest, lambda: self._load(digest))

    async def _load(self, digest: str) -> KeyInfo | None:
        # Stamped before the query: a change committed while it runs is seen within the TTL.
        loaded_at = self.clock()
        info = await sync_to_async(load_key, thread_sensitive=True)(digest)
        if len(self._entries) >= MAX_CACHED_KEYS:
            self._entries.clear()
        self._entries[digest] = (info, loaded_at)
        return info

    def clear(self) -> None:
        self._entries.clear()


key_cache = KeyCache(ttl=settings.GATEWAY_KEY_CACHE_SECONDS)


def bearer_token(request: HttpRequest) -> str | None:
    header = request.headers.get("Authorization", "")
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
