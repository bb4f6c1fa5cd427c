"""Who may do what in the key-management API (/api/keys/).

Django's model permissions, as in the admin: reading keys needs `view_apikey`, creating them
`add_apikey`, changing, revoking and rotating them `change_apikey`; usage reports also need
`view_usagerecord`. On top of that, two rules keep a key from raising its own power: only
superusers bind keys to users (a key acts with its user's permissions), and a key cannot raise
its own limits, widen its models or extend its own expiry.
"""
from __future__ import annotations

from typing import Any

from rest_framework.permissions import DjangoModelPermissions

from keys.models import APIKey

VIEW, ADD, CHANGE = "keys.view_apikey", "keys.add_apikey", "keys.change_apikey"
VIEW_USAGE = "keys.view_usagerecord"
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "parallel_requests", "token_budget")


class KeyModelPermissions(DjangoModelPermissions):
    """Permissions by action: the custom actions are POSTs that change a key, not additions."""

    ACTIONS = {
        "list": [VIEW], "retrieve": [VIEW], "create": [ADD], "update": [CHANGE], "partial_update": [CHANGE],
        "revoke": [CHANGE], "rotate": [CHANGE], "usage": [VIEW, VIEW_USAGE], "usage_summary": [VIEW, VIEW_USAGE],
    }

    def has_permission(self, request, view) -> bool:
        if not request.user or not request.user.is_authenticated:
            return False
        # An action this map does not know (a new one, or OPTIONS) needs every key permission.
        return request.user.has_perms(self.ACTIONS.get(view.action, [VIEW, ADD, CHANGE]))


def check_key_change(user, auth: Any, key: APIKey | None, changes: dict[str, Any]) -> str | None:
    """Why `user` (authenticated by `auth`, an APIKey or a session) may not create (key None)
    or change `key` with `changes`, or None when it may."""
    if "user" in changes and changes["user"] != (key.user if key else None) and not user.is_superuser:
        return "Only superusers may bind a key to a user."
    if isinstance(auth, APIKey) and key is not None and key.pk == auth.pk and raises_itself(key, changes):
        return "A key cannot raise its own limits, widen its models or extend its own expiry."
    return None


def raises_itself(key: APIKey, changes: dict[str, Any]) -> bool:
    """Would `changes` give `key` more than it has? None is no limit: the most of all."""
    def more(field: str, new: Any) -> bool:
        old = getattr(key, field)
        return old is not None and (new is None or new > old)

    if any(more(field, changes[field]) for field in (*LIMIT_FIELDS, "expires_at") if field in changes):
        return True
    if "allowed_models" in changes and key.allowed_models:
        new = changes["allowed_models"]
        if not new or set(new) - set(key.allowed_models):
            return True
    budget_window_grows = changes.get("budget_period", key.budget_period) == APIKey.BudgetPeriod.MONTH
    return key.token_budget is not None and key.budget_period == APIKey.BudgetPeriod.DAY and budget_window_grows
