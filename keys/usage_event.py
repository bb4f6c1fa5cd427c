"""A finished request's usage, bounded to what the database stores, where it is made.

Everything in an event can come from a caller (the model name, the request id header) or from
a worker (token counts), and PostgreSQL refuses what SQLite accepts: a string longer than its
column, a NUL character, a lone surrogate (not UTF-8), an integer out of its column's range.
One such row used to fail its whole batch, for ever. So an event cleans every field when it is
constructed, with the bounds read from the models, and the rows and the daily roll-ups (keyed
by the cleaned model) are written from the same cleaned values.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import datetime

from django.db.backends.base.operations import BaseDatabaseOperations
from django.utils import timezone

from keys.models import UsageDaily, UsageRecord

# PostgreSQL's text types refuse NUL; lone surrogates cannot be encoded as UTF-8.
NOT_STORABLE = re.compile("[\x00\ud800-\udfff]")


def text_length(name: str) -> int:
    """The longest value every table storing the field accepts."""
    lengths = [model._meta.get_field(name).max_length for model in (UsageRecord, UsageDaily)
               if any(f.name == name for f in model._meta.concrete_fields)]
    return min(lengths)


def integer_range(name: str) -> tuple[int, int]:
    """The column's range, the same on every database (SQLite would accept any integer)."""
    internal_type = UsageRecord._meta.get_field(name).get_internal_type()
    return BaseDatabaseOperations.integer_field_ranges[internal_type]


TEXT_FIELDS = {name: text_length(name) for name in ("model", "endpoint", "request_id", "error_code", "upstream", "route")}
INTEGER_FIELDS = {name: integer_range(name)
                  for name in ("status", "prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms")}
# The four counts share one column type; the event relies on it.
TOKEN_RANGE = INTEGER_FIELDS["prompt_tokens"]
assert all(INTEGER_FIELDS[name] == TOKEN_RANGE for name in ("completion_tokens", "latency_ms", "ttft_ms"))


def bounded_text(value: object, length: int) -> str:
    if type(value) is not str:
        value = "" if value is None else str(value)
    if not value.isascii():
        value = NOT_STORABLE.sub("", value)
    elif "\x00" in value:
        value = value.replace("\x00", "")
    return value[:length]


def bounded_int(value: object, low: int, high: int) -> int:
    """`value` as an integer clamped into [low, high]; `low` for anything that is no number."""
    if type(value) is not int:
        try:
            value = int(value) if not (isinstance(value, float) and not math.isfinite(value)) else low
        except (TypeError, ValueError):
            value = low
    return low if value < low else high if value > high else value


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One finished request, as the API path reports it, cleaned to fit the usage tables."""

    key_id: int
    model: str
    endpoint: str
    request_id: str
    status: int
    error_code: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: int = 0
    ttft_ms: int | None = None
    streamed: bool = False
    created_at: datetime = field(default_factory=timezone.now)
    upstream: str = ""  # the upstream and route that served it (the router's report), if any
    route: str = ""
    tokens_estimated: bool = False  # counted by the gateway: the upstream reported none

    def __post_init__(self) -> None:
        # Spelled out field by field, and a field set only if cleaning changed it: this runs
        # once per request, on the event loop (about 1.5 µs).
        text, integer, (low, high) = bounded_text, bounded_int, TOKEN_RANGE
        cleaned = {}
        for name, length in TEXT_FIELDS.items():
            value = getattr(self, name)
            if (bounded := text(value, length)) is not value:
                cleaned[name] = bounded
        for name in ("prompt_tokens", "completion_tokens", "latency_ms"):
            value = getattr(self, name)
            if (bounded := integer(value, low, high)) is not value:
                cleaned[name] = bounded
        if (status := integer(self.status, *INTEGER_FIELDS["status"])) is not self.status:
            cleaned["status"] = status
        if self.ttft_ms is not None and (ttft := integer(self.ttft_ms, low, high)) is not self.ttft_ms:
            cleaned["ttft_ms"] = ttft
        if type(self.streamed) is not bool:
            cleaned["streamed"] = bool(self.streamed)
        if not isinstance(self.created_at, datetime):
            cleaned["created_at"] = timezone.now()
        for name, value in cleaned.items():
            object.__setattr__(self, name, value)

    @property
    def is_error(self) -> bool:
        return self.status >= 400
