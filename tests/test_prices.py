"""Prices and spend (docs/decisions.md#prices): each usage row stores the cost at the price in force
at its request's time, or none ("unpriced", never 0); editing a price never rewrites past rows;
roll-ups sum cost as well as tokens, unpriced usage apart; the dashboard, the CSV export and the
usage API show it. Run on PostgreSQL too (python -m tests.services): Decimal precision and NULLs."""
from __future__ import annotations

import csv
import io
import random
from datetime import timedelta
from decimal import Decimal

from django.contrib.auth.models import User
from django.db.models import Sum
from django.test import TestCase
from django.utils import timezone
from rest_framework.test import APIClient

from gateway_project import state
from keys.models import APIKey, Price, Team, UsageDaily, UsageRecord
from keys.pricing import PriceBook, get_price_book, to_nanos
from keys.usage import write_batch
from keys.usage_event import UsageEvent
from keys.usage_totals import rollups, summed


def event(key: APIKey, model: str = "m1", prompt: int = 1000, completion: int = 500, upstream: str = "",
          **fields) -> UsageEvent:
    return UsageEvent(key_id=key.pk, model=model, endpoint="/v1/chat/completions", request_id=f"r{random.random()}",
                      status=200, prompt_tokens=prompt, completion_tokens=completion, upstream=upstream, **fields)


class PriceTestCase(TestCase):
    def setUp(self) -> None:
        state.reset()
        self.team = Team.objects.create(name="acme")
        self.key, _ = APIKey.objects.create_key("alice", team=self.team)
        self.other, _ = APIKey.objects.create_key("bob")
        self.hour_ago = timezone.now() - timedelta(hours=1)

    def tearDown(self) -> None:
        state.reset()

    def write(self, *events: UsageEvent) -> None:
        get_price_book().invalidate()  # a price changed since the last batch: read it now
        write_batch(list(events))


class CostTests(PriceTestCase):
    def test_a_row_stores_the_cost_at_the_price_of_its_time(self):
        Price.objects.create(model="m1", input_per_million=Decimal("0.15"), output_per_million=Decimal("0.60"),
                             valid_from=self.hour_ago)
        self.write(event(self.key, prompt=1000, completion=500))
        row = UsageRecord.objects.get()
        self.assertEqual((row.cost, row.currency), (Decimal("0.00045"), "USD"))  # 0.00015 + 0.0003

    def test_the_tiniest_cost_is_not_rounded_to_zero(self):
        Price.objects.create(model="m1", input_per_million=Decimal("0.000001"), output_per_million=Decimal("0"),
                             valid_from=self.hour_ago)
        self.write(event(self.key, prompt=1, completion=0))
        self.assertEqual(UsageRecord.objects.get().cost, Decimal("1E-12"))
        self.assertEqual(UsageDaily.objects.get().cost, Decimal("1E-12"))

    def test_a_model_without_a_price_has_no_cost_anywhere(self):
        Price.objects.create(model="m1", input_per_million=1, output_per_million=1, valid_from=self.hour_ago)
        self.write(event(self.key, model="free-for-now"), event(self.key, model="m1"))
        row = UsageRecord.objects.get(model="free-for-now")
        self.assertEqual((row.cost, row.currency), (None, ""))
        rollup = UsageDaily.objects.get(model="free-for-now")
        self.assertEqual((rollup.cost, rollup.currency), (None, ""))
        totals = summed(rollups(), "model")
        unpriced = next(t for t in totals if t["model"] == "free-for-now")
        self.assertEqual((unpriced["cost"], unpriced["unpriced_requests"], unpriced["unpriced_tokens"]), (None, 1, 1500))
        priced = next(t for t in totals if t["model"] == "m1")
        self.assertEqual((priced["cost"], priced["unpriced_requests"]), (Decimal("0.0015"), 0))

    def test_a_price_from_a_later_date_applies_from_then_on(self):
        Price.objects.create(model="m1", input_per_million=1, output_per_million=1,
                             valid_from=timezone.now() + timedelta(hours=1))
        self.write(event(self.key))
        self.assertIsNone(UsageRecord.objects.get().cost)  # not in force yet: unpriced, not guessed

    def test_editing_a_price_never_rewrites_past_rows(self):
        price = Price.objects.create(model="m1", input_per_million=2, output_per_million=4, valid_from=self.hour_ago)
        self.write(event(self.key, prompt=1_000_000, completion=0))
        price.input_per_million = Decimal("3")
        price.save()
        Price.objects.create(model="m1", input_per_million=10, output_per_million=10, valid_from=timezone.now())
        self.write(event(self.key, prompt=1_000_000, completion=0))
        costs = list(UsageRecord.objects.order_by("id").values_list("cost", flat=True))
        self.assertEqual(costs, [Decimal("2"), Decimal("10")])
        self.assertEqual(UsageDaily.objects.get().cost, Decimal("12"))

    def test_an_upstreams_own_price_wins_over_the_models(self):
        Price.objects.create(model="m1", input_per_million=1, output_per_million=1, valid_from=self.hour_ago)
        Price.objects.create(model="m1", upstream="cloud", input_per_million=5, output_per_million=5,
                             currency="EUR", valid_from=self.hour_ago)
        self.write(event(self.key, prompt=1_000_000, completion=0, upstream="cloud"),
                   event(self.key, prompt=1_000_000, completion=0, upstream="local"))
        rows = dict(UsageRecord.objects.values_list("upstream", "cost"))
        self.assertEqual(rows, {"cloud": Decimal("5"), "local": Decimal("1")})
        self.assertEqual(set(UsageDaily.objects.values_list("upstream", "currency")), {("cloud", "EUR"), ("local", "USD")})

    def test_rollup_sums_equal_row_sums(self):
        Price.objects.create(model="m1", input_per_million=Decimal("0.333333"), output_per_million=Decimal("1.7"),
                             valid_from=self.hour_ago)
        Price.objects.create(model="m2", upstream="u2", input_per_million=Decimal("12.5"),
                             output_per_million=Decimal("0.000001"), valid_from=self.hour_ago)
        rng = random.Random(7)
        for _ in range(5):
            self.write(*(event(rng.choice([self.key, self.other]), model=rng.choice(["m1", "m2", "m3"]),
                               upstream=rng.choice(["", "u2"]), prompt=rng.randrange(0, 5000),
                               completion=rng.randrange(0, 5000), route=rng.choice(["", "r"]))
                         for _ in range(40)))
        rows = UsageRecord.objects.aggregate(cost=Sum("cost"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
        daily = UsageDaily.objects.aggregate(cost=Sum("cost"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"))
        self.assertEqual(rows, daily)
        self.assertEqual(UsageRecord.objects.filter(cost__isnull=True).count(),
                         UsageDaily.objects.filter(currency="").aggregate(n=Sum("requests"))["n"])
        for group in ("key_id", "model", "upstream", "route"):
            by_rows = {r[group]: r["c"] for r in UsageRecord.objects.values(group).annotate(c=Sum("cost"))}
            by_daily = {r[group]: r["cost"] for r in summed(rollups(), group)}
            self.assertEqual(by_rows, by_daily, group)


class PriceBookTests(TestCase):
    def test_prices_are_read_at_most_once_per_ttl(self):
        now = [0.0]
        book = PriceBook(ttl=5, clock=lambda: now[0])
        Price.objects.create(model="m1", input_per_million=1, output_per_million=1,
                             valid_from=timezone.now() - timedelta(minutes=1))
        with self.assertNumQueries(1):
            book.fresh()
            now[0] = 4.9
            book.fresh()
            self.assertIsNotNone(book.price("m1", "", timezone.now()))
        Price.objects.create(model="m2", input_per_million=1, output_per_million=1,
                             valid_from=timezone.now() - timedelta(minutes=1))
        self.assertIsNone(book.price("m2", "", timezone.now()))  # not yet seen
        now[0] = 5.0
        with self.assertNumQueries(1):
            book.fresh()
        self.assertIsNotNone(book.price("m2", "", timezone.now()))

    def test_the_dearest_price_bounds_a_request_before_its_upstream_is_chosen(self):
        at = timezone.now()
        book = PriceBook(ttl=5)
        Price.objects.create(model="m1", input_per_million=1, output_per_million=8, valid_from=at - timedelta(days=1))
        Price.objects.create(model="m1", upstream="u", input_per_million=3, output_per_million=2,
                             valid_from=at - timedelta(days=1))
        book.fresh()
        dearest = book.dearest("m1", at)
        self.assertEqual((dearest.input_per_million, dearest.output_per_million), (3, 8))
        self.assertIsNone(book.dearest("m2", at))
        self.assertEqual(to_nanos(Decimal("0.0000000001")), 1)  # rounded up: never counts less


class SpendReportTests(PriceTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.staff = User.objects.create_superuser("root", password="pw")
        Price.objects.create(model="m1", input_per_million=1, output_per_million=3, valid_from=self.hour_ago)
        self.write(event(self.key, prompt=1_000_000, completion=1_000_000, upstream="u1"),
                   event(self.other, prompt=2_000_000, completion=0, upstream="u2"),
                   event(self.key, model="local-llama", prompt=10, completion=20))

    def test_the_usage_api_shows_spend_per_key_team_model_and_upstream_with_unpriced_apart(self):
        api = APIClient()
        api.force_authenticate(self.staff)
        body = api.get("/api/keys/usage/", {"days": 1}).json()
        totals = body["totals"]
        self.assertEqual((totals["spend"], totals["unpriced_requests"], totals["unpriced_tokens"]),
                         ({"USD": "6.000000000000"}, 1, 30))
        by_model = {row["model"]: row for row in body["by_model"]}
        self.assertEqual(by_model["local-llama"]["spend"], {})  # unpriced: no cost, not 0
        self.assertEqual(by_model["local-llama"]["unpriced_requests"], 1)
        self.assertEqual({row["upstream"]: row["spend"] for row in body["by_upstream"]},
                         {"u1": {"USD": "4.000000000000"}, "u2": {"USD": "2.000000000000"}, "": {}})
        self.assertEqual({row["name"]: row["spend"] for row in body["by_team"]},
                         {"acme": {"USD": "4.000000000000"}, "": {"USD": "2.000000000000"}})
        self.assertEqual({row["name"]: row["unpriced_tokens"] for row in body["by_key"]}, {"alice": 30, "bob": 0})

    async def test_the_csv_export_says_unpriced(self):
        await self.async_client.aforce_login(self.staff)
        response = await self.async_client.get("/admin/keys/usagerecord/export/")
        content = b"".join([chunk async for chunk in response.streaming_content])
        rows = list(csv.DictReader(io.StringIO(content.decode())))
        costs = sorted((row["model"], row["cost"], row["currency"]) for row in rows)
        self.assertEqual(costs[0], ("local-llama", "unpriced", ""))
        self.assertEqual({Decimal(c) for m, c, cur in costs[1:]}, {Decimal(4), Decimal(2)})
        self.assertEqual({row["key__team__name"] for row in rows}, {"acme", ""})

    def test_the_dashboard_counts_unpriced_usage_apart(self):
        self.client.force_login(self.staff)
        page = self.client.get("/admin/keys/usagerecord/dashboard/").content.decode()
        self.assertIn("Spend (USD)", page)
        self.assertIn("6.00 USD", page)
        self.assertIn("Unpriced requests", page)
        self.assertIn("Spend per team", page)
        self.assertIn("Spend per upstream", page)
        self.assertRegex(page, r'class="num unpriced">unpriced<')
        self.assertNotIn("0.00 USD", page)  # the unpriced model is never shown as free
