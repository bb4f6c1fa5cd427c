"""The registry's admin and staff API (/api/upstreams/), and the secrecy of upstream API keys: after
keys are set through every path (the config file, the admin's add and change views, the API's
create and update) and the upstreams are listed, tested and discovered with every logger at DEBUG,
no key is found in any table, log record, admin page, API answer or /metrics."""
from __future__ import annotations

import logging
from io import StringIO
from unittest import mock

from asgiref.sync import async_to_sync
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import connection
from django.test import TestCase
from django.urls import reverse
from rest_framework.test import APIClient

from gateway_project import state
from tests.base import GatewayTestCase
from upstreams.base import DiscoveredModel, Probe
from upstreams.models import Upstream, UpstreamModel
from upstreams.status import ProbeResult

LIST = reverse("admin:upstreams_upstream_changelist")
ADD = reverse("admin:upstreams_upstream_add")


def change_url(upstream: Upstream) -> str:
    return reverse("admin:upstreams_upstream_change", args=[upstream.pk])


def form_data(**fields) -> dict:
    """The admin's add/change form, with its inline model formset."""
    data = {
        "name": "vllm", "kind": "openai", "base_url": "http://vllm:8000/v1", "api_key": "", "enabled": "on",
        "priority": "0", "weight": "1", "connect_timeout": "10", "first_byte_timeout": "100", "idle_timeout": "100",
        "max_concurrency": "", "extra_headers": "{}", "discover_models": "on",
        "models-TOTAL_FORMS": "0", "models-INITIAL_FORMS": "0", "models-MIN_NUM_FORMS": "0",
        "models-MAX_NUM_FORMS": "1000",
    }
    data.update(fields)
    return {name: value for name, value in data.items() if value is not None}


def make(name="vllm", key=None, **fields) -> Upstream:
    row = Upstream(name=name, kind=fields.pop("kind", "openai"), base_url=fields.pop("base_url", f"http://{name}:8000/v1"),
                   **fields)
    row.set_api_key(key)
    row.save_by()
    return row


class AdminTests(TestCase):
    def setUp(self) -> None:
        self.admin_user = User.objects.create_superuser("root", "root@example.com", None)
        self.client.force_login(self.admin_user)
        state.reset()
        self.addCleanup(state.reset)

    def test_adding_an_upstream_stores_its_key_encrypted_and_shows_only_its_last_four(self):
        response = self.client.post(ADD, form_data(api_key="sk-admin-added-key-7777", **{
            "models-TOTAL_FORMS": "1", "models-0-public_name": "llama-3-8b", "models-0-upstream_name": "llama3:8b",
            "models-0-capabilities": "tools, vision", "models-0-enabled": "on"}))
        self.assertEqual(response.status_code, 302, response.content[:3000])
        row = Upstream.objects.get()
        self.assertEqual(row.api_key(), "sk-admin-added-key-7777")
        model = row.models.get()
        self.assertEqual((model.public_name, model.upstream_name, model.capabilities, model.capabilities_by_hand),
                         ("llama-3-8b", "llama3:8b", ["tools", "vision"], True))
        page = self.client.get(change_url(row)).content.decode()
        self.assertIn("…7777", page)
        self.assertNotIn("sk-admin-added", page)

    def test_an_empty_key_field_keeps_the_key_and_clear_removes_it(self):
        row = make(key="sk-kept-key-1234")
        response = self.client.post(change_url(row), form_data(weight="4"))
        self.assertEqual(response.status_code, 302, response.content[:3000])
        row.refresh_from_db()
        self.assertEqual((row.weight, row.api_key()), (4, "sk-kept-key-1234"))
        self.client.post(change_url(row), form_data(api_key="sk-replaced-key-5678"))
        row.refresh_from_db()
        self.assertEqual(row.api_key(), "sk-replaced-key-5678")
        self.client.post(change_url(row), form_data(clear_api_key="on"))
        row.refresh_from_db()
        self.assertFalse(row.has_api_key)

    def test_invalid_input_is_shown_on_the_form_without_the_key(self):
        response = self.client.post(ADD, form_data(base_url="ftp://x/v1", api_key="sk-never-echoed-key-0000",
                                                   extra_headers='{"Authorization": "Bearer y"}', weight="5000"))
        self.assertEqual(response.status_code, 200)
        page = response.content.decode()
        self.assertIn("Enter an http:// or https:// URL.", page)
        self.assertIn("The gateway sets Authorization itself", page)
        self.assertNotIn("sk-never-echoed", page)
        self.assertFalse(Upstream.objects.exists())
        response = self.client.post(ADD, form_data(kind="fastchat", api_key="sk-never-echoed-key-0000"))
        self.assertContains(response, "A FastChat controller takes no API key.")
        self.assertNotIn("sk-never-echoed", response.content.decode())

    def test_the_list_shows_each_state_with_a_class_of_its_own(self):
        make("up")
        make("off", enabled=False)
        make("bad", key="sk-rejected-key-4444")
        from upstreams.status import Status

        def status_of(name, enabled=True, api_key=None):
            if not enabled:
                return Status("disabled")
            if name == "bad":
                return Status("credentials_rejected", 12.0, "401 Incorrect API key provided")
            return Status("healthy", 3.0)

        with mock.patch("upstreams.admin.status_of", side_effect=status_of):
            page = self.client.get(LIST).content.decode()
        self.assertIn('class="upstream-state upstream-state-credentials_rejected"', page)
        self.assertIn(">credentials rejected</span>", page)
        self.assertIn('class="upstream-state upstream-state-healthy"', page)
        self.assertIn('class="upstream-state upstream-state-disabled"', page)
        self.assertIn("401 Incorrect API key provided", page)
        self.assertIn("…4444", page)
        self.assertIn(".upstream-state-credentials_rejected {", page)  # its style is on the page

    def test_the_list_renders_with_the_real_health_module(self):
        make("up", key="sk-listed-key-3333")
        page = self.client.get(LIST)
        self.assertEqual(page.status_code, 200)
        self.assertRegex(page.content.decode(), r'upstream-state-(unknown|healthy|unreachable|cooling_down)')

    def test_the_admin_index_links_to_the_upstreams(self):
        self.assertContains(self.client.get(reverse("admin:index")), LIST)

    def test_test_now_reports_each_result(self):
        up, down = make("up"), make("down")
        results = {"up": ProbeResult(True, 5.0, None, ""), "down": ProbeResult(False, 1.0, "unreachable", "refused")}
        with mock.patch("upstreams.admin.test_now", side_effect=lambda row: results[row.name]):
            response = self.client.post(LIST, {"action": "test_now", "_selected_action": [up.pk, down.pk]}, follow=True)
        text = [str(message) for message in response.context["messages"]]
        self.assertIn("up: ok in 5 ms", text)
        self.assertIn("down: unreachable in 1 ms: refused", text)

    def test_discover_and_disable_actions_go_through_the_registry(self):
        row = make("up")
        with mock.patch("upstreams.discovery.list_models", return_value=[DiscoveredModel("m1")]):
            self.client.post(LIST, {"action": "discover_now", "_selected_action": [row.pk]})
        self.assertTrue(UpstreamModel.objects.filter(upstream=row, public_name="m1", discovered=True).exists())
        self.client.post(LIST, {"action": "disable", "_selected_action": [row.pk]})
        self.assertFalse(Upstream.objects.get().enabled)

    def test_an_edited_inline_capability_is_kept_from_discovery(self):
        row = make("up")
        from upstreams import discovery

        discovery.record(row, [DiscoveredModel("m1", frozenset({"tools"}))])
        model = row.models.get()
        self.client.post(change_url(row), form_data(name="up", base_url=row.base_url, **{
            "models-TOTAL_FORMS": "1", "models-INITIAL_FORMS": "1", "models-0-id": str(model.pk),
            "models-0-upstream": str(row.pk), "models-0-public_name": "m1", "models-0-upstream_name": "m1",
            "models-0-capabilities": "vision", "models-0-enabled": "on"}))
        model.refresh_from_db()
        self.assertEqual((model.capabilities, model.capabilities_by_hand), (["vision"], True))
        discovery.record(row, [DiscoveredModel("m1", frozenset({"tools"}))])
        model.refresh_from_db()
        self.assertEqual(model.capabilities, ["vision"])


class APITests(TestCase):
    def setUp(self) -> None:
        self.staff = User.objects.create_user("staff", is_staff=True)
        self.api = APIClient()
        self.api.force_login(User.objects.create_superuser("root", "root@example.com", None))
        state.reset()
        self.addCleanup(state.reset)

    def test_create_read_update_delete_with_a_write_only_key(self):
        response = self.api.post("/api/upstreams/", {
            "name": "vllm", "kind": "openai", "base_url": "http://vllm:8000/v1/", "api_key": "sk-api-created-1111",
            "priority": 5, "weight": 2, "extra_headers": {"X-Team": "r"}}, format="json")
        self.assertEqual(response.status_code, 201, response.content)
        body = response.json()
        self.assertEqual((body["api_key_last4"], body["base_url"], body["state"]["state"]), ("1111", "http://vllm:8000/v1",
                                                                                             body["state"]["state"]))
        self.assertNotIn("api_key", body)
        self.assertNotIn("sk-api-created", response.content.decode())
        pk = body["id"]
        self.assertEqual(Upstream.objects.get().api_key(), "sk-api-created-1111")
        response = self.api.patch(f"/api/upstreams/{pk}/", {"weight": 3}, format="json")
        self.assertEqual((response.status_code, response.json()["weight"]), (200, 3))
        self.assertEqual(Upstream.objects.get().api_key(), "sk-api-created-1111")  # left out: kept
        response = self.api.patch(f"/api/upstreams/{pk}/", {"api_key": None}, format="json")
        self.assertEqual(response.json()["api_key_last4"], "")
        response = self.api.post("/api/upstream-models/", {"upstream": "vllm", "public_name": "llama-3-8b",
                                                           "upstream_name": "llama3:8b", "capabilities": ["tools"]},
                                 format="json")
        self.assertEqual(response.status_code, 201, response.content)
        self.assertTrue(response.json()["capabilities_by_hand"])
        listed = self.api.get("/api/upstreams/").json()
        self.assertEqual(listed["results"][0]["models"][0]["upstream_name"], "llama3:8b")
        self.assertEqual(self.api.delete(f"/api/upstreams/{pk}/").status_code, 204)
        self.assertFalse(UpstreamModel.objects.exists())

    def test_bad_input_gets_400_naming_the_field(self):
        cases = [({"base_url": "ftp://x"}, "base_url"), ({"weight": -1}, "weight"), ({"priority": 5000}, "priority"),
                 ({"connect_timeout": 0}, "connect_timeout"), ({"extra_headers": {"Host": "x"}}, "extra_headers"),
                 ({"name": "a b"}, "name"), ({"kind": "fastchat", "api_key": "sk-x-1234"}, "kind"),
                 ({"api_key": "x" * 5000}, "api_key")]
        for fields, field in cases:
            data = {"name": "u", "kind": "openai", "base_url": "http://u:1/v1", **fields}
            with self.subTest(fields=str(fields)[:60]):
                response = self.api.post("/api/upstreams/", data, format="json")
                self.assertEqual(response.status_code, 400, response.content)
                self.assertIn(field, response.json())
        self.assertFalse(Upstream.objects.exists())
        make("u")
        response = self.api.post("/api/upstream-models/", {"upstream": "u", "public_name": "m", "upstream_name": "m",
                                                           "capabilities": ["telepathy"]}, format="json")
        self.assertEqual(response.status_code, 400)

    def test_model_permissions_decide_who_reads_and_who_writes(self):
        client = APIClient()
        client.force_login(self.staff)
        make("u")
        self.assertEqual(client.get("/api/upstreams/").status_code, 403)
        self.staff.user_permissions.add(Permission.objects.get(codename="view_upstream"))
        self.staff = User.objects.get(pk=self.staff.pk)
        client.force_login(self.staff)
        self.assertEqual(client.get("/api/upstreams/").status_code, 200)
        self.assertEqual(client.post("/api/upstreams/", {"name": "v", "kind": "openai",
                                                         "base_url": "http://v:1/v1"}, format="json").status_code, 403)
        self.assertEqual(client.post(f"/api/upstreams/{Upstream.objects.get().pk}/discover/").status_code, 403)
        nobody = APIClient()
        nobody.force_login(User.objects.create_user("user"))
        self.assertEqual(nobody.get("/api/upstreams/").status_code, 403)
        self.assertIn(APIClient().get("/api/upstreams/").status_code, (401, 403))

    def test_test_and_discover_actions(self):
        row = make("u")
        with mock.patch("upstreams.api.test_now", return_value=ProbeResult(False, 2.0, "credentials_rejected", "401")):
            self.assertEqual(self.api.post(f"/api/upstreams/{row.pk}/test/").json(),
                             {"ok": False, "latency_ms": 2.0, "failure": "credentials_rejected", "message": "401"})
        with mock.patch("upstreams.discovery.list_models", return_value=[DiscoveredModel("m1")]):
            self.assertEqual(self.api.post(f"/api/upstreams/{row.pk}/discover/").json(),
                             {"changes": ["discovered model u/m1"]})
        with mock.patch("upstreams.discovery.list_models", side_effect=ConnectionError("http://internal:1 refused")):
            response = self.api.post(f"/api/upstreams/{row.pk}/discover/")
        self.assertEqual(response.status_code, 502)
        self.assertNotIn("internal", response.content.decode())


class RecordEverything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{self.format(record)}\n{record.__dict__!r}")


class EchoingAdapter:
    """An upstream that rejects its key and echoes it in the error, as a careless server might."""

    kind = "openai"

    def __init__(self, spec) -> None:
        self.key = spec.api_key

    async def probe(self) -> Probe:
        return Probe(ok=False, latency_ms=4.0, failure="credentials", message=f"401: bad key {self.key}")

    async def list_models(self) -> list[DiscoveredModel]:
        return [DiscoveredModel("m-" + (self.key or "none")[-4:])]


class SecrecyTests(GatewayTestCase):
    """Upstream keys set through every path, then the registry used; each key is searched for everywhere."""

    def setUp(self) -> None:
        super().setUp()
        self.logs = self.capture_all_logging()
        self.admin_user = User.objects.create_superuser("root", "root@example.com", None)
        self.client.force_login(self.admin_user)
        self.api = APIClient()
        self.api.force_login(self.admin_user)
        self.pages: list[tuple[str, str]] = []
        self.secrets = {
            "config file": "sk-config-file-Secret-aaaa1111",
            "admin add": "sk-admin-add-Secret-bbbb2222",
            "admin change": "sk-admin-change-Secret-cccc3333",
            "API create": "sk-api-create-Secret-dddd4444",
            "API update": "sk-api-update-Secret-eeee5555",
        }
        adapter = mock.patch("upstreams.adapters.adapter_for", side_effect=EchoingAdapter)
        adapter.start()
        self.addCleanup(adapter.stop)
        self.set_keys()
        self.use_registry()

    def capture_all_logging(self) -> RecordEverything:
        handler = RecordEverything()
        loggers = [logging.getLogger()] + [
            logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
        for logger in loggers:
            self.addCleanup(setattr, logger, "level", logger.level)
            self.addCleanup(setattr, logger, "disabled", logger.disabled)
            logger.setLevel(logging.DEBUG)
            logger.disabled = False
            if logger is logging.getLogger() or not logger.propagate:
                logger.addHandler(handler)
                self.addCleanup(logger.removeHandler, handler)
        self.addCleanup(setattr, connection, "force_debug_cursor", connection.force_debug_cursor)
        connection.force_debug_cursor = True
        return handler

    def keep(self, where: str, response) -> None:
        self.pages.append((where, response.content.decode()))

    def set_keys(self) -> None:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "upstreams.yaml"
            path.write_text("upstreams:\n  - {name: from-file, kind: openai, base_url: 'http://f:1/v1', "
                            "api_key_env: FILE_KEY}\n")
            out = StringIO()
            with mock.patch.dict("os.environ", {"FILE_KEY": self.secrets["config file"]}):
                call_command("upstreams", "apply", str(path), stdout=out, stderr=out)
            self.pages.append(("apply's output", out.getvalue()))
        response = self.client.post(ADD, form_data(name="by-admin", api_key=self.secrets["admin add"]))
        self.assertEqual(response.status_code, 302)
        self.keep("the admin's add answer", response)
        row = Upstream.objects.get(name="by-admin")
        response = self.client.post(change_url(row), form_data(name="by-admin", api_key=self.secrets["admin change"]))
        self.assertEqual(response.status_code, 302)
        self.keep("the admin's change answer", response)
        response = self.client.post(ADD, form_data(name="refused", kind="fastchat", api_key=self.secrets["admin add"]))
        self.assertEqual(response.status_code, 200)  # a refused add shows the form again
        self.keep("the admin's refused add answer", response)
        response = self.api.post("/api/upstreams/", {"name": "by-api", "kind": "openai", "base_url": "http://a:1/v1",
                                                     "api_key": self.secrets["API create"]}, format="json")
        self.assertEqual(response.status_code, 201)
        self.keep("the API's create answer", response)
        response = self.api.patch(f"/api/upstreams/{response.json()['id']}/", {"api_key": self.secrets["API update"]},
                                  format="json")
        self.keep("the API's update answer", response)
        response = self.api.post("/api/upstreams/", {"name": "bad", "kind": "fastchat", "base_url": "http://a:1",
                                                     "api_key": self.secrets["API create"]}, format="json")
        self.assertEqual(response.status_code, 400)
        self.keep("the API's refusal", response)
        self.assertEqual({row.name: row.api_key() for row in Upstream.objects.all()}, {
            "from-file": self.secrets["config file"], "by-admin": self.secrets["admin change"],
            "by-api": self.secrets["API update"]})

    def use_registry(self) -> None:
        rows = list(Upstream.objects.all())
        ids = [row.pk for row in rows]
        self.keep("test now", self.client.post(LIST, {"action": "test_now", "_selected_action": ids}, follow=True))
        self.keep("discover", self.client.post(LIST, {"action": "discover_now", "_selected_action": ids}, follow=True))
        for row in rows:
            self.keep(f"the API's test of {row.name}", self.api.post(f"/api/upstreams/{row.pk}/test/"))
        out = StringIO()
        call_command("upstreams", "list", stdout=out)
        self.pages.append(("upstreams list", out.getvalue()))
        for page in [LIST, ADD, reverse("admin:index")] + [change_url(row) for row in rows]:
            response = self.client.get(page)
            self.assertEqual(response.status_code, 200, page)
            self.keep(f"the admin page {page}", response)
        for path in ["/api/upstreams/", "/api/upstream-models/", "/api/schema/"] + [f"/api/upstreams/{i}/" for i in ids]:
            response = self.api.get(path)
            self.assertEqual(response.status_code, 200, path)
            self.keep(f"the API answer {path}", response)
        get = async_to_sync(self.async_client.get)
        self.keep("GET /v1/models", get("/v1/models", headers=self.auth))
        metrics = get("/metrics")
        self.assertEqual(metrics.status_code, 200)
        self.keep("/metrics", metrics)

    def assertNowhere(self, haystack: str, where: str) -> None:
        for path, secret in self.secrets.items():
            self.assertNotIn(secret, haystack, f"the key set by {path} appears in {where}")
            self.assertNotIn(secret[3:-4], haystack, f"most of the key set by {path} appears in {where}")

    def test_the_keys_work_and_their_last_four_characters_are_shown(self):
        page = dict(self.pages)[f"the admin page {LIST}"]
        self.assertIn("…3333", page)  # the admin's changed key
        self.assertIn("…5555", page)
        self.assertIn("…1111", dict(self.pages)["upstreams list"])
        # the echoing upstream's error is shown, with the key cut out
        self.assertIn("401: bad key …", dict(self.pages)["test now"])

    def test_no_table_holds_a_key(self):
        dump = StringIO()
        call_command("dumpdata", stdout=dump)
        self.assertNowhere(dump.getvalue(), "dumpdata")
        with connection.cursor() as cursor:
            for table in connection.introspection.table_names(cursor):
                cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
                self.assertNowhere(repr(cursor.fetchall()), f"the table {table}")

    def test_no_log_record_holds_a_key(self):
        self.assertGreater(len(self.logs.records), 50)
        for text in self.logs.records:
            self.assertNowhere(text, f"a log record: {text[:300]}")

    def test_no_page_answer_or_metric_shows_a_key(self):
        self.assertGreater(len(self.pages), 15)
        for where, text in self.pages:
            self.assertNowhere(text, where)


class SchemaTests(TestCase):
    def test_the_schema_describes_the_registry_api_with_a_write_only_key(self):
        from rest_framework.test import APIClient as Client

        schema = Client().get("/api/schema/", {"format": "json"}).json()
        self.assertLessEqual({"/api/upstreams/", "/api/upstreams/{id}/", "/api/upstreams/{id}/test/",
                              "/api/upstreams/{id}/discover/", "/api/upstream-models/", "/api/upstream-models/{id}/"},
                             set(schema["paths"]))
        properties = schema["components"]["schemas"]["Upstream"]["properties"]
        self.assertTrue(properties["api_key"]["writeOnly"])
        self.assertTrue(properties["api_key_last4"]["readOnly"])
