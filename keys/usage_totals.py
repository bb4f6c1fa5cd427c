"""Usage totals, all from the daily roll-ups (UsageDaily).

keys.usage writes a request's row and its roll-up in one transaction, so the roll-ups are
complete, today's included; they outlive `prune_usage`, and a query over them reads one row per
key, model and day however many requests there were. The dashboard, the REST API's usage
reports, the admin's "requests (30 d)" column and the budgets all count from here.
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from decimal import Decimal

from django.db.models import OuterRef, Q, QuerySet, Subquery, Sum

from keys.models import UsageDaily

COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens")
UNPRICED = Q(currency="")
# Aliases differ from the field names: Django refuses an annotation named like a field.
SUMS = {
    **{f"{name}_sum": Sum(name) for name in COUNTERS},
    "cost_sum": Sum("cost"),  # NULL (None) when no row of the group is priced: never 0
    "unpriced_requests_sum": Sum("requests", filter=UNPRICED),
    "unpriced_tokens_sum": Sum("prompt_tokens", filter=UNPRICED) + Sum("completion_tokens", filter=UNPRICED),
}
TOKENS = Sum("prompt_tokens") + Sum("completion_tokens")


def rollups(since: date | None = None, until: date | None = None,
            keys: QuerySet | Iterable[int] | None = None) -> QuerySet[UsageDaily]:
    """The roll-ups of the days from `since` to `until` (both included, either open), of `keys`
    (a key queryset or ids; None: every key)."""
    rows = UsageDaily.objects.all()
    if since is not None:
        rows = rows.filter(day__gte=since)
    if until is not None:
        rows = rows.filter(day__lte=until)
    if keys is not None:
        rows = rows.filter(key__in=keys)
    return rows


def summed(rows: QuerySet[UsageDaily], *group_by: str, order_by: str | None = None,
           limit: int | None = None) -> list[dict]:
    """The sums of `rows` per group of `group_by` fields (none: one dict of grand totals). Each
    dict holds the group's fields, `requests`, `errors`, `prompt_tokens`, `completion_tokens`,
    `total_tokens`, `cost` (None if nothing in the group was priced; group by "currency" when
    prices of several currencies exist), `unpriced_requests` and `unpriced_tokens`. `order_by` ("requests" or "tokens") puts the biggest groups first (ties
    by the group fields) and `limit` keeps that many."""
    if not group_by:
        return [counts(rows.aggregate(**SUMS))]
    grouped = rows.values(*group_by).order_by().annotate(**SUMS, tokens_sum=TOKENS)
    if order_by is not None:
        grouped = grouped.order_by(f"-{order_by}_sum", *group_by)
    if limit is not None:
        grouped = grouped[:limit]
    return [{**{name: row[name] for name in group_by}, **counts(row)} for row in grouped]


def counts(row: dict) -> dict:
    totals = {name: row[f"{name}_sum"] or 0 for name in COUNTERS}
    return {**totals, "total_tokens": totals["prompt_tokens"] + totals["completion_tokens"],
            "cost": row["cost_sum"], "unpriced_requests": row["unpriced_requests_sum"] or 0,
            "unpriced_tokens": row["unpriced_tokens_sum"] or 0}


def tokens_used_since(key_id: int, since: datetime) -> int:
    """Tokens a key used from the day of `since` on (budget periods start at midnight)."""
    return summed(rollups(since=since.date(), keys=[key_id]))[0]["total_tokens"]


def spent_since(limits, since: datetime):
    """What a level (a key, or every key of a team) spent from the day of `since` on: tokens, and
    money in its budget's currency in billionths (rounded up), for the limit stores."""
    from keys.limits import Spent
    from keys.pricing import to_nanos

    rows = rollups(since=since.date())
    rows = rows.filter(key__team_id=limits.key_id) if limits.scope == "team" else rows.filter(key_id=limits.key_id)
    totals = summed(rows)[0]
    cost = rows.filter(currency=limits.currency).aggregate(cost=Sum("cost"))["cost"] or Decimal(0)
    return Spent(tokens=totals["total_tokens"], nanos=to_nanos(cost))


def per_key(counter: str, since: date) -> Subquery:
    """A key's sum of `counter` since `since`, to annotate a key queryset (OuterRef "pk")."""
    rows = rollups(since=since).filter(key=OuterRef("pk")).values("key").order_by()
    return Subquery(rows.annotate(total=Sum(counter)).values("total"))
