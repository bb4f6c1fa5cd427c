"""Teams through the production request path (docs/decisions.md#limits): a key's models are within
its team's, the team's limits and budgets bind with the key's (the tightest wins, and the 429
says which: "Team budget" or "Key budget"), and a request's reservation is settled when it ends,
however it ends."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import httpx
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.utils import timezone
from rest_framework.test import APIClient

from keys.limit_store_memory import MemoryLimitStore
from keys.limits import get_limit_store, reset_limit_store
from keys.models import APIKey, Membership, Price, Team
from openai_api.auth import key_cache
from tests.base import GatewayTestCase
from tests.sse import read_stream

CHAT = "/v1/chat/completions"
BODY = {"model": "m1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


class TeamTestCase(GatewayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.team = Team.objects.create(name="acme")
        APIKey.objects.filter(pk=self.key.pk).update(team=self.team)

    async def team_set(self, **fields) -> None:
        await Team.objects.filter(pk=self.team.pk).aupdate(**fields)
        key_cache.clear()

    async def key_set(self, **fields) -> None:
        await APIKey.objects.filter(pk=self.key.pk).aupdate(**fields)
        key_cache.clear()


class TeamModelTests(TeamTestCase):
    async def test_a_key_may_use_only_its_teams_models(self):
        await self.team_set(allowed_models=["embed"])
        body = self.assertError(await self.post(CHAT, BODY), 403, param="model")
        self.assertIn("m1", body["error"]["message"])
        listed = (await self.get("/v1/models")).json()["data"]
        self.assertEqual([card["id"] for card in listed], ["embed"])

    async def test_a_keys_list_narrows_the_teams(self):
        await self.team_set(allowed_models=["m1", "embed"])
        await self.key_set(allowed_models=["embed"])
        self.assertError(await self.post(CHAT, BODY), 403)

    def test_the_key_api_refuses_models_outside_the_team(self):
        admin = User.objects.create_superuser("root", password="pw")
        api = APIClient()
        api.force_authenticate(admin)
        self.team.allowed_models = ["m1"]
        self.team.save()
        response = api.patch(f"/api/keys/{self.key.pk}/", {"allowed_models": ["m1", "m2"]}, format="json")
        self.assertEqual(response.status_code, 400, response.content)
        self.assertIn("m2", str(response.json()))
        response = api.post("/api/keys/", {"name": "x", "team": self.team.pk, "allowed_models": ["m9"]}, format="json")
        self.assertEqual(response.status_code, 400, response.content)

    def test_the_admin_refuses_narrowing_a_team_below_its_keys(self):
        admin = User.objects.create_superuser("root", password="pw")
        self.client.force_login(admin)
        APIKey.objects.filter(pk=self.key.pk).update(allowed_models=["m1"])
        Membership.objects.create(team=self.team, user=admin, role="owner")
        response = self.client.post(f"/admin/keys/team/{self.team.pk}/change/", {
            "name": "acme", "allowed_models": '["embed"]', "budget_currency": "", "budget_period": "month",
            "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0",
        })
        self.assertEqual(response.status_code, 200)  # the form again, with its error
        self.assertContains(response, "still list m1")
        self.team.refresh_from_db()
        self.assertEqual(self.team.allowed_models, [])


class TeamAdminPageTests(TeamTestCase):
    def test_teams_and_prices_are_in_the_admin(self):
        self.client.force_login(User.objects.create_superuser("root", password="pw"))
        for url in ("/admin/keys/team/", "/admin/keys/team/add/", f"/admin/keys/team/{self.team.pk}/change/",
                    "/admin/keys/price/", "/admin/keys/price/add/"):
            self.assertEqual(self.client.get(url).status_code, 200, url)
        response = self.client.post("/admin/keys/price/add/", {
            "model": "m1", "upstream": "", "input_per_million": "0.15", "output_per_million": "0.6",
            "currency": "USD", "valid_from_0": "2026-01-01", "valid_from_1": "00:00:00"})
        self.assertEqual(response.status_code, 302, response.content[:2000])
        self.assertEqual(Price.objects.get().output_per_million, Decimal("0.6"))


class TeamLimitTests(TeamTestCase):
    """On the memory store, whose state the tests read (Redis: tests/test_budgets.py and the
    end-to-end tests/test_team_budget_e2e.py)."""

    def setUp(self) -> None:
        super().setUp()
        reset_limit_store(MemoryLimitStore())

    async def test_the_teams_rate_limit_binds_every_key_of_the_team(self):
        other, plaintext = await sync_to_async(APIKey.objects.create_key)("bob", team=self.team)
        await self.team_set(requests_per_minute=2)
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        self.assertEqual((await self.post(CHAT, BODY, Authorization=f"Bearer {plaintext}")).status_code, 200)
        refused = await self.post(CHAT, BODY)
        body = self.assertError(refused, 429, code="rate_limit_exceeded")
        self.assertIn("Team rate limit", body["error"]["message"])

    async def test_a_team_budget_binds_and_says_so(self):
        await self.team_set(token_budget=5)
        body = self.assertError(await self.post(CHAT, BODY), 429, code="insufficient_quota")
        self.assertIn("Team budget", body["error"]["message"])
        self.assertIn("acme", body["error"]["message"])

    async def test_a_key_budget_binds_inside_a_roomy_team_and_says_so(self):
        await self.team_set(token_budget=10_000_000)
        await self.key_set(token_budget=5)
        body = self.assertError(await self.post(CHAT, BODY), 429, code="insufficient_quota")
        self.assertIn("Key budget", body["error"]["message"])

    async def test_an_unpriced_model_cannot_spend_a_money_budget(self):
        await self.team_set(money_budget=Decimal("10"))
        body = self.assertError(await self.post(CHAT, BODY), 429, code="insufficient_quota")
        self.assertIn("Team budget", body["error"]["message"])
        self.assertIn("no price", body["error"]["message"])

    async def test_a_money_budget_is_reserved_and_settled_at_the_price(self):
        await Price.objects.acreate(model="m1", input_per_million=Decimal("1000"), output_per_million=Decimal("1000"),
                                    valid_from=timezone.now() - timedelta(hours=1))
        await self.team_set(money_budget=Decimal("10"))
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        team = get_limit_store().states[("team", self.team.pk)]
        self.assertEqual(team.reserved, {})
        # 1000 per million tokens: a billionth is a thousandth of a token's price.
        self.assertGreater(team.nanos_used, 0)
        self.assertEqual(team.nanos_used % 1_000_000, 0)
        self.assertEqual(team.nanos_used // 1_000_000, team.budget_used)

    async def test_reservations_are_settled_when_a_request_fails_or_its_stream_breaks(self):
        await self.team_set(token_budget=1_000_000)
        store = get_limit_store()
        self.fake.worker_error = httpx.ReadTimeout
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 504)
        self.fake.worker_error = None
        self.fake.error_chunk_after = 2
        await read_stream(await self.post(CHAT, {**BODY, "stream": True}))
        self.fake.error_chunk_after = None
        self.assertEqual(await store.parallel_in_use(self.team.pk, "team"), 0)
        self.assertEqual(store.states[("team", self.team.pk)].reserved, {})

    async def test_keys_without_limits_or_team_take_no_lease(self):
        await self.key_set(team=None)
        self.assertEqual((await self.post(CHAT, BODY)).status_code, 200)
        self.assertEqual(get_limit_store().states, {})
