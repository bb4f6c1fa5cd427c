"""The audit trail: every mutation path (admin, REST API, commands, console, bulk updates) leaves
exactly one entry with the right actor, origin and diff and no plaintext secret; nothing can
change or delete an entry (model, queryset, admin, database triggers); the API path writes none."""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from datetime import timedelta
from decimal import Decimal
from unittest import mock

from asgiref.sync import sync_to_async
from cryptography.fernet import Fernet
from django import forms
from django.conf import settings
from django.contrib.auth.models import Group, Permission, User
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction
from django.test import TestCase, override_settings
from django.urls import reverse
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework.test import APIClient

from keys import audit
from keys.audit.models import AuditEntry, AuditEntryImmutable
from keys.hashing import hash_key
from keys.models import APIKey, Membership, Price, Team
from keys.usage import UsageEvent, usage_writer
from openai_api.management.commands.openai_api_server import Command as ServerCommand
from tests.base import GatewayTestCase

PLAINTEXT = re.compile(r"sk-[A-Za-z0-9_-]{43}")
TRAIL = reverse("admin:keys_auditentry_changelist")
EXPORT = reverse("admin:keys_audit_export")
REQUEST_ID = "req-audit-0123456789"
REDACTED = audit.REDACTED


def form_data(response) -> dict:
    """What a browser would send back from an admin change page, unchanged."""
    form = response.context["adminform"].form
    data = {}
    for name, field in form.fields.items():
        if field.disabled:
            continue
        value = field.prepare_value(form[name].value())
        widget = getattr(field.widget, "widget", field.widget)
        if isinstance(widget, forms.MultiWidget):
            parts = value if isinstance(value, (list, tuple)) else widget.decompress(value)
            for index, part in enumerate(parts):
                data[f"{name}_{index}"] = "" if part is None else str(part)
        elif isinstance(widget, forms.CheckboxInput):
            if value:
                data[name] = "on"
        elif isinstance(value, (list, tuple)):
            data[name] = [str(item) for item in value]
        else:
            data[name] = "" if value is None else str(value)
    return data


class AuditAssertions:
    def mark(self) -> None:
        self.last_id = AuditEntry.objects.order_by("-id").values_list("id", flat=True).first() or 0

    def new_entries(self) -> list[AuditEntry]:
        return list(AuditEntry.objects.filter(id__gt=self.last_id).order_by("id"))

    def assertOneEntry(self, obj, action: str, origin: str, actor=None, key=None, secrets=()) -> AuditEntry:
        entries = self.new_entries()
        self.assertEqual([(e.object_type, e.object_id, e.action) for e in entries],
                         [(obj._meta.label_lower, str(obj.pk), action)], [e.changes for e in entries])
        entry = entries[0]
        self.assertEqual(entry.origin, origin)
        self.assertEqual(entry.actor_user, actor)
        self.assertEqual(entry.actor_key, key)
        self.assertNoSecret(entry, *secrets)
        self.mark()
        return entry

    def assertNoSecret(self, entry: AuditEntry, *secrets: str) -> None:
        text = json.dumps([getattr(entry, field.attname) for field in AuditEntry._meta.concrete_fields],
                          default=str)
        for secret in secrets:
            self.assertTrue(secret)
            self.assertNotIn(secret, text)
        self.assertIsNone(PLAINTEXT.search(text), text)


class AdminPathTests(AuditAssertions, GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.root = User.objects.create_superuser("root", "root@example.com", None)
        self.client.force_login(self.root)
        self.mark()

    def change_url(self, obj) -> str:
        return reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])

    def test_adding_a_key(self):
        response = self.client.post(reverse("admin:keys_apikey_add"), {
            "name": "billing", "owner": "ops@example.com", "user": "", "allowed_models": "m1, m2",
            "expires_at_0": "", "expires_at_1": "", "requests_per_minute": "60", "tokens_per_minute": "",
            "parallel_requests": "", "token_budget": "", "budget_period": "month", "budget_currency": "USD",
        }, headers={"X-Request-ID": REQUEST_ID})
        self.assertEqual(response.status_code, 200, response.content[:2000])
        plaintext = PLAINTEXT.search(response.content.decode()).group(0)
        key = APIKey.objects.get(name="billing")
        entry = self.assertOneEntry(key, "create", "admin", actor=self.root,
                                    secrets=[plaintext, hash_key(plaintext)])
        self.assertEqual(entry.changes["name"], [None, "billing"])
        self.assertEqual(entry.changes["allowed_models"], [None, ["m1", "m2"]])
        self.assertEqual(entry.changes["hashed_key"], [None, REDACTED])
        self.assertNotIn("last_used_at", entry.changes)
        self.assertEqual((entry.request_id, entry.ip, entry.actor_label), (REQUEST_ID, "127.0.0.1", "root"))
        self.assertEqual(entry.where, "POST " + reverse("admin:keys_apikey_add"))

    def test_changing_a_key_records_the_fields_that_changed(self):
        data = form_data(self.client.get(self.change_url(self.key)))
        self.client.post(self.change_url(self.key), data)
        self.assertEqual(self.new_entries(), [], "a save without a change is no change")
        response = self.client.post(self.change_url(self.key), {**data, "requests_per_minute": "100",
                                                                  "owner": "=cmd|' /C calc'!A0"})
        self.assertEqual(response.status_code, 302, response.content[:3000])
        entry = self.assertOneEntry(self.key, "update", "admin", actor=self.root, secrets=[self.plaintext])
        self.assertEqual(entry.changes, {"requests_per_minute": [None, 100], "owner": ["", "=cmd|' /C calc'!A0"]})

    def test_the_revoke_action(self):
        self.client.post(reverse("admin:keys_apikey_changelist"),
                         {"action": "revoke", "_selected_action": [self.key.pk]})
        self.key.refresh_from_db()
        entry = self.assertOneEntry(self.key, "update", "admin", actor=self.root)
        self.assertEqual(list(entry.changes), ["revoked_at"])
        self.assertEqual(entry.changes["revoked_at"][0], None)
        self.assertEqual(parse_datetime(entry.changes["revoked_at"][1]),
                         self.key.revoked_at.replace(microsecond=self.key.revoked_at.microsecond // 1000 * 1000))

    def test_the_rotate_action_and_page(self):
        old_prefix = self.key.prefix
        response = self.client.post(reverse("admin:keys_apikey_changelist"),
                                    {"action": "rotate", "_selected_action": [self.key.pk], "confirm": "yes"})
        new = PLAINTEXT.search(response.content.decode()).group(0)
        self.key.refresh_from_db()
        entry = self.assertOneEntry(self.key, "update", "admin", actor=self.root,
                                    secrets=[new, hash_key(new), self.plaintext, hash_key(self.plaintext)])
        self.assertEqual(entry.changes, {"prefix": [old_prefix, self.key.prefix], "hashed_key": [REDACTED, REDACTED]})
        response = self.client.post(reverse("admin:keys_apikey_rotate", args=[self.key.pk]), {"confirm": "yes"})
        newer = PLAINTEXT.search(response.content.decode()).group(0)
        self.assertOneEntry(self.key, "update", "admin", actor=self.root, secrets=[new, newer, hash_key(newer)])

    def test_adding_a_user_redacts_the_password(self):
        password = "Correct-horse-battery-9"
        response = self.client.post(reverse("admin:auth_user_add"), {
            "username": "carol", "password1": password, "password2": password, "usable_password": "true"})
        self.assertEqual(response.status_code, 302, response.content[:3000])
        carol = User.objects.get(username="carol")
        entry = self.assertOneEntry(carol, "create", "admin", actor=self.root, secrets=[password, carol.password])
        self.assertEqual(entry.changes["password"], [None, REDACTED])
        self.assertEqual(entry.changes["groups"], [None, []])

    def test_changing_a_users_fields_and_groups_is_one_entry(self):
        # The admin's form shows times to the second: a stored microsecond would change on save.
        carol = User.objects.create_user("carol", password="old-password-1",
                                         date_joined=timezone.now().replace(microsecond=0))
        ops = Group.objects.create(name="operators")
        self.mark()
        data = form_data(self.client.get(self.change_url(carol)))
        response = self.client.post(self.change_url(carol), {**data, "is_staff": "on", "groups": [str(ops.pk)],
                                                             "email": "carol@example.com"})
        self.assertEqual(response.status_code, 302, response.content[:3000])
        entry = self.assertOneEntry(carol, "update", "admin", actor=self.root)
        self.assertEqual(entry.changes, {"is_staff": [False, True], "email": ["", "carol@example.com"],
                                         "groups": [[], ["operators"]]})
        password = "New-password-of-carol-2"
        self.client.post(reverse("admin:auth_user_password_change", args=[carol.pk]),
                         {"password1": password, "password2": password, "usable_password": "true"})
        carol.refresh_from_db()
        entry = self.assertOneEntry(carol, "update", "admin", actor=self.root, secrets=[password, carol.password])
        self.assertEqual(entry.changes, {"password": [REDACTED, REDACTED]})

    def test_a_team_with_a_member_and_a_price(self):
        member = User.objects.create_user("mia")
        self.mark()
        response = self.client.post(reverse("admin:keys_team_add"), {
            "name": "red", "allowed_models": "[\"m1\"]", "requests_per_minute": "", "tokens_per_minute": "",
            "parallel_requests": "", "token_budget": "", "money_budget": "25", "budget_currency": "USD",
            "budget_period": "month",
            "memberships-TOTAL_FORMS": "1", "memberships-INITIAL_FORMS": "0",
            "memberships-MIN_NUM_FORMS": "0", "memberships-MAX_NUM_FORMS": "1000",
            "memberships-0-user": str(member.pk), "memberships-0-role": "owner",
        })
        self.assertEqual(response.status_code, 302, response.context and [
            response.context["adminform"].form.errors, [f.errors for f in response.context["inline_admin_formsets"][0].formset]])
        team = Team.objects.get(name="red")
        entries = self.new_entries()
        self.assertEqual(sorted((e.object_type, e.action, e.origin, e.actor_user_id) for e in entries),
                         [("keys.membership", "create", "admin", self.root.pk),
                          ("keys.team", "create", "admin", self.root.pk)], "one entry per object changed")
        team_entry = next(e for e in entries if e.object_type == "keys.team")
        self.assertEqual((team_entry.object_id, team_entry.changes["money_budget"]), (str(team.pk), [None, "25.000000"]))
        history = reverse("admin:keys_team_history", args=[team.pk])
        self.assertContains(self.client.get(self.change_url(team)), history)
        self.assertRedirects(self.client.get(history), f"{TRAIL}?object_type=keys.team&object_id={team.pk}")
        self.mark()
        response = self.client.post(reverse("admin:keys_price_add"), {
            "model": "m1", "upstream": "", "input_per_million": "0.5", "output_per_million": "1.5",
            "currency": "USD", "valid_from_0": "2026-01-01", "valid_from_1": "00:00:00"})
        self.assertEqual(response.status_code, 302, response.content[:3000])
        entry = self.assertOneEntry(Price.objects.get(model="m1"), "create", "admin", actor=self.root)
        self.assertEqual(entry.changes["output_per_million"], [None, "1.500000"])

    async def test_api_requests_write_no_entry(self):
        self.assertNotIn("keys.audit.middleware.audit_scope", settings.API_MIDDLEWARE)
        response = await self.post("/v1/chat/completions", {"model": "m1", "messages": [{"role": "user", "content": "Hi"}],
                                                            "max_tokens": 4})
        self.assertEqual(response.status_code, 200, response.content)
        await sync_to_async(usage_writer.flush)()
        self.assertEqual(await sync_to_async(self.new_entries)(), [])

    def test_logging_in_is_not_a_change(self):
        User.objects.create_user("dave", password="dave-password-3")
        self.mark()
        self.client.logout()
        self.client.post(reverse("admin:login"), {"username": "dave", "password": "dave-password-3"})
        self.assertEqual(self.new_entries(), [])

    def test_a_failed_change_leaves_no_entry(self):
        """A change and its entry share a transaction: what rolls back leaves nothing."""
        with self.assertRaises(RuntimeError), audit.context(actor=self.root, origin="console"):
            self.key.name = "renamed"
            self.key.save()
            raise RuntimeError
        self.key.refresh_from_db()
        self.assertEqual((self.key.name, self.new_entries()), ("alice", []))

    def test_the_usage_writer_and_the_api_path_write_no_entry(self):
        self.assertNotIn("keys.audit.middleware.audit_scope", settings.API_MIDDLEWARE)
        usage_writer.record(UsageEvent(key_id=self.key.pk, model="m1", endpoint="/v1/chat/completions",
                                       request_id="req-1", status=200))
        usage_writer.flush()
        self.key.refresh_from_db()
        self.assertIsNotNone(self.key.last_used_at)
        self.assertEqual(self.new_entries(), [])


@override_settings(GATEWAY_KEY_CACHE_SECONDS=1.0)
class RESTPathTests(AuditAssertions, GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.staff = User.objects.create_user("staff", is_staff=True)
        self.staff.user_permissions.set(Permission.objects.filter(
            content_type__app_label="keys", codename__in=["view_apikey", "add_apikey", "change_apikey"]))
        self.api = APIClient()
        self.api.force_login(self.staff)
        self.mark()

    def call(self, method: str, path: str, data=None, **headers):
        response = getattr(self.api, method)(path, data, format="json", headers={"X-Request-ID": REQUEST_ID, **headers})
        self.assertLess(response.status_code, 300, response.content)
        return response

    def test_each_endpoint(self):
        body = self.call("post", "/api/keys/", {"name": "bob", "requests_per_minute": 10}).json()
        key = APIKey.objects.get(pk=body["id"])
        entry = self.assertOneEntry(key, "create", "api", actor=self.staff,
                                    secrets=[body["key"], hash_key(body["key"])])
        self.assertEqual((entry.request_id, entry.where), (REQUEST_ID, "POST /api/keys/"))
        self.assertEqual(entry.changes["requests_per_minute"], [None, 10])

        self.call("patch", f"/api/keys/{key.pk}/", {"requests_per_minute": 20})
        entry = self.assertOneEntry(key, "update", "api", actor=self.staff)
        self.assertEqual(entry.changes, {"requests_per_minute": [10, 20]})

        self.call("put", f"/api/keys/{key.pk}/", {"name": "bobby", "requests_per_minute": 20})
        entry = self.assertOneEntry(key, "update", "api", actor=self.staff)
        self.assertEqual(entry.changes["name"], ["bob", "bobby"])

        rotated = self.call("post", f"/api/keys/{key.pk}/rotate/").json()["key"]
        entry = self.assertOneEntry(key, "update", "api", actor=self.staff,
                                    secrets=[rotated, hash_key(rotated), body["key"]])
        self.assertEqual(entry.changes["hashed_key"], [REDACTED, REDACTED])

        self.call("post", f"/api/keys/{key.pk}/revoke/")
        entry = self.assertOneEntry(key, "update", "api", actor=self.staff)
        self.assertEqual(list(entry.changes), ["revoked_at"])
        self.call("post", f"/api/keys/{key.pk}/revoke/")
        self.assertEqual(self.new_entries(), [], "revoking a revoked key changes nothing")

    def test_a_key_acting_for_its_user_is_named(self):
        staff_key, plaintext = APIKey.objects.create_key("ops", user=self.staff)
        self.mark()
        api = APIClient()
        response = api.patch(f"/api/keys/{self.key.pk}/", {"owner": "finance"}, format="json",
                             headers={"Authorization": f"Bearer {plaintext}"})
        self.assertEqual(response.status_code, 200, response.content)
        entry = self.assertOneEntry(self.key, "update", "api", actor=self.staff, key=staff_key, secrets=[plaintext])
        self.assertEqual(entry.actor_label, f"key {staff_key.prefix}… (ops) of staff")

    async def test_under_asgi(self):
        """Django's ASGI handler, as uvicorn serves the admin and /api/keys/."""
        from django.test import AsyncClient

        staff_key, plaintext = await sync_to_async(APIKey.objects.create_key)("ops", user=self.staff)
        await sync_to_async(self.mark)()
        response = await AsyncClient().post("/api/keys/", {"name": "async"}, content_type="application/json",
                                            headers={"Authorization": f"Bearer {plaintext}", "X-Request-ID": REQUEST_ID})
        self.assertEqual(response.status_code, 201, response.content)
        key = await APIKey.objects.aget(name="async")

        def check():
            entry = self.assertOneEntry(key, "create", "api", actor=self.staff, key=staff_key,
                                        secrets=[plaintext, response.json()["key"]])
            self.assertEqual(entry.request_id, REQUEST_ID)

        await sync_to_async(check)()

    def test_the_upstream_api(self):
        self.staff.user_permissions.add(*Permission.objects.filter(content_type__app_label="upstreams"))
        self.mark()
        secret = "upstream-secret-value-0042"
        with override_settings(GATEWAY_ENCRYPTION_KEY=Fernet.generate_key().decode()):
            body = self.call("post", "/api/upstreams/", {"name": "vllm", "kind": "openai",
                                                         "base_url": "http://127.0.0.1:9/v1", "api_key": secret,
                                                         "discover_models": False}).json()
            from upstreams.models import Upstream
            upstream = Upstream.objects.get(pk=body["id"])
            entry = self.assertOneEntry(upstream, "create", "api", actor=self.staff,
                                        secrets=[secret, upstream.api_key_encrypted])
            self.assertEqual(entry.changes["api_key_encrypted"], [None, REDACTED])
            self.call("patch", f"/api/upstreams/{upstream.pk}/", {"priority": 5})
            entry = self.assertOneEntry(upstream, "update", "api", actor=self.staff)
            self.assertEqual(entry.changes, {"priority": [0, 5]})
            self.call("delete", f"/api/upstreams/{upstream.pk}/")
            entry = self.assertOneEntry(upstream, "delete", "api", actor=self.staff, secrets=[secret])
            self.assertEqual(entry.changes["name"], ["vllm", None])


class CommandPathTests(AuditAssertions, TestCase):
    def setUp(self) -> None:
        self.mark()

    def test_create_api_key(self):
        out = io.StringIO()
        call_command("create_api_key", "cli", "--rpm", "5", stdout=out, stderr=io.StringIO())
        plaintext = out.getvalue().strip()
        key = APIKey.objects.get(name="cli")
        entry = self.assertOneEntry(key, "create", "command", secrets=[plaintext, hash_key(plaintext)])
        self.assertEqual(entry.where, "manage.py create_api_key")
        self.assertIn("manage.py create_api_key", entry.actor_label)
        self.assertIsNone(entry.ip)

    def test_import_and_revoke(self):
        call_command("import_api_keys", "sk-imported-secret-1", stdout=io.StringIO())
        key = APIKey.objects.get(hashed_key=hash_key("sk-imported-secret-1"))
        self.assertOneEntry(key, "create", "command", secrets=["sk-imported-secret-1", key.hashed_key])
        call_command("revoke_api_key", key.prefix, stdout=io.StringIO())
        entry = self.assertOneEntry(key, "update", "command")
        self.assertEqual((entry.where, list(entry.changes)), ("manage.py revoke_api_key", ["revoked_at"]))

    def test_the_servers_api_keys_flag(self):
        call_command("import_api_keys", "sk-flag-one", stdout=io.StringIO())
        earlier = APIKey.objects.get(hashed_key=hash_key("sk-flag-one"))
        self.mark()
        command = ServerCommand(stderr=io.StringIO())
        command.sync_flag_keys(["sk-flag-one", "sk-flag-two"])
        entries = self.new_entries()
        self.assertEqual(sorted((e.action, e.origin, e.where) for e in entries),
                         [("create", "command", "manage.py openai_api_server --api-keys"),
                          ("update", "command", "manage.py openai_api_server --api-keys")])
        adopted = next(e for e in entries if e.action == "update")
        self.assertEqual((adopted.object_id, adopted.changes), (str(earlier.pk), {"source": ["imported", "api_keys_flag"]}))
        for entry in entries:
            self.assertNoSecret(entry, "sk-flag-one", "sk-flag-two")
        self.mark()
        command.sync_flag_keys(["sk-flag-two"])  # the first is no longer listed: revoked
        self.assertOneEntry(earlier, "update", "command")

    def test_commands_without_a_scope_of_their_own(self):
        """createsuperuser, changepassword, upstreams…: attributed to the command they ran in."""
        with mock.patch.object(sys, "argv", ["manage.py", "createsuperuser"]):
            root = User.objects.create_superuser("root", "root@example.com", "Root-password-77")
        entry = self.assertOneEntry(root, "create", "command", secrets=["Root-password-77", root.password])
        self.assertEqual(entry.where, "manage.py createsuperuser")
        team = Team.objects.create(name="outside")
        self.assertEqual(self.assertOneEntry(team, "create", "system").origin, "system")

    def test_upstreams_apply(self):
        import tempfile
        from pathlib import Path

        from upstreams.models import Upstream

        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "upstreams.json"
            path.write_text(json.dumps({"upstreams": [{"name": "local", "kind": "openai",
                                                       "base_url": "http://127.0.0.1:9/v1", "discover_models": False,
                                                       "models": ["m1"]}]}))
            with mock.patch.object(sys, "argv", ["manage.py", "upstreams", "apply", str(path)]):
                call_command("upstreams", "apply", str(path), stdout=io.StringIO())
        upstream = Upstream.objects.get(name="local")
        entries = self.new_entries()
        self.assertEqual(sorted((e.object_type, e.action) for e in entries),
                         [("upstreams.upstream", "create"), ("upstreams.upstreammodel", "create")])
        self.assertEqual({(e.origin, e.where) for e in entries}, {("command", "manage.py upstreams")})
        self.assertEqual(entries[0].object_id if entries[0].object_type == "upstreams.upstream"
                         else entries[1].object_id, str(upstream.pk))


class TeamConsoleTests(AuditAssertions, TestCase):
    def setUp(self) -> None:
        self.owner = User.objects.create_user("olive", password="pw")
        self.team = Team.objects.create(name="red")
        Membership.objects.create(team=self.team, user=self.owner, role=Membership.Role.OWNER)
        self.key, self.plaintext = APIKey.objects.create_key("red-app", team=self.team)
        self.client.force_login(self.owner)
        self.mark()

    def test_console_actions(self):
        response = self.client.post(reverse("console:key-rotate", args=[self.key.pk]), headers={"X-Request-ID": REQUEST_ID})
        new = PLAINTEXT.search(response.content.decode()).group(0)
        entry = self.assertOneEntry(self.key, "update", "console", actor=self.owner, secrets=[new, self.plaintext])
        self.assertEqual((entry.request_id, entry.actor_label), (REQUEST_ID, "olive"))
        self.client.post(reverse("console:key-revoke", args=[self.key.pk]))
        self.assertOneEntry(self.key, "update", "console", actor=self.owner)

    def test_console_create_and_change(self):
        data = {"name": "new-app", "allowed_models": "", "requests_per_minute": "50", "tokens_per_minute": "",
                "parallel_requests": "", "token_budget": "", "money_budget": "", "budget_period": "month"}
        response = self.client.post(reverse("console:key-create", args=[self.team.pk]), data)
        plaintext = PLAINTEXT.search(response.content.decode()).group(0)
        key = APIKey.objects.get(name="new-app")
        entry = self.assertOneEntry(key, "create", "console", actor=self.owner, secrets=[plaintext, hash_key(plaintext)])
        self.assertEqual((entry.changes["team"], entry.changes["requests_per_minute"]), ([None, self.team.pk], [None, 50]))
        response = self.client.post(reverse("console:key", args=[key.pk]), {**data, "requests_per_minute": "40"})
        self.assertEqual(response.status_code, 302)
        entry = self.assertOneEntry(key, "update", "console", actor=self.owner)
        self.assertEqual(entry.changes, {"requests_per_minute": [50, 40]})

    def test_teams_memberships_and_prices_through_the_context_api(self):
        member = User.objects.create_user("mo")
        self.mark()
        with audit.context(actor=self.owner, origin="console"):
            membership = Membership.objects.create(team=self.team, user=member, role=Membership.Role.VIEWER)
        entry = self.assertOneEntry(membership, "create", "console", actor=self.owner)
        self.assertEqual(entry.changes["role"], [None, "viewer"])
        with audit.context(actor=self.owner, origin="console"):
            membership.role = Membership.Role.MEMBER
            membership.save()
            membership.role = Membership.Role.OWNER
            membership.save()
        entry = self.assertOneEntry(membership, "update", "console", actor=self.owner)
        self.assertEqual(entry.changes, {"role": ["viewer", "owner"]}, "two saves in one scope: one entry")
        with audit.context(actor=self.owner, origin="console"):
            membership.delete()
        entry = self.assertOneEntry(membership.__class__(pk=entry.object_id), "delete", "console", actor=self.owner)
        with audit.context(actor=self.owner, origin="admin"):
            self.team.money_budget = Decimal("12.50")
            self.team.save()
            price = Price.objects.create(model="m1", input_per_million=Decimal("0.5"), output_per_million=Decimal("1.5"))
        self.assertEqual(sorted((e.object_type, e.action) for e in self.new_entries()),
                         [("keys.price", "create"), ("keys.team", "update")])
        team_entry = AuditEntry.objects.get(object_type="keys.team", object_id=str(self.team.pk), action="update")
        self.assertEqual(team_entry.changes, {"money_budget": [None, "12.500000"]})
        self.assertTrue(AuditEntry.objects.filter(object_type="keys.price", object_id=str(price.pk)).exists())


class TrailAdminTests(AuditAssertions, GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.root = User.objects.create_superuser("root", "root@example.com", None)
        self.client.force_login(self.root)
        with audit.context(actor=self.root, origin="admin"):
            self.key.owner = "=HYPERLINK(\"http://x\",\"y\")"
            self.key.save()
        self.entry = AuditEntry.objects.get(object_type="keys.apikey", object_id=str(self.key.pk), action="update")

    def test_nobody_may_add_change_or_delete_entries(self):
        self.assertEqual(set(Permission.objects.filter(content_type__model="auditentry").values_list("codename", flat=True)),
                         {"view_auditentry"})
        change = reverse("admin:keys_auditentry_change", args=[self.entry.pk])
        delete = reverse("admin:keys_auditentry_delete", args=[self.entry.pk])
        page = self.client.get(change)
        self.assertEqual(page.status_code, 200)
        self.assertNotContains(page, 'name="_save"')
        self.assertEqual(self.client.post(change, {"object_repr": "forged"}).status_code, 403)
        self.assertEqual(self.client.post(delete, {"post": "yes"}).status_code, 403)
        self.assertEqual(self.client.get(reverse("admin:keys_auditentry_add")).status_code, 403)
        listing = self.client.get(TRAIL)
        self.assertNotContains(listing, "action-checkbox")
        self.client.post(TRAIL, {"action": "delete_selected", "_selected_action": [self.entry.pk], "post": "yes"})
        self.assertEqual(AuditEntry.objects.get(pk=self.entry.pk).object_repr, self.entry.object_repr)

    def test_no_route_but_the_admins_reads_entries(self):
        from django.urls import get_resolver

        def views(patterns):
            for pattern in patterns:
                if hasattr(pattern, "url_patterns"):
                    yield from views(pattern.url_patterns)
                else:
                    yield pattern.callback

        for view in views(get_resolver().url_patterns):
            queryset = getattr(getattr(view, "cls", None), "queryset", None)
            self.assertFalse(queryset is not None and queryset.model is AuditEntry, view)
        for method in ("post", "put", "patch", "delete"):
            self.assertEqual(getattr(self.client, method)("/api/audit/").status_code, 404)

    def test_staff_need_the_view_permission(self):
        staff = User.objects.create_user("intern", is_staff=True)
        self.client.force_login(staff)
        self.assertEqual(self.client.get(TRAIL).status_code, 403)
        self.assertEqual(self.client.get(EXPORT).status_code, 403)
        staff.user_permissions.add(Permission.objects.get(codename="view_auditentry"))
        self.assertEqual(self.client.get(TRAIL).status_code, 200)
        self.assertEqual(self.client.post(reverse("admin:keys_auditentry_change", args=[self.entry.pk]),
                                          {"object_repr": "forged"}).status_code, 403)

    def test_the_model_and_queryset_refuse(self):
        self.entry.object_repr = "forged"
        with self.assertRaises(AuditEntryImmutable):
            self.entry.save()
        with self.assertRaises(AuditEntryImmutable):
            self.entry.delete()
        with self.assertRaises(AuditEntryImmutable):
            AuditEntry.objects.filter(pk=self.entry.pk).update(object_repr="forged")
        with self.assertRaises(AuditEntryImmutable):
            AuditEntry.objects.all().delete()

    def test_the_database_refuses_updates(self):
        with self.assertRaises(DatabaseError), transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("UPDATE keys_auditentry SET object_repr = 'forged'")
        if connection.vendor == "postgresql":
            with self.assertRaises(DatabaseError), transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("DELETE FROM keys_auditentry")
        self.assertTrue(AuditEntry.objects.filter(pk=self.entry.pk, object_repr=self.entry.object_repr).exists())

    def test_filters_by_actor_object_and_date(self):
        other = User.objects.create_user("other")
        with audit.context(actor=other, origin="console"):
            Team.objects.create(name="blue")

        def shown(**query) -> set[str]:
            response = self.client.get(TRAIL, query)
            self.assertEqual(response.status_code, 200)
            return {entry.object_type for entry in response.context["cl"].result_list}

        self.assertEqual(shown(actor_user__id__exact=self.root.pk), {"keys.apikey"})
        self.assertEqual(shown(actor_user__id__exact=other.pk), {"keys.team"})
        self.assertEqual(shown(object_type="keys.apikey", object_id=str(self.key.pk)), {"keys.apikey"})
        today = timezone.now()
        self.assertIn("keys.team", shown(created_at__gte=(today - timedelta(days=1)).isoformat()))
        self.assertEqual(shown(created_at__gte=(today + timedelta(days=2)).isoformat()), set())
        self.assertIn("keys.team", shown(created_at__year=today.year, created_at__month=today.month,
                                         created_at__day=today.day))

    def test_each_key_page_links_to_its_history(self):
        page = self.client.get(reverse("admin:keys_apikey_change", args=[self.key.pk]))
        history = reverse("admin:keys_apikey_history", args=[self.key.pk])
        self.assertContains(page, history)
        response = self.client.get(history)
        self.assertRedirects(response, f"{TRAIL}?object_type=keys.apikey&object_id={self.key.pk}")

    async def test_the_csv_export_neutralises_formulas(self):
        response = await self.async_client_for_admin().get(EXPORT, {"object_type": "keys.apikey"})
        self.assertEqual(response.status_code, 200)
        body = b"".join([chunk async for chunk in response.streaming_content]).decode()
        rows = list(csv.DictReader(io.StringIO(body)))
        self.assertTrue(rows)
        self.assertTrue(all(row["object_type"] == "keys.apikey" for row in rows))
        changed = next(row for row in rows if row["action"] == "update")
        self.assertEqual(json.loads(changed["changes"]), {"owner": ["", '=HYPERLINK("http://x","y")']})
        self.assertNotIn(self.plaintext, body)
        for row in rows:
            for value in row.values():
                self.assertFalse(value.startswith(("=", "+", "@")), value)

    def async_client_for_admin(self):
        from django.test import AsyncClient

        client = AsyncClient()
        client.cookies = self.client.cookies
        return client
