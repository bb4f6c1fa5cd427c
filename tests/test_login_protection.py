"""Logging in safely: lock-out after failed logins on the admin's and the console's login, and
the optional TOTP second factor for staff (keys/login.py, keys/admin_site.py)."""
from __future__ import annotations

import io
import re
from datetime import timedelta

import httpx
import pytest
from axes.models import AccessAttempt
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import TestCase, override_settings
from django.urls import reverse
from django_otp.oath import totp
from django_otp.plugins.otp_totp.models import TOTPDevice

from tests.gateway_process import start_gateway

ADMIN_LOGIN = reverse("admin:login")
CONSOLE_LOGIN = reverse("console:login")
ADMIN_INDEX = reverse("admin:index")
FAST_HASHER = override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"])


@FAST_HASHER
@override_settings(AXES_FAILURE_LIMIT=3, AXES_COOLOFF_TIME=timedelta(minutes=15))
class LockoutTests(TestCase):
    def setUp(self) -> None:
        self.admin = User.objects.create_superuser("root", password="right-password")
        self.other = User.objects.create_user("alice", password="alice-password")

    def login(self, username: str, password: str, ip: str = "203.0.113.7", url: str = ADMIN_LOGIN, **headers):
        self.client.logout()
        return self.client.post(f"{url}?next={ADMIN_INDEX}" if url == ADMIN_LOGIN else url,
                                {"username": username, "password": password}, REMOTE_ADDR=ip, **headers)

    def fail(self, times: int, username: str = "root", ip: str = "203.0.113.7", url: str = ADMIN_LOGIN) -> None:
        for attempt in range(1, times + 1):
            # The form again, until the failure that reaches the limit: that one locks.
            expected = 429 if attempt >= 3 else 200
            self.assertEqual(self.login(username, "wrong", ip, url).status_code, expected, attempt)

    def test_after_the_limit_even_the_right_password_is_refused_with_429(self):
        self.fail(2)
        self.assertEqual(self.login("root", "right-password").status_code, 302)  # below the limit: in
        self.fail(3)  # a success reset the count; three more failures lock
        answer = self.login("root", "right-password")
        self.assertEqual(answer.status_code, 429)
        self.assertContains(answer, "Too many failed logins", status_code=429)
        self.assertEqual(answer["Retry-After"], str(15 * 60))
        self.assertNotIn("_auth_user_id", self.client.session)

    def test_the_console_login_counts_and_locks_too(self):
        self.fail(3, "alice", url=CONSOLE_LOGIN)
        self.assertEqual(self.login("alice", "alice-password", url=CONSOLE_LOGIN).status_code, 429)
        self.assertEqual(self.login("alice", "alice-password", url=ADMIN_LOGIN).status_code, 429)

    def test_another_user_and_another_address_are_not_locked(self):
        self.fail(3)
        self.assertEqual(self.login("root", "right-password").status_code, 429)
        self.assertEqual(self.login("alice", "alice-password", url=CONSOLE_LOGIN).status_code, 302)
        self.assertEqual(self.login("root", "right-password", ip="198.51.100.9").status_code, 302)

    def test_a_forwarding_header_from_a_direct_caller_does_not_change_the_address(self):
        self.fail(3)
        answer = self.login("root", "right-password", HTTP_X_FORWARDED_FOR="192.0.2.1", HTTP_X_REAL_IP="192.0.2.1")
        self.assertEqual(answer.status_code, 429)
        self.assertEqual(set(AccessAttempt.objects.values_list("ip_address", flat=True)), {"203.0.113.7"})

    def test_the_lock_out_ends_after_the_cool_off(self):
        self.fail(3)
        self.assertEqual(self.login("root", "right-password").status_code, 429)
        # Time passes: the attempts are as old as the cool-off.
        AccessAttempt.objects.update(attempt_time=AccessAttempt.objects.get().attempt_time - timedelta(minutes=16))
        self.assertEqual(self.login("root", "right-password").status_code, 302)

    def test_the_password_is_not_stored_with_the_attempt(self):
        self.fail(3)
        attempt = AccessAttempt.objects.get()
        self.assertNotIn("wrong", attempt.post_data)


@FAST_HASHER
@override_settings(GATEWAY_ADMIN_OTP=True)
class AdminTOTPTests(TestCase):
    def setUp(self) -> None:
        self.admin = User.objects.create_superuser("root", password="right-password")
        self.device = TOTPDevice.objects.create(user=self.admin, name="phone", confirmed=True)

    def token(self) -> str:
        return f"{totp(self.device.bin_key, self.device.step, self.device.t0, self.device.digits):06d}"

    def login(self, **extra):
        return self.client.post(f"{ADMIN_LOGIN}?next={ADMIN_INDEX}",
                                {"username": "root", "password": "right-password", **extra}, REMOTE_ADDR="203.0.113.7")

    def test_the_login_page_asks_for_a_token(self):
        self.assertContains(self.client.get(ADMIN_LOGIN), 'name="otp_token"')

    def test_the_password_alone_does_not_open_the_admin(self):
        answer = self.login()
        self.assertEqual(answer.status_code, 200)
        self.assertEqual(self.client.get(ADMIN_INDEX).status_code, 302)

    def test_a_wrong_token_does_not_open_the_admin(self):
        wrong = f"{(int(self.token()) + 1) % 1_000_000:06d}"
        self.assertEqual(self.login(otp_token=wrong).status_code, 200)
        self.assertEqual(self.client.get(ADMIN_INDEX).status_code, 302)

    def test_a_valid_token_opens_the_admin(self):
        self.assertRedirects(self.login(otp_token=self.token()), ADMIN_INDEX)
        self.assertEqual(self.client.get(ADMIN_INDEX).status_code, 200)

    def test_staff_without_a_device_cannot_open_the_admin(self):
        self.device.delete()
        self.assertEqual(self.login(otp_token="123456").status_code, 200)
        self.assertEqual(self.client.get(ADMIN_INDEX).status_code, 302)

    def test_a_session_logged_in_without_a_token_is_not_enough(self):
        self.client.force_login(self.admin)  # e.g. through the console's login
        self.assertEqual(self.client.get(ADMIN_INDEX).status_code, 302)


class TOTPDefaultOffTests(TestCase):
    def test_without_the_setting_the_password_is_enough(self):
        User.objects.create_superuser("root", password="right-password")
        self.assertNotContains(self.client.get(ADMIN_LOGIN), 'name="otp_token"')
        answer = self.client.post(f"{ADMIN_LOGIN}?next={ADMIN_INDEX}", {"username": "root", "password": "right-password"})
        self.assertRedirects(answer, ADMIN_INDEX)


class TOTPDeviceCommandTests(TestCase):
    def test_the_command_enrols_a_device_and_prints_its_uri_once(self):
        user = User.objects.create_superuser("root", password="pw")
        out = io.StringIO()
        call_command("totp_device", "root", stdout=out)
        uri = re.search(r"otpauth://totp/\S+", out.getvalue()).group(0)
        device = TOTPDevice.objects.get(user=user)
        self.assertTrue(device.confirmed)
        self.assertEqual(uri, device.config_url)
        self.assertIn("issuer=FastChat%20gateway", uri)

    def test_the_admin_never_shows_a_device_secret(self):
        user = User.objects.create_superuser("root", password="pw")
        device = TOTPDevice.objects.create(user=user, name="phone", confirmed=True)
        self.client.force_login(user)
        with override_settings(GATEWAY_ADMIN_OTP=False):
            page = self.client.get(reverse("admin:otp_totp_totpdevice_change", args=[device.pk]))
        self.assertEqual(page.status_code, 200)
        self.assertNotContains(page, device.key)
        self.assertNotContains(page, "otpauth://")


class AdminSaysWhatItIsTests(TestCase):
    def test_the_index_is_titled_and_links_dashboard_live_view_and_upstream_health(self):
        self.client.force_login(User.objects.create_superuser("root", password="pw"))
        page = self.client.get(ADMIN_INDEX)
        self.assertContains(page, "<title>Administration | FastChat gateway</title>", html=False)
        self.assertContains(page, "FastChat gateway")
        for name in ("admin:keys_usage_dashboard", "admin:keys_usage_live", "admin:upstreams_upstream_changelist"):
            self.assertContains(page, f'href="{reverse(name)}"')

    def test_the_login_page_is_titled(self):
        self.assertContains(self.client.get(ADMIN_LOGIN), "FastChat gateway")


@pytest.mark.e2e
def test_behind_the_proxy_each_forwarded_client_is_counted_apart_and_a_forged_address_is_ignored(tmp_path):
    """Served by uvicorn as deployed: it trusts the forwarding header from nginx on loopback only
    and takes the client nginx saw (the rightmost address), not one the client wrote itself."""
    gateway = start_gateway(tmp_path, "http://127.0.0.1:9", server="uvicorn",
                            extra_env={"GATEWAY_LOGIN_FAILURE_LIMIT": "2"})
    try:
        gateway.manage("shell", "-c", "from django.contrib.auth.models import User; "
                                      "User.objects.create_superuser('root', password='right-password')")

        def login(password: str, forwarded_for: str) -> int:
            with httpx.Client(base_url=gateway.url, timeout=10) as browser:
                page = browser.get(ADMIN_LOGIN)
                token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
                return browser.post(f"{ADMIN_LOGIN}?next={ADMIN_INDEX}", headers={"X-Forwarded-For": forwarded_for},
                                    data={"csrfmiddlewaretoken": token, "username": "root", "password": password}
                                    ).status_code

        assert login("wrong", "198.51.100.1") == 200
        assert login("wrong", "198.51.100.1") == 429
        assert login("right-password", "198.51.100.1") == 429
        # What nginx sends when the locked-out client writes its own header: "forged, real".
        assert login("right-password", "203.0.113.9, 198.51.100.1") == 429
        assert login("right-password", "198.51.100.2") == 302  # another client behind the proxy
    finally:
        gateway.stop()
