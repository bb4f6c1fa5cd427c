"""The console (/console/): team members' view of their keys, spend and usage; owners' actions."""
from __future__ import annotations

import re
from decimal import Decimal

from django.contrib.auth.models import User
from django.test import TestCase
from django.urls import reverse
from django.utils import timezone

from keys.hashing import hash_key
from keys.models import APIKey, Membership, Team, UsageDaily

PLAINTEXT = re.compile(r"sk-[A-Za-z0-9_-]{43}")
HOME = reverse("console:home")
LOGIN = reverse("console:login")


def team_url(team: Team) -> str:
    return reverse("console:team", args=[team.pk])


def key_url(key: APIKey, action: str = "") -> str:
    return reverse(f"console:key{'-' + action if action else ''}", args=[key.pk])


class ConsoleCast(TestCase):
    """Two teams, each with keys, and users in every role of the first."""

    def setUp(self) -> None:
        super().setUp()
        self.red = Team.objects.create(name="red", allowed_models=["m1", "m2"], requests_per_minute=100,
                                       token_budget=1_000_000, money_budget=Decimal("50"))
        self.blue = Team.objects.create(name="blue")
        self.users = {}
        for role in Membership.Role.values:
            self.users[role] = User.objects.create_user(f"red-{role}", password="pw")
            Membership.objects.create(team=self.red, user=self.users[role], role=role)
        self.blue_owner = User.objects.create_user("blue-owner", password="pw")
        Membership.objects.create(team=self.blue, user=self.blue_owner, role=Membership.Role.OWNER)
        self.red_key, _ = APIKey.objects.create_key("red-app", team=self.red, allowed_models=["m1"])
        self.blue_key, _ = APIKey.objects.create_key("blue-app", team=self.blue)
        today = timezone.now().date()
        UsageDaily.objects.create(key=self.red_key, model="m1", day=today, requests=3, prompt_tokens=30,
                                  completion_tokens=12, currency="USD", cost=Decimal("1.25"))
        UsageDaily.objects.create(key=self.red_key, model="local", day=today, requests=2, prompt_tokens=7,
                                  completion_tokens=5, currency="", cost=None)

    def login(self, role: str) -> User:
        user = self.users[role] if role in self.users else self.blue_owner
        self.client.force_login(user)
        return user


class ReadingTests(ConsoleCast):
    def test_anonymous_visitors_are_sent_to_the_login_page(self):
        for url in (HOME, team_url(self.red), key_url(self.red_key)):
            response = self.client.get(url)
            self.assertEqual(response.status_code, 302)
            self.assertTrue(response["Location"].startswith(LOGIN), response["Location"])

    def test_a_non_staff_user_logs_in_on_the_admins_login_page(self):
        page = self.client.get(LOGIN)
        self.assertContains(page, 'id="login-form"')
        self.assertTemplateUsed(page, "admin/login.html")
        response = self.client.post(LOGIN, {"username": "red-viewer", "password": "pw"})
        self.assertRedirects(response, HOME, fetch_redirect_response=False)
        self.assertContains(self.client.get(HOME), "red")
        self.client.logout()
        wrong = self.client.post(LOGIN, {"username": "red-viewer", "password": "nope"})
        self.assertEqual(wrong.status_code, 200)
        self.assertContains(wrong, "errornote")

    def test_members_see_their_team_and_its_keys_only(self):
        for role in Membership.Role.values:
            self.login(role)
            home = self.client.get(HOME)
            self.assertContains(home, f'href="{team_url(self.red)}"')
            self.assertNotContains(home, "blue")
            page = self.client.get(team_url(self.red))
            self.assertContains(page, "red-app")
            self.assertContains(page, self.red_key.prefix)
            self.assertNotContains(page, "blue-app")
            self.assertEqual(self.client.get(team_url(self.blue)).status_code, 404)
            self.assertEqual(self.client.get(key_url(self.blue_key)).status_code, 404)

    def test_spend_shows_unpriced_usage_apart_never_as_zero(self):
        self.login("viewer")
        page = self.client.get(team_url(self.red)).content.decode()
        self.assertIn("1.25 USD", page)
        self.assertIn("12 tokens unpriced", page)  # 7 + 5 tokens of the unpriced model
        self.assertIn("of 50.00 USD", page)
        key_page = self.client.get(key_url(self.red_key)).content.decode()
        self.assertIn("1.25 USD", key_page)
        self.assertIn("12 tokens unpriced", key_page)

    def test_a_key_with_only_unpriced_usage_shows_no_cost(self):
        UsageDaily.objects.filter(currency="USD").delete()
        self.login("member")
        page = self.client.get(key_url(self.red_key)).content.decode()
        spend = re.search(r'id="key-spend">(.*?)</strong>', page, re.S).group(1)
        self.assertIn("12 tokens unpriced", spend)
        self.assertNotIn("0", spend.replace("12", ""))

    def test_charts_are_inline_svg_of_the_teams_keys_only(self):
        UsageDaily.objects.create(key=self.blue_key, model="secret-model", day=timezone.now().date(), requests=9)
        self.login("member")
        page = self.client.get(team_url(self.red)).content.decode()
        self.assertIn("<svg", page)
        self.assertIn('aria-label="Requests per day"', page)
        self.assertIn("red-app", page)
        self.assertNotIn("secret-model", page)
        self.assertNotIn("<script src=\"http", page)

    def test_viewers_and_members_cannot_change_keys_they_did_not_create(self):
        for role in ("viewer", "member"):
            self.login(role)
            page = self.client.get(team_url(self.red)).content.decode()
            self.assertEqual("Create a key" in page, role == "member")
            self.assertNotIn(key_url(self.red_key, "revoke"), page)
            self.assertNotIn('id="key-form"', self.client.get(key_url(self.red_key)).content.decode())
            self.assertEqual(self.client.post(key_url(self.red_key, "revoke")).status_code, 403)
            self.assertEqual(self.client.post(key_url(self.red_key, "rotate")).status_code, 403)
            self.assertEqual(self.client.post(key_url(self.red_key), {"name": "x"}).status_code, 403)
            create = self.client.get(reverse("console:key-create", args=[self.red.pk]))
            self.assertEqual(create.status_code, 200 if role == "member" else 403)
            self.red_key.refresh_from_db()
            self.assertFalse(self.red_key.is_revoked)
            self.assertEqual(self.red_key.name, "red-app")

    def test_a_member_manages_the_keys_they_created_only(self):
        member = self.login("member")
        response = self.client.post(reverse("console:key-create", args=[self.red.pk]), {
            "name": "laptop", "allowed_models": "m1", "budget_period": "month"})
        self.assertEqual(response.status_code, 200)
        self.assertTrue(PLAINTEXT.search(response.content.decode()))
        mine = APIKey.objects.get(name="laptop")
        page = self.client.get(team_url(self.red)).content.decode()
        self.assertIn(key_url(mine, "revoke"), page)
        self.assertNotIn(key_url(self.red_key, "revoke"), page)
        self.assertContains(self.client.get(key_url(mine)), 'id="key-form"')
        self.assertEqual(self.client.post(key_url(mine, "rotate")).status_code, 200)
        self.assertEqual(self.client.post(key_url(mine, "revoke")).status_code, 302)
        mine.refresh_from_db()
        self.assertTrue(mine.is_revoked)
        # Another member of the team, or a viewer, may not.
        other = User.objects.create_user("red-member-2")
        Membership.objects.create(team=self.red, user=other, role=Membership.Role.MEMBER)
        self.client.force_login(other)
        self.assertEqual(self.client.post(key_url(mine, "rotate")).status_code, 403)
        self.assertNotEqual(member, other)


class OwnerTests(ConsoleCast):
    def setUp(self) -> None:
        super().setUp()
        self.login("owner")

    def create(self, **fields):
        data = {"name": "new-app", "allowed_models": "m2", "requests_per_minute": "50", "tokens_per_minute": "",
                "parallel_requests": "", "token_budget": "", "money_budget": "", "budget_period": "month", **fields}
        return self.client.post(reverse("console:key-create", args=[self.red.pk]), data)

    def test_an_owner_creates_a_key_and_sees_its_plaintext_once(self):
        response = self.create()
        self.assertEqual(response.status_code, 200)
        plaintexts = set(PLAINTEXT.findall(response.content.decode()))
        self.assertEqual(len(plaintexts), 1)
        plaintext = plaintexts.pop()
        key = APIKey.objects.get(name="new-app")
        self.assertEqual((key.team, key.allowed_models, key.requests_per_minute), (self.red, ["m2"], 50))
        self.assertEqual(key.hashed_key, hash_key(plaintext))
        for url in (HOME, team_url(self.red), key_url(key)):
            self.assertNotIn(plaintext, self.client.get(url).content.decode())

    def test_keys_stay_within_the_teams_models_and_limits(self):
        for fields, field in (({"allowed_models": "m1, m3"}, "allowed_models"),
                              ({"requests_per_minute": "101"}, "requests_per_minute"),
                              ({"token_budget": "1000001"}, "token_budget"),
                              ({"money_budget": "50.01"}, "money_budget")):
            response = self.create(**fields)
            self.assertEqual(response.status_code, 200)
            self.assertIn(field, response.context["form"].errors, fields)
            self.assertFalse(PLAINTEXT.search(response.content.decode()))
        self.assertFalse(APIKey.objects.filter(name="new-app").exists())
        # Empty models: the team's (its allow-list binds as well), shown so.
        self.create(allowed_models="")
        key = APIKey.objects.get(name="new-app")
        self.assertEqual(key.allowed_models, [])
        self.assertContains(self.client.get(team_url(self.red)), "all of the team's")

    def test_an_owner_changes_limits_within_the_teams(self):
        data = {"name": "renamed", "allowed_models": "m1, m2", "requests_per_minute": "100", "tokens_per_minute": "",
                "parallel_requests": "2", "token_budget": "", "money_budget": "10", "budget_period": "day"}
        response = self.client.post(key_url(self.red_key), data)
        self.assertRedirects(response, key_url(self.red_key), fetch_redirect_response=False)
        self.red_key.refresh_from_db()
        self.assertEqual((self.red_key.name, self.red_key.parallel_requests, self.red_key.money_budget),
                         ("renamed", 2, Decimal("10")))
        refused = self.client.post(key_url(self.red_key), {**data, "requests_per_minute": "500"})
        self.assertEqual(refused.status_code, 200)
        self.red_key.refresh_from_db()
        self.assertEqual(self.red_key.requests_per_minute, 100)

    def test_an_owner_revokes_and_rotates(self):
        old_hash = self.red_key.hashed_key
        rotated = self.client.post(key_url(self.red_key, "rotate"))
        plaintext = PLAINTEXT.search(rotated.content.decode()).group(0)
        self.red_key.refresh_from_db()
        self.assertNotEqual(self.red_key.hashed_key, old_hash)
        self.assertEqual(self.red_key.hashed_key, hash_key(plaintext))
        response = self.client.post(key_url(self.red_key, "revoke"))
        self.assertRedirects(response, team_url(self.red), fetch_redirect_response=False)
        self.red_key.refresh_from_db()
        self.assertTrue(self.red_key.is_revoked)
        self.assertContains(self.client.get(team_url(self.red)), "Revoked red-app")
        self.assertNotIn(PLAINTEXT.pattern, "")
        again = self.client.post(key_url(self.red_key, "rotate"))
        self.assertRedirects(again, key_url(self.red_key), fetch_redirect_response=False)

    def test_actions_need_post_and_a_csrf_token(self):
        self.assertEqual(self.client.get(key_url(self.red_key, "revoke")).status_code, 405)
        from django.test import Client

        strict = Client(enforce_csrf_checks=True)
        strict.force_login(self.users["owner"])
        self.assertEqual(strict.post(key_url(self.red_key, "revoke")).status_code, 403)
        self.assertEqual(strict.post(reverse("console:key-create", args=[self.red.pk]), {"name": "x"}).status_code, 403)
        self.red_key.refresh_from_db()
        self.assertFalse(self.red_key.is_revoked)

    def test_an_owner_of_one_team_cannot_touch_anothers_keys(self):
        for url in (key_url(self.blue_key, "revoke"), key_url(self.blue_key, "rotate"), key_url(self.blue_key)):
            self.assertEqual(self.client.post(url).status_code, 404)
        self.assertEqual(self.client.get(reverse("console:key-create", args=[self.blue.pk])).status_code, 404)
        self.blue_key.refresh_from_db()
        self.assertFalse(self.blue_key.is_revoked)


class AuditTests(ConsoleCast):
    """Each console action leaves exactly one audit entry: the user, the console, no plaintext."""

    def test_each_console_action_leaves_one_entry_naming_the_user_and_the_console(self):
        from keys.audit.models import AuditEntry

        owner = self.login("owner")
        created = self.client.post(reverse("console:key-create", args=[self.red.pk]), {
            "name": "audited", "allowed_models": "m1", "requests_per_minute": "", "tokens_per_minute": "",
            "parallel_requests": "", "token_budget": "", "money_budget": "", "budget_period": "month"})
        key = APIKey.objects.get(name="audited")
        changed = {"name": "audited", "allowed_models": "m1", "requests_per_minute": "7", "tokens_per_minute": "",
                   "parallel_requests": "", "token_budget": "", "money_budget": "", "budget_period": "month"}
        actions = [
            ("create", lambda: created),
            ("update", lambda: self.client.post(key_url(key), changed)),
            ("update", lambda: self.client.post(key_url(key, "rotate"))),
            ("update", lambda: self.client.post(key_url(key, "revoke"))),
        ]
        plaintexts = set(PLAINTEXT.findall(created.content.decode()))
        seen = 0
        for action, act in actions:
            response = act()
            plaintexts |= set(PLAINTEXT.findall(response.content.decode()))
            entries = list(AuditEntry.objects.filter(object_type="keys.apikey", object_id=str(key.pk))
                           .order_by("id"))
            self.assertEqual(len(entries), seen + 1, [(e.action, e.changes) for e in entries])
            entry = entries[-1]
            self.assertEqual((entry.action, entry.origin, entry.actor_user_id), (action, "console", owner.pk))
            seen += 1
        self.assertEqual(len(plaintexts), 2)  # created, then rotated
        trail = str(list(AuditEntry.objects.values()))
        for plaintext in plaintexts:
            self.assertNotIn(plaintext, trail)
        self.assertNotIn(key.hashed_key, trail)

    def test_a_refused_action_leaves_no_entry(self):
        from keys.audit.models import AuditEntry

        self.login("member")
        self.client.post(key_url(self.red_key, "revoke"))
        self.login("owner")
        self.client.post(key_url(self.red_key), {"name": "x", "requests_per_minute": "1000"})  # above the team's
        self.assertFalse(AuditEntry.objects.filter(origin="console").exists())


class BoundsTests(ConsoleCast):
    def test_model_lists_and_names_are_bounded(self):
        self.red.allowed_models = []
        self.red.save()
        self.login("owner")
        url = reverse("console:key-create", args=[self.red.pk])
        base = {"name": "bounded", "budget_period": "month"}
        for models in ("x" * 201, ",".join(f"m{i}" for i in range(1001))):
            response = self.client.post(url, {**base, "allowed_models": models})
            self.assertEqual(response.status_code, 200)
            self.assertIn("allowed_models", response.context["form"].errors)
        self.assertFalse(APIKey.objects.filter(name="bounded").exists())
        response = self.client.get(team_url(self.red), {"days": "100000"})
        self.assertEqual(response.context["days"], 30)


class LoginTests(ConsoleCast):
    def test_a_signed_in_user_on_the_login_page_goes_to_their_teams_and_logs_out_by_post(self):
        self.login("viewer")
        self.assertRedirects(self.client.get(LOGIN), HOME, fetch_redirect_response=False)
        self.assertEqual(self.client.get(reverse("console:logout")).status_code, 405)
        self.assertRedirects(self.client.post(reverse("console:logout")), LOGIN, fetch_redirect_response=False)
        self.assertEqual(self.client.get(HOME).status_code, 302)

    def test_an_inactive_user_cannot_log_in(self):
        self.users["member"].is_active = False
        self.users["member"].save()
        response = self.client.post(LOGIN, {"username": "red-member", "password": "pw"})
        self.assertEqual(response.status_code, 200)
        self.assertEqual(self.client.get(HOME).status_code, 302)
