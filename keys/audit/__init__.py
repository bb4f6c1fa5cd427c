"""The audit trail (docs/decisions.md#audit): every change to keys, teams, memberships, prices,
users, groups and upstreams leaves one append-only entry saying who, from where, what before
and after (secrets redacted), when.

    with audit.context(actor=request.user, origin="console", request=request):
        ...                                   # each object changed in here: one entry
    audit.update(APIKey.objects.filter(...), revoked_at=now)   # a bulk update, with entries

Requests to the admin, the REST API and the console get a scope from keys/audit/middleware.py,
the key commands from AuditedCommand; the OpenAI API path gets none and writes nothing.
"""
from keys.audit.scope import ORIGINS, context, current
from keys.audit.trail import REDACTED, TRACKED, update

__all__ = ["ORIGINS", "REDACTED", "TRACKED", "context", "current", "update"]
