"""The API tests' client sends requests through the production ASGI application."""
from __future__ import annotations

from tests.base import GatewayTestCase


class ProductionPathTests(GatewayTestCase):
    async def test_api_requests_take_the_api_handlers_middleware_only(self):
        response = await self.get("/v1/models")
        self.assertEqual(response.status_code, 200)
        self.assertTrue(response["X-Request-ID"])  # API_MIDDLEWARE ran
        # The full stack (MIDDLEWARE) would add it.
        self.assertNotIn("X-Frame-Options", response)

    async def test_other_paths_keep_djangos_full_stack(self):
        response = await self.async_client.get("/admin/login/")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["X-Frame-Options"], "DENY")

    async def test_streams_read_like_the_test_clients(self):
        response = await self.post("/v1/chat/completions", {"model": "m1", "stream": True,
                                                            "messages": [{"role": "user", "content": "Hi"}]})
        self.assertTrue(response.streaming)
        body = b"".join([part async for part in response])
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"), body)

    async def test_the_chunks_of_one_read_leave_in_one_write(self):
        """A stream's chunks that arrive in one read from the worker are sent in one body message
        (one socket write), not one each; chunks that arrive apart are not held back."""
        request = {"model": "m1", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
        apart = [part async for part in await self.post("/v1/chat/completions", request)]
        self.fake.one_read = True
        together = [part async for part in await self.post("/v1/chat/completions", request)]

        def events(parts: list[bytes]) -> list[bytes]:
            return [event for part in parts for event in part.split(b"\n\n") if event]

        self.assertEqual(len(events(together)), len(events(apart)))
        self.assertGreater(len(events(together)), 4)  # role, deltas, finish, [DONE]
        # One message for every chunk before [DONE], then [DONE].
        self.assertEqual(len([part for part in together if part]), 2, together)
        self.assertEqual(together[1], b"data: [DONE]\n\n")
        # Apart: the worker's chunks arrive one by one (each in two reads), and so they leave; only
        # the role rides with the first delta, and the finish with the last (one worker chunk).
        self.assertEqual(len([part for part in apart if part]), len(events(apart)) - 2, apart)
