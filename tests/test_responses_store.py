"""The Responses API's store (openai_api/responses/store.py) and its endpoints (retrieve.py):
a response is read, chained, listed and deleted only with its key; ids are checked before any
query; the chain is read in a bounded number of queries; pruning; the admin is read-only."""
from __future__ import annotations

from asgiref.sync import async_to_sync
from django.test import override_settings

from keys.models import APIKey
from openai_api.errors import ContextLengthError, InvalidRequestError, NotFoundError
from openai_api.models import StoredInputItem, StoredResponse
from openai_api.responses import store
from tests.base import GatewayTestCase


def message(item_id: str, text: str, role: str = "user") -> dict:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"id": item_id, "type": "message", "role": role, "content": [{"type": kind, "text": text}],
            "status": "completed"}


def response(response_id: str, text: str, previous: str | None = None, **extra) -> dict:
    return {"id": response_id, "object": "response", "created_at": 1, "status": "completed", "model": "m1",
            "previous_response_id": previous, "output": [message(f"msg_out_{response_id}", text, "assistant")],
            "output_text": text, **extra}


class StoreTests(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.other, self.other_plaintext = APIKey.objects.create_key("bob")

    async def test_a_chain_is_read_oldest_first_inputs_then_outputs(self):
        await store.save(self.key, response("resp_1", "A1"), [message("msg_q1", "Q1")])
        await store.save(self.key, response("resp_2", "A2", previous="resp_1"), [message("msg_q2", "Q2")])
        items = await store.conversation_before(self.key, "resp_2")
        self.assertEqual([item["id"] for item in items], ["msg_q1", "msg_out_resp_1", "msg_q2", "msg_out_resp_2"])
        self.assertEqual(items[1]["content"][0]["text"], "A1")

    async def test_another_keys_chain_is_absent(self):
        await store.save(self.key, response("resp_1", "A1"), [message("msg_q1", "Q1")])
        with self.assertRaises(NotFoundError) as raised:
            await store.conversation_before(self.other, "resp_1")
        self.assertEqual((raised.exception.status_code, raised.exception.param), (404, "previous_response_id"))
        with self.assertRaises(NotFoundError) as absent:
            await store.conversation_before(self.other, "resp_never")
        self.assertEqual(raised.exception.message.replace("resp_1", "X"), absent.exception.message.replace(
            "resp_never", "X"))

    def test_junk_ids_are_refused_before_any_query(self):
        # Sync tests: the store's queries then run on this thread, where assertNumQueries counts.
        for junk in ("", "resp_", "msg_1", "resp_" + "a" * 96, "resp_a b", "resp_a\x00", 7, None):
            with self.subTest(junk=junk), self.assertNumQueries(0), self.assertRaises(InvalidRequestError) as raised:
                async_to_sync(store.conversation_before)(self.key, junk)
            self.assertEqual(raised.exception.param, "previous_response_id")

    def test_a_chain_is_walked_in_three_queries(self):
        previous = None
        for turn in range(30):
            async_to_sync(store.save)(self.key, response(f"resp_{turn}", f"A{turn}", previous),
                                      [message(f"m{turn}", "Q")])
            previous = f"resp_{turn}"
        with self.assertNumQueries(3):
            items = async_to_sync(store.conversation_before)(self.key, "resp_29")
        self.assertEqual(len(items), 60)

    async def test_the_chain_ends_where_a_response_was_deleted(self):
        await store.save(self.key, response("resp_1", "A1"), [message("msg_q1", "Q1")])
        await store.save(self.key, response("resp_2", "A2", previous="resp_1"), [message("msg_q2", "Q2")])
        await store.delete(self.key, "resp_1")
        items = await store.conversation_before(self.key, "resp_2")
        self.assertEqual([item["id"] for item in items], ["msg_q2", "msg_out_resp_2"])

    @override_settings(GATEWAY_MAX_MESSAGES=4)
    async def test_a_chain_beyond_the_bounds_is_refused_or_cut_with_truncation(self):
        previous = None
        for turn in range(4):  # 8 items: the bound is 2 x 4
            await store.save(self.key, response(f"resp_{turn}", f"A{turn}", previous), [message(f"m{turn}", "Q")])
            previous = f"resp_{turn}"
        self.assertEqual(len(await store.conversation_before(self.key, "resp_3")), 8)
        await store.save(self.key, response("resp_4", "A4", "resp_3"), [message("m4", "Q")])
        with self.assertRaises(ContextLengthError) as raised:
            await store.conversation_before(self.key, "resp_4")
        self.assertEqual(raised.exception.param, "previous_response_id")
        items = await store.conversation_before(self.key, "resp_4", truncate=True)
        self.assertEqual([item["id"] for item in items][:2], ["m1", "msg_out_resp_1"])
        self.assertEqual(len(items), 8)

    async def test_text_a_database_may_refuse_is_kept_exactly(self):
        text = "nul \x00 and \u2028 and emoji \U0001F600"
        await store.save(self.key, response("resp_nul", text, model="m\x00" + "x" * 300),
                         [message("id\x00bad", text), message("x" * 300, text)])
        body = await store.get(self.key, "resp_nul")
        self.assertIn('"output_text":"nul \\u0000 and', body)
        items = await store.conversation_before(self.key, "resp_nul")
        self.assertEqual(items[0]["content"][0]["text"], text)
        self.assertEqual(items[0]["id"], "id\x00bad")
        row = await StoredResponse.objects.aget(response_id="resp_nul")
        self.assertEqual(len(row.model), 200)
        self.assertEqual([item.item_id async for item in StoredInputItem.objects.order_by("position")], ["", ""])
