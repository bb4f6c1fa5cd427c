"""API keys with their limits, the teams they belong to, prices and usage. Only a key's SHA-256
digest is stored."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.db import models, transaction
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from keys.audit import update as audited_update
from keys.audit.models import AuditEntry  # noqa: F401  (the audit trail's model lives in keys/audit/)
from keys.hashing import digest_prefix, display_prefix, generate_key, hash_key


class KeyRevokedError(Exception):
    """A revoked key cannot be rotated: it is revoked for good."""


@dataclass(frozen=True)
class ImportResult:
    """What an import of plaintext keys did, counted (never the keys themselves)."""

    created: int = 0
    present: int = 0
    revoked: int = 0  # keys of an earlier --api-keys list that are no longer in it
    still_revoked: int = 0  # listed keys that somebody revoked: the list does not bring them back


class APIKeyManager(models.Manager["APIKey"]):
    @sensitive_variables("plaintext")
    def create_key(self, name: str, **fields) -> tuple[APIKey, str]:
        """Create a key and return it with its plaintext, which is never stored or shown again."""
        plaintext = generate_key()
        key = self.create(name=name, prefix=display_prefix(plaintext), hashed_key=hash_key(plaintext), **fields)
        return key, plaintext

    def import_plaintext(self, plaintext: str, name: str = "imported", source: str = "imported") -> tuple[APIKey, bool]:
        """Store an existing key by its digest (no character of it is kept); (key, created)."""
        digest = hash_key(plaintext)
        return self.get_or_create(hashed_key=digest, defaults={"name": name, "prefix": digest_prefix(digest),
                                                               "source": source})

    def import_keys(self, plaintexts: Iterable[str]) -> ImportResult:
        """`manage.py import_api_keys`: store each key once; keys already present stay as they are."""
        created = sum(self.import_plaintext(plaintext)[1] for plaintext in dict.fromkeys(plaintexts))
        return ImportResult(created=created, present=len(dict.fromkeys(plaintexts)) - created)

    @transaction.atomic
    def sync_flag_keys(self, plaintexts: Iterable[str]) -> ImportResult:
        """        FastChat's --api-keys: the list is authoritative, as in FastChat. Listed keys are
        imported (or, if imported before by other means, now governed by the list); keys an
        earlier list brought in and this one lacks are revoked. Keys generated here are never
        touched. A listed key that somebody revoked stays revoked (a restart must not bring
        back a leaked key)."""
        keys = [self.import_plaintext(p, name="--api-keys", source=APIKey.Source.API_KEYS_FLAG)
                for p in dict.fromkeys(plaintexts)]
        listed = {key.pk for key, _ in keys}
        audited_update(self.filter(pk__in=listed, source=APIKey.Source.IMPORTED),
                       source=APIKey.Source.API_KEYS_FLAG, updated_at=timezone.now())
        dropped = self.filter(source=APIKey.Source.API_KEYS_FLAG, revoked_at__isnull=True).exclude(pk__in=listed)
        revoked = sum(key.revoke() for key in dropped)
        created = sum(is_new for _, is_new in keys)
        return ImportResult(created=created, present=len(keys) - created, revoked=revoked,
                            still_revoked=sum(key.is_revoked for key, _ in keys))


class BudgetPeriod(models.TextChoices):
    DAY = "day", "per day"
    MONTH = "month", "per month"


# Money: prices per million tokens with 6 decimals, costs and budgets with 12 (a token's cost at
# 0.000001 per million is 1e-12), so no cost is ever rounded to 0 (docs/decisions.md#prices).
PRICE_FIELD = {"max_digits": 18, "decimal_places": 6}
COST_FIELD = {"max_digits": 30, "decimal_places": 12}
BUDGET_FIELD = {"max_digits": 20, "decimal_places": 6}


def currency_field(**options) -> models.CharField:
    return models.CharField(max_length=3, help_text="ISO 4217 code, such as USD or EUR.", **options)


class Team(models.Model):
    """Keys grouped under common limits and budgets (docs/decisions.md#limits)."""

    name = models.CharField(max_length=100, unique=True)
    allowed_models = models.JSONField(
        default=list, blank=True,
        help_text="Model names; empty means every model. A key of the team may use only these.")
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    parallel_requests = models.PositiveIntegerField(null=True, blank=True)
    token_budget = models.PositiveBigIntegerField(null=True, blank=True)
    money_budget = models.DecimalField(null=True, blank=True, **BUDGET_FIELD)
    budget_currency = currency_field(default="USD")
    budget_period = models.CharField(max_length=5, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTH)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def allows_model(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models


class Membership(models.Model):
    """A Django user's role in a team."""

    class Role(models.TextChoices):
        OWNER = "owner", "owner"
        MEMBER = "member", "member"
        VIEWER = "viewer", "viewer"

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey("auth.User", on_delete=models.CASCADE, related_name="team_memberships")
    role = models.CharField(max_length=6, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="one_membership_per_team_user")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team} ({self.role})"


class APIKey(models.Model):
    BudgetPeriod = BudgetPeriod

    class Source(models.TextChoices):
        GENERATED = "generated", "generated here"
        IMPORTED = "imported", "imported (import_api_keys)"
        API_KEYS_FLAG = "api_keys_flag", "openai_api_server --api-keys"

    name = models.CharField(max_length=100)
    owner = models.CharField(max_length=200, blank=True)
    prefix = models.CharField(max_length=16, editable=False)
    hashed_key = models.CharField(max_length=64, unique=True, editable=False)
    source = models.CharField(
        max_length=16, choices=Source.choices, default=Source.GENERATED, editable=False,
        help_text="Where the secret came from. Keys from --api-keys are revoked when the flag no longer lists them.",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    allowed_models = models.JSONField(default=list, blank=True, help_text="Model names; empty means every model.")
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    parallel_requests = models.PositiveIntegerField(null=True, blank=True)
    token_budget = models.PositiveBigIntegerField(null=True, blank=True)
    budget_period = models.CharField(max_length=5, choices=BudgetPeriod.choices, default=BudgetPeriod.MONTH)
    money_budget = models.DecimalField(null=True, blank=True, **BUDGET_FIELD)
    budget_currency = currency_field(default="USD")
    team = models.ForeignKey(
        Team, null=True, blank=True, on_delete=models.SET_NULL, related_name="keys",
        help_text="The key's models are within the team's, and the team's limits and budgets apply too.",
    )
    user = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="api_keys",
        help_text="A staff user's key may also call the key-management API (/api/keys/), within the user's permissions.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    objects = APIKeyManager()

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now=None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())

    def allows_model(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    @staticmethod
    def expiry_in_days(days: int | None):
        return timezone.now() + timedelta(days=days) if days else None

    # Key actions: the admin, the REST API and the commands all go through these.

    @sensitive_variables("plaintext")
    def assign_new_secret(self) -> str:
        """Give this key a new generated secret, unsaved; returns its plaintext (show it once)."""
        plaintext = generate_key()
        self.prefix, self.hashed_key, self.source = display_prefix(plaintext), hash_key(plaintext), self.Source.GENERATED
        return plaintext

    @sensitive_variables("plaintext")
    def rotate(self) -> str:
        """A new secret in place (same row, settings and usage history); returns the plaintext.
        The old secret stops working once the API path's key cache expires (a second)."""
        if self.is_revoked:
            raise KeyRevokedError("A revoked key cannot be rotated; create a new key instead.")
        plaintext = self.assign_new_secret()
        self.save(update_fields=["prefix", "hashed_key", "source", "updated_at"])
        return plaintext

    def revoke(self) -> bool:
        """Revoke this key for good; True if this call revoked it (the first revocation time is kept)."""
        now = timezone.now()
        revoked = audited_update(APIKey.objects.filter(pk=self.pk, revoked_at__isnull=True),
                                 revoked_at=now, updated_at=now)
        self.refresh_from_db(fields=["revoked_at", "updated_at"])
        return bool(revoked)


class Price(models.Model):
    """What a model costs from `valid_from` on (docs/decisions.md#prices). A usage row stores the
    cost at the time of its request; a model without a price has rows without cost."""

    model = models.CharField(max_length=200, help_text="The public model name clients send.")
    upstream = models.CharField(
        max_length=100, blank=True,
        help_text="Only for requests served by this upstream; blank: whichever serves the model.")
    input_per_million = models.DecimalField(**PRICE_FIELD, help_text="Price of a million prompt tokens.")
    output_per_million = models.DecimalField(**PRICE_FIELD, help_text="Price of a million completion tokens.")
    currency = currency_field(default="USD")
    valid_from = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model", "upstream", "-valid_from"]
        constraints = [models.UniqueConstraint(fields=["model", "upstream", "valid_from"], name="one_price_per_start")]

    def __str__(self) -> str:
        return f"{self.model}{'@' + self.upstream if self.upstream else ''}: {self.input_per_million}/" \
               f"{self.output_per_million} {self.currency} per million from {self.valid_from:%Y-%m-%d}"

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return (self.input_per_million * prompt_tokens + self.output_per_million * completion_tokens) / 1_000_000


class UsageRecord(models.Model):
    """One narrow row per API request (docs/decisions.md#usage-rows), written in batches off the request path."""

    key = models.ForeignKey(APIKey, on_delete=models.CASCADE, related_name="usage")
    model = models.CharField(max_length=200, blank=True)
    endpoint = models.CharField(max_length=100)
    request_id = models.CharField(max_length=128)
    status = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    streamed = models.BooleanField(default=False)
    upstream = models.CharField(max_length=100, blank=True)
    route = models.CharField(max_length=200, blank=True)
    # The upstream reported no usage: the tokens are the gateway's count (docs/openai-upstreams.md).
    tokens_estimated = models.BooleanField(default=False)
    # The price in force at the request's time; NULL (and no currency) when its model had none.
    cost = models.DecimalField(null=True, blank=True, **COST_FIELD)
    currency = models.CharField(max_length=3, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["key", "created_at"]),
            models.Index(fields=["created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model} {self.status}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageDaily(models.Model):
    """Daily roll-up per key and model, so dashboards stay fast with millions of usage rows."""

    key = models.ForeignKey(APIKey, on_delete=models.CASCADE, related_name="daily_usage")
    model = models.CharField(max_length=200, blank=True)
    day = models.DateField()
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    upstream = models.CharField(max_length=100, blank=True)
    route = models.CharField(max_length=200, blank=True)
    # Priced and unpriced requests roll up apart: currency "" holds the unpriced ones (cost NULL).
    currency = models.CharField(max_length=3, blank=True)
    cost = models.DecimalField(null=True, blank=True, **COST_FIELD)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["key", "model", "upstream", "route", "currency", "day"],
                                               name="one_rollup_per_key_model_route_currency_day")]
        indexes = [models.Index(fields=["day"])]
        verbose_name_plural = "daily usage"

    def __str__(self) -> str:
        return f"{self.day} {self.model}"
