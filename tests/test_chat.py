"""POST /v1/chat/completions against FakeFastChat."""
from __future__ import annotations

import asyncio

from django.test import override_settings

from tests.base import GatewayTestCase
from tests.sse import parse_sse, read_stream

URL = "/v1/chat/completions"


def chat(**fields):
    return {"model": "m1", "messages": [{"role": "user", "content": "Hi there"}], **fields}


class ChatCompletionTests(GatewayTestCase):
    async def test_it_answers_with_the_workers_text(self):
        response = await self.post(URL, chat())
        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        self.assertEqual(body["object"], "chat.completion")
        self.assertTrue(body["id"].startswith("chatcmpl-"))
        self.assertEqual(body["choices"][0]["message"], {"role": "assistant", "content": self.fake.reply})
        self.assertEqual(body["choices"][0]["finish_reason"], "stop")
        self.assertEqual(body["usage"]["total_tokens"], body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"])
        self.assertTrue(response["X-Request-ID"])

    async def test_it_sends_fastchats_prompt_and_params(self):
        await self.post(URL, chat(messages=[{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi there"},
                                            {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "again"}],
                                  max_tokens=10, stop="END"))
        params = self.fake.payloads("/worker_generate_stream")[0]
        self.assertEqual(params["prompt"], "SYS USER: Hi there ASSISTANT: Yo</s>USER: again ASSISTANT:")
        self.assertEqual(list(params), ["model", "prompt", "temperature", "logprobs", "top_p", "top_k", "presence_penalty",
                                        "frequency_penalty", "max_new_tokens", "echo", "stop_token_ids", "stop"])
        self.assertEqual(params["max_new_tokens"], 10)
        self.assertIs(params["echo"], False)
        self.assertEqual(params["stop"], ["END"])

    async def test_it_makes_three_upstream_calls_per_request_when_warm(self):
        await self.post(URL, chat(max_tokens=5))
        self.fake.calls.clear()
        response = await self.post(URL, chat(max_tokens=5))
        self.assertEqual(response.status_code, 200)
        self.assertLessEqual(len(self.fake.calls), 3, self.fake.paths())
        self.assertEqual(self.fake.paths(), ["/get_worker_address", "/worker_generate_stream"])

    async def test_it_counts_tokens_when_max_tokens_is_missing(self):
        self.fake.context_length = 64
        await self.post(URL, chat())
        params = self.fake.payloads("/worker_generate_stream")[0]
        prompt_tokens = len(params["prompt"].split()) + 1
        self.assertEqual(params["max_new_tokens"], 64 - prompt_tokens)

    async def test_a_max_tokens_beyond_the_context_is_lowered_to_what_it_leaves_like_fastchat(self):
        self.fake.context_length = 64
        response = await self.post(URL, chat(max_tokens=1_000_000))
        self.assertEqual(response.status_code, 200, response.content)
        params = self.fake.payloads("/worker_generate_stream")[0]
        self.assertEqual(params["max_new_tokens"], 64 - (len(params["prompt"].split()) + 1))

    async def test_it_streams_complete_chunks(self):
        response = await self.post(URL, chat(stream=True, stream_options={"include_usage": True}))
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["Content-Type"], "text/event-stream; charset=utf-8")
        self.assertEqual(response["Cache-Control"], "no-cache")
        self.assertEqual(response["X-Accel-Buffering"], "no")
        events = parse_sse(await read_stream(response))
        self.assertEqual(events[-1], "[DONE]")
        chunks = events[:-1]
        for chunk in chunks:
            self.assertEqual(set(chunk) - {"usage"}, {"id", "object", "created", "model", "choices"})
            self.assertEqual(chunk["object"], "chat.completion.chunk")
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        self.assertEqual(text, self.fake.reply)
        self.assertEqual(chunks[-2]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertGreater(chunks[-1]["usage"]["completion_tokens"], 0)


@override_settings(GATEWAY_WORKER_ADDRESS_TTL=60)
class WorkerAddressPoolTests(GatewayTestCase):
    async def test_a_warm_request_goes_straight_to_the_worker(self):
        await self.post(URL, chat(max_tokens=5))
        self.fake.calls.clear()
        response = await self.post(URL, chat(max_tokens=5))
        self.assertEqual(response.status_code, 200)
        self.assertEqual(self.fake.paths(), ["/worker_generate_stream"])

    async def test_the_pool_spreads_requests_over_the_workers_the_controller_hands_out(self):
        self.fake.workers = ["http://worker-a.test", "http://worker-b.test"]
        for _ in range(10):
            self.assertEqual((await self.post(URL, chat(max_tokens=5))).status_code, 200)
        generations = [worker for worker, path in self.fake.worker_hits if path == "/worker_generate_stream"]
        self.assertEqual(len(generations), 10)
        self.assertEqual(generations.count("http://worker-a.test"), 5)
        self.assertEqual(self.fake.paths().count("/get_worker_address"), 3)  # one renewal of the pool

    async def test_concurrent_requests_share_one_renewal_of_an_expired_pool(self):
        self.fake.workers = ["http://worker-a.test", "http://worker-b.test"]
        responses = await asyncio.gather(*(self.post(URL, chat(max_tokens=5)) for _ in range(20)))
        self.assertEqual([r.status_code for r in responses], [200] * 20)
        # One pool renewal (3 controller answers) and one model list and template fetch, not 20 each.
        self.assertEqual(self.fake.paths().count("/get_worker_address"), 3)
        self.assertEqual(self.fake.paths().count("/list_models"), 1)
        self.assertEqual(self.fake.paths().count("/worker_get_conv_template"), 2)  # one per worker

    async def test_a_dead_worker_in_the_pool_is_replaced_by_asking_the_controller(self):
        self.fake.workers = ["http://worker-a.test", "http://worker-b.test"]
        await self.post(URL, chat(max_tokens=5))
        self.fake.dead_workers = {"http://worker-a.test"}
        for _ in range(4):
            self.assertEqual((await self.post(URL, chat(max_tokens=5))).status_code, 200)
        served = [worker for worker, path in self.fake.worker_hits[-8:] if path == "/worker_generate_stream"]
        self.assertIn("http://worker-b.test", served)
