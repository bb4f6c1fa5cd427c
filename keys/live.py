"""The admin's live view: usage events pushed to staff over a channels WebSocket.

The request path calls `push_usage_event` (a usage_writer listener) synchronously at the end of
every API request. It never waits: it schedules `group_send` as a task on the running loop, and
with the in-memory layer it does nothing at all when no staff member watches. With Redis the
watchers may sit on another replica, so every event is sent (one Redis call, off the request).
"""
from __future__ import annotations

import asyncio
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
_tasks: set[asyncio.Task] = set()  # strong references until each send finishes
_last_warning = -WARNING_INTERVAL


def push_usage_event(event: UsageEvent) -> None:
    """Schedule the event's delivery to the live group; O(1) and never blocking."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # recorded outside an event loop (a command, a sync test): nobody to tell
        return
    layer = get_channel_layer()
    if layer is None or not has_watchers(layer):
        return
    task = loop.create_task(layer.group_send(GROUP, event_message(event)))
    _tasks.add(task)
    task.add_done_callback(_finished)


def has_watchers(layer) -> bool:
    """False only when we can tell cheaply that nobody is in the group (in-memory layer)."""
    if isinstance(layer, InMemoryChannelLayer):
        return bool(layer.groups.get(GROUP))
    return True


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
        logger.warning("Live usage events not delivered: %r", task.exception())


class LiveUsageConsumer(AsyncJsonWebsocketConsumer):
    """Staff who may view usage only: everyone else's handshake is refused (HTTP 403)."""

    async def connect(self) -> None:
        if not same_origin(self.scope) or not await database_sync_to_async(may_watch)(self.scope.get("user")):
            await self.close()
            return
        self.key_labels: dict[int, str] = {}
        await self.channel_layer.group_add(GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code) -> None:
        await self.channel_layer.group_discard(GROUP, self.channel_name)

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
