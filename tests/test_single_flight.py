"""gateway_project.single_flight.SingleFlight: one upstream call for everyone who needs it at once."""
from __future__ import annotations

import asyncio
import unittest

from gateway_project.single_flight import SingleFlight


class SingleFlightTests(unittest.IsolatedAsyncioTestCase):
    def setUp(self) -> None:
        self.flights, self.calls, self.release = SingleFlight(), 0, asyncio.Event()

    async def fetch(self) -> int:
        self.calls += 1
        await self.release.wait()
        return self.calls

    async def test_concurrent_callers_share_one_call_and_later_ones_start_another(self):
        waiters = [asyncio.ensure_future(self.flights.run("k", self.fetch)) for _ in range(10)]
        await asyncio.sleep(0)
        self.release.set()
        self.assertEqual(await asyncio.gather(*waiters), [1] * 10)
        self.assertEqual(await self.flights.run("k", self.fetch), 2)
        self.assertEqual(await self.flights.run("other", self.fetch), 3)

    async def test_a_cancelled_caller_does_not_cancel_the_call_for_the_others(self):
        first = asyncio.ensure_future(self.flights.run("k", self.fetch))
        second = asyncio.ensure_future(self.flights.run("k", self.fetch))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.sleep(0)
        self.release.set()
        self.assertEqual(await second, 1)
        self.assertTrue(first.cancelled())

    async def test_a_failure_reaches_every_caller_and_the_next_call_tries_again(self):
        async def failing() -> int:
            self.calls += 1
            await asyncio.sleep(0)
            raise ConnectionError("controller down")

        results = await asyncio.gather(*(self.flights.run("k", failing) for _ in range(3)), return_exceptions=True)
        self.assertEqual([type(r) for r in results], [ConnectionError] * 3)
        self.assertEqual(self.calls, 1)
        self.release.set()
        self.assertEqual(await self.flights.run("k", self.fetch), 2)
