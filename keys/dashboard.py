"""The admin dashboard: requests and tokens per day, per key and per model, as inline SVG, and
spend per key, team, model and upstream with unpriced usage counted apart.

Everything comes from the UsageDaily roll-ups (keys/usage_totals.py), which keys.usage updates
at every flush (today's row included), so the page costs a few grouped queries however many usage
rows there are, and it survives `prune_usage`. Charts are computed here as plain geometry; the template draws them
without any JavaScript (the admin may have no internet access, so no chart library from a CDN).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.utils import timezone

from keys.usage_totals import COUNTERS as FIELDS
from keys.usage_totals import rollups, summed

PERIODS = (7, 30, 90)
DEFAULT_DAYS = 30
TOP = 10

# Chart geometry, in SVG user units (the SVG scales to its container).
WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, BOTTOM, TOP_MARGIN = 56, 24, 24, 10
BAR_HEIGHT, BAR_GAP, LABEL_WIDTH = 18, 6, 200


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str

    def __post_init__(self) -> None:  # short SVG attributes
        for name in ("x", "y", "width", "height"):
            object.__setattr__(self, name, round(getattr(self, name), 1))


@dataclass(frozen=True)
class Text:
    x: float
    y: float
    text: str
    anchor: str = "middle"

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", round(self.x, 1))
        object.__setattr__(self, "y", round(self.y, 1))


@dataclass
class Chart:
    title: str
    width: int
    height: int
    rects: list[Rect] = field(default_factory=list)
    texts: list[Text] = field(default_factory=list)
    grid: list[Text] = field(default_factory=list)  # a horizontal line at each y, its value at the left
    left: int = 0  # where grid lines start
    legend: list[tuple[str, str]] = field(default_factory=list)  # (css class, label)
    empty: bool = False


def dashboard_context(days: int = DEFAULT_DAYS, today: date | None = None, keys=None) -> dict:
    """Everything the dashboard template shows, for the `days` days up to `today` included, of
    `keys` (ids or a queryset; None: every key)."""
    today = today or timezone.now().date()
    start = today - timedelta(days=days - 1)
    rows = rollups(since=start, until=today, keys=keys)
    per_day = per_day_totals(rows, start, days)
    totals = period_totals(per_day)
    key_fields = ("key_id", "key__name", "key__prefix")
    return {
        "days": days,
        "periods": PERIODS,
        "start": start,
        "today": today,
        "totals": totals,
        "tiles": tiles(totals) + spend_tiles(rows),
        "spend_tables": spend_tables(rows),
        "charts": [
            day_chart("Requests per day", per_day, [("requests_ok", "ok", "succeeded"), ("errors", "err", "failed")]),
            day_chart("Tokens per day", per_day, [("prompt_tokens", "prompt", "prompt"),
                                                  ("completion_tokens", "completion", "completion")]),
        ],
        "breakdowns": [
            bar_chart("Requests per key", top(rows, key_fields, "requests", key_label), "ok"),
            bar_chart("Tokens per key", top(rows, key_fields, "tokens", key_label), "prompt"),
            bar_chart("Requests per model", top(rows, ("model",), "requests", model_label), "ok"),
            bar_chart("Tokens per model", top(rows, ("model",), "tokens", model_label), "prompt"),
        ],
    }


def per_day_totals(rows, start: date, days: int) -> list[dict]:
    """One dict per day, oldest first, zeros for days without traffic."""
    found = {row.pop("day"): row for row in summed(rows, "day")}
    series = []
    for offset in range(days):
        day = start + timedelta(days=offset)
        row = {name: found[day][name] for name in FIELDS} if day in found else dict.fromkeys(FIELDS, 0)
        series.append({"day": day, **row, "requests_ok": row["requests"] - row["errors"]})
    return series


def period_totals(per_day: list[dict]) -> dict:
    totals = {name: sum(day[name] for day in per_day) for name in FIELDS}
    totals["tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    totals["error_rate"] = totals["errors"] / totals["requests"] if totals["requests"] else 0
    return totals


def tiles(totals: dict) -> list[tuple[str, str]]:
    """The headline numbers, formatted."""
    return [
        ("Requests", f"{totals['requests']:,}"),
        ("Errors", f"{totals['errors']:,}"),
        ("Error rate", f"{totals['error_rate']:.1%}"),
        ("Tokens", f"{totals['tokens']:,}"),
        ("Prompt tokens", f"{totals['prompt_tokens']:,}"),
        ("Completion tokens", f"{totals['completion_tokens']:,}"),
    ]


def money(amount: Decimal, currency: str) -> str:
    """An amount as shown: cents when it has no finer part, else up to 6 decimals."""
    shown = amount.quantize(Decimal("0.01")) if amount == amount.quantize(Decimal("0.01")) else \
        amount.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
    return f"{shown:,} {currency}"


def spend_tiles(rows) -> list[tuple[str, str]]:
    """Spend per currency, and the requests of models without a price, counted apart."""
    priced = [(row["currency"], row["cost"]) for row in summed(rows.exclude(currency=""), "currency")]
    unpriced = summed(rows.filter(currency=""))[0]
    return [*((f"Spend ({currency})", money(cost, currency)) for currency, cost in priced),
            ("Unpriced requests", f"{unpriced['requests']:,}"), ("Unpriced tokens", f"{unpriced['total_tokens']:,}")]


SPEND_BREAKDOWNS = [
    ("Spend per key", ("key_id", "key__name", "key__prefix")),
    ("Spend per team", ("key__team__name",)),
    ("Spend per model", ("model",)),
    ("Spend per upstream", ("upstream",)),
]


def spend_tables(rows, limit: int = TOP) -> list[dict]:
    """Per key, team, model and upstream: the spend of each currency and the unpriced usage,
    each group on its own line, the busiest first (a table each, no chart: amounts do not add
    across currencies)."""
    tables = []
    for title, group_by in SPEND_BREAKDOWNS:
        lines = []
        for row in summed(rows, *group_by, "currency", order_by="requests", limit=limit * 2):
            lines.append({
                "name": spend_label(group_by, row),
                "requests": f"{row['requests']:,}",
                "tokens": f"{row['total_tokens']:,}",
                "cost": money(row["cost"], row["currency"]) if row["currency"] else "unpriced",
                "priced": bool(row["currency"]),
            })
        tables.append({"title": title, "lines": lines})
    return tables


def spend_label(group_by: tuple[str, ...], row: dict) -> str:
    if group_by[0] == "key_id":
        return key_label(row)
    value = row[group_by[0]]
    if group_by[0] == "key__team__name":
        return value or "(no team)"
    if group_by[0] == "upstream":
        return value or "(none recorded)"
    return model_label(row)


def top(rows, group_by: tuple[str, ...], measure: str, label, limit: int = TOP) -> list[tuple[str, int]]:
    """The `limit` biggest groups by requests or tokens, as (label, value)."""
    value = "total_tokens" if measure == "tokens" else measure
    return [(label(row), row[value]) for row in summed(rows, *group_by, order_by=measure, limit=limit)]


def key_label(row: dict) -> str:
    return f"{row['key__name']} ({row['key__prefix']}…)"


def model_label(row: dict) -> str:
    return row["model"] or "(no model)"


def day_chart(title: str, per_day: list[dict], series: list[tuple[str, str, str]]) -> Chart:
    """Stacked columns, one per day; `series` is (field, css class, legend label)."""
    chart = Chart(title, WIDTH, HEIGHT, legend=[(css, label) for _, css, label in series], left=LEFT)
    # Counts are whole numbers: at least 4 so that the 4 gridlines fall on integers.
    top = max(nice_ceiling(max((sum(day[name] for name, _, _ in series) for day in per_day), default=0)), 4)
    chart.empty = not any(day[name] for day in per_day for name, _, _ in series)
    plot_height = HEIGHT - BOTTOM - TOP_MARGIN
    slot = (WIDTH - LEFT - RIGHT) / max(len(per_day), 1)
    chart.grid = [Text(LEFT - 6, HEIGHT - BOTTOM - plot_height * i / 4, compact(top * i / 4), "end") for i in range(5)]
    label_every = max(1, math.ceil(len(per_day) / 10))
    for index, day in enumerate(per_day):
        x, base = LEFT + index * slot + slot * 0.15, HEIGHT - BOTTOM
        for name, css, label in series:
            height = plot_height * day[name] / top if top else 0
            if height:
                base -= height
                chart.rects.append(Rect(x, base, slot * 0.7, height, css, f"{day['day']:%b %d}: {day[name]:,} {label}"))
        if (len(per_day) - 1 - index) % label_every == 0:  # counted from today, which is always labelled
            chart.texts.append(Text(x + slot * 0.35, HEIGHT - 6, f"{day['day']:%b %d}"))
    return chart


def bar_chart(title: str, rows: list[tuple[str, int]], css: str) -> Chart:
    """Horizontal bars, biggest first, labelled on the left with their value on the right."""
    height = max(len(rows), 1) * (BAR_HEIGHT + BAR_GAP) + BAR_GAP
    chart = Chart(title, WIDTH, height, empty=not any(value for _, value in rows))
    top = max((value for _, value in rows), default=0)
    span = WIDTH - LABEL_WIDTH - 70
    for index, (label, value) in enumerate(rows):
        y = BAR_GAP + index * (BAR_HEIGHT + BAR_GAP)
        width = span * value / top if top else 0
        chart.rects.append(Rect(LABEL_WIDTH, y, max(width, 1), BAR_HEIGHT, css, f"{label}: {value:,}"))
        chart.texts.append(Text(LABEL_WIDTH - 8, y + BAR_HEIGHT * 0.72, shorten(label, 30), "end"))
        chart.texts.append(Text(LABEL_WIDTH + width + 6, y + BAR_HEIGHT * 0.72, f"{value:,}", "start"))
    return chart


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten (divided in 4 gridlines) at or above value."""
    if value <= 0:
        return 0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def compact(value: float) -> str:
    """1234 -> "1.2k", 2500000 -> "2.5M"."""
    for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= divisor:
            return f"{value / divisor:.3g}{suffix}"
    return f"{value:.3g}"


def shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"
