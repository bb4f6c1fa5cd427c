"""The registry of upstreams and the models they serve.

An `Upstream` is one server that generates: a FastChat controller (kind `fastchat`, `base_url` is
the controller address) or an OpenAI-compatible server (kind `openai`, `base_url` ends before
`/chat/completions`, e.g. `http://host:8000/v1`, with an optional API key). An `UpstreamModel` is a
model one upstream serves: the `public_name` clients ask for and the `upstream_name` sent to it
(an alias), with its capabilities. Rows are discovered (`discovered`, from the upstream's model
list) or listed by hand.

The request path never reads these tables: upstreams/registry.py turns them into frozen specs,
reread at most once a second per process. Every change goes through `save_by`/`delete_by`, which
send upstreams.signals.registry_changed (the audit hook) and make this process reread at once.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction

from upstreams import crypto
from upstreams.signals import registry_changed

CAPABILITIES = ("tools", "json_schema", "json_mode", "vision", "embeddings")
MAX_TIMEOUT = 3600.0
MAX_WEIGHT = 1000
MAX_PRIORITY = 1000
MAX_CONCURRENCY = 100_000
MAX_EXTRA_HEADERS = 32
MAX_API_KEY_CHARS = 4096
# Headers the gateway sets itself: an extra header may not replace them. Credentials belong in
# the API key field, which is encrypted (an extra header's value is stored and shown as is).
RESERVED_HEADERS = frozenset({
    "authorization", "proxy-authorization", "host", "content-length", "content-type", "transfer-encoding",
    "connection", "keep-alive", "upgrade", "te", "trailer", "cookie",
})
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")
MODEL_NAME = re.compile(r"^[^\s\x00-\x1f\x7f]{1,200}$")


def validate_model_name(value: str) -> None:
    if not isinstance(value, str) or not MODEL_NAME.match(value):
        raise ValidationError("A model name is 1 to 200 characters without spaces or control characters.")


def validate_capabilities(value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValidationError("Capabilities are a list of names.")
    unknown = sorted(set(value) - set(CAPABILITIES))
    if unknown:
        raise ValidationError(f"Unknown capabilities: {', '.join(unknown)} (known: {', '.join(CAPABILITIES)}).")


def validate_extra_headers(value: Any) -> None:
    if not isinstance(value, dict):
        raise ValidationError("Extra headers are an object of header names to string values.")
    if len(value) > MAX_EXTRA_HEADERS:
        raise ValidationError(f"At most {MAX_EXTRA_HEADERS} extra headers.")
    for name, header in value.items():
        if not isinstance(name, str) or not HEADER_NAME.match(name):
            raise ValidationError(f"{str(name)[:100]!r} is not a header name.")
        if name.lower() in RESERVED_HEADERS:
            raise ValidationError(
                f"The gateway sets {name} itself; put an upstream's credentials in its API key (stored encrypted)."
            )
        if not isinstance(header, str) or len(header) > 1000 or re.search(r"[\x00-\x08\x0a-\x1f\x7f]", header):
            raise ValidationError(f"The value of {name} must be a string of at most 1000 characters, on one line.")


def validate_base_url(value: str) -> None:
    """http(s)://host[:port][/path]; any host name (single-label names like `vllm` in a container
    network too); no user:password@ (credentials belong in the API key, which is encrypted)."""
    message = "Enter an http:// or https:// URL."
    if not isinstance(value, str) or re.search(r"[\s\x00-\x1f\x7f]", value):
        raise ValidationError(message)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise ValidationError(message) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValidationError(message)
    if parts.username is not None or parts.password is not None:
        raise ValidationError("Put credentials in the API key (stored encrypted), not in the URL.")
timeout_validators = [MinValueValidator(0.001), MaxValueValidator(MAX_TIMEOUT)]


class TrackedModel(models.Model):
    """Remembers the values it was loaded with, so a save can tell what changed."""

    class Meta:
        abstract = True

    TRACKED: tuple[str, ...] = ()
    SOURCES = ("admin", "api", "config", "discovery", "rotate-key", "code")

    @classmethod
    def from_db(cls, db, field_names, values):
        instance = super().from_db(db, field_names, values)
        instance._loaded = instance._values()
        return instance

    def _values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.TRACKED}

    def changes(self) -> dict[str, tuple[Any, Any]]:
        """field -> (old, new) since it was loaded (every field for a new row)."""
        loaded = getattr(self, "_loaded", None) or {}
        now = self._values()
        return {name: (loaded.get(name), value) for name, value in now.items()
                if self._state.adding or loaded.get(name) != value}

    def described_changes(self) -> dict[str, tuple[Any, Any]]:
        return self.changes()

    def save_by(self, actor: Any = None, source: str = "code", *, changes: dict | None = None) -> dict:
        """Validate, save and announce (registry_changed) the change; returns what changed ({}: nothing)."""
        self.full_clean()
        adding = self._state.adding
        changes = self.described_changes() if changes is None else changes
        if not changes and not adding:
            return {}
        with transaction.atomic():
            self.save()
            transaction.on_commit(lambda: registry_changed.send(
                sender=type(self), instance=self, action="created" if adding else "updated",
                changes=changes, actor=actor, source=source))
        self._loaded = self._values()
        _refresh_registry()
        return changes

    def delete_by(self, actor: Any = None, source: str = "code") -> None:
        with transaction.atomic():
            self.delete()
            transaction.on_commit(lambda: registry_changed.send(
                sender=type(self), instance=self, action="deleted", changes={}, actor=actor, source=source))
        _refresh_registry()


def _refresh_registry() -> None:
    # This process rereads the registry on its next request; the others within a second.
    from upstreams import registry

    registry.invalidate()


class UpstreamManager(models.Manager):
    def rotate_api_keys(self, actor: Any = None) -> int:
        """Re-encrypt every stored API key with the newest GATEWAY_ENCRYPTION_KEY (all or none);
        returns how many. UndecryptableSecret when one is opened by no configured key."""
        count = 0
        with transaction.atomic():
            for upstream in self.select_for_update().exclude(api_key_encrypted="").order_by("pk"):
                upstream.api_key_encrypted = crypto.rotate(upstream.api_key_encrypted)
                upstream.save_by(actor, "rotate-key", changes={"api_key": ("re-encrypted", upstream.api_key_hint)})
                count += 1
        return count


class Upstream(TrackedModel):
    class Kind(models.TextChoices):
        FASTCHAT = "fastchat", "FastChat controller"
        OPENAI = "openai", "OpenAI-compatible server"

    name = models.SlugField(max_length=64, unique=True,
                            help_text="Letters, digits, - and _; shown in usage, metrics and logs.")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.OPENAI)
    base_url = models.CharField(
        "base URL", max_length=500, validators=[validate_base_url],
        help_text="FastChat: the controller address. OpenAI-compatible: the URL before /chat/completions, "
                  "e.g. http://host:8000/v1.",
    )
    api_key_encrypted = models.TextField(blank=True, default="", editable=False)
    api_key_last4 = models.CharField(max_length=4, blank=True, default="", editable=False)
    enabled = models.BooleanField(default=True)
    priority = models.IntegerField(
        default=0, validators=[MinValueValidator(0), MaxValueValidator(MAX_PRIORITY)],
        help_text="Routes of the highest priority that can serve a request are used first; lower ones are the "
                  "fallback.",
    )
    weight = models.PositiveIntegerField(
        default=1, validators=[MaxValueValidator(MAX_WEIGHT)],
        help_text="Share of the traffic among routes of the same priority (0: only when the others cannot).",
    )
    connect_timeout = models.FloatField(default=10.0, validators=timeout_validators, help_text="Seconds.")
    first_byte_timeout = models.FloatField(
        default=100.0, validators=timeout_validators, help_text="Seconds until the upstream's first byte.")
    idle_timeout = models.FloatField(
        default=100.0, validators=timeout_validators, help_text="Seconds of silence allowed between stream chunks.")
    max_concurrency = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1), MaxValueValidator(MAX_CONCURRENCY)],
        help_text="Requests in flight per gateway process at most; empty: no cap.",
    )
    extra_headers = models.JSONField(default=dict, blank=True, validators=[validate_extra_headers],
                                     help_text='Sent with every request, e.g. {"X-Team": "research"}.')
    discover_models = models.BooleanField(default=True, help_text="Ask the upstream which models it serves.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = UpstreamManager()

    TRACKED = ("name", "kind", "base_url", "api_key_encrypted", "api_key_last4", "enabled", "priority", "weight", "connect_timeout",
               "first_byte_timeout", "idle_timeout", "max_concurrency", "extra_headers", "discover_models")

    class Meta:
        ordering = ["-priority", "name"]

    def __str__(self) -> str:
        return self.name

    # The API key: write-only; only its last four characters are ever shown.

    @property
    def has_api_key(self) -> bool:
        return bool(self.api_key_encrypted)

    @property
    def api_key_hint(self) -> str:
        return f"…{self.api_key_last4}" if self.api_key_encrypted else ""

    def set_api_key(self, plaintext: str | None) -> None:
        """Store `plaintext` encrypted (None or "": no key)."""
        if not plaintext:
            self.api_key_encrypted = self.api_key_last4 = ""
            return
        if len(plaintext) > MAX_API_KEY_CHARS or not plaintext.isprintable() or plaintext != plaintext.strip():
            raise ValidationError({"api_key": f"An API key is at most {MAX_API_KEY_CHARS} printable characters."})
        self.api_key_encrypted = crypto.encrypt(plaintext)
        self.api_key_last4 = plaintext[-4:]

    def api_key(self) -> str | None:
        """The plaintext key (for the adapter), None without one; UndecryptableSecret if no key opens it."""
        return crypto.decrypt(self.api_key_encrypted) if self.api_key_encrypted else None

    def api_key_is(self, plaintext: str | None) -> bool:
        """Is the stored key `plaintext`? (without storing anything; a token no key opens is not)"""
        if not plaintext:
            return not self.api_key_encrypted
        try:
            return self.api_key() == plaintext
        except crypto.UndecryptableSecret:
            return False

    def described_changes(self) -> dict[str, tuple[Any, Any]]:
        changes = self.changes()
        changes.pop("api_key_last4", None)
        if "api_key_encrypted" in changes:
            loaded = getattr(self, "_loaded", None) or {}
            old = loaded.get("api_key_encrypted")
            del changes["api_key_encrypted"]
            if not (self.api_key_encrypted and old and self._same_secret(old)):
                changes["api_key"] = (f"…{loaded.get('api_key_last4', '')}" if old else "", self.api_key_hint)
        return changes

    def _same_secret(self, old_token: str) -> bool:
        # A re-encryption (rotate-key) of the same secret changes the token, not the key.
        try:
            return crypto.decrypt(old_token) == crypto.decrypt(self.api_key_encrypted)
        except crypto.UndecryptableSecret:
            return False

    def clean(self) -> None:
        super().clean()
        if self.base_url:
            self.base_url = self.base_url.rstrip("/")
        if self.kind == self.Kind.FASTCHAT and self.api_key_encrypted:
            raise ValidationError({"kind": "A FastChat controller takes no API key."})


class UpstreamModel(TrackedModel):
    upstream = models.ForeignKey(Upstream, on_delete=models.CASCADE, related_name="models")
    public_name = models.CharField(max_length=200, validators=[validate_model_name],
                                   help_text="The name clients ask for (keys' allow-lists use it).")
    upstream_name = models.CharField(max_length=200, validators=[validate_model_name],
                                     help_text="The name sent to this upstream.")
    capabilities = models.JSONField(default=list, blank=True, validators=[validate_capabilities],
                                    help_text=f"Some of: {', '.join(CAPABILITIES)}.")
    capabilities_by_hand = models.BooleanField(
        default=False, help_text="Set by hand: discovery leaves these capabilities as they are.")
    context_length = models.PositiveIntegerField(null=True, blank=True, validators=[MaxValueValidator(2**31 - 1)])
    discovered = models.BooleanField(default=False, help_text="Found in the upstream's model list (not listed by hand).")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    TRACKED = ("public_name", "upstream_name", "capabilities", "capabilities_by_hand", "context_length",
               "discovered", "enabled")

    class Meta:
        ordering = ["upstream__name", "public_name"]
        verbose_name = "model"
        constraints = [
            models.UniqueConstraint(fields=["upstream", "public_name"], name="upstream_public_name_unique"),
            models.UniqueConstraint(fields=["upstream", "upstream_name"], name="upstream_model_name_unique"),
        ]

    def __str__(self) -> str:
        if self.public_name == self.upstream_name:
            return self.public_name
        return f"{self.public_name} → {self.upstream_name}"

    def clean(self) -> None:
        super().clean()
        if isinstance(self.capabilities, list):
            self.capabilities = sorted(set(self.capabilities))
