"""Shared test cast: two keys (one active, one revoked) and a FakeFastChat.

API requests (self.post, self.get, self.async_client) go through the production ASGI
application and its API handler (tests/asgi.py), not Django's full middleware stack."""
from __future__ import annotations

import json
from typing import Any

from django.test import TestCase, override_settings
from django.utils import timezone

from gateway_project import state
from keys.models import APIKey
from tests.asgi import ProductionAsyncClient
from tests.fakes import CONTROLLER, FakeFastChat


# The worker address is asked of the controller on every request (FastChat's way) unless a test
# turns the address pool on.
@override_settings(CONTROLLER_ADDRESS=CONTROLLER, GATEWAY_WORKER_RETRIES=3, GATEWAY_WORKER_ADDRESS_TTL=0)
class GatewayTestCase(TestCase):
    async_client_class = ProductionAsyncClient

    def setUp(self) -> None:
        super().setUp()
        self.key, self.plaintext = APIKey.objects.create_key("alice")
        revoked, self.revoked_plaintext = APIKey.objects.create_key("revoked")
        revoked.revoked_at = timezone.now()
        revoked.save()
        self.auth = {"Authorization": f"Bearer {self.plaintext}"}
        self.fake = FakeFastChat()
        state.reset(transport=self.fake.transport())

    def tearDown(self) -> None:
        state.reset()
        super().tearDown()

    async def post(self, path: str, data: Any, **headers: Any):
        body = data if isinstance(data, (bytes, str)) else json.dumps(data)
        return await self.async_client.post(path, body, content_type="application/json", headers={**self.auth, **headers})

    async def get(self, path: str, **headers: Any):
        return await self.async_client.get(path, headers={**self.auth, **headers})

    def assertError(self, response, status: int, param: str | None = None, code: Any = None) -> dict:
        self.assertEqual(response.status_code, status, response.content)
        self.assertEqual(response["Content-Type"], "application/json")
        body = response.json()
        self.assertEqual(body["object"], "error")
        self.assertEqual(body["message"], body["error"]["message"])
        self.assertIsInstance(body["code"], int)
        if param is not None:
            self.assertEqual(body["error"]["param"], param)
        if code is not None:
            self.assertIn(code, (body["code"], body["error"]["code"]))
        return body
