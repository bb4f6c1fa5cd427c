"""The key-management API (/api/keys/): staff authentication, keys, revocation, rotation, usage."""
from __future__ import annotations

from datetime import timedelta
from io import StringIO

from asgiref.sync import async_to_sync
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

from keys.hashing import hash_key
from keys.models import APIKey, UsageDaily, UsageRecord
from keys.usage import UsageEvent, write_batch
from openai_api.auth import key_cache
from tests.base import GatewayTestCase

KEYS = "/api/keys/"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@override_settings(GATEWAY_KEY_CACHE_SECONDS=1.0)
class KeysAPITestCase(GatewayTestCase):
    """A staff user logged in through `self.api`, and the OpenAI API's key cache on a fake clock."""

    def setUp(self) -> None:
        super().setUp()
        self.staff = User.objects.create_user("staff", is_staff=True)
        self.staff.user_permissions.set(Permission.objects.filter(
            content_type__app_label="keys", codename__in=["view_apikey", "add_apikey", "change_apikey",
                                                          "view_usagerecord"]))
        self.api = APIClient()
        self.api.force_login(self.staff)
        self.clock = FakeClock()
        original_clock = key_cache.clock
        key_cache.clock = self.clock
        self.addCleanup(setattr, key_cache, "clock", original_clock)

    def url(self, key: APIKey, action: str = "") -> str:
        return f"{KEYS}{key.pk}/{action + '/' if action else ''}"

    def create(self, expect: int = 201, **data):
        response = self.api.post(KEYS, {"name": "bob", **data}, format="json")
        self.assertEqual(response.status_code, expect, response.content)
        return response

    def openai_status(self, plaintext: str, model: str | None = None) -> int:
        """The status the OpenAI API gives this key (for a chat request if `model` is given)."""
        headers = {"Authorization": f"Bearer {plaintext}"}
        if model is None:
            return async_to_sync(self.async_client.get)("/v1/models", headers=headers).status_code
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        response = async_to_sync(self.async_client.post)(
            "/v1/chat/completions", body, content_type="application/json", headers=headers)
        return response.status_code


class AuthenticationTests(KeysAPITestCase):
    def bearer(self, user: User | None, **fields) -> APIClient:
        _, plaintext = APIKey.objects.create_key("admin key", user=user, **fields)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
        return client

    def test_it_accepts_a_staff_session(self):
        self.assertEqual(self.api.get(KEYS).status_code, 200)

    def test_it_accepts_a_staff_users_bearer_key(self):
        client = self.bearer(self.staff)
        self.assertEqual(client.get(KEYS).status_code, 200)
        self.assertEqual(client.post(KEYS, {"name": "made by key"}, format="json").status_code, 201)

    def test_anonymous_requests_get_401_with_a_challenge(self):
        response = APIClient().get(KEYS)
        self.assertEqual(response.status_code, 401)
        self.assertTrue(response["WWW-Authenticate"].startswith("Bearer"))

    def test_non_staff_get_403(self):
        user = User.objects.create_user("user")
        client = APIClient()
        client.force_login(user)
        self.assertEqual(client.get(KEYS).status_code, 403)
        self.assertEqual(self.bearer(user).get(KEYS).status_code, 403)

    def test_a_key_without_a_user_gets_403(self):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {self.plaintext}")
        self.assertEqual(client.get(KEYS).status_code, 403)

    def test_unknown_revoked_and_expired_keys_get_401(self):
        past = timezone.now() - timedelta(seconds=1)
        clients = [self.bearer(self.staff, revoked_at=past), self.bearer(self.staff, expires_at=past), APIClient()]
        clients[2].credentials(HTTP_AUTHORIZATION="Bearer sk-unknown")
        for client in clients:
            self.assertEqual(client.get(KEYS).status_code, 401)

    def test_an_inactive_users_key_gets_401(self):
        client = self.bearer(self.staff)
        User.objects.filter(pk=self.staff.pk).update(is_active=False)
        self.assertEqual(client.get(KEYS).status_code, 401)

    def test_a_revoked_staff_key_stops_at_once(self):
        client = self.bearer(self.staff)
        self.assertEqual(client.get(KEYS).status_code, 200)
        APIKey.objects.filter(user=self.staff).update(revoked_at=timezone.now())
        self.assertEqual(client.get(KEYS).status_code, 401)


class PermissionMatrixTests(KeysAPITestCase):
    """Django's model permissions decide, over a session and over the user's own key alike."""

    ROLES = {
        "staff without permissions": [],
        "staff who may view": ["view_apikey", "view_usagerecord"],
        "staff who may change": ["view_apikey", "add_apikey", "change_apikey", "view_usagerecord"],
    }
    #                       list  create  change  revoke  rotate  usage
    EXPECTED = {
        "staff without permissions": (403, 403, 403, 403, 403, 403),
        "staff who may view":        (200, 403, 403, 403, 403, 200),
        "staff who may change":      (200, 201, 200, 200, 200, 200),
        "superuser":                 (200, 201, 200, 200, 200, 200),
    }  # fmt: skip

    def user(self, role: str) -> User:
        if role == "superuser":
            return User.objects.create_superuser(role.replace(" ", "-"), password=None)
        user = User.objects.create_user(role.replace(" ", "-"), is_staff=True)
        user.user_permissions.set(Permission.objects.filter(content_type__app_label="keys",
                                                            codename__in=self.ROLES[role]))
        return user

    def client_for(self, user: User, auth: str) -> tuple[APIClient, APIKey]:
        own, plaintext = APIKey.objects.create_key(f"{user.username}'s key", user=user, requests_per_minute=10)
        client = APIClient()
        if auth == "session":
            client.force_login(user)
        else:
            client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
        return client, own

    def statuses(self, client: APIClient) -> tuple[int, ...]:
        victim, _ = APIKey.objects.create_key("victim", requests_per_minute=5)
        return (
            client.get(KEYS).status_code,
            client.post(KEYS, {"name": "new"}, format="json").status_code,
            client.patch(self.url(victim), {"requests_per_minute": 6}, format="json").status_code,
            client.post(self.url(victim, "revoke")).status_code,
            client.post(self.url(self.key, "rotate")).status_code,
            client.get(self.url(victim, "usage")).status_code,
        )

    def test_each_role_over_a_session_and_over_its_key(self):
        for role, expected in self.EXPECTED.items():
            user = self.user(role)
            for auth in ("session", "key"):
                with self.subTest(role=role, auth=auth):
                    client, _ = self.client_for(user, auth)
                    self.assertEqual(self.statuses(client), expected)

    def test_a_viewer_sees_the_usage_summary_and_a_keyless_role_does_not(self):
        viewer, _ = self.client_for(self.user("staff who may view"), "key")
        self.assertEqual(viewer.get(KEYS + "usage/").status_code, 200)
        nobody, _ = self.client_for(self.user("staff without permissions"), "key")
        self.assertEqual(nobody.get(KEYS + "usage/").status_code, 403)

    def test_the_reported_escalation_is_refused(self):
        """A staff user with no permissions, with its own key: no unlimited key bound to the
        superuser, no clearing its own limits, no revoking other keys."""
        root = self.user("superuser")
        client, own = self.client_for(self.user("staff without permissions"), "key")
        self.assertEqual(client.post(KEYS, {"name": "root", "user": root.pk}, format="json").status_code, 403)
        self.assertEqual(client.patch(self.url(own), {"requests_per_minute": None}, format="json").status_code, 403)
        self.assertEqual(client.post(self.url(self.key, "revoke")).status_code, 403)
        self.assertFalse(APIKey.objects.filter(user=root).exclude(name__endswith="'s key").exists())
        own.refresh_from_db()
        self.key.refresh_from_db()
        self.assertEqual((own.requests_per_minute, self.key.revoked_at), (10, None))

    def test_only_superusers_bind_keys_to_users(self):
        root = self.user("superuser")
        for auth in ("session", "key"):
            editor, _ = self.client_for(self.user("staff who may change") if auth == "session" else self.staff, auth)
            refused = editor.post(KEYS, {"name": "bound", "user": root.pk}, format="json")
            self.assertEqual(refused.status_code, 403, auth)
            self.assertIn("superusers", refused.json()["detail"])
            self.assertEqual(editor.patch(self.url(self.key), {"user": self.staff.pk}, format="json").status_code, 403)
            self.assertEqual(editor.post(KEYS, {"name": "unbound", "user": None}, format="json").status_code, 201)
        superuser, _ = self.client_for(root, "key")
        self.assertEqual(superuser.post(KEYS, {"name": "bound", "user": self.staff.pk}, format="json").status_code, 201)
        self.assertEqual(superuser.patch(self.url(self.key), {"user": self.staff.pk}, format="json").status_code, 200)

    def test_a_key_cannot_raise_its_own_limits_or_extend_its_own_expiry(self):
        soon = timezone.now() + timedelta(days=1)
        own, plaintext = APIKey.objects.create_key(
            "own", user=self.user("superuser"), requests_per_minute=10, tokens_per_minute=100, parallel_requests=2,
            token_budget=1000, budget_period="day", expires_at=soon, allowed_models=["m1"])
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {plaintext}")
        raises = [{"requests_per_minute": 11}, {"requests_per_minute": None}, {"tokens_per_minute": None},
                  {"parallel_requests": 3}, {"token_budget": 2000}, {"budget_period": "month"},
                  {"expires_at": None}, {"expires_at": (soon + timedelta(days=1)).isoformat()},
                  {"allowed_models": []}, {"allowed_models": ["m1", "m2"]}]
        for change in raises:
            with self.subTest(change=change):
                response = client.patch(self.url(own), change, format="json")
                self.assertEqual(response.status_code, 403, response.content)
                self.assertIn("own limits", response.json()["detail"])
        lowers = [{"requests_per_minute": 5}, {"token_budget": 10}, {"expires_at": (soon - timedelta(hours=1)).isoformat()},
                  {"name": "renamed"}]
        for change in lowers:
            with self.subTest(change=change):
                self.assertEqual(client.patch(self.url(own), change, format="json").status_code, 200)
        # The same user may raise the key over a session (or with another key).
        session = APIClient()
        session.force_login(own.user)
        self.assertEqual(session.patch(self.url(own), {"requests_per_minute": None}, format="json").status_code, 200)


class CreateListRetrieveTests(KeysAPITestCase):
    def test_create_returns_the_plaintext_once_and_stores_only_its_digest(self):
        body = self.create(owner="team", allowed_models=["m1"], requests_per_minute=5).json()
        plaintext = body["key"]
        self.assertTrue(plaintext.startswith("sk-") and len(plaintext) >= 35)
        self.assertNotIn("hashed_key", body)
        self.assertEqual((body["name"], body["owner"], body["allowed_models"]), ("bob", "team", ["m1"]))
        self.assertEqual((body["status"], body["requests_per_minute"]), ("active", 5))
        stored = APIKey.objects.get(pk=body["id"])
        self.assertEqual((stored.hashed_key, stored.prefix), (hash_key(plaintext), plaintext[:10]))
        self.assertNotIn(plaintext, str(list(APIKey.objects.values())))
        self.assertEqual(self.openai_status(plaintext), 200)

    def test_create_validates_its_fields(self):
        self.create(expect=400, name="")
        self.create(expect=400, requests_per_minute=-1)
        self.create(expect=400, budget_period="year")
        self.create(expect=400, allowed_models="m1")
        self.assertEqual(APIKey.objects.filter(name="bob").count(), 0)

    def test_created_model_lists_are_trimmed_and_deduplicated(self):
        body = self.create(allowed_models=["m1", " m2 ", "m1"]).json()
        self.assertEqual(body["allowed_models"], ["m1", "m2"])

    def test_list_and_retrieve_never_show_the_secret(self):
        body = self.create().json()
        listed = self.api.get(KEYS).json()
        shown = self.api.get(f"{KEYS}{body['id']}/").json()
        self.assertEqual(listed["count"], 3)
        for item in [*listed["results"], shown]:
            self.assertNotIn("key", item)
            self.assertNotIn("hashed_key", item)
        for secret in (body["key"], self.plaintext, hash_key(body["key"]), self.key.hashed_key):
            self.assertNotIn(secret, str(listed) + str(shown))
        self.assertEqual(shown["prefix"], body["prefix"])

    def test_the_list_filters_by_revocation_and_search(self):
        self.create(owner="research")
        names = lambda query: sorted(item["name"] for item in self.api.get(KEYS, query).json()["results"])  # noqa: E731
        self.assertEqual(names({"revoked": "true"}), ["revoked"])
        self.assertEqual(names({"revoked": "false"}), ["alice", "bob"])
        self.assertEqual(names({"search": "RESEARCH"}), ["bob"])
        self.assertEqual(self.api.get(KEYS, {"revoked": "maybe"}).status_code, 400)

    def test_answers_are_json_even_for_a_browser(self):
        response = self.api.get(KEYS, HTTP_ACCEPT="text/html,application/xhtml+xml,*/*;q=0.8")
        self.assertEqual(response["Content-Type"], "application/json")

    def test_keys_are_never_deleted(self):
        self.assertEqual(self.api.delete(self.url(self.key)).status_code, 405)

    def test_an_unknown_key_gets_404(self):
        self.assertEqual(self.api.get(f"{KEYS}999999/").status_code, 404)


class UpdateTests(KeysAPITestCase):
    def test_limits_and_models_can_be_changed(self):
        response = self.api.patch(self.url(self.key), {
            "allowed_models": ["embed"], "tokens_per_minute": 100, "parallel_requests": 2,
            "token_budget": 10_000, "budget_period": "day",
        }, format="json")
        self.assertEqual(response.status_code, 200, response.content)
        self.key.refresh_from_db()
        self.assertEqual(self.key.allowed_models, ["embed"])
        self.assertEqual((self.key.tokens_per_minute, self.key.parallel_requests), (100, 2))
        self.assertEqual((self.key.token_budget, self.key.budget_period), (10_000, "day"))

    def test_read_only_fields_are_ignored(self):
        old = (self.key.hashed_key, self.key.prefix)
        self.api.patch(self.url(self.key), {"prefix": "sk-evil", "hashed_key": "0" * 64, "revoked_at": timezone.now().isoformat()}, format="json")
        self.key.refresh_from_db()
        self.assertEqual((self.key.hashed_key, self.key.prefix, self.key.revoked_at), (*old, None))

    def test_put_replaces_the_settings(self):
        response = self.api.put(self.url(self.key), {"name": "renamed", "requests_per_minute": 3}, format="json")
        self.assertEqual(response.json()["name"], "renamed")
        self.assertEqual(APIKey.objects.get(pk=self.key.pk).requests_per_minute, 3)

    def test_a_model_change_reaches_the_openai_api_within_the_cache_time(self):
        self.assertEqual(self.openai_status(self.plaintext, model="m1"), 200)
        self.api.patch(self.url(self.key), {"allowed_models": ["embed"]}, format="json")
        self.clock.advance(1.01)
        self.assertEqual(self.openai_status(self.plaintext, model="m1"), 403)

    def test_an_expiry_reaches_the_openai_api_within_the_cache_time(self):
        self.assertEqual(self.openai_status(self.plaintext), 200)
        past = (timezone.now() - timedelta(seconds=1)).isoformat()
        self.assertEqual(self.api.patch(self.url(self.key), {"expires_at": past}, format="json").json()["status"], "expired")
        self.clock.advance(1.01)
        self.assertEqual(self.openai_status(self.plaintext), 401)


class RevokeTests(KeysAPITestCase):
    def test_a_revoked_key_is_refused_within_the_cache_time(self):
        self.assertEqual(self.openai_status(self.plaintext), 200)
        body = self.api.post(self.url(self.key, "revoke")).json()
        self.assertEqual(body["status"], "revoked")
        self.assertIsNotNone(body["revoked_at"])
        self.clock.advance(1.01)
        self.assertEqual(self.openai_status(self.plaintext), 401)

    def test_revoking_twice_keeps_the_first_time(self):
        first = self.api.post(self.url(self.key, "revoke")).json()["revoked_at"]
        self.assertEqual(self.api.post(self.url(self.key, "revoke")).json()["revoked_at"], first)

    def test_revoke_needs_post(self):
        self.assertEqual(self.api.get(self.url(self.key, "revoke")).status_code, 405)


class RotateTests(KeysAPITestCase):
    def test_rotation_replaces_the_secret_on_the_same_row(self):
        UsageRecord.objects.create(key=self.key, model="m1", endpoint="/v1/models", request_id="r1", status=200)
        self.assertEqual(self.openai_status(self.plaintext), 200)
        response = self.api.post(self.url(self.key, "rotate"))
        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        new = body["key"]
        self.assertNotEqual(new, self.plaintext)
        self.assertEqual((body["id"], body["prefix"]), (self.key.pk, new[:10]))
        self.assertEqual(APIKey.objects.get(pk=self.key.pk).hashed_key, hash_key(new))
        self.assertEqual(UsageRecord.objects.filter(key=self.key).count(), 1)
        self.clock.advance(1.01)
        self.assertEqual(self.openai_status(self.plaintext), 401)
        self.assertEqual(self.openai_status(new), 200)
        self.assertNotIn(new, str(self.api.get(self.url(self.key)).json()))

    def test_a_revoked_key_cannot_be_rotated(self):
        revoked = APIKey.objects.get(name="revoked")
        self.assertEqual(self.api.post(self.url(revoked, "rotate")).status_code, 409)
        self.assertEqual(APIKey.objects.get(pk=revoked.pk).hashed_key, hash_key(self.revoked_plaintext))


class UsageTests(KeysAPITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.today = timezone.now().date()
        other = APIKey.objects.get(name="revoked")
        for key, model, days_ago, requests, errors, prompt, completion in [
            (self.key, "m1", 1, 10, 2, 100, 50),
            (self.key, "m2", 1, 1, 0, 7, 3),
            (self.key, "m1", 6, 4, 4, 0, 0),
            (self.key, "m1", 7, 99, 0, 999, 999),  # outside a 7-day window
            (other, "m1", 1, 5, 0, 20, 20),
        ]:
            UsageDaily.objects.create(key=key, model=model, day=self.today - timedelta(days=days_ago),
                                      requests=requests, errors=errors, prompt_tokens=prompt, completion_tokens=completion)
        # Today's requests, as the usage writer stores them: rows and their roll-ups together.
        write_batch([UsageEvent(key_id=key.pk, model="m1", endpoint="/v1/chat/completions", request_id="r",
                                status=status, prompt_tokens=prompt, completion_tokens=completion)
                     for key, status, prompt, completion in [(self.key, 200, 11, 5), (self.key, 500, 3, 0), (other, 200, 1, 1)]])
        # Yesterday's rows are already in the roll-up: they must not count twice.
        UsageRecord.objects.create(key=self.key, model="m1", endpoint="/v1/chat/completions", request_id="old",
                                   status=200, prompt_tokens=100, created_at=timezone.now() - timedelta(days=1, hours=1))

    def counts(self, requests, errors, prompt, completion) -> dict:
        # No model here has a price: all of it is unpriced usage, with no spend (never 0).
        return {"requests": requests, "errors": errors, "prompt_tokens": prompt,
                "completion_tokens": completion, "total_tokens": prompt + completion,
                "spend": {}, "unpriced_requests": requests, "unpriced_tokens": prompt + completion}

    def test_a_keys_usage_adds_rollups_and_todays_rows(self):
        response = self.api.get(self.url(self.key, "usage"), {"days": 7})
        self.assertEqual(response.status_code, 200, response.content)
        body = response.json()
        self.assertEqual((body["key"], body["days"], body["until"]), (self.key.pk, 7, self.today.isoformat()))
        self.assertEqual(body["since"], (self.today - timedelta(days=6)).isoformat())
        self.assertEqual(body["totals"], self.counts(17, 7, 121, 58))
        by_day = {row.pop("day"): row for row in body["by_day"]}
        self.assertEqual(len(by_day), 7)
        self.assertEqual(by_day[self.today.isoformat()], self.counts(2, 1, 14, 5))
        self.assertEqual(by_day[(self.today - timedelta(days=1)).isoformat()], self.counts(11, 2, 107, 53))
        self.assertEqual(by_day[(self.today - timedelta(days=2)).isoformat()], self.counts(0, 0, 0, 0))
        self.assertEqual(body["by_model"], [
            {"model": "m1", **self.counts(16, 7, 114, 55)},
            {"model": "m2", **self.counts(1, 0, 7, 3)},
        ])

    def test_the_window_defaults_to_30_days_and_is_bounded(self):
        body = self.api.get(self.url(self.key, "usage")).json()
        self.assertEqual((body["days"], len(body["by_day"])), (30, 30))
        self.assertEqual(body["totals"]["requests"], 116)
        for days in (0, 367, "x"):
            self.assertEqual(self.api.get(self.url(self.key, "usage"), {"days": days}).status_code, 400)

    def test_the_summary_covers_every_key(self):
        body = self.api.get(f"{KEYS}usage/", {"days": 7}).json()
        self.assertEqual(body["totals"], self.counts(23, 7, 142, 79))
        self.assertEqual([(row["key"], row["name"], row["requests"]) for row in body["by_key"]],
                         [(self.key.pk, "alice", 17), (APIKey.objects.get(name="revoked").pk, "revoked", 6)])
        self.assertEqual(body["by_key"][0]["prefix"], self.key.prefix)

    def test_usage_needs_staff(self):
        self.assertEqual(APIClient().get(f"{KEYS}usage/").status_code, 401)


class SchemaTests(KeysAPITestCase):
    def test_the_schema_is_valid_openapi_listing_the_key_api(self):
        response = APIClient().get("/api/schema/", {"format": "json"})
        self.assertEqual(response.status_code, 200)
        schema = response.json()
        validate_schema(schema)
        self.assertTrue(schema["openapi"].startswith("3."))
        self.assertEqual({path for path in schema["paths"] if path.startswith("/api/keys/")}, {
            "/api/keys/", "/api/keys/{id}/", "/api/keys/{id}/revoke/", "/api/keys/{id}/rotate/",
            "/api/keys/{id}/usage/", "/api/keys/usage/",
        })
        self.assertIn("key", schema["components"]["schemas"]["NewAPIKey"]["properties"])
        self.assertNotIn("key", schema["components"]["schemas"]["APIKey"]["properties"])
        self.assertNotIn("hashed_key", str(schema))

    def test_the_schema_is_also_served_as_yaml(self):
        response = APIClient().get("/api/schema/")
        self.assertEqual(response.status_code, 200)
        self.assertIn(b"/api/keys/{id}/rotate/:", response.content)


class RevokeCommandTests(KeysAPITestCase):
    def revoke(self, *references: str) -> str:
        out = StringIO()
        call_command("revoke_api_key", *references, stdout=out)
        return out.getvalue()

    def test_it_revokes_by_prefix_and_the_openai_api_follows(self):
        self.assertEqual(self.openai_status(self.plaintext), 200)
        self.assertIn("Revoked key", self.revoke(self.key.prefix + "…"))
        self.assertTrue(APIKey.objects.get(pk=self.key.pk).is_revoked)
        self.clock.advance(1.01)
        self.assertEqual(self.openai_status(self.plaintext), 401)

    def test_it_revokes_by_id_and_reports_keys_already_revoked(self):
        revoked = APIKey.objects.get(name="revoked")
        output = self.revoke(str(self.key.pk), str(revoked.pk))
        self.assertIn("already revoked", output)
        self.assertTrue(APIKey.objects.get(pk=self.key.pk).is_revoked)

    def test_it_refuses_unknown_and_ambiguous_references_and_revokes_nothing(self):
        twin = APIKey.objects.create(name="twin", prefix=self.key.prefix, hashed_key=hash_key("another secret"))
        with self.assertRaisesMessage(CommandError, "2 keys"):
            self.revoke(self.key.prefix)
        with self.assertRaisesMessage(CommandError, "No key"):
            self.revoke(str(twin.pk), "sk-nothing")
        self.assertFalse(APIKey.objects.filter(pk__in=[self.key.pk, twin.pk], revoked_at__isnull=False).exists())

    def test_an_unknown_full_key_is_not_echoed(self):
        secret = "sk-" + "x" * 40
        with self.assertRaises(CommandError) as raised:
            self.revoke(secret)
        self.assertNotIn(secret, str(raised.exception))
