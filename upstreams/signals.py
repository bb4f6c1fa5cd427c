"""The hook for an audit trail of registry changes.

Every change to an upstream or one of its models (admin, staff API, `manage.py upstreams`,
discovery) goes through `Upstream.save_by` / `delete_by` (and the same on `UpstreamModel`), which
send `registry_changed` after the write:

    registry_changed.send(sender=Upstream, instance=..., action="created"|"updated"|"deleted",
                          changes={field: (old, new)}, actor=<User or None>, source="admin"|"api"|
                          "config"|"discovery"|"rotate-key")

An API key appears in `changes` only as "…last4" (its ciphertext never).
"""
from django.dispatch import Signal

registry_changed = Signal()
