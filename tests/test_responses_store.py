"""The Responses API's store (openai_api/responses/store.py) and its endpoints (retrieve.py):
a response is read, chained, listed and deleted only with its key; ids are checked before any
query; the chain is read in a bounded number of queries; pruning; the admin is read-only."""
from __future__ import annotations

import io
import os
import signal
import time
import unittest
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from unittest import mock

import httpx
import openai
import orjson
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import TestCase, TransactionTestCase, override_settings
from django.urls import reverse
from django.utils import timezone

from keys.models import APIKey, UsageRecord
from keys.usage import usage_writer
from openai_api.auth import key_cache
from openai_api.errors import ContextLengthError, InvalidRequestError, NotFoundError, StoreUnavailableError
from openai_api.models import StoredInputItem, StoredResponse
from openai_api.observability import endpoint_label
from openai_api.responses import store
from tests.base import GatewayTestCase
from tests.gateway_process import Gateway, start_gateway
from tests.procs import free_port, start_controller, start_demo_worker, stop_process, wait_for_models
from tests.services import Postgres, ServiceUnavailable, postgres, require_service
from tests.test_outages import cluster_pids, start_again
from tests.test_responses_create import SDKMixin


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
        answer, inputs = response("resp_nul", text, model="m\x00" + "x" * 300), [message("id\x00bad", text),
                                                                                message("x" * 300, text)]
        await store.save(self.key, answer, inputs)
        body = await store.get(self.key, "resp_nul")
        self.assertIn('"output_text":"nul \\u0000 and', body)
        items = await store.conversation_before(self.key, "resp_nul")
        self.assertEqual(items[0]["content"][0]["text"], text)
        self.assertEqual(items[0]["id"], "id\x00bad")
        row = await StoredResponse.objects.aget(response_id="resp_nul")
        self.assertEqual(len(row.model), 200)
        # The chain's bound counts bytes of UTF-8 JSON (the emoji is 4), not characters.
        self.assertEqual(row.size_bytes, sum(len(orjson.dumps(item)) for item in inputs)
                         + len(orjson.dumps(answer["output"])))
        self.assertEqual(row.item_count, 3)
        self.assertEqual([item.item_id async for item in StoredInputItem.objects.order_by("position")], ["", ""])


class EndpointTests(GatewayTestCase):
    """GET/DELETE /v1/responses/{id} and GET /v1/responses/{id}/input_items through the API handler."""

    def setUp(self) -> None:
        super().setUp()
        self.other, other_plaintext = APIKey.objects.create_key("bob")
        self.other_auth = {"Authorization": f"Bearer {other_plaintext}"}
        self.items = [message(f"msg_{n}", f"Q{n}") for n in range(5)]

    async def stored(self, response_id: str = "resp_abc") -> dict:
        answer = response(response_id, "A", metadata={"k": "v"})
        await store.save(self.key, answer, self.items)
        return answer

    async def delete(self, path: str, **headers):
        return await self.async_client.delete(path, headers={**self.auth, **headers})

    async def test_get_answers_the_response_as_stored(self):
        answer = await self.stored()
        got = await self.get("/v1/responses/resp_abc")
        self.assertEqual(got.status_code, 200, got.content)
        self.assertEqual(got["Content-Type"], "application/json")
        self.assertEqual(got.json(), answer)

    async def test_another_key_gets_the_404_of_an_id_that_never_existed(self):
        await self.stored()
        for path in ("/v1/responses/{}", "/v1/responses/{}/input_items"):
            theirs = await self.async_client.get(path.format("resp_abc"), headers=self.other_auth)
            never = await self.async_client.get(path.format("resp_abd"), headers=self.other_auth)
            self.assertError(theirs, 404, code="not_found")
            self.assertEqual(theirs.content.replace(b"resp_abc", b"X"), never.content.replace(b"resp_abd", b"X"))
        self.assertError(await self.async_client.delete("/v1/responses/resp_abc", headers=self.other_auth), 404)
        self.assertEqual((await self.get("/v1/responses/resp_abc")).status_code, 200)  # still there

    async def test_delete_removes_it_and_its_items_once(self):
        await self.stored()
        deleted = await self.delete("/v1/responses/resp_abc")
        self.assertEqual(deleted.status_code, 200, deleted.content)
        self.assertEqual(deleted.json(), {"id": "resp_abc", "object": "response.deleted", "deleted": True})
        self.assertError(await self.get("/v1/responses/resp_abc"), 404)
        self.assertError(await self.get("/v1/responses/resp_abc/input_items"), 404)
        self.assertError(await self.delete("/v1/responses/resp_abc"), 404)
        self.assertEqual(await StoredInputItem.objects.acount(), 0)

    async def test_junk_ids_get_400_naming_the_parameter(self):
        for junk in ("abc", "resp_" + "a" * 96, "resp_a%20b", "msg_1", "resp_%00"):
            with self.subTest(junk=junk):
                body = self.assertError(await self.get(f"/v1/responses/{junk}"), 400, param="response_id")
                self.assertNotIn(junk, body["error"]["message"])
                self.assertError(await self.delete(f"/v1/responses/{junk}"), 400, param="response_id")
                self.assertError(await self.get(f"/v1/responses/{junk}/input_items"), 400, param="response_id")

    async def test_other_methods_get_405(self):
        self.assertError(await self.post("/v1/responses/resp_abc", {}), 405)
        self.assertError(await self.async_client.delete("/v1/responses/resp_abc/input_items",
                                                        headers=self.auth), 405)

    async def test_without_a_key_401(self):
        await self.stored()
        self.assertError(await self.async_client.get("/v1/responses/resp_abc"), 401)

    async def page(self, query: str = "", status: int = 200) -> dict:
        got = await self.get(f"/v1/responses/resp_abc/input_items{query}")
        self.assertEqual(got.status_code, status, got.content)
        return got.json()

    async def test_input_items_are_paginated_as_openai(self):
        await self.stored()
        ids = [item["id"] for item in self.items]

        def shown(page):
            return [item["id"] for item in page["data"]], page["first_id"], page["last_id"], page["has_more"]

        everything = await self.page()
        self.assertEqual(everything["object"], "list")
        self.assertEqual(everything["data"][0], self.items[-1])  # newest first by default, as stored
        self.assertEqual(shown(everything), (ids[::-1], "msg_4", "msg_0", False))
        self.assertEqual(shown(await self.page("?limit=2")), (["msg_4", "msg_3"], "msg_4", "msg_3", True))
        self.assertEqual(shown(await self.page("?limit=2&after=msg_3")), (["msg_2", "msg_1"], "msg_2", "msg_1", True))
        self.assertEqual(shown(await self.page("?limit=2&after=msg_1")), (["msg_0"], "msg_0", "msg_0", False))
        self.assertEqual(shown(await self.page("?order=asc&limit=3")), (ids[:3], "msg_0", "msg_2", True))
        self.assertEqual(shown(await self.page("?order=asc&after=msg_2")), (ids[3:], "msg_3", "msg_4", False))
        # `before`: the items just before the cursor in the listing's order, in that order.
        self.assertEqual(shown(await self.page("?order=asc&before=msg_3&limit=2")),
                         (["msg_1", "msg_2"], "msg_1", "msg_2", True))
        self.assertEqual(shown(await self.page("?before=msg_1&limit=2")), (["msg_3", "msg_2"], "msg_3", "msg_2", True))
        self.assertEqual(shown(await self.page("?before=msg_3")), (["msg_4"], "msg_4", "msg_4", False))
        self.assertEqual(shown(await self.page("?after=msg_4&before=msg_1")), (["msg_3", "msg_2"], "msg_3", "msg_2",
                                                                                 False))
        self.assertEqual(shown(await self.page("?after=msg_0")), ([], None, None, False))
        self.assertEqual(shown(await self.page("?limit=100&include[]=message.input_image.image_url")),
                         (ids[::-1], "msg_4", "msg_0", False))

    async def test_cursors_that_leave_nothing_between_them_give_an_empty_page(self):
        # Each cursor is an item of the response: `before` at or beyond `after` is an empty page,
        # not the 400 of an unknown cursor (it was looked up among the items after `after`).
        await self.stored()
        for query in ("?after=msg_2&before=msg_2", "?after=msg_1&before=msg_3", "?order=asc&after=msg_3&before=msg_1"):
            with self.subTest(query=query):
                page = await self.page(query)
                self.assertEqual((page["data"], page["first_id"], page["last_id"], page["has_more"]),
                                 ([], None, None, False))

    async def test_input_items_parameters_are_checked(self):
        await self.stored()
        for query, param in (("?limit=0", "limit"), ("?limit=101", "limit"), ("?limit=abc", "limit"),
                             ("?limit=+5", "limit"), ("?limit=", "limit"), ("?order=newest", "order"),
                             ("?after=msg_9", "after"), ("?before=" + "x" * 257, "before"), ("?after=%00", "after")):
            with self.subTest(query=query):
                self.assertError(await self.get(f"/v1/responses/resp_abc/input_items{query}"), 400, param=param)

    async def test_a_database_failure_is_a_503_in_openais_shape(self):
        from django.db import OperationalError
        await self.stored()
        with mock.patch.object(store, "read_body", side_effect=OperationalError("server closed the connection")):
            body = self.assertError(await self.get("/v1/responses/resp_abc"), 503, code="store_unavailable")
        self.assertEqual(body["error"]["type"], "server_error")
        with mock.patch.object(store, "delete_now", side_effect=OperationalError("down")):
            self.assertError(await self.delete("/v1/responses/resp_abc"), 503, code="store_unavailable")
        with mock.patch.object(store, "read_items", side_effect=OperationalError("down")):
            got = await self.get("/v1/responses/resp_abc/input_items")
            self.assertError(got, 503, code="store_unavailable")
            self.assertEqual(got["Retry-After"], "1")
        with mock.patch.object(store, "read_conversation", side_effect=OperationalError("down")), \
                self.assertRaises(StoreUnavailableError):
            await store.conversation_before(self.key, "resp_abc")
        with mock.patch.object(store, "save_now", side_effect=OperationalError("down")), \
                self.assertRaises(StoreUnavailableError):
            await store.save(self.key, response("resp_new", "A"), [])

    async def test_a_database_that_hangs_is_a_503_after_the_stores_timeout(self):
        await self.stored()

        def hang(*args):
            time.sleep(1.0)

        started = time.monotonic()
        with mock.patch.object(store, "STORE_TIMEOUT", 0.2), mock.patch.object(store, "read_body", side_effect=hang):
            self.assertError(await self.get("/v1/responses/resp_abc"), 503, code="store_unavailable")
        self.assertLess(time.monotonic() - started, 0.9)

    async def test_usage_rows_and_metrics_name_the_route_never_the_id(self):
        await self.stored()
        await self.get("/v1/responses/resp_abc")
        await self.get("/v1/responses/resp_abc/input_items")
        await self.delete("/v1/responses/resp_abc")
        await self.get("/v1/responses/resp_zzz")
        await sync_to_async(usage_writer.flush)()
        rows = [row async for row in UsageRecord.objects.filter(key=self.key).order_by("pk")
                .values_list("endpoint", "status")]
        self.assertEqual(rows, [("/v1/responses/{id}", 200), ("/v1/responses/{id}/input_items", 200),
                                ("/v1/responses/{id}", 200), ("/v1/responses/{id}", 404)])
        metrics = (await self.async_client.get("/metrics")).content.decode()
        self.assertIn('endpoint="/v1/responses/{id}"', metrics)
        self.assertIn('endpoint="/v1/responses/{id}/input_items"', metrics)
        self.assertNotIn("resp_abc", metrics)
        self.assertNotIn("resp_zzz", metrics)
        self.assertEqual(endpoint_label("/v1/responses/resp_abc"), "/v1/responses/{id}")
        self.assertEqual(endpoint_label("/v1/responses/resp_abc/input_items"), "/v1/responses/{id}/input_items")


class AdminTests(TestCase):
    """Read-only for everybody, the superuser included; searchable by response id and key."""

    def setUp(self) -> None:
        self.key, _ = APIKey.objects.create_key("alice-app")
        self.other, _ = APIKey.objects.create_key("bob-app")
        async_to_sync(store.save)(self.key, response("resp_alice1", "A <b>1</b>"), [message("msg_q", "Q <i>")])
        async_to_sync(store.save)(self.other, response("resp_bob1", "B"), [])
        self.client.force_login(User.objects.create_superuser("root", "root@example.com", None))
        self.row = StoredResponse.objects.get(response_id="resp_alice1")

    def listed(self, **query) -> set[str]:
        page = self.client.get(reverse("admin:openai_api_storedresponse_changelist"), query)
        self.assertEqual(page.status_code, 200)
        return {rid for rid in ("resp_alice1", "resp_bob1") if f">{rid}<" in page.content.decode()}

    def test_the_list_is_searchable_by_response_id_and_key(self):
        self.assertEqual(self.listed(), {"resp_alice1", "resp_bob1"})
        self.assertEqual(self.listed(q="resp_bob1"), {"resp_bob1"})
        self.assertEqual(self.listed(q="resp_bob"), set())  # ids match exactly
        self.assertEqual(self.listed(q=self.key.prefix), {"resp_alice1"})
        self.assertEqual(self.listed(q="bob-app"), {"resp_bob1"})
        StoredResponse.objects.filter(response_id="resp_bob1").update(status="incomplete")
        self.assertEqual(self.listed(status="incomplete"), {"resp_bob1"})
        self.assertEqual(self.listed(status="completed"), {"resp_alice1"})

    def test_a_response_shows_its_body_and_items_escaped(self):
        page = self.client.get(reverse("admin:openai_api_storedresponse_change", args=[self.row.pk]))
        self.assertEqual(page.status_code, 200)
        self.assertContains(page, "A &lt;b&gt;1&lt;/b&gt;")
        self.assertContains(page, "Q &lt;i&gt;")
        self.assertNotContains(page, 'name="_save"')

    def test_nobody_adds_changes_or_deletes(self):
        for url in (reverse("admin:openai_api_storedresponse_add"),
                    reverse("admin:openai_api_storedresponse_delete", args=[self.row.pk])):
            self.assertEqual(self.client.get(url).status_code, 403)
            self.assertEqual(self.client.post(url, {"post": "yes"}).status_code, 403)
        change = reverse("admin:openai_api_storedresponse_change", args=[self.row.pk])
        self.assertEqual(self.client.post(change, {"status": "failed"}).status_code, 403)
        changelist = reverse("admin:openai_api_storedresponse_changelist")
        self.client.post(changelist, {"action": "delete_selected", "_selected_action": [self.row.pk]})
        self.row.refresh_from_db()
        self.assertEqual(self.row.status, "completed")


class RetentionTests(TestCase):
    def setUp(self) -> None:
        self.key, _ = APIKey.objects.create_key("alice-app")
        for n in range(5):
            async_to_sync(store.save)(self.key, response(f"resp_{n}", "A"), [message(f"m{n}", "Q")] * 3)
        StoredResponse.objects.filter(response_id__in=["resp_0", "resp_1", "resp_2"]).update(
            created_at=timezone.now() - timedelta(days=31))

    def test_prune_deletes_old_responses_with_their_items_in_batches(self):
        self.assertEqual(store.prune(30, batch=2), 3)
        self.assertEqual(set(StoredResponse.objects.values_list("response_id", flat=True)), {"resp_3", "resp_4"})
        self.assertEqual(StoredInputItem.objects.count(), 6)
        self.assertEqual(store.prune(30), 0)

    def test_the_usage_writers_daily_pruning_applies_the_setting(self):
        with self.settings(RESPONSES_RETENTION_DAYS=0):
            self.assertTrue(usage_writer._prune_safely())
        self.assertEqual(StoredResponse.objects.count(), 5)
        with self.settings(RESPONSES_RETENTION_DAYS=30), self.assertLogs("keys.usage", "INFO") as logs:
            self.assertTrue(usage_writer._prune_safely())
        self.assertEqual(StoredResponse.objects.count(), 2)
        self.assertIn("Pruned 3 stored response row(s)", logs.output[-1])

    def test_an_unreachable_database_is_retried_soon(self):
        from django.db import OperationalError
        with self.settings(RESPONSES_RETENTION_DAYS=30), \
                mock.patch.object(store, "prune", side_effect=OperationalError("connection refused")), \
                self.assertLogs("keys.usage", "WARNING"):
            self.assertFalse(usage_writer._prune_safely())

    def test_the_command(self):
        out = io.StringIO()
        with self.settings(RESPONSES_RETENTION_DAYS=40):
            call_command("prune_responses", stdout=out)
        self.assertIn("Deleted 0 stored response(s) older than 40 day(s).", out.getvalue())
        call_command("prune_responses", "--days", "30", stdout=out)
        self.assertIn("Deleted 3 stored response(s) older than 30 day(s).", out.getvalue())
        with self.assertRaises(CommandError):
            call_command("prune_responses", "--days", "0")


# SQLite's in-memory test database refuses concurrent writers at once ("table is locked"); the
# suite's PostgreSQL run (python -m tests.services -- ...) runs these.
@unittest.skipUnless(connection.vendor == "postgresql", "concurrent writers: the PostgreSQL run")
class ConcurrencyTests(TransactionTestCase):
    """Saves, reads and deletes of the same responses from threads with connections of their own
    (committed data, as between gateway processes): all or nothing is seen, one DELETE wins,
    a chain survives the deletion of the response it follows."""

    ITEMS = 5

    def setUp(self) -> None:
        self.key, _ = APIKey.objects.create_key("race")

    def in_thread(self, function, *args):
        try:
            return async_to_sync(function)(*args)
        finally:
            connection.close()  # this thread's own connection

    def save(self, response_id: str, previous: str | None = None) -> None:
        items = [message(f"{response_id}_m{n}", "Q") for n in range(self.ITEMS)]
        self.in_thread(store.save, self.key, response(response_id, "A", previous), items)

    def delete(self, response_id: str) -> bool:
        try:
            self.in_thread(store.delete, self.key, response_id)
            return True
        except NotFoundError:
            return False

    def read(self, response_id: str) -> int | None:
        try:
            page = self.in_thread(store.input_items, self.key, response_id, store.ItemsQuery(limit=100))
        except NotFoundError:
            return None
        return len(page.items)

    def test_saves_deletes_and_reads_racing(self):
        ids = [f"resp_race{n}" for n in range(40)]
        with ThreadPoolExecutor(8) as pool:
            runs = [(rid, pool.submit(self.read, rid), pool.submit(self.save, rid), pool.submit(self.read, rid),
                     pool.submit(self.delete, rid), pool.submit(self.delete, rid), pool.submit(self.read, rid))
                    for rid in ids]
            outcomes = [(rid, *(future.result() for future in futures)) for rid, *futures in runs]
        stored = dict(StoredResponse.objects.values_list("response_id", "item_count"))
        for rid, *reads_and_writes in outcomes:
            first_read, _, second_read, deleted_once, deleted_twice, last_read = reads_and_writes
            with self.subTest(rid=rid):
                self.assertFalse(deleted_once and deleted_twice)  # one DELETE wins
                for seen in (first_read, second_read, last_read):
                    self.assertIn(seen, (None, self.ITEMS))  # all of it or nothing
                if deleted_once or deleted_twice:
                    self.assertNotIn(rid, stored)
                else:  # both deletes came before the save committed
                    self.assertEqual(stored[rid], self.ITEMS + 1)
        present = StoredResponse.objects.count()
        self.assertEqual(StoredInputItem.objects.count(), present * self.ITEMS)
        self.assertEqual(StoredInputItem.objects.exclude(response__in=StoredResponse.objects.all()).count(), 0)
        print(f"{len(ids) - present} of {len(ids)} responses deleted by the racing DELETEs")

    def test_a_chain_is_saved_while_the_response_it_follows_is_deleted(self):
        pairs = [(f"resp_first{n}", f"resp_next{n}") for n in range(30)]
        for first, _ in pairs:
            self.save(first)
        with ThreadPoolExecutor(8) as pool:
            saves = [pool.submit(self.save, second, first) for first, second in pairs]
            deletes = [pool.submit(self.delete, first) for first, _ in pairs]
            for future in [*saves, *deletes]:
                self.assertIn(future.result(), (None, True))
        for _, second in pairs:
            items = self.in_thread(store.conversation_before, self.key, second)
            self.assertEqual([item["id"] for item in items],
                             [*(f"{second}_m{n}" for n in range(self.ITEMS)), f"msg_out_{second}"])


class ProductionPathTests(SDKMixin, GatewayTestCase):
    """POST -> GET -> input_items -> DELETE with the official openai client, through the API
    handler (helper A's POST view saving through the store)."""

    async def test_create_retrieve_list_delete_and_another_key_gets_404_for_each(self):
        other, other_plaintext = await sync_to_async(APIKey.objects.create_key)("bob")
        client, stranger = self.sdk(), self.sdk(other_plaintext)
        created = await client.responses.create(
            model="m1", instructions="Be brief.",
            input=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": [{"type": "input_text", "text": "Again"}]}])
        retrieved = await client.responses.retrieve(created.id)
        self.assertEqual(retrieved.model_dump(), created.model_dump())
        listed = await client.responses.input_items.list(created.id, order="asc")
        self.assertEqual([(item.role, item.content[0].text) for item in listed.data],
                         [("user", "Hi"), ("assistant", "Hello."), ("user", "Again")])
        self.assertEqual((listed.first_id, listed.last_id, listed.has_more),
                         (listed.data[0].id, listed.data[-1].id, False))
        paged = [item.id async for item in client.responses.input_items.list(created.id, limit=1)]
        self.assertEqual(paged, [item.id for item in reversed(listed.data)])  # the SDK follows `after`
        for call in (stranger.responses.retrieve(created.id), stranger.responses.input_items.list(created.id),
                     stranger.responses.delete(created.id)):
            with self.assertRaises(openai.NotFoundError):
                await call
        self.assertIsNone(await client.responses.delete(created.id))  # the SDK answers None
        with self.assertRaises(openai.NotFoundError):
            await client.responses.retrieve(created.id)
        with self.assertRaises(openai.NotFoundError):
            await client.responses.create(model="m1", input="Next", previous_response_id=created.id)

    async def test_store_false_then_retrieve_is_404(self):
        created = await self.sdk().responses.create(model="m1", input="Hi", store=False)
        with self.assertRaises(openai.NotFoundError):
            await self.sdk().responses.retrieve(created.id)
        self.assertEqual(await StoredResponse.objects.acount(), 0)

    async def test_a_streamed_response_is_retrieved_as_its_final_event(self):
        client = self.sdk()
        async with client.responses.stream(model="m1", input="Hi") as stream:
            final = await stream.get_final_response()
        self.assertEqual((await client.responses.retrieve(final.id)).output_text, final.output_text)


# A gateway process on a throwaway PostgreSQL that goes down, then hangs ------------------------

E2E_MODEL = "demo-chat"


@pytest.fixture(scope="module")
def pg_gateway(tmp_path_factory) -> Iterator[tuple[Gateway, Postgres]]:
    tmp = tmp_path_factory.mktemp("store-outage")
    processes, gateway = [], None
    try:
        with postgres() as pg:
            controller_port, worker_port = free_port(), free_port()
            controller_url = f"http://127.0.0.1:{controller_port}"
            try:
                processes.append(start_controller(controller_port, log_path=tmp / "controller.log"))
                processes.append(start_demo_worker(worker_port, controller_url, [E2E_MODEL],
                                                   log_path=tmp / "worker.log"))
                wait_for_models(controller_url, [E2E_MODEL], timeout=20)
                gateway = start_gateway(tmp, controller_url, server="uvicorn", extra_env={
                    "DATABASE_URL": pg.url, "GATEWAY_KEY_CACHE_SECONDS": "0.5", "GATEWAY_KEY_GRACE_SECONDS": "120"})
                yield gateway, pg
            finally:
                if gateway is not None:
                    gateway.stop()
                for process in reversed(processes):
                    stop_process(process)
    except ServiceUnavailable as exc:
        require_service("PostgreSQL", False, str(exc))


def store_requests(response_id: str) -> list[tuple[str, str, dict | None]]:
    return [("GET", f"/v1/responses/{response_id}", None), ("GET", f"/v1/responses/{response_id}/input_items", None),
            ("DELETE", f"/v1/responses/{response_id}", None),
            ("POST", "/v1/responses", {"model": E2E_MODEL, "input": "And?", "previous_response_id": response_id,
                                       "max_output_tokens": 4})]


def assert_store_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert (body["error"]["code"], body["error"]["type"], body["object"]) == (
        "store_unavailable", "server_error", "error")
    assert int(response.headers["Retry-After"]) >= 1


def wait_until_served(client: httpx.Client, path: str) -> None:
    deadline = time.monotonic() + 30
    while (status := client.get(path).status_code) != 200:
        assert time.monotonic() < deadline, f"the store did not come back ({status})"
        time.sleep(0.2)


@pytest.mark.e2e
def test_postgresql_down_or_hung_the_store_answers_503_never_500(pg_gateway):
    gateway, pg = pg_gateway
    key = gateway.create_key("store-outage")
    with httpx.Client(base_url=gateway.url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        created = client.post("/v1/responses", json={"model": E2E_MODEL, "input": "Hi", "max_output_tokens": 4})
        assert created.status_code == 200, created.text
        response_id = created.json()["id"]
        assert client.get(f"/v1/responses/{response_id}").json() == created.json()
        pg.psql("CHECKPOINT")  # the throwaway server commits asynchronously: an immediate stop would lose it
        pg.stop()
        try:
            time.sleep(1)  # past GATEWAY_KEY_CACHE_SECONDS: the key is served from memory
            down = [(path, client.request(method, path, json=body)) for method, path, body in store_requests(response_id)]
        finally:
            start_again(pg)
        for _, response in down:
            assert_store_unavailable(response)
        wait_until_served(client, f"/v1/responses/{response_id}")

        pids = cluster_pids(pg)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            hung = client.get(f"/v1/responses/{response_id}")
            waited = time.monotonic() - started
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        print(f"PostgreSQL hung: {hung.status_code} after {waited:.1f} s")
        assert_store_unavailable(hung)
        assert store.STORE_TIMEOUT - 0.5 < waited < store.STORE_TIMEOUT + 3
        wait_until_served(client, f"/v1/responses/{response_id}/input_items")
        assert client.delete(f"/v1/responses/{response_id}").json()["deleted"] is True


class LimitTests(GatewayTestCase):
    async def test_request_limits_apply_but_no_budget_or_token_rate(self):
        await store.save(self.key, response("resp_abc", "A"), [message("msg_1", "Q")])
        await APIKey.objects.filter(pk=self.key.pk).aupdate(requests_per_minute=3, token_budget=0,
                                                           tokens_per_minute=1)
        key_cache.clear()
        self.assertError(await self.post("/v1/chat/completions", {"model": "m1", "messages": [
            {"role": "user", "content": "Hi"}]}), 429, code="insufficient_quota")  # the budget is spent
        # A refused request is not counted: three requests in the minute, then the fourth is refused.
        self.assertEqual((await self.get("/v1/responses/resp_abc")).status_code, 200)
        self.assertEqual((await self.get("/v1/responses/resp_abc/input_items")).status_code, 200)
        deleted = await self.async_client.delete("/v1/responses/resp_abc", headers=self.auth)
        self.assertEqual(deleted.status_code, 200, deleted.content)
        self.assertError(await self.get("/v1/responses/resp_abc"), 429, code="rate_limit_exceeded")
