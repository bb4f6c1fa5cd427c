"""A key's plaintext is shown once, when it is made, and appears nowhere afterwards.

Keys are made through every path (the create_api_key and import_api_keys commands, the admin's
add view, the REST API's create and rotate) and used for successful and failing requests with
every logger at DEBUG and SQL logged; then each plaintext is searched for in every table, every
log record, the admin pages and every REST response that followed its creation.
"""
from __future__ import annotations

import logging
import re
from io import StringIO

from asgiref.sync import async_to_sync
from django.contrib import admin
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.db import connection
from django.urls import NoReverseMatch, reverse
from rest_framework.test import APIClient

from keys.hashing import generate_key
from keys.models import APIKey
from keys.usage import usage_writer
from tests.base import GatewayTestCase

PLAINTEXT = re.compile(r"sk-[A-Za-z0-9_-]{32,}")
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


class RecordEverything(logging.Handler):
    """Keeps every record: its formatted text (with traceback) and all its attributes."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.records: list[tuple[str, str]] = []  # (logger name, everything the record holds)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, f"{self.format(record)}\n{record.__dict__!r}"))


def read(response) -> str:
    """A response's body, streamed (the admin's CSV export streams asynchronously) or not."""
    if not response.streaming:
        return response.content.decode()
    if response.is_async:
        async def chunks() -> list[bytes]:
            return [chunk async for chunk in response.streaming_content]

        return b"".join(async_to_sync(chunks)()).decode()
    return b"".join(response.streaming_content).decode()


class SecrecyTests(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.logs = self.capture_all_logging()
        self.admin_user = User.objects.create_superuser("root", "root@example.com", None)
        self.api = APIClient()
        self.api.force_login(self.admin_user)
        self.responses: list[str] = []  # every REST and admin response after the keys were made
        self.secrets = {
            "create_api_key": self.create_with_command(),
            "import_api_keys": self.import_with_command(),
            "admin add view": self.create_in_admin(),
            "REST create (then rotated away)": self.create_with_api(),
        }
        self.secrets["REST rotate"] = self.rotate_with_api(self.secrets["REST create (then rotated away)"])
        for plaintext in self.secrets.values():
            self.use(plaintext)
        self.use_as_staff(self.secrets["REST rotate"])
        usage_writer.flush()
        self.browse_api()

    def capture_all_logging(self) -> RecordEverything:
        """Route every logger, at DEBUG, to one handler, and log SQL, until the test ends."""
        handler = RecordEverything()
        loggers = [logging.getLogger()] + [
            logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)
        ]
        for logger in loggers:
            self.addCleanup(setattr, logger, "level", logger.level)
            self.addCleanup(setattr, logger, "disabled", logger.disabled)
            logger.setLevel(logging.DEBUG)
            logger.disabled = False
            if logger is logging.getLogger() or not logger.propagate:
                logger.addHandler(handler)
                self.addCleanup(logger.removeHandler, handler)
        self.addCleanup(setattr, connection, "force_debug_cursor", connection.force_debug_cursor)
        connection.force_debug_cursor = True  # django.db.backends logs every query at DEBUG
        return handler

    # Making keys, one path each.

    def create_with_command(self) -> str:
        out, err = StringIO(), StringIO()
        call_command("create_api_key", "by-command", "--rpm", "100", stdout=out, stderr=err)
        plaintext = out.getvalue().strip().splitlines()[-1]
        self.assertNotIn(plaintext, err.getvalue())
        return plaintext

    def import_with_command(self) -> str:
        plaintext = generate_key()
        out = StringIO()
        call_command("import_api_keys", plaintext, stdout=out, stderr=out)
        self.assertNotIn(plaintext, out.getvalue())
        return plaintext

    def create_in_admin(self) -> str:
        """The admin shows the plaintext in the response to the creating POST, its one appearance."""
        self.client.force_login(self.admin_user)
        response = self.client.post(reverse("admin:keys_apikey_add"), {
            "name": "by-admin", "owner": "", "user": "", "allowed_models": "", "expires_at_0": "", "expires_at_1": "",
            "requests_per_minute": "", "tokens_per_minute": "", "parallel_requests": "", "token_budget": "",
            "budget_period": "month",
        })
        self.assertIn(response.status_code, (200, 302), response.content[:2000])
        found = PLAINTEXT.findall(response.content.decode())
        self.assertEqual(len(set(found)), 1, "the admin's add response should show the new key once")
        self.assertTrue(APIKey.objects.filter(name="by-admin").exists())
        return found[0]

    def create_with_api(self) -> str:
        response = self.api.post("/api/keys/", {"name": "by-api", "user": self.admin_user.pk}, format="json")
        self.assertEqual(response.status_code, 201, response.content)
        return response.json()["key"]

    def rotate_with_api(self, plaintext: str) -> str:
        key = APIKey.objects.get(name="by-api")
        response = self.api.post(f"/api/keys/{key.pk}/rotate/")
        self.assertEqual(response.status_code, 200, response.content)
        self.assertNotIn(plaintext, response.content.decode())
        return response.json()["key"]

    # Using them.

    def use(self, plaintext: str) -> None:
        """Successful and failing OpenAI requests (the old, rotated-away key gets 401s)."""
        auth = {"Authorization": f"Bearer {plaintext}"}
        get, post = async_to_sync(self.async_client.get), async_to_sync(self.async_client.post)
        get("/v1/models", headers=auth)
        post("/v1/chat/completions", CHAT, content_type="application/json", headers=auth)
        post("/v1/chat/completions", {**CHAT, "stream": True}, content_type="application/json", headers=auth)
        post("/v1/chat/completions", {**CHAT, "temperature": 9}, content_type="application/json", headers=auth)
        post("/v1/chat/completions", {**CHAT, "model": "nope"}, content_type="application/json", headers=auth)
        post("/v1/chat/completions", b"{not json", content_type="application/json", headers=auth)
        self.fake.generate_status = 500
        post("/v1/chat/completions", CHAT, content_type="application/json", headers=auth)
        self.fake.generate_status = 200
        get("/v1/models", headers={"Authorization": f"Bearer {plaintext}x"})

    def use_as_staff(self, plaintext: str) -> None:
        """The key-management API with a staff user's key, and with a wrong one."""
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
        self.assertEqual(client.get("/api/keys/").status_code, 200)
        self.responses.append(client.get("/api/keys/").content.decode())
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}x")
        self.assertEqual(client.get("/api/keys/").status_code, 401)

    def browse_api(self) -> None:
        keys = list(APIKey.objects.all())
        paths = ["/api/keys/", "/api/keys/usage/", "/api/schema/"]
        for key in keys:
            paths += [f"/api/keys/{key.pk}/", f"/api/keys/{key.pk}/usage/"]
        for path in paths:
            response = self.api.get(path)
            self.assertEqual(response.status_code, 200, path)
            self.responses.append(response.content.decode())
        rotated = APIKey.objects.get(name="by-api")
        self.responses.append(self.api.patch(f"/api/keys/{rotated.pk}/", {"owner": "ops"}, format="json").content.decode())
        self.responses.append(self.api.post(f"/api/keys/{self.key.pk}/revoke/").content.decode())

    # Looking for them.

    def assertNowhere(self, haystack: str, where: str) -> None:
        for path, plaintext in self.secrets.items():
            self.assertFalse(plaintext in haystack, f"the key made by {path} appears in {where}")

    def test_every_path_made_a_distinct_working_key(self):
        self.assertEqual(len(set(self.secrets.values())), 5)
        for plaintext in self.secrets.values():
            self.assertRegex(plaintext, PLAINTEXT)
        statuses = [async_to_sync(self.async_client.get)("/v1/models", headers={"Authorization": f"Bearer {p}"})
                    .status_code for p in self.secrets.values()]
        self.assertEqual(statuses, [200, 200, 200, 401, 200])  # the rotated-away key is refused

    def test_no_table_holds_a_plaintext(self):
        dump = StringIO()
        call_command("dumpdata", stdout=dump)
        self.assertNowhere(dump.getvalue(), "dumpdata")
        with connection.cursor() as cursor:
            for table in connection.introspection.table_names(cursor):
                cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
                self.assertNowhere(repr(cursor.fetchall()), f"the table {table}")
        sessions = [session.get_decoded() for session in Session.objects.all()]
        self.assertNowhere(repr(sessions), "a decoded session")

    def test_no_log_record_holds_a_plaintext(self):
        loggers = {name for name, _ in self.logs.records}
        self.assertTrue({"django.db.backends", "django.request"} <= loggers, loggers)  # everything reached us
        for name, text in self.logs.records:
            self.assertNowhere(text, f"a record of the logger {name!r}: {text[:300]}")

    def test_no_admin_page_shows_a_plaintext(self):
        self.client.force_login(self.admin_user)
        pages = [reverse("admin:index")]
        for model in admin.site._registry:
            if model._meta.app_label == "keys":
                pages.append(reverse(f"admin:keys_{model._meta.model_name}_changelist"))
        pages += [reverse("admin:keys_apikey_change", args=[key.pk]) for key in APIKey.objects.all()]
        for name in ("admin:keys_usage_dashboard",):
            try:
                pages.append(reverse(name))
            except NoReverseMatch:
                pass
        for page in pages:
            response = self.client.get(page)
            self.assertEqual(response.status_code, 200, page)
            self.assertNowhere(read(response), f"the admin page {page}")

    def test_no_rest_response_after_creation_shows_a_plaintext(self):
        self.assertGreater(len(self.responses), 10)
        self.assertNowhere("\n".join(self.responses), "a REST response")
