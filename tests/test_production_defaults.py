"""Safe defaults in production: the secret key, allowed hosts, TLS settings, CORS on the API
paths only, and /metrics and /health/ready's details for insiders only."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from django.contrib.auth.models import User
from django.test import TestCase, override_settings

from tests.base import GatewayTestCase
from tests.procs import REPO_ROOT

PRINT_SETTINGS = (
    "import django, json; django.setup(); from django.conf import settings as s; print(json.dumps({"
    "'hosts': s.ALLOWED_HOSTS, 'proxy': getattr(s, 'SECURE_PROXY_SSL_HEADER', None), "
    "'session_secure': s.SESSION_COOKIE_SECURE, 'csrf_secure': s.CSRF_COOKIE_SECURE, 'hsts': s.SECURE_HSTS_SECONDS}))"
)


def load_settings(argv0: str = "", **env: str) -> subprocess.CompletedProcess:
    """Import the gateway's settings in a fresh process with only `env` set (no key by default)."""
    base = {name: value for name, value in os.environ.items()
            if not name.startswith(("DJANGO_", "GATEWAY_")) and name != "DATABASE_URL"}
    code = f"import sys; sys.argv = ['manage.py', {argv0!r}]; {PRINT_SETTINGS}" if argv0 else PRINT_SETTINGS
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          env={**base, "DJANGO_SETTINGS_MODULE": "gateway_project.settings", **env})


class SecretKeyAndHostsTests(TestCase):
    def test_without_a_secret_key_the_gateway_refuses_to_start(self):
        result = load_settings()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("ImproperlyConfigured: DJANGO_SECRET_KEY (or DJANGO_SECRET_KEY_FILE) must be set", result.stderr)

    def test_the_uvicorn_entry_point_refuses_too(self):
        base = {name: value for name, value in os.environ.items() if not name.startswith("DJANGO_")}
        result = subprocess.run([sys.executable, "-c", "import gateway_project.asgi"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=60, env=base)
        self.assertIn("DJANGO_SECRET_KEY", result.stderr)
        self.assertNotEqual(result.returncode, 0)

    def test_with_a_key_the_hosts_default_to_loopback_names_and_tls_is_off(self):
        result = load_settings(DJANGO_SECRET_KEY="k" * 50)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout), {
            "hosts": ["localhost", "127.0.0.1", "[::1]"], "proxy": None,
            "session_secure": False, "csrf_secure": False, "hsts": 0})

    def test_debug_and_the_demo_need_no_key(self):
        self.assertEqual(load_settings(DJANGO_DEBUG="True").returncode, 0)
        demo = load_settings("demo")
        self.assertEqual(demo.returncode, 0, demo.stderr)
        self.assertNotIn("*", json.loads(demo.stdout)["hosts"])

    def test_behind_tls_the_proxy_header_secure_cookies_and_hsts_are_on(self):
        result = load_settings(DJANGO_SECRET_KEY="k" * 50, GATEWAY_BEHIND_TLS="True",
                               DJANGO_ALLOWED_HOSTS="gateway.example.com")
        self.assertEqual(json.loads(result.stdout), {
            "hosts": ["gateway.example.com"], "proxy": ["HTTP_X_FORWARDED_PROTO", "https"],
            "session_secure": True, "csrf_secure": True, "hsts": 31536000})

    @override_settings(SECURE_PROXY_SSL_HEADER=("HTTP_X_FORWARDED_PROTO", "https"), SECURE_HSTS_SECONDS=3600)
    def test_the_forwarded_scheme_turns_hsts_on_for_the_admin(self):
        self.assertIn("Strict-Transport-Security", self.client.get("/admin/login/", headers={"X-Forwarded-Proto": "https"}))
        self.assertNotIn("Strict-Transport-Security", self.client.get("/admin/login/"))


@override_settings(CORS_ALLOWED_ORIGINS=["*"], CORS_ALLOW_CREDENTIALS=True)
class CorsScopeTests(GatewayTestCase):
    ORIGIN = {"Origin": "https://evil.example"}

    def test_key_management_and_admin_answer_no_origin_even_with_credentials(self):
        staff = User.objects.create_superuser("root", password="pw")
        self.client.force_login(staff)
        for path in ("/api/keys/", "/admin/", "/admin/keys/apikey/"):
            response = self.client.get(path, headers=self.ORIGIN)
            self.assertEqual(response.status_code, 200, path)
            self.assertNotIn("Access-Control-Allow-Origin", response, path)
            self.assertNotIn("Access-Control-Allow-Credentials", response, path)
        preflight = self.client.options("/api/keys/", headers={**self.ORIGIN, "Access-Control-Request-Method": "POST"})
        self.assertNotIn("Access-Control-Allow-Origin", preflight)
        self.assertNotIn("Access-Control-Allow-Methods", preflight)

    async def test_any_origin_is_not_echoed_with_credentials(self):
        response = await self.get("/v1/models", **self.ORIGIN)
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response["Access-Control-Allow-Origin"], "*")
        self.assertNotIn("Access-Control-Allow-Credentials", response)

    @override_settings(CORS_ALLOWED_ORIGINS=["https://app.example"])
    async def test_a_listed_origin_gets_credentials(self):
        response = await self.get("/v1/models", Origin="https://app.example")
        self.assertEqual(response["Access-Control-Allow-Origin"], "https://app.example")
        self.assertEqual(response["Access-Control-Allow-Credentials"], "true")


class InsiderTests(GatewayTestCase):
    REMOTE = {"REMOTE_ADDR": "203.0.113.9"}
    PROXIED = {"headers": {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9"}}

    def test_metrics_answer_direct_loopback_callers_only(self):
        self.assertEqual(self.client.get("/metrics").status_code, 200)
        self.assertEqual(self.client.get("/metrics", **self.REMOTE).status_code, 403)
        # nginx connects from loopback: a forwarded request is remote.
        self.assertEqual(self.client.get("/metrics", **self.PROXIED).status_code, 403)
        self.assertEqual(self.client.get("/metrics", headers={"X-Real-IP": "127.0.0.1"}).status_code, 403)

    @override_settings(GATEWAY_METRICS_TOKEN="scrape-token")
    def test_with_a_token_metrics_answer_the_token_alone_from_anywhere(self):
        self.assertEqual(self.client.get("/metrics", **self.REMOTE).status_code, 401)
        self.assertEqual(self.client.get("/metrics").status_code, 401)
        self.assertEqual(self.client.get("/metrics", headers={"Authorization": "Bearer wrong"},
                                         **self.REMOTE).status_code, 401)
        response = self.client.get("/metrics", headers={"Authorization": "Bearer scrape-token",
                                                        "X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(response.status_code, 200)
        self.assertIn(b"gateway_requests_total", response.content)

    def test_readiness_tells_remote_callers_only_ok_or_unavailable(self):
        self.assertEqual(self.client.get("/health/ready", **self.REMOTE).json(), {"status": "ok"})
        self.fake.controller_error = __import__("httpx").ConnectError
        remote = self.client.get("/health/ready", **self.PROXIED)
        self.assertEqual((remote.status_code, remote.json()), (503, {"status": "unavailable"}))
        self.assertNotIn(b"http", remote.content)
        local = self.client.get("/health/ready")
        self.assertEqual(local.status_code, 503)
        self.assertEqual(local.json()["checks"]["database"], "ok")
        self.assertTrue(local.json()["checks"]["controller"].startswith("error"))

    @override_settings(GATEWAY_METRICS_TOKEN="scrape-token")
    def test_token_holders_get_the_readiness_details(self):
        response = self.client.get("/health/ready", headers={"Authorization": "Bearer scrape-token"}, **self.REMOTE)
        self.assertEqual(response.json()["checks"], {"database": "ok", "controller": "ok"})


class DefaultDatabaseTests(TestCase):
    def test_the_default_sqlite_database_runs_in_wal_mode_and_stays_durable(self):
        import sqlite3
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "gateway.sqlite3"
            base = {name: value for name, value in os.environ.items() if not name.startswith(("DJANGO_", "GATEWAY_"))}
            code = ("import django, json; django.setup(); from django.db import connection; "
                    "cursor = connection.cursor(); print(json.dumps([cursor.execute('PRAGMA journal_mode').fetchone()[0], "
                    "cursor.execute('PRAGMA synchronous').fetchone()[0]]))")
            result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                                    timeout=60, env={**base, "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
                                                     "DJANGO_SECRET_KEY": "x", "DATABASE_URL": f"sqlite:///{path}"})
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(json.loads(result.stdout.splitlines()[-1]), ["wal", 2])  # 2: FULL, a commit is synced
            # The mode is the file's: any reader (a backup, sqlite3's shell) finds it so.
            with sqlite3.connect(path) as db:
                self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
