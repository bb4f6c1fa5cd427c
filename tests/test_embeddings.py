"""POST /v1/embeddings and /v1/engines/{model}/embeddings."""
from __future__ import annotations

from django.test import override_settings

from tests.base import GatewayTestCase


class EmbeddingTests(GatewayTestCase):
    async def test_it_batches_inputs_and_keeps_their_order(self):
        inputs = ["a", "bb", "ccc", "dddd", "eeeee"]
        response = await self.post("/v1/embeddings", {"model": "embed", "input": inputs})
        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        self.assertEqual(body["object"], "list")
        self.assertEqual([d["index"] for d in body["data"]], [0, 1, 2, 3, 4])
        self.assertEqual([d["embedding"][0] for d in body["data"]], [1.0, 2.0, 3.0, 4.0, 5.0])
        self.assertEqual([len(p["input"]) for p in self.fake.payloads("/worker_get_embeddings")], [4, 1])
        self.assertEqual(body["usage"], {"prompt_tokens": 10, "total_tokens": 10})

    @override_settings(FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE=2)
    async def test_the_batch_size_is_configurable(self):
        await self.post("/v1/embeddings", {"model": "embed", "input": ["a", "b", "c"]})
        self.assertEqual([len(p["input"]) for p in self.fake.payloads("/worker_get_embeddings")], [2, 1])

    async def test_a_string_input_is_sent_as_a_list(self):
        await self.post("/v1/embeddings", {"model": "embed", "input": "hello"})
        self.assertEqual(self.fake.payloads("/worker_get_embeddings")[0]["input"], ["hello"])

    async def test_base64_is_passed_through(self):
        body = (await self.post("/v1/embeddings", {"model": "embed", "input": ["ab"], "encoding_format": "base64"})).json()
        self.assertIsInstance(body["data"][0]["embedding"], str)
        self.assertEqual(self.fake.payloads("/worker_get_embeddings")[0]["encoding_format"], "base64")

    async def test_the_engines_route_takes_the_model_from_the_path(self):
        response = await self.post("/v1/engines/embed/embeddings", {"input": ["x"]})
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(response.json()["model"], "embed")

    async def test_it_rejects_bad_input(self):
        self.assertError(await self.post("/v1/embeddings", {"model": "embed", "input": []}), 400, param="input")
        self.assertError(await self.post("/v1/embeddings", {"model": "embed"}), 400, param="input")
        self.assertError(await self.post("/v1/embeddings", {"model": "embed", "input": [{"a": 1}]}), 400, param="input")
        self.assertError(await self.post("/v1/embeddings", {"model": "embed", "input": "x", "encoding_format": "hex"}),
                         400, param="encoding_format")
        self.assertEqual(self.fake.payloads("/worker_get_embeddings"), [])
