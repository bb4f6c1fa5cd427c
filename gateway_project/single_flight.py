"""SingleFlight: callers that need the same fetch at the same time share one call."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


class SingleFlight:
    """Callers that need the same fetch at the same time share one call (per event loop).

    When a cache entry expires under load, every request in flight would otherwise make the
    same call (a controller look-up, a key query): at concurrency 64, 64 of them, all waiting.
    The shared call runs in a task of its own and is shielded, so a caller that is cancelled
    (its client left) does not cancel it for the others.
    """

    def __init__(self) -> None:
        self._calls: dict[Hashable, asyncio.Task] = {}

    async def run(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        """Await ``fetch()``, or the same call already under way. ``fetch`` should store what it
        fetched itself: a caller arriving just after the call ended starts a new one."""
        loop = asyncio.get_running_loop()
        call = self._calls.get(key)
        if call is None or call.done() or call.get_loop() is not loop:
            call = self._calls[key] = loop.create_task(fetch())
            call.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(call)

    def _finished(self, key: Hashable, call: asyncio.Task) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
        if not call.cancelled():
            call.exception()  # retrieved: every waiter may have gone
