"""The admin's live view: usage events pushed to staff over a channels WebSocket.

The request path calls `push_usage_event` (a usage_writer listener) synchronously at the end of
every API request. It never waits: it schedules `group_send` as a task on the running loop, and
does nothing at all when no staff member watches. With the in-memory layer that is read from the
group itself. With Redis the watchers may sit on another replica: each open socket keeps an entry
in a shared sorted set (`WatcherPresence`), and each process reads that set at most once a
second, off the request path, instead of sending every event to Redis. A socket opened on another
replica therefore sees events from this one after at most about a second.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict
from urllib.parse import urlsplit

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.urls import path

from keys.models import APIKey
from keys.usage import UsageEvent

logger = logging.getLogger(__name__)

GROUP = "admin-usage-live"
MESSAGE_TYPE = "usage.event"
WARNING_INTERVAL = 60.0
PRESENCE_KEY = "gateway:live-watchers"  # sorted set: a watcher's channel name -> its expiry (unix s)
PRESENCE_TTL = 60.0  # an open socket renews its entry every third of this; a crashed one expires
PRESENCE_RECHECK = 1.0  # seconds between two reads of the set by one process
_tasks: set[asyncio.Task] = set()  # strong references until each send or check finishes
_last_warning = -WARNING_INTERVAL


class WatcherPresence:
    """Whether anyone watches on any replica, for layers shared through Redis.

    ``maybe_watched`` answers from the last read of PRESENCE_KEY and starts a new read (a task)
    when that one is over PRESENCE_RECHECK old. Until the first read, and whenever a read
    fails, the answer is yes: an event sent for nobody costs less than one lost.
    """

    def __init__(self) -> None:
        self.watched = True
        self.checked_at = -PRESENCE_RECHECK

    def maybe_watched(self, layer) -> bool:
        now = time.monotonic()
        if now - self.checked_at >= PRESENCE_RECHECK:
            self.checked_at = now
            _keep(asyncio.get_running_loop().create_task(self.check(layer)))
        return self.watched

    async def check(self, layer) -> None:
        try:
            count = await layer.connection(0).zcount(PRESENCE_KEY, time.time(), "+inf")
        except Exception:
            self.watched = True
            raise
        self.watched = count > 0

    async def join(self, layer, channel_name: str) -> None:
        """Announce a watcher (again, to renew it); this process knows at once."""
        self.watched = True
        connection = layer.connection(0)
        await connection.zremrangebyscore(PRESENCE_KEY, "-inf", time.time())
        await connection.zadd(PRESENCE_KEY, {channel_name: time.time() + PRESENCE_TTL})

    async def leave(self, layer, channel_name: str) -> None:
        await layer.connection(0).zrem(PRESENCE_KEY, channel_name)


presence = WatcherPresence()


def push_usage_event(event: UsageEvent) -> None:
    """Schedule the event's delivery to the live group; O(1) and never blocking."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # recorded outside an event loop (a command, a sync test): nobody to tell
        return
    layer = get_channel_layer()
    if layer is None or not has_watchers(layer):
        return
    _keep(loop.create_task(layer.group_send(GROUP, event_message(event))))


def has_watchers(layer) -> bool:
    """False when nobody is in the group (in-memory layer) or in the presence set (Redis)."""
    if isinstance(layer, InMemoryChannelLayer):
        return bool(layer.groups.get(GROUP))
    if shares_presence(layer):
        return presence.maybe_watched(layer)
    return True


def shares_presence(layer) -> bool:
    """Layers with a Redis connection (channels_redis) keep the presence set beside their groups."""
    return hasattr(layer, "connection") and hasattr(layer, "ring_size")


def _keep(task: asyncio.Task) -> None:
    _tasks.add(task)
    task.add_done_callback(_finished)


def event_message(event: UsageEvent) -> dict:
    payload = asdict(event)
    payload["created_at"] = event.created_at.isoformat()
    return {"type": MESSAGE_TYPE, "event": payload}


def _finished(task: asyncio.Task) -> None:
    global _last_warning
    _tasks.discard(task)
    if task.cancelled() or task.exception() is None:
        return
    if time.monotonic() - _last_warning > WARNING_INTERVAL:  # one line a minute while Redis is down
        _last_warning = time.monotonic()
        logger.warning("Live usage events may not be delivered: %r", task.exception())


class LiveUsageConsumer(AsyncJsonWebsocketConsumer):
    """Staff who may view usage only: everyone else's handshake is refused (HTTP 403)."""

    async def connect(self) -> None:
        if not same_origin(self.scope) or not await database_sync_to_async(may_watch)(self.scope.get("user")):
            await self.close()
            return
        self.key_labels: dict[int, str] = {}
        await self.channel_layer.group_add(GROUP, self.channel_name)
        self.renewal = None
        if shares_presence(self.channel_layer):
            await presence.join(self.channel_layer, self.channel_name)
            self.renewal = asyncio.create_task(self.renew_presence())
        await self.accept()

    async def renew_presence(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_TTL / 3)
            with contextlib.suppress(Exception):  # Redis away: the entry expires, events resume on return
                await presence.join(self.channel_layer, self.channel_name)

    async def disconnect(self, code) -> None:
        await self.channel_layer.group_discard(GROUP, self.channel_name)
        if getattr(self, "renewal", None) is not None:
            self.renewal.cancel()
            await presence.leave(self.channel_layer, self.channel_name)

    async def receive_json(self, content, **kwargs) -> None:
        """The view only listens; anything the browser sends is ignored."""

    async def usage_event(self, message: dict) -> None:
        event = message["event"]
        event["key"] = await self.key_label(event["key_id"])
        await self.send_json(event)

    async def key_label(self, key_id: int) -> str:
        if key_id not in self.key_labels:
            self.key_labels[key_id] = await database_sync_to_async(label_of_key)(key_id)
        return self.key_labels[key_id]


def same_origin(scope: dict) -> bool:
    """The page that opens the socket must come from this host: a session cookie alone does not
    prove it (cross-site WebSocket hijacking), and ALLOWED_HOSTS is often "*"."""
    headers = dict(scope.get("headers", ()))
    origin = urlsplit(headers.get(b"origin", b"").decode("latin-1")).hostname
    host = urlsplit("//" + headers.get(b"host", b"").decode("latin-1")).hostname
    return host is not None and origin == host  # ports may differ behind a proxy (nginx's $host has none)


def may_watch(user) -> bool:
    """Staff who may view usage rows (the admin's usage list)."""
    return bool(user and user.is_active and user.is_staff and user.has_perm("keys.view_usagerecord"))


def label_of_key(key_id: int) -> str:
    key = APIKey.objects.filter(pk=key_id).only("name", "prefix").first()
    return str(key) if key else f"key #{key_id}"


websocket_urlpatterns = [
    path("ws/admin/usage/", LiveUsageConsumer.as_asgi()),
]
