"""One request cannot take the process down: every size a client chooses is bounded, answered
with a 400 (413 for bodies) naming the parameter, before any upstream call; bodies are counted
as they are read, and not read at all for a bad key; JSON that would be costly to parse is
refused before it is parsed."""
from __future__ import annotations

import asyncio
import gc
import json
import os
import time

from asgiref.testing import ApplicationCommunicator
from django.test import SimpleTestCase, override_settings

from gateway_project.asgi import application
from keys.models import APIKey
from keys.usage import usage_writer
from openai_api.auth import key_cache
from openai_api.errors import InvalidRequestError
from openai_api.json_shape import check_json_shape
from tests.asgi import http_scope
from tests.base import GatewayTestCase

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
TOKEN_CHECK = "/api/v1/token_check"
MiB = 1024 * 1024


def chat(**fields):
    return {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], **fields}


def completion(**fields):
    return {"model": "m1", "prompt": "Once", **fields}


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class BoundsTestCase(GatewayTestCase):
    def assertRefused(self, response, param: str, status: int = 400, code=None) -> dict:
        body = self.assertError(response, status, param=param, code=code)
        self.assertEqual(self.fake.calls, [], "no upstream call may be made for a refused request")
        self.assertTrue(response["X-Request-ID"])
        return body


class ModelNameTests(BoundsTestCase):
    async def test_long_or_unprintable_model_names_are_refused_everywhere(self):
        for model in ("m" * 201, "m1\x00", "m\n1", "m\x1b[31m"):
            for path, body in ((CHAT, chat(model=model)), (COMPLETIONS, completion(model=model)),
                               (EMBEDDINGS, {"model": model, "input": "x"}),
                               ("/api/v1/chat/completions", chat(model=model))):
                with self.subTest(path=path, model=model[:10]):
                    self.assertRefused(await self.post(path, body), "model")
            with self.subTest(path=TOKEN_CHECK, model=model[:10]):
                body = {"prompts": [{"model": model, "prompt": "x", "max_tokens": 1}]}
                self.assertRefused(await self.post(TOKEN_CHECK, body), "prompts[0].model")

    async def test_a_refused_model_name_is_not_recorded(self):
        await self.post(CHAT, chat(model="m" * 10_000))
        await self.post(CHAT, chat(model="m1\x00"))
        self.assertEqual([event.model for event in usage_writer.pending], ["", ""])

    async def test_the_engines_route_checks_the_model_in_its_path(self):
        self.assertRefused(await self.post(f"/v1/engines/{'e' * 300}/embeddings", {"input": "x"}), "model")

    async def test_a_model_name_at_the_limit_is_only_unknown(self):
        response = await self.post(CHAT, chat(model="m" * 200))
        self.assertError(response, 404, param="model")


class GenerationCountTests(BoundsTestCase):
    async def test_twenty_thousand_prompts_times_n_16_is_refused_at_once_and_costs_no_memory(self):
        body = json.dumps(completion(prompt=["x"] * 20_000, n=16, max_tokens=1))
        self.assertLess(len(body), 110_000)
        gc.collect()
        before, started = rss_bytes(), time.monotonic()
        response = await self.post(COMPLETIONS, body)
        elapsed, grown = time.monotonic() - started, rss_bytes() - before
        self.assertRefused(response, "prompt")
        self.assertIn("array too long", response.json()["message"])
        self.assertLess(elapsed, 1.0)
        self.assertLess(grown, 8 * MiB)

    async def test_prompts_times_n_are_bounded_before_any_generation(self):
        response = await self.post(COMPLETIONS, completion(prompt=["x"] * 100, n=2))
        body = self.assertRefused(response, "n")
        self.assertIn("200 generations", body["message"])

    @override_settings(GATEWAY_MAX_GENERATIONS=8)
    async def test_the_bound_is_a_setting_and_allows_up_to_it(self):
        response = await self.post(COMPLETIONS, completion(prompt=["a", "b"], n=4, max_tokens=2))
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual(len(response.json()["choices"]), 8)
        self.fake.calls.clear()
        self.assertRefused(await self.post(COMPLETIONS, completion(prompt=["a", "b", "c"], n=3)), "n")
        self.assertRefused(await self.post(COMPLETIONS, completion(prompt=["x"] * 9)), "prompt")
        self.assertRefused(await self.post(CHAT, chat(n=9)), "n")
        self.assertRefused(await self.post(CHAT, chat(n=9, stream=True)), "n")

    async def test_best_of_counts_as_generations(self):
        self.assertRefused(await self.post(COMPLETIONS, completion(best_of=129)), "best_of")
        self.assertRefused(await self.post(COMPLETIONS, completion(prompt=["a", "b"], n=8, best_of=16)), "best_of")

    async def test_a_token_id_prompt_is_one_prompt_however_long(self):
        response = await self.post(COMPLETIONS, completion(prompt=list(range(1, 500)), n=2))
        # Decoding needs tiktoken's files: 200 with them, a clear 400 without; never a count refusal.
        self.assertIn(response.status_code, (200, 400), response.content)
        if response.status_code == 400:
            self.assertEqual(response.json()["error"]["code"], "unsupported_parameter")


class EmbeddingAndTokenCheckTests(BoundsTestCase):
    async def test_embedding_inputs_are_bounded(self):
        self.assertRefused(await self.post(EMBEDDINGS, {"model": "embed", "input": ["x"] * 2049}), "input")
        self.assertRefused(await self.post(EMBEDDINGS, {"model": "embed", "input": [[1, 2]] * 2049}), "input")

    @override_settings(FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE=1, GATEWAY_EMBEDDING_CONCURRENCY=3)
    async def test_only_a_few_embedding_batches_are_in_flight(self):
        real_worker = self.fake.worker
        in_flight, most, tasks = 0, 0, []

        async def slow_worker(path, payload):
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            tasks.append(len(asyncio.all_tasks()))
            await asyncio.sleep(0.01)
            in_flight -= 1
            return await real_worker(path, payload)

        self.fake.worker = slow_worker
        inputs = [f"text {i}" for i in range(40)]
        response = await self.post(EMBEDDINGS, {"model": "embed", "input": inputs})
        self.assertEqual(response.status_code, 200, response.content)
        self.assertEqual([d["index"] for d in response.json()["data"]], list(range(40)))
        self.assertEqual([d["embedding"][0] for d in response.json()["data"]], [float(len(t)) for t in inputs])
        self.assertEqual(most, 3)
        self.assertLess(max(tasks) - min(tasks), 4, "one task per batch in flight, not per batch")

    async def test_token_check_items_are_bounded(self):
        items = [{"model": "m1", "prompt": "x", "max_tokens": 1}] * 65
        self.assertRefused(await self.post(TOKEN_CHECK, {"prompts": items}), "prompts")
        bad = [{"model": "m1", "prompt": "x", "max_tokens": 1e20}]
        self.assertRefused(await self.post(TOKEN_CHECK, {"prompts": bad}), "prompts[0].max_tokens")

    async def test_token_check_is_admitted_through_the_keys_limits(self):
        await APIKey.objects.filter(pk=self.key.pk).aupdate(requests_per_minute=1)
        key_cache.clear()
        body = {"prompts": [{"model": "m1", "prompt": "Hello there", "max_tokens": 10}]}
        first = await self.post(TOKEN_CHECK, body)
        self.assertEqual(first.status_code, 200, first.content)
        self.assertEqual(first.json()["prompts"][0]["tokenCount"], 3)
        calls = len(self.fake.calls)
        second = await self.post(TOKEN_CHECK, body)
        self.assertError(second, 429)
        self.assertEqual(len(self.fake.calls), calls, "a refused token check calls no worker")


class NumberTests(BoundsTestCase):
    async def test_integers_beyond_64_bits_are_400_not_500(self):
        for field in ("seed", "top_k", "n", "max_tokens", "max_completion_tokens"):
            for value in (1e20, 10**20, -(10**20)):
                with self.subTest(field=field, value=value):
                    self.assertRefused(await self.post(CHAT, chat(**{field: value})), field)
        self.assertRefused(await self.post(COMPLETIONS, completion(seed=1e20)), "seed")
        self.assertRefused(await self.post(COMPLETIONS, completion(logprobs=10**30)), "logprobs")

    async def test_seed_and_top_k_within_range_pass(self):
        response = await self.post(CHAT, chat(seed=2**63 - 1, top_k=-1))
        self.assertEqual(response.status_code, 200, response.content)
        sent = self.fake.payloads("/worker_generate") + self.fake.payloads("/worker_generate_stream")
        self.assertEqual(sent[0]["seed"], 2**63 - 1)

    async def test_negative_top_k_other_than_minus_one_is_refused(self):
        for value in (-2, -5, -(2**40)):
            with self.subTest(value=value):
                body = self.assertRefused(await self.post(CHAT, chat(top_k=value)), "top_k")
                self.assertIn("Either set top_k to -1 or >=1", body["message"])

    async def test_max_tokens_has_a_range(self):
        self.assertRefused(await self.post(CHAT, chat(max_tokens=2**31)), "max_tokens")
        self.assertRefused(await self.post(COMPLETIONS, completion(max_tokens=2**31)), "max_tokens")

    async def test_floats_out_of_range_and_not_finite_are_refused(self):
        for field, value in (("temperature", 1e300), ("top_p", 2), ("presence_penalty", 1e20),
                             ("frequency_penalty", -1e20), ("temperature", 10**30)):
            with self.subTest(field=field):
                self.assertRefused(await self.post(CHAT, chat(**{field: value})), field)
        # The parser refuses what would be NaN or infinite (a 400-digit integer too).
        for literal in (b"NaN", b"Infinity", b"1e400", b"-1e999", b"1" + b"0" * 400):
            with self.subTest(literal=literal):
                raw = b'{"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "temperature": ' + literal + b"}"
                self.assertRefused(await self.post(CHAT, raw), None, code="invalid_json")

    async def test_stop_is_bounded_in_count_and_length(self):
        self.assertRefused(await self.post(CHAT, chat(stop=["s"] * 17)), "stop")
        self.assertRefused(await self.post(CHAT, chat(stop="s" * 257)), "stop")
        self.assertRefused(await self.post(COMPLETIONS, completion(stop=["ok", "s" * 257])), "stop")
        response = await self.post(CHAT, chat(stop=["s" * 256] * 16))
        self.assertEqual(response.status_code, 200, response.content)

    async def test_messages_and_their_content_are_bounded(self):
        self.assertRefused(await self.post(CHAT, chat(messages=[{"role": "user", "content": "x"}] * 2049)), "messages")
        parts = [{"type": "text", "text": "x"}] * 65
        self.assertRefused(await self.post(CHAT, chat(messages=[{"role": "user", "content": parts}])),
                           "messages[0].content")

    @override_settings(GATEWAY_MAX_CONTENT_CHARS=10)
    async def test_content_length_is_a_setting(self):
        self.assertRefused(await self.post(CHAT, chat(messages=[{"role": "user", "content": "x" * 11}])),
                           "messages[0].content")
        parts = [{"type": "text", "text": "x" * 11}]
        self.assertRefused(await self.post(CHAT, chat(messages=[{"role": "user", "content": parts}])),
                           "messages[0].content[0].text")
        self.assertRefused(await self.post(CHAT, chat(messages="x" * 11)), "messages")
        self.assertRefused(await self.post(COMPLETIONS, completion(prompt=["ok", "x" * 11])), "prompt[1]")
        self.assertRefused(await self.post(EMBEDDINGS, {"model": "embed", "input": "x" * 11}), "input")


class JSONShapeTests(BoundsTestCase):
    async def test_deep_nesting_is_refused_before_parsing(self):
        raw = b'{"model": "m1", "x": ' + b"[" * (16 * MiB - 30) + b"}"
        started = time.monotonic()
        response = await self.post(CHAT, raw)
        elapsed = time.monotonic() - started
        self.assertRefused(response, None, code="json_too_deep")
        self.assertLess(elapsed, 1.0)

    async def test_a_body_of_a_million_small_ints_is_refused_before_parsing(self):
        raw = b'{"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "x": [' + b"1," * 10**6 + b"1]}"
        started = time.monotonic()
        response = await self.post(CHAT, raw)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertRefused(response, None, code="json_too_large")

    async def test_a_top_level_array_is_refused_without_parsing(self):
        started = time.monotonic()
        response = await self.post(CHAT, b"[" + b"[]," * (5 * MiB) + b"[]]")
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertRefused(response, None, code="invalid_json")

    async def test_nesting_at_the_limit_passes(self):
        response = await self.post(CHAT, chat(x=json.loads("[" * 63 + "]" * 63)))
        self.assertEqual(response.status_code, 200, response.content)
        self.fake.calls.clear()
        self.assertRefused(await self.post(CHAT, chat(x=json.loads("[" * 64 + "]" * 64))), None, code="json_too_deep")

    @override_settings(GATEWAY_MAX_JSON_DEPTH=5000)
    async def test_the_parsers_own_depth_limit_is_a_clean_400(self):
        raw = b'{"model": "m1", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"
        self.assertRefused(await self.post(CHAT, raw), None, code="invalid_json")

    async def test_brackets_commas_and_escaped_quotes_inside_strings_are_text(self):
        self.fake.context_length = 10**8
        content = '\\"[{' * 200 + ", " * 400_000 + "\\\\"
        response = await self.post(CHAT, chat(messages=[{"role": "user", "content": content}]))
        self.assertEqual(response.status_code, 200, response.content)


class BodyReadingTests(BoundsTestCase):
    """Straight through the ASGI application, as a server sends a body in parts."""

    async def start(self, headers: dict[str, str], parts: list[bytes], more_body_after: bool = True):
        communicator = ApplicationCommunicator(application, http_scope(CHAT, headers))
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            await communicator.send_input({"type": "http.request", "body": part,
                                           "more_body": more_body_after or not last})
        return communicator

    async def answer(self, communicator) -> tuple[int, dict, dict]:
        start = await communicator.receive_output(timeout=5)
        body = await communicator.receive_output(timeout=5)
        await communicator.wait(timeout=5)
        headers = {name.decode().lower(): value.decode() for name, value in start["headers"]}
        return start["status"], headers, json.loads(body["body"])

    async def test_a_chunked_20_mb_body_gets_413_once_it_passes_the_limit(self):
        parts = [b"x" * MiB] * 20
        communicator = await self.start({**self.auth, "transfer-encoding": "chunked"}, parts)
        status, headers, body = await self.answer(communicator)
        self.assertEqual(status, 413)
        self.assertEqual(body["error"]["code"], "request_too_large")
        self.assertTrue(headers["x-request-id"])
        # 16 MiB is passed by the 17th part; the other three were never read.
        self.assertEqual(communicator.input_queue.qsize(), 3)
        self.assertEqual(self.fake.calls, [])

    async def test_a_content_length_that_lies_does_not_raise_the_limit(self):
        parts = [b"x" * MiB] * 20
        communicator = await self.start({**self.auth, "content-length": "100"}, parts)
        status, _, body = await self.answer(communicator)
        self.assertEqual(status, 413)
        self.assertEqual(communicator.input_queue.qsize(), 3)

    async def test_a_body_in_one_part_passing_the_limit_is_refused(self):
        communicator = await self.start({**self.auth, "content-length": "100"}, [b"x" * (16 * MiB + 1)],
                                        more_body_after=False)
        status, _, body = await self.answer(communicator)
        self.assertEqual(status, 413)

    async def test_a_declared_oversized_body_is_not_read(self):
        communicator = await self.start({**self.auth, "content-length": str(10**9)}, [b"x" * MiB])
        status, _, body = await self.answer(communicator)
        self.assertEqual(status, 413)
        self.assertEqual(communicator.input_queue.qsize(), 1)

    async def test_a_bad_key_gets_401_without_its_body_being_read(self):
        for headers in ({"authorization": "Bearer sk-not-a-key"}, {}, {"authorization": f"Bearer {self.revoked_plaintext}"}):
            with self.subTest(headers=headers):
                for length in ({"content-length": str(16 * MiB)}, {"transfer-encoding": "chunked"}):
                    communicator = await self.start({**headers, **length}, [b"x" * MiB] * 16)
                    status, headers_out, body = await self.answer(communicator)
                    self.assertEqual(status, 401)
                    self.assertTrue(headers_out["x-request-id"])
                    # Only what the server had handed over with the request (its first message).
                    self.assertEqual(communicator.input_queue.qsize(), 15, "the body was read")

    async def test_a_body_in_parts_is_joined(self):
        raw = json.dumps(chat()).encode()
        communicator = await self.start({**self.auth, "transfer-encoding": "chunked"},
                                        [raw[:10], raw[10:20], raw[20:]], more_body_after=False)
        status, _, body = await self.answer(communicator)
        self.assertEqual(status, 200, body)
        self.assertEqual(body["object"], "chat.completion")


class CheckJSONShapeTests(SimpleTestCase):
    def refused(self, raw: bytes, depth: int = 4, values: int = 20) -> str | None:
        try:
            check_json_shape(raw, depth, values)
        except InvalidRequestError as exc:
            return exc.code
        return None

    def test_depth(self):
        self.assertIsNone(self.refused(b'{"a": [{"b": [1]}]}'))
        self.assertEqual(self.refused(b'{"a": [[{"b": [1]}]]}'), "json_too_deep")
        self.assertEqual(self.refused(b'{"a": [[], [[{"b": [[]]}]]]}'), "json_too_deep")
        self.assertIsNone(self.refused(b'{"a": [[], [], [], [], [[]], [[1]], [], [{}]]}'))

    def test_strings_do_not_count(self):
        self.assertIsNone(self.refused(b'{"a": "[[[[[[[[,,,,,,,,,,,,,,,,,,,,,,,,,,{{{{{{{{"}'))
        self.assertIsNone(self.refused(b'{"a": "\\"[[[[[[[[\\\\", "b": "]]]\\\\\\"[[[[[[["}'))
        self.assertEqual(self.refused(b'{"a": "\\\\", "b": [[[[[]]]]]}'), "json_too_deep")

    def test_values(self):
        self.assertIsNone(self.refused(b'{"a": [' + b"1," * 18 + b"1]}"))
        self.assertEqual(self.refused(b'{"a": [' + b"1," * 25 + b"1]}"), "json_too_large")
        self.assertEqual(self.refused(b'{"a": [' + b'"",' * 25 + b'""]}'), "json_too_large")
        self.assertEqual(self.refused(b'{"a": [' + b"[]," * 25 + b"[]]}"), "json_too_large")

    def test_malformed_json_is_left_to_the_parser(self):
        self.assertIsNone(self.refused(b'{"a": [[]], "b": [[]], "c": [[]]]]]'))
        self.assertIsNone(self.refused(b'{"a": "unterminated [[[[[[[['))
