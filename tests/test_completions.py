"""POST /v1/completions against FakeFastChat."""
from __future__ import annotations

from unittest import mock

from tests.base import GatewayTestCase
from tests.sse import parse_sse, read_stream

URL = "/v1/completions"


class CompletionTests(GatewayTestCase):
    async def test_it_completes_a_list_of_prompts_with_n_choices(self):
        response = await self.post(URL, {"model": "m1", "prompt": ["One", "Two two"], "n": 2, "max_tokens": 3})
        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        self.assertEqual(body["object"], "text_completion")
        self.assertEqual([c["index"] for c in body["choices"]], [0, 1, 2, 3])
        self.assertEqual(body["choices"][0]["text"], "Hello wörld, how")
        self.assertEqual(body["choices"][0]["finish_reason"], "length")
        prompts = [p["prompt"] for p in self.fake.payloads("/worker_generate_stream")]
        self.assertEqual(prompts, ["One", "One", "Two two", "Two two"])
        # Prompt tokens once per prompt (2 + 3), completion tokens over all four choices.
        self.assertEqual(body["usage"]["prompt_tokens"], 5)
        self.assertEqual(body["usage"]["completion_tokens"], 4 * 2)

    async def test_it_sends_echo_logprobs_and_beam_params_explicitly(self):
        response = await self.post(URL, {"model": "m1", "prompt": "Once", "echo": True, "logprobs": 1})
        body = response.json()
        self.assertTrue(body["choices"][0]["text"].startswith("Once"))
        self.assertEqual(body["choices"][0]["logprobs"]["tokens"][:2], ["Hello", "wörld,"])
        params = self.fake.payloads("/worker_generate_stream")[0]
        self.assertIs(params["echo"], True)
        self.assertEqual(params["logprobs"], 1)
        self.assertIs(params["use_beam_search"], False)
        self.assertEqual(params["max_new_tokens"], 16)

    async def test_null_max_tokens_means_16(self):
        await self.post(URL, {"model": "m1", "prompt": "Once", "max_tokens": None})
        self.assertEqual(self.fake.payloads("/worker_generate_stream")[0]["max_new_tokens"], 16)

    async def test_it_lowers_max_tokens_to_what_the_context_leaves(self):
        self.fake.context_length = 10
        await self.post(URL, {"model": "m1", "prompt": ["a b c", "a b c d e f"], "max_tokens": 8})
        self.assertEqual({p["max_new_tokens"] for p in self.fake.payloads("/worker_generate_stream")}, {10 - 7})

    async def test_it_rejects_a_prompt_that_overflows_the_context(self):
        self.fake.context_length = 4
        body = self.assertError(await self.post(URL, {"model": "m1", "prompt": "a b c d e"}), 400, param="prompt", code=40303)
        self.assertEqual(body["message"], "This model's maximum context length is 4 tokens. However, your messages "
                                          "resulted in 6 tokens. Please reduce the length of the messages.")

    async def test_it_rejects_empty_prompt_lists(self):
        self.assertError(await self.post(URL, {"model": "m1", "prompt": []}), 400, param="prompt")

    async def test_token_id_prompts_without_tiktoken_files_get_a_clear_400(self):
        with mock.patch("openai_api.tokens.load_encoding", return_value=None):
            body = self.assertError(await self.post(URL, {"model": "m1", "prompt": [1, 2, 3]}), 400, param="prompt")
        self.assertIn("tiktoken", body["message"])

    async def test_token_id_prompts_are_decoded(self):
        encoding = mock.Mock(decode=lambda ids: "decoded " + ",".join(map(str, ids)))
        with mock.patch("openai_api.tokens.load_encoding", return_value=encoding):
            response = await self.post(URL, {"model": "m1", "prompt": [[1, 2], [3]]})
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual([p["prompt"] for p in self.fake.payloads("/worker_generate_stream")], ["decoded 1,2", "decoded 3"])

    async def test_it_streams_with_unique_indices_across_prompts(self):
        response = await self.post(URL, {"model": "m1", "prompt": ["A", "B"], "n": 2, "stream": True,
                                         "stream_options": {"include_usage": True}})
        self.assertEqual(response.status_code, 200)
        events = parse_sse(await read_stream(response))
        self.assertEqual(events[-1], "[DONE]")
        chunks = events[:-1]
        texts = {}
        for chunk in chunks[:-1]:
            self.assertEqual(chunk["object"], "text_completion")
            self.assertIn("created", chunk)
            choice = chunk["choices"][0]
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        self.assertEqual(sorted(texts), [0, 1, 2, 3])
        self.assertEqual(set(texts.values()), {self.fake.reply})
        finishes = [c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
        self.assertEqual(sorted(finishes), [0, 1, 2, 3])
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"]["prompt_tokens"], 4)

    async def test_streamed_logprobs_are_per_chunk_not_cumulative(self):
        response = await self.post(URL, {"model": "m1", "prompt": "A", "logprobs": 1, "stream": True})
        events = parse_sse(await read_stream(response))
        tokens = [t for e in events[:-1] if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["tokens"]]
        self.assertEqual(tokens, self.fake.reply.split(" "))

    async def test_a_worker_finish_reason_outside_stop_and_length_passes_through(self):
        self.fake.finish_reason = "abort"
        body = (await self.post(URL, {"model": "m1", "prompt": "A"})).json()
        self.assertEqual(body["choices"][0]["finish_reason"], "abort")
