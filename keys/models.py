"""API keys with their limits. Only a key's SHA-256 digest is stored."""
from __future__ import annotations

from datetime import timedelta

from django.db import models
from django.utils import timezone

from keys.hashing import display_prefix, generate_key, hash_key


class APIKeyManager(models.Manager["APIKey"]):
    def create_key(self, name: str, **fields) -> tuple[APIKey, str]:
        """Create a key and return it with its plaintext, which is never stored or shown again."""
        plaintext = generate_key()
        key = self.create(name=name, prefix=display_prefix(plaintext), hashed_key=hash_key(plaintext), **fields)
        return key, plaintext

    def import_plaintext(self, plaintext: str, name: str) -> tuple[APIKey, bool]:
        """Store an existing key (FastChat's --api-keys) by its digest; (key, created)."""
        return self.get_or_create(
            hashed_key=hash_key(plaintext),
            defaults={"name": name, "prefix": display_prefix(plaintext)},
        )


class APIKey(models.Model):
    class BudgetPeriod(models.TextChoices):
        DAY = "day", "per day"
        MONTH = "month", "per month"

    name = models.CharField(max_length=100)
    owner = models.CharField(max_length=200, blank=True)
    prefix = models.CharField(max_length=16, editable=False)
    hashed_key = models.CharField(max_length=64, unique=True, editable=False)
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
    user = models.ForeignKey(
        "auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="api_keys",
        help_text="A staff user's key may also call the key-management API (/api/keys/).",
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


class UsageRecord(models.Model):
    """One narrow row per API request (SPEC.md 5), written in batches off the request path."""

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

    class Meta:
        constraints = [models.UniqueConstraint(fields=["key", "model", "day"], name="one_rollup_per_key_model_day")]
        indexes = [models.Index(fields=["day"])]
        verbose_name_plural = "daily usage"

    def __str__(self) -> str:
        return f"{self.day} {self.model}"
