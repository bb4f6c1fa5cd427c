"""OpenID Connect single sign-on against a local provider (tests/oidc_provider.py): the whole
authorization-code flow, users created and updated, team roles from the groups claim, the local
login kept beside it (keys/oidc.py)."""
from __future__ import annotations

from urllib.parse import urlsplit

import httpx
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.test import TestCase, override_settings
from django.urls import reverse

from keys.models import Membership, Team
from keys.oidc import Grant, parse_team_roles
from tests.oidc_provider import Provider

BACKENDS = ["keys.login.LockoutBackend", "django.contrib.auth.backends.ModelBackend", "keys.oidc.TeamRoleOIDCBackend"]
ROLES = "ml-admins=red:owner,ml-devs=red:member,ml-readers=red:viewer,blue-devs=blue:member"


class OIDCTests(TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.provider = Provider("gateway", "client-secret").__enter__()
        cls.addClassCleanup(cls.provider.__exit__)

    def setUp(self) -> None:
        self.red = Team.objects.create(name="red")
        self.blue = Team.objects.create(name="blue")
        self.green = Team.objects.create(name="green")  # not in the mapping: managed in the admin
        self.settings_override = override_settings(
            **self.provider.settings(), AUTHENTICATION_BACKENDS=BACKENDS, GATEWAY_OIDC_TEAM_ROLES=ROLES,
            GATEWAY_OIDC_TEAMS_CLAIM="groups", GATEWAY_OIDC_STAFF_GROUPS=[])
        self.settings_override.enable()
        self.addCleanup(self.settings_override.disable)
        self.provider.audience = None

    def sso_login(self, sub: str = "u-123", groups: list[str] | None = None, **claims):
        """Start at the gateway, let the provider answer, come back to the callback."""
        self.provider.claims = {"sub": sub, "email": f"{sub}@example.org", "given_name": "Ada",
                                "groups": groups or [], **claims}
        self.client.logout()
        start = self.client.get(f"{reverse('oidc_authentication_init')}?next=/console/")
        self.assertEqual(start.status_code, 302)
        self.assertTrue(start["Location"].startswith(f"{self.provider.url}/authorize?"), start["Location"])
        at_provider = httpx.get(start["Location"], follow_redirects=False, timeout=5)
        self.assertEqual(at_provider.status_code, 302, at_provider.text)
        back = urlsplit(at_provider.headers["location"])
        self.assertEqual(back.path, reverse("oidc_authentication_callback"))
        return self.client.get(f"{back.path}?{back.query}")

    def roles(self, user: User) -> dict[str, str]:
        return dict(Membership.objects.filter(user=user).values_list("team__name", "role"))

    def test_a_new_user_is_created_logged_in_and_given_the_mapped_team_role(self):
        answer = self.sso_login(groups=["ml-admins", "unrelated"])
        self.assertRedirects(answer, "/console/", fetch_redirect_response=False)
        user = User.objects.get(username="sso-u-123")
        self.assertEqual(int(self.client.session["_auth_user_id"]), user.pk)
        self.assertEqual((user.email, user.first_name, user.is_staff), ("u-123@example.org", "Ada", False))
        self.assertFalse(user.has_usable_password())
        self.assertEqual(self.roles(user), {"red": "owner"})
        self.assertContains(self.client.get("/console/"), "red")  # the console shows the team

    def test_the_roles_follow_the_claim_at_each_login(self):
        self.sso_login(groups=["ml-devs", "blue-devs"])
        user = User.objects.get(username="sso-u-123")
        Membership.objects.create(user=user, team=self.green, role="owner")  # given in the admin
        self.assertEqual(self.roles(user), {"red": "member", "blue": "member", "green": "owner"})
        self.sso_login(groups=["ml-readers"])
        self.assertEqual(self.roles(user), {"red": "viewer", "green": "owner"})  # blue left; green kept
        self.sso_login(groups=[])
        self.assertEqual(self.roles(user), {"green": "owner"})
        self.assertEqual(User.objects.filter(username__startswith="sso-").count(), 1)  # updated, not duplicated

    def test_the_highest_role_wins_when_groups_map_to_one_team(self):
        self.sso_login(groups=["ml-readers", "ml-admins", "ml-devs"])
        self.assertEqual(self.roles(User.objects.get(username="sso-u-123")), {"red": "owner"})

    def test_a_provider_cannot_claim_a_local_account(self):
        root = User.objects.create_superuser("root", password="pw", email="root@example.org")
        self.sso_login(sub="root", email="root@example.org")
        self.assertNotEqual(int(self.client.session["_auth_user_id"]), root.pk)
        self.assertFalse(User.objects.get(username="sso-root").is_staff)

    def test_staff_groups_make_staff_when_configured(self):
        with override_settings(GATEWAY_OIDC_STAFF_GROUPS=["gateway-admins"]):
            self.sso_login(groups=["gateway-admins"])
            self.assertTrue(User.objects.get(username="sso-u-123").is_staff)
            self.sso_login(groups=[])
            self.assertFalse(User.objects.get(username="sso-u-123").is_staff)

    def test_an_id_token_for_another_client_is_refused(self):
        self.provider.audience = "another-client"
        answer = self.sso_login(groups=["ml-admins"])
        self.assertNotIn("_auth_user_id", self.client.session)
        self.assertEqual(answer.status_code, 400)
        self.assertFalse(User.objects.filter(username="sso-u-123").exists())

    def test_a_forged_callback_is_refused(self):
        self.client.get(reverse("oidc_authentication_init"))  # a state exists in the session
        answer = self.client.get(f"{reverse('oidc_authentication_callback')}?code=made-up&state=made-up")
        self.assertNotIn("_auth_user_id", self.client.session)
        self.assertIn(answer.status_code, (302, 400))

    def test_the_local_login_stays_beside_single_sign_on(self):
        User.objects.create_superuser("root", password="break-glass")
        page = self.client.get(reverse("admin:login"))
        self.assertContains(page, f'href="{reverse("oidc_authentication_init")}')
        self.assertContains(page, 'name="password"')
        self.assertContains(self.client.get(reverse("console:login")), "Log in with single sign-on")
        answer = self.client.post(f"{reverse('admin:login')}?next=/admin/", {"username": "root", "password": "break-glass"})
        self.assertRedirects(answer, "/admin/", fetch_redirect_response=False)


@override_settings(OIDC_RP_CLIENT_ID="")
class OIDCOffTests(TestCase):
    def test_without_configuration_the_routes_are_404_and_the_login_page_has_no_link(self):
        self.assertEqual(self.client.get(reverse("oidc_authentication_init")).status_code, 404)
        self.assertEqual(self.client.get(reverse("oidc_authentication_callback")).status_code, 404)
        self.assertNotContains(self.client.get(reverse("admin:login")), "single sign-on")


class MappingTests(TestCase):
    def test_both_spellings_parse(self):
        expected = {"a": Grant("red", "owner"), "b": Grant("blue team", "viewer")}
        self.assertEqual(parse_team_roles("a=red:owner, b=blue team:viewer"), expected)
        self.assertEqual(parse_team_roles('{"a": "red:owner", "b": "blue team:viewer"}'), expected)
        self.assertEqual(parse_team_roles(""), {})

    def test_a_bad_mapping_says_what_is_wrong(self):
        for bad in ("a=red", "a=red:admin", "nonsense"):
            with self.assertRaises(ImproperlyConfigured):
                parse_team_roles(bad)
