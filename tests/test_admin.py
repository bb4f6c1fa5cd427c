"""The admin: keys (plaintext once, revoke, rotate, limits), usage list, CSV, dashboard, live view."""
from __future__ import annotations

import asyncio
import csv
import io
import re
import time
import unittest
from datetime import date, datetime, timedelta
from unittest import mock

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.apps import apps
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.contrib.sessions.models import Session
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from gateway_project.asgi import application
from keys import dashboard, live
from keys.hashing import hash_key
from keys.models import APIKey, UsageDaily, UsageRecord
from keys.usage import UsageEvent, usage_writer
from openai_api.auth import key_cache
from tests.base import GatewayTestCase

PLAINTEXT = re.compile(r"sk-[A-Za-z0-9_-]{43}")
KEYS = reverse("admin:keys_apikey_changelist")
ADD = reverse("admin:keys_apikey_add")
USAGE = reverse("admin:keys_usagerecord_changelist")
EXPORT = reverse("admin:keys_usage_export")
DASHBOARD = reverse("admin:keys_usage_dashboard")
LIVE = reverse("admin:keys_usage_live")
IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

KEY_FORM = {
    "name": "billing", "owner": "ops@example.com", "user": "", "allowed_models": "m1, m2 ,m1",
    "expires_at_0": "", "expires_at_1": "", "requests_per_minute": "60", "tokens_per_minute": "",
    "parallel_requests": "4", "token_budget": "", "budget_period": "month",
}


def record(key: APIKey, model: str = "m1", status: int = 200, request_id: str = "req-1", **fields) -> None:
    usage_writer.record(UsageEvent(key_id=key.pk, model=model, endpoint=CHAT, request_id=request_id,
                                   status=status, **fields))
    usage_writer.flush()


class AdminTestCase(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.staff = User.objects.create_superuser("root", "root@example.com", None)
        self.client.force_login(self.staff)

    def everything_stored(self) -> str:
        """Every row of every table, as text (sessions decoded), to look for a secret in."""
        rows = [str(list(model.objects.values())) for model in apps.get_models()]
        rows += [str(session.get_decoded()) for session in Session.objects.all()]
        return "\n".join(rows)

    def add_key(self, **fields) -> tuple[APIKey, str, object]:
        response = self.client.post(ADD, {**KEY_FORM, **fields})
        self.assertEqual(response.status_code, 200, response.content[:2000])
        plaintexts = PLAINTEXT.findall(response.content.decode())
        self.assertEqual(len(set(plaintexts)), 1)
        return APIKey.objects.get(name=fields.get("name", KEY_FORM["name"])), plaintexts[0], response


class KeyAdminTests(AdminTestCase):
    def test_it_shows_the_plaintext_once_and_stores_only_its_digest(self):
        key, plaintext, response = self.add_key()
        self.assertContains(response, "will not be shown again")
        self.assertIn("no-store", response["Cache-Control"])
        self.assertEqual(key.hashed_key, hash_key(plaintext))
        self.assertEqual(key.prefix, plaintext[:10])
        self.assertNotIn(plaintext, self.everything_stored())
        self.assertNotIn(plaintext, str(response.cookies))
        self.assertNotIn(plaintext, str(list(LogEntry.objects.values())))
        self.assertNotIn(plaintext, repr(response.context_data))  # the template engine logs it at DEBUG
        for url in (KEYS, reverse("admin:keys_apikey_change", args=[key.pk]),
                    reverse("admin:keys_apikey_history", args=[key.pk])):
            page = self.client.get(url, follow=True).content.decode()  # History: the key's audit trail
            self.assertNotIn(plaintext, page)
            self.assertNotIn(key.hashed_key, page)
            self.assertIn(key.prefix, page)

    def test_it_saves_limits_and_a_comma_separated_model_list(self):
        key, _, _ = self.add_key()
        self.assertEqual(key.allowed_models, ["m1", "m2"])
        self.assertEqual((key.requests_per_minute, key.parallel_requests, key.tokens_per_minute), (60, 4, None))
        self.assertEqual(key.owner, "ops@example.com")
        change = reverse("admin:keys_apikey_change", args=[key.pk])
        self.assertContains(self.client.get(change), 'value="m1, m2"')
        response = self.client.post(change, {**KEY_FORM, "allowed_models": "", "tokens_per_minute": "1000"})
        self.assertEqual(response.status_code, 302)
        key.refresh_from_db()
        self.assertEqual((key.allowed_models, key.tokens_per_minute), ([], 1000))
        self.assertContains(self.client.get(KEYS), "1,000 tok/min")

    def test_it_never_offers_the_digest(self):
        page = self.client.get(ADD).content.decode()
        self.assertNotIn("hashed_key", page)
        self.assertNotIn("hashed_key", self.client.get(reverse("admin:keys_apikey_change", args=[self.key.pk])).content.decode())
        response = self.client.get(KEYS, {"hashed_key__startswith": self.key.hashed_key[:4]})
        self.assertEqual(response.status_code, 400)

    def test_the_changelist_shows_prefix_models_limits_and_last_use(self):
        self.key.allowed_models, self.key.requests_per_minute = ["m1"], 5
        self.key.save()
        record(self.key)
        page = self.client.get(KEYS).content.decode()
        for text in (self.key.prefix, "alice", "m1", "5 req/min", "Requests (30 d)", "Last used at"):
            self.assertIn(text, page)
        self.assertIn(f"?key__id__exact={self.key.pk}", page)
        self.assertIsNotNone(APIKey.objects.get(pk=self.key.pk).last_used_at)

    async def test_it_revokes_keys_and_the_api_refuses_them_within_a_second(self):
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        await self.async_client.aforce_login(self.staff)
        response = await self.async_client.post(KEYS, {"action": "revoke", "_selected_action": [self.key.pk]})
        self.assertEqual(response.status_code, 302)
        self.assertIsNotNone((await APIKey.objects.aget(pk=self.key.pk)).revoked_at)
        later = time.monotonic() + 1.01
        with mock.patch.object(key_cache, "clock", lambda: later):
            self.assertError(await self.post(CHAT, BODY), 401, code="revoked_api_key")

    def test_it_rotates_a_key_after_confirmation(self):
        old_digest = self.key.hashed_key
        confirm = self.client.post(KEYS, {"action": "rotate", "_selected_action": [self.key.pk]})
        self.assertContains(confirm, "Yes, rotate")
        self.assertEqual(APIKey.objects.get(pk=self.key.pk).hashed_key, old_digest)
        response = self.client.post(KEYS, {"action": "rotate", "_selected_action": [self.key.pk], "confirm": "yes"})
        plaintext = PLAINTEXT.findall(response.content.decode())[0]
        self.key.refresh_from_db()
        self.assertEqual(self.key.hashed_key, hash_key(plaintext))
        self.assertNotEqual(plaintext, self.plaintext)
        self.assertNotIn(plaintext, self.everything_stored())
        self.assertNotIn(plaintext, self.client.get(KEYS).content.decode())

    def test_the_change_page_rotates_one_key(self):
        url = reverse("admin:keys_apikey_rotate", args=[self.key.pk])
        self.assertContains(self.client.get(reverse("admin:keys_apikey_change", args=[self.key.pk])), url)
        self.assertContains(self.client.get(url), "Yes, rotate")
        response = self.client.post(url, {"confirm": "yes"})
        plaintext = PLAINTEXT.findall(response.content.decode())[0]
        self.assertEqual(APIKey.objects.get(pk=self.key.pk).hashed_key, hash_key(plaintext))

    def test_revoked_keys_are_not_rotated(self):
        revoked = APIKey.objects.get(name="revoked")
        response = self.client.post(KEYS, {"action": "rotate", "_selected_action": [revoked.pk], "confirm": "yes"},
                                    follow=True)
        self.assertContains(response, "cannot be rotated")
        self.assertEqual(APIKey.objects.get(pk=revoked.pk).hashed_key, revoked.hashed_key)

    def test_revoking_and_rotating_update_the_change_time(self):
        before = self.key.updated_at
        self.client.post(KEYS, {"action": "revoke", "_selected_action": [self.key.pk]})
        self.key.refresh_from_db()
        self.assertGreater(self.key.updated_at, before)
        other, _ = APIKey.objects.create_key("other")
        before = other.updated_at
        self.client.post(KEYS, {"action": "rotate", "_selected_action": [other.pk], "confirm": "yes"})
        other.refresh_from_db()
        self.assertGreater(other.updated_at, before)
        self.assertTrue(LogEntry.objects.filter(object_id=str(self.key.pk), change_message="Revoked.").exists())

    def test_only_superusers_bind_a_key_to_a_user(self):
        editor = User.objects.create_user("editor", is_staff=True)
        editor.user_permissions.add(*Permission.objects.filter(codename__in=["view_apikey", "change_apikey"]))
        self.client.force_login(editor)
        change = reverse("admin:keys_apikey_change", args=[self.key.pk])
        self.assertNotContains(self.client.get(change), 'name="user"')
        self.client.post(change, {**KEY_FORM, "user": self.staff.pk})
        self.key.refresh_from_db()
        self.assertIsNone(self.key.user)
        self.client.force_login(self.staff)
        self.assertContains(self.client.get(change), 'name="user"')

    def test_the_state_filter(self):
        revoked = APIKey.objects.get(name="revoked")
        page = self.client.get(KEYS, {"state": "revoked"}).content.decode()
        self.assertIn(revoked.prefix, page)
        self.assertNotIn(self.key.prefix, page)
        page = self.client.get(KEYS, {"state": "active"}).content.decode()
        self.assertIn(self.key.prefix, page)
        self.assertNotIn(revoked.prefix, page)


class UsageAdminTests(AdminTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.other, _ = APIKey.objects.create_key("bob")
        record(self.key, "m1", 200, "req-ok", prompt_tokens=5, completion_tokens=7)
        record(self.key, "m2", 502, "req-upstream", error_code="upstream_error")
        record(self.other, "m1", 429, "req-limited")
        old = timezone.now() - timedelta(days=40)
        record(self.other, "m2", 200, "req-old", created_at=old)

    def shown(self, **params) -> set[str]:
        response = self.client.get(USAGE, params)
        self.assertEqual(response.status_code, 200)
        return set(re.findall(r"req-[a-z]+", response.content.decode()))

    def test_it_lists_usage_read_only(self):
        self.assertEqual(self.shown(), {"req-ok", "req-upstream", "req-limited", "req-old"})
        page = self.client.get(USAGE).content.decode()
        self.assertNotIn(reverse("admin:keys_usagerecord_add"), page)
        row = UsageRecord.objects.get(request_id="req-ok")
        change = self.client.get(reverse("admin:keys_usagerecord_change", args=[row.pk]))
        self.assertNotContains(change, 'name="_save"')
        self.assertEqual(self.client.post(reverse("admin:keys_usagerecord_delete", args=[row.pk])).status_code, 403)

    def test_it_filters_by_key_model_status_and_date(self):
        self.assertEqual(self.shown(key__id__exact=self.key.pk), {"req-ok", "req-upstream"})
        self.assertEqual(self.shown(model="m2"), {"req-upstream", "req-old"})
        self.assertEqual(self.shown(status_class="5xx"), {"req-upstream"})
        self.assertEqual(self.shown(status_class="429"), {"req-limited"})
        self.assertEqual(self.shown(status_class="ok"), {"req-ok", "req-old"})
        today = timezone.now()
        self.assertEqual(self.shown(created_at__year=today.year, created_at__month=today.month, created_at__day=today.day),
                         {"req-ok", "req-upstream", "req-limited"})
        self.assertEqual(self.shown(q="req-limited"), {"req-limited"})

    async def read_csv(self, params: dict) -> list[dict]:
        await self.async_client.aforce_login(self.staff)
        response = await self.async_client.get(EXPORT, params)
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["Content-Type"], "text/csv; charset=utf-8")
        self.assertIn("attachment;", response["Content-Disposition"])
        body = b"".join([chunk async for chunk in response.streaming_content]).decode()
        return list(csv.DictReader(io.StringIO(body)))

    async def test_the_csv_export_honours_the_filters(self):
        rows = await self.read_csv({"key__id__exact": self.key.pk, "model": "m1"})
        self.assertEqual(len(rows), 1)
        row = rows[0]
        self.assertEqual((row["request_id"], row["key__name"], row["model"], row["status"]), ("req-ok", "alice", "m1", "200"))
        self.assertEqual((row["prompt_tokens"], row["completion_tokens"], row["streamed"]), ("5", "7", "False"))
        self.assertEqual(len(await self.read_csv({})), 4)

    async def test_the_csv_export_streams_in_chunks(self):
        with mock.patch("keys.admin.CSV_CHUNK_ROWS", 2):
            rows = await self.read_csv({"o": "-1"})
        self.assertEqual(len(rows), 4)

    def test_the_export_action_exports_the_selected_rows(self):
        ids = list(UsageRecord.objects.filter(status__gte=400).values_list("pk", flat=True))
        response = self.client.post(USAGE, {"action": "export_selected", "_selected_action": ids})
        with self.assertWarns(Warning):  # the sync test client reads the async stream at once
            body = b"".join(response).decode()
        self.assertEqual({row["request_id"] for row in csv.DictReader(io.StringIO(body))}, {"req-upstream", "req-limited"})

    async def test_the_export_neutralises_cells_a_spreadsheet_would_run_as_formulas(self):
        formula = '=HYPERLINK("http://x","y")'
        await sync_to_async(record)(self.key, formula, 200, "req-formula", prompt_tokens=3)
        await sync_to_async(record)(self.key, "@SUM(1)", 200, "req-at")
        await sync_to_async(record)(self.key, "-1", 200, "req-number")
        rows = {row["request_id"]: row for row in await self.read_csv({})}
        self.assertEqual(rows["req-formula"]["model"], "'" + formula)
        self.assertEqual(rows["req-at"]["model"], "'@SUM(1)")
        self.assertEqual(rows["req-number"]["model"], "-1")  # a number stays a number
        self.assertEqual(rows["req-formula"]["prompt_tokens"], "3")

    def test_cells_starting_with_each_formula_character_are_neutralised(self):
        from keys.spreadsheet import safe_row

        self.assertEqual(safe_row(["=1+1", "+A1", "-A1", "@A1", "\tx", "\rx", "ok", "", 5, -5, "-5", "+1.5e3", None]),
                         ["'=1+1", "'+A1", "'-A1", "'@A1", "'\tx", "'\rx", "ok", "", 5, -5, "-5", "+1.5e3", None])

    def test_the_changelist_links_the_export_with_its_filters(self):
        self.assertContains(self.client.get(USAGE, {"model": "m1"}), f"{EXPORT}?model=m1")


class PruneUsageTests(AdminTestCase):
    def test_it_deletes_rows_older_than_the_retention_and_keeps_the_rollups(self):
        record(self.key, request_id="req-new")
        record(self.key, request_id="req-old", created_at=timezone.now() - timedelta(days=91))
        out = io.StringIO()
        with override_settings(USAGE_RETENTION_DAYS=90):
            call_command("prune_usage", stdout=out)
        self.assertIn("Deleted 1 usage row(s) older than 90 day(s).", out.getvalue())
        self.assertEqual(list(UsageRecord.objects.values_list("request_id", flat=True)), ["req-new"])
        self.assertEqual(UsageDaily.objects.count(), 2)
        call_command("prune_usage", "--days", "1", stdout=io.StringIO())
        self.assertEqual(UsageRecord.objects.count(), 1)
        with self.assertRaises(CommandError):
            call_command("prune_usage", "--days", "0")


class DashboardTests(AdminTestCase):
    def test_it_charts_requests_and_tokens_per_day_key_and_model(self):
        bob, _ = APIKey.objects.create_key("bob")
        today = timezone.now().date()
        UsageDaily.objects.create(key=self.key, model="m1", day=today, requests=10, errors=2, prompt_tokens=100,
                                  completion_tokens=50)
        UsageDaily.objects.create(key=bob, model="m2", day=today - timedelta(days=3), requests=4, prompt_tokens=3000)
        UsageDaily.objects.create(key=bob, model="m2", day=today - timedelta(days=45), requests=999)
        response = self.client.get(DASHBOARD)
        self.assertEqual(response.status_code, 200)
        self.assertContains(response, 'role="img"', count=6)
        for text in ("Requests per day", "Tokens per key", f"alice ({self.key.prefix}…)", "<title>m2: 3,000</title>",
                     "<li>Requests<b>14</b>", "<li>Tokens<b>3,150</b>", "<li>Error rate<b>14.3%</b>"):
            self.assertContains(response, text)
        self.assertContains(self.client.get(DASHBOARD, {"days": "90"}), "<li>Requests<b>1,013</b>")

    def test_it_renders_without_data(self):
        response = self.client.get(DASHBOARD, {"days": "nonsense"})
        self.assertContains(response, "No usage in this period.")
        self.assertEqual(response.context["days"], dashboard.DEFAULT_DAYS)

    def test_the_numbers(self):
        bob, _ = APIKey.objects.create_key("bob")
        day = date(2025, 3, 10)
        UsageDaily.objects.create(key=self.key, model="m1", day=day, requests=3, prompt_tokens=10, completion_tokens=1)
        UsageDaily.objects.create(key=bob, model="m1", day=day, requests=1, prompt_tokens=500)
        UsageDaily.objects.create(key=bob, model="m2", day=day - timedelta(days=1), requests=3, errors=1)
        context = dashboard.dashboard_context(days=7, today=day)
        self.assertEqual(context["totals"]["requests"], 7)
        self.assertEqual(context["totals"]["tokens"], 511)
        requests_per_key, tokens_per_key, requests_per_model, _ = context["breakdowns"]
        self.assertEqual([rect.title for rect in requests_per_key.rects][0], f"bob ({bob.prefix}…): 4")
        self.assertEqual(tokens_per_key.rects[0].title, f"bob ({bob.prefix}…): 500")
        self.assertEqual([rect.title for rect in requests_per_model.rects], ["m1: 4", "m2: 3"])
        requests_per_day = context["charts"][0]
        self.assertEqual([rect.title for rect in requests_per_day.rects],
                         ["Mar 09: 2 succeeded", "Mar 09: 1 failed", "Mar 10: 4 succeeded"])
        self.assertEqual([dashboard.nice_ceiling(v) for v in (0, 7, 10, 11, 3100)], [0, 10, 10, 20, 5000])
        self.assertEqual(dashboard.compact(2_500_000), "2.5M")


class AccessTests(AdminTestCase):
    def test_non_staff_are_sent_to_the_login_page(self):
        self.client.force_login(User.objects.create_user("eve"))
        for url in (KEYS, ADD, USAGE, EXPORT, DASHBOARD, LIVE, reverse("admin:keys_apikey_rotate", args=[self.key.pk])):
            response = self.client.get(url)
            self.assertEqual(response.status_code, 302, url)
            self.assertIn(reverse("admin:login"), response["Location"])

    def test_staff_without_permissions_are_refused(self):
        self.client.force_login(User.objects.create_user("intern", is_staff=True))
        for url in (KEYS, USAGE, EXPORT, DASHBOARD, LIVE, reverse("admin:keys_apikey_rotate", args=[self.key.pk])):
            self.assertEqual(self.client.get(url).status_code, 403, url)

    def test_staff_may_view_without_changing(self):
        viewer = User.objects.create_user("viewer", is_staff=True)
        viewer.user_permissions.add(*Permission.objects.filter(codename__in=["view_apikey", "view_usagerecord"]))
        self.client.force_login(viewer)
        for url in (KEYS, USAGE, DASHBOARD, LIVE):
            self.assertEqual(self.client.get(url).status_code, 200, url)
        self.client.post(KEYS, {"action": "revoke", "_selected_action": [self.key.pk]})
        self.assertIsNone(APIKey.objects.get(pk=self.key.pk).revoked_at)
        self.assertEqual(self.client.get(reverse("admin:keys_apikey_rotate", args=[self.key.pk])).status_code, 403)


class LiveSocket:
    async def connect(self, user: User | None) -> WebsocketCommunicator:
        headers = [(b"origin", b"http://testserver"), (b"host", b"testserver")]
        if user is not None:
            await self.async_client.aforce_login(user)
            headers.append((b"cookie", f"sessionid={self.async_client.cookies['sessionid'].value}".encode()))
        return WebsocketCommunicator(application, "/ws/admin/usage/", headers=headers)

    async def test_staff_see_each_request_as_it_finishes(self):
        communicator = await self.connect(self.staff)
        connected, _ = await communicator.connect(timeout=3)
        self.assertTrue(connected)
        try:
            response = await self.post(CHAT, BODY)
            event = await communicator.receive_json_from(timeout=3)
        finally:
            await communicator.disconnect()
        self.assertEqual(event["request_id"], response["X-Request-ID"])
        self.assertEqual((event["key"], event["model"], event["status"], event["endpoint"]),
                         (str(self.key), "m1", 200, CHAT))
        self.assertGreater(event["completion_tokens"], 0)
        datetime.fromisoformat(event["created_at"])


@override_settings(CHANNEL_LAYERS=IN_MEMORY)
class LiveViewTests(LiveSocket, AdminTestCase):

    async def test_anonymous_users_are_refused(self):
        communicator = await self.connect(None)
        connected, _ = await communicator.connect(timeout=3)
        self.assertFalse(connected)

    async def test_non_staff_users_are_refused(self):
        user = await sync_to_async(User.objects.create_user)("eve")
        communicator = await self.connect(user)
        connected, _ = await communicator.connect(timeout=3)
        self.assertFalse(connected)

    async def test_other_origins_are_refused(self):
        communicator = await self.connect(self.staff)
        communicator.scope["headers"] = [(b"origin", b"http://evil.example") if name == b"origin" else (name, value)
                                         for name, value in communicator.scope["headers"]]
        connected, _ = await communicator.connect(timeout=3)
        self.assertFalse(connected)

    async def test_nothing_is_sent_when_nobody_watches(self):
        with mock.patch("channels.layers.InMemoryChannelLayer.group_send") as group_send:
            usage_writer.record(UsageEvent(key_id=self.key.pk, model="m1", endpoint=CHAT, request_id="r", status=200))
        group_send.assert_not_called()
        self.assertEqual(live._tasks, set())

    def test_events_recorded_outside_an_event_loop_are_skipped(self):
        live.push_usage_event(UsageEvent(key_id=self.key.pk, model="m1", endpoint=CHAT, request_id="r", status=200))
        self.assertEqual(live._tasks, set())

    def test_the_live_page_opens_the_websocket(self):
        self.assertContains(self.client.get(LIVE), "/ws/admin/usage/")


class RedisLiveViewTests(LiveSocket, AdminTestCase):
    """The channel layer of several processes: events travel through Redis."""

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        try:  # tests/services.py: throwaway Redis (and PostgreSQL) servers for the tests
            from tests.services import ServiceUnavailable, redis_server, under_services_wrapper
        except ImportError as exc:
            raise unittest.SkipTest(f"no tests.services: {exc}") from None
        url = settings.REDIS_URL if settings.REDIS_URL and under_services_wrapper() else None
        if url is None:
            try:
                url = cls.enterClassContext(redis_server()).url
            except ServiceUnavailable as exc:
                raise unittest.SkipTest(str(exc)) from None
        layers = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [url]}}}
        cls.enterClassContext(override_settings(CHANNEL_LAYERS=layers))

    def setUp(self) -> None:
        super().setUp()
        patcher = mock.patch.object(live, "presence", live.WatcherPresence())  # no answer from earlier tests
        patcher.start()
        self.addCleanup(patcher.stop)

    async def settle(self) -> None:
        """Let the presence read that has_watchers started land."""
        while live._tasks:
            await asyncio.gather(*live._tasks, return_exceptions=True)

    async def record_event(self) -> None:
        usage_writer.record(UsageEvent(key_id=self.key.pk, model="m1", endpoint=CHAT, request_id="r", status=200))
        await self.settle()

    async def test_nothing_goes_to_redis_per_request_when_nobody_watches(self):
        layer = get_channel_layer()
        await layer.connection(0).delete(live.PRESENCE_KEY)
        self.assertTrue(live.has_watchers(layer))  # unknown until the first read
        await self.settle()
        with mock.patch.object(type(layer), "group_send") as group_send:
            for _ in range(5):
                await self.record_event()
        group_send.assert_not_called()

    async def test_a_watcher_on_another_replica_gets_events_within_a_second(self):
        layer = get_channel_layer()
        await layer.connection(0).delete(live.PRESENCE_KEY)
        live.has_watchers(layer)
        await self.settle()
        self.assertFalse(live.has_watchers(layer))
        # What LiveUsageConsumer.connect does in another process.
        await layer.connection(0).zadd(live.PRESENCE_KEY, {"elsewhere!abc": time.time() + live.PRESENCE_TTL})
        live.presence.checked_at -= live.PRESENCE_RECHECK  # a second later
        live.has_watchers(layer)
        await self.settle()
        with mock.patch.object(type(layer), "group_send") as group_send:
            await self.record_event()
        group_send.assert_called_once()
        # An entry of a process that died without leaving expires.
        await layer.connection(0).zadd(live.PRESENCE_KEY, {"elsewhere!abc": time.time() - 1})
        live.presence.checked_at -= live.PRESENCE_RECHECK
        live.has_watchers(layer)
        await self.settle()
        self.assertFalse(live.has_watchers(layer))

    async def test_sockets_announce_themselves_and_leave(self):
        layer = get_channel_layer()
        communicator = await self.connect(self.staff)
        connected, _ = await communicator.connect(timeout=3)
        self.assertTrue(connected)
        try:
            members = await layer.connection(0).zrange(live.PRESENCE_KEY, 0, -1, withscores=True)
            self.assertEqual(len(members), 1)
            self.assertGreater(members[0][1], time.time() + live.PRESENCE_TTL - 5)
        finally:
            await communicator.disconnect()
        self.assertEqual(await layer.connection(0).zcard(live.PRESENCE_KEY), 0)

    async def test_events_are_sent_while_redis_cannot_say(self):
        layer = get_channel_layer()
        live.presence.watched = False
        with mock.patch.object(type(layer), "connection", side_effect=ConnectionError("down")), \
                mock.patch.object(live, "_last_warning", float("-inf")), self.assertLogs("keys.live", "WARNING"):
            live.has_watchers(layer)
            await self.settle()
        self.assertTrue(live.presence.watched)
