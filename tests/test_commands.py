"""Management commands, CORS and system checks."""
from __future__ import annotations

import io
import os
from unittest import mock

from django.core.management import call_command
from django.test import SimpleTestCase, TestCase, override_settings

from keys.hashing import hash_key
from keys.models import APIKey
from openai_api.apps import settings_check


class CreateApiKeyTests(TestCase):
    def test_it_prints_the_key_alone_on_the_last_line_and_stores_its_digest(self):
        out = io.StringIO()
        call_command("create_api_key", "ci", "--models", "a, b", "--rpm", "5", "--tpm", "100",
                     "--expires-days", "3", stdout=out, stderr=io.StringIO())
        plaintext = out.getvalue().strip().splitlines()[-1]
        self.assertRegex(plaintext, r"^sk-[A-Za-z0-9_-]{43}$")
        key = APIKey.objects.get()
        self.assertEqual(key.hashed_key, hash_key(plaintext))
        self.assertEqual((key.allowed_models, key.requests_per_minute, key.tokens_per_minute), (["a", "b"], 5, 100))
        self.assertIsNotNone(key.expires_at)


class ImportKeysTests(TestCase):
    def test_fastchat_style_keys_are_imported_once_as_digests(self):
        call_command("import_api_keys", "k1,k2", stdout=io.StringIO())
        call_command("import_api_keys", "k2,k3", stdout=io.StringIO())
        digests = set(APIKey.objects.values_list("hashed_key", flat=True))
        self.assertEqual(digests, {hash_key("k1"), hash_key("k2"), hash_key("k3")})
        self.assertFalse(APIKey.objects.filter(name__contains="k1,").exists())

    def test_short_imported_keys_are_never_stored_or_shown_whole(self):
        call_command("import_api_keys", "EMPTY,sk-123456", stdout=io.StringIO())
        for plaintext in ("EMPTY", "sk-123456"):
            key = APIKey.objects.get(hashed_key=hash_key(plaintext))
            self.assertEqual(key.prefix, "imp-" + key.hashed_key[:8])
            self.assertEqual(key.source, APIKey.Source.IMPORTED)
            stored = str(list(APIKey.objects.filter(pk=key.pk).values()))
            self.assertNotIn(plaintext, stored)
            self.assertNotIn(plaintext[:4], key.name + key.prefix + str(key))

    # The command exports its settings to os.environ and django.conf.settings: keep both local.
    @mock.patch.dict(os.environ)
    @override_settings()
    def test_openai_api_server_takes_fastchats_flags(self):
        with mock.patch("openai_api.management.commands.openai_api_server.Command.run_uvicorn") as run:
            call_command("openai_api_server", "--api-keys", "alpha,beta", "--port", "9001",
                         "--controller-address", "http://10.0.0.5:21001/", "--allowed-origins", '["https://a.example"]',
                         "--no-migrate", stderr=io.StringIO())
        options = run.call_args.args[0]
        self.assertEqual((options["port"], options["allowed_origins"]), (9001, ["https://a.example"]))
        self.assertEqual(APIKey.objects.filter(hashed_key__in=[hash_key("alpha"), hash_key("beta")]).count(), 2)
        from django.conf import settings

        self.assertEqual(settings.CONTROLLER_ADDRESS, "http://10.0.0.5:21001")


class CorsTests(TestCase):
    def test_a_preflight_gets_the_allowed_methods(self):
        response = self.client.options("/v1/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["Access-Control-Allow-Origin"], "*")
        self.assertEqual(response["Access-Control-Allow-Methods"], "POST")
        self.assertEqual(response["Access-Control-Allow-Headers"], "authorization, content-type")

    @override_settings(CORS_ALLOWED_ORIGINS=["https://app.example"], CORS_ALLOW_CREDENTIALS=True)
    def test_only_listed_origins_get_cors_headers(self):
        allowed = self.client.get("/v1/models", headers={"Origin": "https://app.example"})
        self.assertEqual(allowed["Access-Control-Allow-Origin"], "https://app.example")
        self.assertEqual(allowed["Access-Control-Allow-Credentials"], "true")
        other = self.client.get("/v1/models", headers={"Origin": "https://evil.example"})
        self.assertNotIn("Access-Control-Allow-Origin", other)


class SystemCheckTests(SimpleTestCase):
    @override_settings(CONTROLLER_ADDRESS="localhost:21001", FASTCHAT_WORKER_API_TIMEOUT=0,
                       FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE=0)
    def test_bad_settings_fail_at_startup(self):
        self.assertEqual({e.id for e in settings_check()}, {"openai_api.E001", "openai_api.E002", "openai_api.E003"})

    def test_the_defaults_pass(self):
        self.assertEqual(settings_check(), [])


@mock.patch.dict(os.environ)
@override_settings()
class ApiKeysFlagTests(TestCase):
    """openai_api_server --api-keys: the list is authoritative, as in FastChat."""

    def serve(self, keys: str) -> str:
        err = io.StringIO()
        with mock.patch("openai_api.management.commands.openai_api_server.Command.run_uvicorn"):
            call_command("openai_api_server", "--api-keys", keys, "--no-migrate", stderr=err)
        return err.getvalue()

    def key(self, plaintext: str) -> APIKey:
        return APIKey.objects.get(hashed_key=hash_key(plaintext))

    def test_keys_missing_from_the_list_stop_working(self):
        self.serve("EMPTY,sk-123456")
        output = self.serve("sk-123456,k3")
        self.assertIn("1 no longer listed and revoked", output)
        self.assertTrue(self.key("EMPTY").is_revoked)
        self.assertFalse(self.key("sk-123456").is_revoked)
        self.assertEqual(self.key("k3").source, APIKey.Source.API_KEYS_FLAG)
        self.assertNotIn("EMPTY", output + self.key("k3").prefix)

    def test_keys_made_here_or_by_hand_are_left_alone_and_earlier_imports_join_the_list(self):
        generated, _ = APIKey.objects.create_key("app")
        call_command("import_api_keys", "by-hand,listed", stdout=io.StringIO())
        self.serve("listed")
        self.serve("other")
        self.assertFalse(APIKey.objects.get(pk=generated.pk).is_revoked)
        self.assertFalse(self.key("by-hand").is_revoked)
        self.assertTrue(self.key("listed").is_revoked)

    def test_a_listed_key_revoked_by_somebody_stays_revoked(self):
        self.serve("leaked")
        self.key("leaked").revoke()
        self.assertIn("1 listed key(s) were revoked", self.serve("leaked"))
        self.assertTrue(self.key("leaked").is_revoked)

    def test_without_the_flag_nothing_is_revoked(self):
        self.serve("k1")
        with mock.patch("openai_api.management.commands.openai_api_server.Command.run_uvicorn"):
            call_command("openai_api_server", "--no-migrate", stderr=io.StringIO())
        self.assertFalse(self.key("k1").is_revoked)


class KeyActionTests(TestCase):
    """The actions the admin, the REST API and the commands share."""

    def test_revoke_keeps_the_first_time_and_updates_the_change_time(self):
        key, _ = APIKey.objects.create_key("k")
        before = key.updated_at
        self.assertTrue(key.revoke())
        first = key.revoked_at
        self.assertGreater(key.updated_at, before)
        self.assertFalse(key.revoke())
        self.assertEqual(APIKey.objects.get(pk=key.pk).revoked_at, first)

    def test_rotate_gives_a_generated_secret_and_refuses_revoked_keys(self):
        from keys.models import KeyRevokedError

        key, _ = APIKey.objects.import_plaintext("EMPTY", source=APIKey.Source.API_KEYS_FLAG)
        before = key.updated_at
        plaintext = key.rotate()
        key.refresh_from_db()
        self.assertEqual((key.hashed_key, key.prefix, key.source), (hash_key(plaintext), plaintext[:10], "generated"))
        self.assertGreater(key.updated_at, before)
        key.revoke()
        with self.assertRaises(KeyRevokedError):
            key.rotate()

    def test_the_migration_hides_what_earlier_imports_showed(self):
        import importlib

        from django.apps import apps

        migration = importlib.import_module("keys.migrations.0002_key_source")
        old = APIKey.objects.create(name="imported EMPT…", prefix="EMPTY", hashed_key=hash_key("EMPTY"))
        generated, plaintext = APIKey.objects.create_key("app")
        migration.hide_imported_secrets(apps, None)
        old.refresh_from_db()
        self.assertEqual((old.name, old.prefix, old.source), ("imported", "imp-" + hash_key("EMPTY")[:8], "imported"))
        self.assertEqual(APIKey.objects.get(pk=generated.pk).prefix, plaintext[:10])
