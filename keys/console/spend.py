"""Spend this budget period, per key and per team, from the daily roll-ups.

Priced usage is summed per currency; usage of models without a price is counted apart, in
tokens, and shown as "unpriced", never as a cost of 0 (docs/decisions.md#prices).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal

from django.db.models import Sum
from django.utils import timezone

from keys.dashboard import money
from keys.models import APIKey, BudgetPeriod, Team
from keys.usage_totals import rollups


@dataclass(frozen=True)
class Spend:
    period: str  # BudgetPeriod value
    since: date
    costs: dict[str, Decimal] = field(default_factory=dict)  # currency -> amount
    unpriced_tokens: int = 0
    budget: str = ""  # the team's money budget, formatted, if any

    @property
    def period_name(self) -> str:
        return "day" if self.period == BudgetPeriod.DAY else "month"

    @property
    def priced(self) -> bool:
        return bool(self.costs)

    @property
    def amount(self) -> str:
        return " + ".join(money(amount, currency) for currency, amount in sorted(self.costs.items()))

    @property
    def unpriced(self) -> str:
        return f"{self.unpriced_tokens:,} tokens" if self.unpriced_tokens else ""


def period_start(period: str, today: date | None = None) -> date:
    today = today or timezone.now().date()
    return today if period == BudgetPeriod.DAY else today.replace(day=1)


def spend_by_key(key_ids: list[int], period: str, today: date | None = None) -> dict[int | None, Spend]:
    """{key id: Spend} for the period containing today (None: all of them together)."""
    since = period_start(period, today)
    rows = (rollups(since=since, keys=key_ids).values("key_id", "currency").order_by()
            .annotate(cost_sum=Sum("cost"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")))
    costs: dict[int | None, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    unpriced: dict[int | None, int] = defaultdict(int)
    for row in rows:
        for owner in (row["key_id"], None):
            if row["currency"]:
                costs[owner][row["currency"]] += row["cost_sum"] or Decimal(0)
            else:
                unpriced[owner] += (row["prompt"] or 0) + (row["completion"] or 0)
    return {owner: Spend(period, since, dict(costs.get(owner, {})), unpriced.get(owner, 0))
            for owner in [*key_ids, None]}


def team_spend(team: Team, today: date | None = None) -> Spend:
    spend = spend_by_key(list(team.keys.values_list("pk", flat=True)), team.budget_period, today)[None]
    if team.money_budget is not None:
        spend = Spend(spend.period, spend.since, spend.costs, spend.unpriced_tokens,
                      money(team.money_budget, team.budget_currency))
    return spend


def with_spend(keys: list[APIKey], team: Team | None) -> list[APIKey]:
    """The keys, each with `.spend` for its team's budget period (a month without a team)."""
    period = team.budget_period if team else BudgetPeriod.MONTH
    spends = spend_by_key([key.pk for key in keys], period)
    for key in keys:
        key.spend = spends[key.pk]
    return keys
