"""Bad input always gets an OpenAI-style JSON error with the right status, never a 500."""
from __future__ import annotations

import json

from django.test import override_settings

from tests import asgi
from tests.base import GatewayTestCase

CHAT = "/v1/chat/completions"


def chat(**fields):
    body = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}]}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


class ValidationTests(GatewayTestCase):
    async def test_it_rejects_malformed_json(self):
        response = await self.post(CHAT, b'{"model": "m1", "messages": [')
        self.assertError(response, 400, code="invalid_json")

    async def test_it_rejects_a_json_body_that_is_not_an_object(self):
        self.assertError(await self.post(CHAT, [1, 2]), 400, code=40001)

    async def test_it_names_missing_fields(self):
        self.assertError(await self.post(CHAT, chat(messages=...)), 400, param="messages", code="missing_required_parameter")
        self.assertError(await self.post(CHAT, chat(model=...)), 400, param="model")

    async def test_it_names_fields_of_the_wrong_type(self):
        cases = {"temperature": "hot", "max_tokens": "ten", "n": 1.5, "stream": "yes", "stop": 5,
                 "messages": {"role": "user"}, "model": 3, "top_p": True}
        for field, value in cases.items():
            with self.subTest(field=field):
                self.assertError(await self.post(CHAT, chat(**{field: value})), 400, param=field, code=40001)

    async def test_it_uses_fastchats_range_messages(self):
        cases = [
            ({"temperature": 3}, "temperature", "3.0 is greater than the maximum of 2 - 'temperature'"),
            ({"temperature": -1}, "temperature", "-1.0 is less than the minimum of 0 - 'temperature'"),
            ({"top_p": 1.5}, "top_p", "1.5 is greater than the maximum of 1 - 'top_p'"),
            ({"max_tokens": 0}, "max_tokens", "0 is less than the minimum of 1 - 'max_tokens'"),
            ({"n": 0}, "n", "0 is less than the minimum of 1 - 'n'"),
            ({"top_k": 0}, "top_k", "0 is out of Range. Either set top_k to -1 or >=1."),
        ]
        for fields, param, message in cases:
            with self.subTest(fields=fields):
                body = self.assertError(await self.post(CHAT, chat(**fields)), 400, param=param, code=40302)
                self.assertEqual(body["message"], message)
        self.assertEqual(self.fake.payloads("/worker_generate_stream"), [])

    async def test_it_refuses_unknown_and_tool_roles(self):
        for role, status in (("tool", 400), ("function", 400), ("wizard", 400)):
            with self.subTest(role=role):
                response = await self.post(CHAT, chat(messages=[{"role": role, "content": "x"}]))
                self.assertError(response, status, param="messages[0].role")

    async def test_it_refuses_features_the_workers_lack(self):
        cases = {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "functions": [{"name": "f"}],
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        }
        for field, value in cases.items():
            with self.subTest(field=field):
                self.assertError(await self.post(CHAT, chat(**{field: value})), 400, param=field, code="unsupported_parameter")

    async def test_it_accepts_text_response_format_and_no_tools(self):
        response = await self.post(CHAT, chat(response_format={"type": "text"}, tools=[], tool_choice="none"))
        self.assertEqual(response.status_code, 200, response.content)

    async def test_it_rejects_null_user_content_and_bad_parts(self):
        self.assertError(await self.post(CHAT, chat(messages=[{"role": "user", "content": None}])), 400,
                         param="messages[0].content")
        self.assertError(await self.post(CHAT, chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}])),
                         400, param="messages[0].content[0].type")
        self.assertError(await self.post(CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])),
                         400, param="messages[0].content[0].image_url")

    async def test_it_rejects_an_empty_message_list(self):
        self.assertError(await self.post(CHAT, chat(messages=[])), 400, param="messages")

    async def test_it_refuses_images_the_template_cannot_render(self):
        self.fake.template = "qwen-7b-chat"
        image = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
        response = await self.post(CHAT, chat(messages=[{"role": "user", "content": image}]))
        self.assertError(response, 400, param="messages")

    async def test_it_sends_images_on_templates_that_take_them(self):
        image = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
        response = await self.post(CHAT, chat(messages=[{"role": "user", "content": image}]))
        self.assertEqual(response.status_code, 200, response.content)
        params = self.fake.payloads("/worker_generate_stream")[0]
        self.assertEqual(params["images"], ["data:image/png;base64,AAAA"])
        self.assertIn("USER: $$<image>$$What? ASSISTANT:", params["prompt"])

    @override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000)
    async def test_it_refuses_huge_bodies_with_413(self):
        response = await self.post(CHAT, chat(messages=[{"role": "user", "content": "x" * 5000}]))
        self.assertError(response, 413, code="request_too_large")

    async def test_it_answers_unknown_routes_with_json_404(self):
        response = await self.get("/v1/nope")
        self.assertError(response, 404, code="unknown_url")

    async def test_it_answers_wrong_methods_with_json_405(self):
        response = await self.get(CHAT)
        self.assertError(response, 405)
        self.assertEqual(response["Allow"], "POST")

    async def test_it_ignores_unknown_fields_and_passes_seed(self):
        response = await self.post(CHAT, chat(seed=7, logit_bias={"1": 2}, parallel_tool_calls=False, user="u1"))
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(self.fake.payloads("/worker_generate_stream")[0]["seed"], 7)

    async def test_it_treats_developer_as_system(self):
        await self.post(CHAT, chat(messages=[{"role": "developer", "content": "DEV"}, {"role": "user", "content": "Hi"}]))
        self.assertEqual(self.fake.payloads("/worker_generate_stream")[0]["prompt"], "DEV USER: Hi ASSISTANT:")

    async def test_it_puts_request_stops_before_template_stops(self):
        self.fake.template = "qwen-7b-chat"
        await self.post(CHAT, chat(stop=["A", "<|im_end|>", "B"]))
        params = self.fake.payloads("/worker_generate_stream")[0]
        self.assertEqual(params["stop"][:3], ["A", "<|im_end|>", "B"])
        self.assertEqual(len(params["stop"]), len(set(params["stop"])))


class ApiHandlerTests(GatewayTestCase):
    """The API path as servers run it (openai_api/handler.py), not through the test client."""

    async def test_unknown_api_routes_get_json_404_from_the_api_urlconf(self):
        status, body = await asgi.request("GET", "/v1/nope")
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(body)["error"]["code"], "unknown_url")

    async def test_the_admin_is_not_routed_through_the_api_handler(self):
        status, _ = await asgi.request("GET", "/admin/login/")
        self.assertEqual(status, 200)

    async def test_declared_oversized_bodies_get_413_before_being_read(self):
        status, body = await asgi.request("POST", "/v1/chat/completions", {**self.auth, "content-length": str(10**9)})
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"]["code"], "request_too_large")

    async def test_without_a_key_the_body_is_not_looked_at(self):
        status, body = await asgi.request("POST", "/v1/chat/completions", {"content-length": str(10**9)})
        self.assertEqual(status, 401)
        self.assertEqual(json.loads(body)["error"]["code"], "missing_api_key")
