"""The registry as the request path sees it: frozen specs, read from the database at most once a
second per process, never on a request's own time.

`snapshot()` (sync) and `await asnapshot()` return the process's last `Snapshot`. One older than
REFRESH_SECONDS is replaced by a fresh read: in the background when the caller runs in an event
loop (the request gets the last snapshot at once), in the caller's thread otherwise (commands,
admin). While the database cannot be read the last snapshot stays, and reads are tried again at
most once a second. Only a process that never read one waits (at most LOAD_TIMEOUT) for the first.

A snapshot's specs are `UpstreamSpec` (the API key decrypted, in memory only, never in a repr)
and its `routes` map each public model to upstreams.base.Route, highest priority first.
`Snapshot.configured` is False when no upstream is registered at all: the router then serves
CONTROLLER_ADDRESS as the one FastChat upstream (`zero_config_upstream()`), as before the registry.
Disabled upstreams and disabled models are not in a snapshot.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError

from gateway_project import state
from upstreams import crypto
from upstreams.base import FASTCHAT, Route

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0
LOAD_TIMEOUT = 2.0
ZERO_CONFIG_NAME = "default"


class RegistryUnavailable(Exception):
    """The registry was never read and the database cannot be read now (answer 503)."""

    status = 503


@dataclass(frozen=True)
class UpstreamSpec:
    """One enabled upstream as the registry describes it (frozen: cheap to share). For a FastChat
    upstream `base_url` is its controller's address. `api_key` is the decrypted key, in memory
    only and never in a repr; adapters send `headers()`."""

    name: str
    kind: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    enabled: bool = True
    priority: int = 0
    weight: int = 1
    connect_timeout: float = 10.0
    first_byte_timeout: float = 100.0
    idle_timeout: float = 100.0
    max_concurrency: int | None = None
    extra_headers: tuple[tuple[str, str], ...] = ()
    discover_models: bool = True

    def headers(self) -> dict[str, str]:
        """Headers for every request to this upstream: its extra headers and its bearer key."""
        headers = dict(self.extra_headers)
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


@dataclass(frozen=True)
class ModelSpec:
    """A model one upstream serves: `public_name` for clients, `upstream_name` sent to it."""

    upstream: str
    public_name: str
    upstream_name: str
    capabilities: frozenset[str] = frozenset()
    context_length: int | None = None
    discovered: bool = False


@dataclass(frozen=True)
class Snapshot:
    """The enabled upstreams and their enabled models, with the routes (upstreams.base.Route) of
    each public model, highest priority first, ready for the router."""

    configured: bool  # any Upstream row at all (False: zero configuration)
    upstreams: tuple[UpstreamSpec, ...] = ()
    models: tuple[ModelSpec, ...] = ()
    unreadable_keys: frozenset[str] = frozenset()  # upstreams whose stored key no configured key opens
    routes: Mapping[str, tuple[Route, ...]] = field(default_factory=lambda: MappingProxyType({}))
    pairs: Mapping[str, tuple[tuple[UpstreamSpec, ModelSpec], ...]] = field(
        default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, upstreams: Sequence[UpstreamSpec], models: Sequence[ModelSpec], *, configured: bool = True,
           unreadable_keys: frozenset[str] = frozenset()) -> Snapshot:
        by_name = {spec.name: spec for spec in upstreams}
        found: dict[str, list[tuple[UpstreamSpec, ModelSpec]]] = {}
        for model in models:
            spec = by_name.get(model.upstream)
            if spec is not None:
                found.setdefault(model.public_name, []).append((spec, model))
        pairs = {name: tuple(sorted(serving, key=lambda pair: (-pair[0].priority, pair[0].name)))
                 for name, serving in sorted(found.items())}
        routes = {name: tuple(Route(
            upstream=spec.name, kind=spec.kind, public_model=model.public_name, upstream_model=model.upstream_name,
            priority=spec.priority, weight=spec.weight, capabilities=model.capabilities,
            max_concurrency=spec.max_concurrency, spec=spec,
        ) for spec, model in serving) for name, serving in pairs.items()}
        return cls(configured=configured, upstreams=tuple(upstreams), models=tuple(models),
                   unreadable_keys=unreadable_keys, routes=MappingProxyType(routes), pairs=MappingProxyType(pairs))

    def upstream(self, name: str) -> UpstreamSpec | None:
        return next((spec for spec in self.upstreams if spec.name == name), None)

    def public_models(self) -> list[str]:
        return list(self.routes)

    def serving(self, public_name: str) -> list[tuple[UpstreamSpec, ModelSpec]]:
        """(upstream, model) pairs that serve `public_name`, highest priority first."""
        return list(self.pairs.get(public_name, ()))

    def models_of(self, upstream: str) -> tuple[ModelSpec, ...]:
        return tuple(model for model in self.models if model.upstream == upstream)


def zero_config_upstream() -> UpstreamSpec:
    """The one FastChat upstream when none is registered: CONTROLLER_ADDRESS, models discovered live."""
    return UpstreamSpec(name=ZERO_CONFIG_NAME, kind=FASTCHAT, base_url=settings.CONTROLLER_ADDRESS,
                        connect_timeout=settings.FASTCHAT_CONTROLLER_TIMEOUT,
                        first_byte_timeout=settings.FASTCHAT_WORKER_API_TIMEOUT,
                        idle_timeout=settings.FASTCHAT_WORKER_API_TIMEOUT)


_unreadable_logged: frozenset[str] = frozenset()


def spec_of(row, api_key: str | None) -> UpstreamSpec:
    """The frozen spec of an Upstream row."""
    return UpstreamSpec(
        name=row.name, kind=row.kind, base_url=row.base_url, api_key=api_key, enabled=row.enabled,
        priority=row.priority, weight=row.weight, connect_timeout=row.connect_timeout,
        first_byte_timeout=row.first_byte_timeout, idle_timeout=row.idle_timeout,
        max_concurrency=row.max_concurrency, extra_headers=tuple(sorted(row.extra_headers.items())),
        discover_models=row.discover_models,
    )


def readable_key(row) -> str | None:
    """The row's API key, None without one or when it cannot be decrypted (never raises)."""
    try:
        return row.api_key()
    except (crypto.UndecryptableSecret, crypto.EncryptionKeyMissing, crypto.EncryptionKeyInvalid):
        return None


def load_snapshot() -> Snapshot:
    """Read the registry from the database (one query per table)."""
    global _unreadable_logged
    from upstreams.models import Upstream, UpstreamModel

    rows = list(Upstream.objects.filter(enabled=True).order_by("-priority", "name"))
    if not rows:
        return Snapshot(configured=Upstream.objects.exists())
    names = {row.pk: row.name for row in rows}
    models = [
        ModelSpec(upstream=names[model.upstream_id], public_name=model.public_name,
                  upstream_name=model.upstream_name, capabilities=frozenset(model.capabilities),
                  context_length=model.context_length, discovered=model.discovered)
        for model in UpstreamModel.objects.filter(upstream__in=rows, enabled=True).order_by("public_name")
    ]
    specs, unreadable = [], set()
    for row in rows:
        key = readable_key(row)
        if row.has_api_key and key is None:
            unreadable.add(row.name)
        specs.append(spec_of(row, key))
    if frozenset(unreadable) != _unreadable_logged:
        _unreadable_logged = frozenset(unreadable)
        if unreadable:
            logger.error("The API keys of upstreams %s cannot be decrypted (GATEWAY_ENCRYPTION_KEY is unset, malformed "
                         "or lacks the key that encrypted them): they are called without one",
                         ", ".join(sorted(unreadable)))
    return Snapshot.of(specs, models, unreadable_keys=frozenset(unreadable))


class Registry:
    """The process's snapshot of the registry (see the module's docstring)."""

    def __init__(self, loader: Callable[[], Snapshot] = load_snapshot, *, ttl: float = REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic, load_timeout: float = LOAD_TIMEOUT):
        self.loader = loader
        self.ttl = ttl
        self.clock = clock
        self.load_timeout = load_timeout
        self.clear()

    def clear(self) -> None:
        self._snapshot: Snapshot | None = None
        self._loaded_at = float("-inf")  # when the current snapshot's read began
        self._tried_at = float("-inf")  # when a read last began (succeeded or not)
        self._refreshing: asyncio.Future | None = None
        self._outage = False

    def invalidate(self) -> None:
        """The next call reads again (a change made by this process)."""
        self._loaded_at = self._tried_at = float("-inf")

    def _due(self, now: float) -> bool:
        return now - self._loaded_at >= self.ttl and now - self._tried_at >= self.ttl

    def snapshot(self) -> Snapshot:
        now = self.clock()
        if self._snapshot is not None and not self._due(now):
            return self._snapshot
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no event loop in this thread: read here
            self._read(now)
        else:
            self._refresh_in_background(now)
        return self._current()

    async def asnapshot(self) -> Snapshot:
        now = self.clock()
        if self._snapshot is not None and not self._due(now):
            return self._snapshot
        task = self._refresh_in_background(now)
        if self._snapshot is None and task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.load_timeout)
            except TimeoutError:
                self._tried_at = self.clock()
        return self._current()

    def _current(self) -> Snapshot:
        if self._snapshot is None:
            raise RegistryUnavailable("The upstream registry cannot be read from the database.")
        return self._snapshot

    def _refresh_in_background(self, now: float) -> asyncio.Future | None:
        if self._refreshing is not None and not self._refreshing.done():
            return self._refreshing
        if not self._due(now):
            return None
        self._tried_at = now
        self._refreshing = asyncio.ensure_future(self._aread(now))
        # Nobody may await it (the request took the last snapshot): its failure is logged here.
        self._refreshing.add_done_callback(_log_failure)
        return self._refreshing

    async def _aread(self, started: float) -> None:
        await sync_to_async(self._read, thread_sensitive=True)(started)

    def _read(self, started: float) -> None:
        self._tried_at = started
        try:
            snapshot = self.loader()
        except DatabaseError as exc:
            if not self._outage:
                self._outage = True
                logger.warning("The upstream registry cannot be read (%s): the last one read stays in use",
                               type(exc).__name__)
            return
        if self._outage:
            self._outage = False
            logger.warning("The upstream registry is read again")
        self._snapshot, self._loaded_at = snapshot, started


def _log_failure(done: asyncio.Future) -> None:
    if not done.cancelled() and done.exception() is not None:
        logger.error("Reading the upstream registry failed", exc_info=done.exception())


def snapshot() -> Snapshot:
    """The process's registry snapshot (no database read on a request's time; see the docstring)."""
    return state.get("upstream_registry").snapshot()


async def asnapshot() -> Snapshot:
    """The same, for a caller in an event loop: only a process's very first read is waited for."""
    return await state.get("upstream_registry").asnapshot()


def invalidate() -> None:
    state.get("upstream_registry").invalidate()
