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
