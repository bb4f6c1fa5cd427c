"""/v1/models, key checks (401/403/404) and the FastChat extras."""
from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from keys.hashing import hash_key
from keys.models import APIKey
from openai_api.auth import key_cache
from tests.base import GatewayTestCase

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}]}


class ModelListTests(GatewayTestCase):
    async def test_it_lists_models_sorted_in_fastchats_shape(self):
        self.fake.models = ["zeta", "alpha", "m1"]
        body = (await self.get("/v1/models")).json()
        self.assertEqual(body["object"], "list")
        self.assertEqual([m["id"] for m in body["data"]], ["alpha", "m1", "zeta"])
        card = body["data"][0]
        self.assertEqual((card["object"], card["owned_by"], card["root"]), ("model", "fastchat", "alpha"))
        self.assertEqual(card["permission"][0]["object"], "model_permission")

    async def test_it_shows_one_model(self):
        self.assertEqual((await self.get("/v1/models/m1")).json()["id"], "m1")
        self.assertError(await self.get("/v1/models/nope"), 404, param="model", code="model_not_found")

    async def test_a_key_sees_only_its_models(self):
        await APIKey.objects.filter(pk=self.key.pk).aupdate(allowed_models=["embed"])
        key_cache.clear()
        body = (await self.get("/v1/models")).json()
        self.assertEqual([m["id"] for m in body["data"]], ["embed"])
        self.assertError(await self.post(CHAT, BODY), 403, param="model", code=40103)
        self.assertError(await self.get("/v1/models/m1"), 404)

    async def test_an_unknown_model_gets_404_with_fastchats_message(self):
        body = self.assertError(await self.post(CHAT, {**BODY, "model": "nope"}), 404, param="model", code=40301)
        self.assertEqual(body["message"], "Only embed&&m1 allowed now, your model nope")

    async def test_an_unknown_model_refreshes_the_list_once(self):
        await self.get("/v1/models")
        self.fake.models.append("late")
        response = await self.post(CHAT, {**BODY, "model": "late"})
        self.assertEqual(response.status_code, 200, response.content)

    async def test_the_model_list_is_cached(self):
        await self.post(CHAT, BODY)
        await self.post(CHAT, BODY)
        self.assertEqual(self.fake.paths().count("/list_models"), 1)
        self.assertEqual(self.fake.paths().count("/worker_get_conv_template"), 1)


class AuthenticationTests(GatewayTestCase):
    async def test_a_missing_key_gets_401(self):
        response = await self.async_client.post(CHAT, BODY, content_type="application/json")
        self.assertError(response, 401, code="missing_api_key")

    async def test_a_wrong_key_gets_401_before_the_body_is_read(self):
        response = await self.post(CHAT, b"not json", Authorization="Bearer sk-wrong-key-1234567890")
        body = self.assertError(response, 401, code="invalid_api_key")
        self.assertNotIn("sk-wrong-key-1234567890", body["message"])

    async def test_a_revoked_key_gets_401(self):
        response = await self.post(CHAT, BODY, Authorization=f"Bearer {self.revoked_plaintext}")
        self.assertError(response, 401, code="revoked_api_key")

    async def test_an_expired_key_gets_401(self):
        await APIKey.objects.filter(pk=self.key.pk).aupdate(expires_at=timezone.now() - timedelta(seconds=1))
        key_cache.clear()
        self.assertError(await self.post(CHAT, BODY), 401, code="expired_api_key")

    async def test_the_scheme_is_case_insensitive(self):
        response = await self.get("/v1/models", Authorization=f"bearer {self.plaintext}")
        self.assertEqual(response.status_code, 200)

    async def test_the_fastchat_extras_need_a_key_too(self):
        for path in ("/api/v1/token_check", "/api/v1/chat/completions"):
            response = await self.async_client.post(path, {}, content_type="application/json")
            self.assertError(response, 401)

    async def test_keys_are_stored_only_as_digests(self):
        stored = await APIKey.objects.aget(pk=self.key.pk)
        self.assertEqual(stored.hashed_key, hash_key(self.plaintext))
        self.assertTrue(self.plaintext.startswith("sk-") and len(self.plaintext) >= 35)
        self.assertTrue(self.plaintext.startswith(stored.prefix))
        self.assertNotIn(self.plaintext, str([row async for row in APIKey.objects.values()]))


class FastChatExtrasTests(GatewayTestCase):
    async def test_token_check_answers_in_fastchats_shape(self):
        self.fake.context_length = 64
        body = (await self.post("/api/v1/token_check", {"prompts": [
            {"model": "m1", "prompt": "a b", "max_tokens": 10},
            {"model": "m1", "prompt": "a b", "max_tokens": 62},
        ]})).json()
        self.assertEqual(body, {"prompts": [
            {"fits": True, "tokenCount": 3, "contextLength": 64},
            {"fits": False, "tokenCount": 3, "contextLength": 64},
        ]})

    async def test_api_chat_passes_repetition_penalty(self):
        response = await self.post("/api/v1/chat/completions", {**BODY, "repetition_penalty": 1.2, "top_k": 5})
        self.assertEqual(response.status_code, 200, response.content)
        params = self.fake.payloads("/worker_generate_stream")[0]
        self.assertEqual(list(params)[-2:], ["stop", "repetition_penalty"])
        self.assertEqual((params["repetition_penalty"], params["top_k"]), (1.2, 5))

    async def test_health_needs_no_key(self):
        response = await self.async_client.get("/health")
        self.assertEqual(response.json(), {"status": "ok"})

    async def test_readiness_checks_the_database_and_the_controller(self):
        response = await self.async_client.get("/health/ready")
        self.assertEqual(response.json()["checks"], {"database": "ok", "controller": "ok"})
        self.fake.controller_error = __import__("httpx").ConnectError
        response = await self.async_client.get("/health/ready")
        self.assertEqual(response.status_code, 503)
