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
