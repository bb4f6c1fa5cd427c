"""Process-wide state: built once per process, reset for every part with one call."""
from __future__ import annotations

import asyncio

import httpx
from django.test import SimpleTestCase

from gateway_project import state
from keys.limit_store_memory import MemoryLimitStore
from keys.limits import get_limit_store
from keys.usage import usage_writer
from openai_api.auth import key_cache
from upstreams import transport as client
from upstreams.router import get_router


class ProcessStateTests(SimpleTestCase):
    def tearDown(self) -> None:
        state.reset()

    def test_a_part_is_built_once_and_rebuilt_after_a_reset(self):
        router, store = get_router(), get_limit_store()
        self.assertIs(get_router(), router)
        self.assertIs(get_limit_store(), store)
        state.reset()
        self.assertIsNot(get_router(), router)
        self.assertIsNot(get_limit_store(), store)

    def test_parts_held_by_name_are_emptied_in_place(self):
        key_cache._unknown["digest"] = 0.0
        usage_writer.pending.append(object())
        state.reset()
        self.assertIs(state.get("key_cache"), key_cache)
        self.assertEqual(len(key_cache._unknown), 0)
        self.assertEqual(len(usage_writer.pending), 0)

    def test_a_test_installs_its_own_parts(self):
        store = MemoryLimitStore()
        fake = httpx.MockTransport(lambda request: httpx.Response(200))
        state.reset(limit_store=store, transport=fake)
        self.assertIs(get_limit_store(), store)

        async def transport() -> httpx.AsyncBaseTransport:
            return client.get_transport()

        self.assertIs(asyncio.run(transport()), fake)
        state.reset()
        self.assertIsNone(client._test_transport)  # the next loop builds a real one
