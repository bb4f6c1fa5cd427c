"""Admin for API keys: the plaintext is shown once, when a key is created."""
from __future__ import annotations

from django.contrib import admin, messages
from django.utils import timezone

from keys.hashing import display_prefix, generate_key, hash_key
from keys.models import APIKey


@admin.register(APIKey)
class APIKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "owner", "created_at", "expires_at", "revoked_at", "last_used_at"]
    list_filter = ["revoked_at", "created_at"]
    search_fields = ["name", "owner", "prefix"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def save_model(self, request, obj: APIKey, form, change: bool) -> None:
        if not change:
            plaintext = generate_key()
            obj.prefix, obj.hashed_key = display_prefix(plaintext), hash_key(plaintext)
            super().save_model(request, obj, form, change)
            self.message_user(
                request,
                f"The new key is {plaintext} — copy it now: it will not be shown again.",
                messages.WARNING,
            )
            return
        super().save_model(request, obj, form, change)

    def lookup_allowed(self, lookup: str, value: str, request=None) -> bool:
        if lookup.startswith("hashed_key"):
            return False
        return super().lookup_allowed(lookup, value, request)

    @admin.action(description="Revoke selected keys")
    def revoke(self, request, queryset) -> None:
        count = queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} key(s).")
