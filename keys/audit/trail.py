"""What the trail records: the tracked models, their states before and after, one entry per
changed object and scope (docs/decisions.md#audit).

Django's model signals note each tracked object's state before its first change in a scope
(pre_save, pre_delete, m2m_changed); when the scope closes, the object is read again and one
entry records the fields that differ. Reading it again makes the entry say what the database
holds, whatever happened in between: a save rolled back to a savepoint leaves no entry, a save
and its many-to-many changes (the admin's user form) leave one.

queryset.update() sends no signal: changes made that way go through `update()` below, and
anything else (the usage writer's last_used_at) is not a change worth an entry.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models, transaction
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save
from django.utils import timezone

from keys.audit.models import AuditEntry
from keys.audit.scope import Pending, Scope, current, implicit_scope

REDACTED = "[redacted]"


@dataclass(frozen=True)
class Policy:
    """How one model is recorded: `secret` fields appear only as REDACTED (or empty when
    empty), `ignored` ones (bookkeeping) never, `m2m` are many-to-many fields recorded too."""

    secret: frozenset[str] = frozenset()
    ignored: frozenset[str] = frozenset()
    m2m: tuple[str, ...] = ()


def policy(secret: Iterable[str] = (), ignored: Iterable[str] = (), m2m: Iterable[str] = ()) -> Policy:
    return Policy(frozenset(secret), frozenset(ignored), tuple(m2m))


TRACKED: dict[str, Policy] = {
    "keys.apikey": policy(secret={"hashed_key"}, ignored={"last_used_at", "updated_at"}),
    "keys.team": policy(ignored={"updated_at"}),
    "keys.membership": policy(),
    "keys.price": policy(ignored={"updated_at"}),
    "auth.user": policy(secret={"password"}, ignored={"last_login"}, m2m=("groups", "user_permissions")),
    "auth.group": policy(m2m=("permissions",)),
    "upstreams.upstream": policy(secret={"api_key_encrypted"}, ignored={"updated_at"}),
    "upstreams.upstreammodel": policy(ignored={"updated_at"}),
}


def policy_of(model) -> Policy | None:
    return TRACKED.get(model._meta.label_lower)


# States

def concrete_state(instance: models.Model, rules: Policy) -> dict[str, Any]:
    return {field.name: field.value_from_object(instance) for field in instance._meta.concrete_fields
            if not field.primary_key and field.name not in rules.ignored}


def m2m_state(instance: models.Model, name: str) -> list[str]:
    return sorted(str(related) for related in getattr(instance, name).all())


def full_state(instance: models.Model, rules: Policy) -> dict[str, Any]:
    return {**concrete_state(instance, rules), **{name: m2m_state(instance, name) for name in rules.m2m}}


def stored(model, pk) -> models.Model | None:
    return model._base_manager.filter(pk=pk).first()


def shown(rules: Policy, name: str, value: Any) -> Any:
    """A value as the entry stores it: JSON, and a secret only as whether it is set."""
    if name in rules.secret:
        return REDACTED if value not in (None, "") else value
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))


# Noting changes

def note(scope: Scope, model, pk, before: dict[str, Any] | None, *, concrete: bool, repr_: str = "") -> None:
    """Remember `before` as the state of (model, pk) unless the scope already knows it."""
    key = (model._meta.label_lower, str(pk))
    known = scope.pending.get(key)
    if known is None:
        scope.pending[key] = Pending(model, pk, before, timezone.now(), repr_, has_fields=concrete)
        return
    if repr_:
        known.repr = repr_
    if known.before is not None and before is not None:
        for name, value in before.items():
            known.before.setdefault(name, value)
        known.has_fields = known.has_fields or concrete


def scope_for(instance: models.Model) -> tuple[Scope, bool]:
    """The current scope, or one of the object's own, written as soon as its change is done."""
    scope = current()
    if scope is not None:
        return scope, False
    scope = getattr(instance, "_audit_scope", None) or implicit_scope()
    instance._audit_scope = scope
    return scope, True


def known(scope: Scope, instance: models.Model) -> Pending | None:
    return scope.pending.get((instance._meta.label_lower, str(instance.pk)))


def before_save(sender, instance, raw=False, update_fields=None, **kwargs) -> None:
    rules = policy_of(sender)
    if rules is None or raw:
        return
    if update_fields is not None and set(update_fields) <= rules.ignored:
        return  # last_login and the like: bookkeeping, not a change
    scope, _ = scope_for(instance)
    if instance.pk is None:
        return  # a new row: noted after its insert
    pending = known(scope, instance)
    if pending is not None and (pending.has_fields or pending.before is None):
        return
    old = stored(sender, instance.pk)
    note(scope, sender, instance.pk, None if old is None else concrete_state(old, rules), concrete=True)


def after_save(sender, instance, created=False, raw=False, update_fields=None, **kwargs) -> None:
    rules = policy_of(sender)
    if rules is None or raw:
        return
    if update_fields is not None and set(update_fields) <= rules.ignored:
        return
    scope, immediate = scope_for(instance)
    if created and known(scope, instance) is None:
        note(scope, sender, instance.pk, None, concrete=True)
    note(scope, sender, instance.pk, {}, concrete=False, repr_=str(instance))
    if immediate:
        finish(instance)


def before_delete(sender, instance, **kwargs) -> None:
    rules = policy_of(sender)
    if rules is None:
        return
    scope, _ = scope_for(instance)
    old = stored(sender, instance.pk) or instance  # as stored, not as edited in memory
    note(scope, sender, instance.pk, full_state(old, rules), concrete=True, repr_=str(instance))


def after_delete(sender, instance, **kwargs) -> None:
    if policy_of(sender) is not None and current() is None:
        finish(instance)


def m2m_change(sender, instance, action, reverse, model, pk_set, **kwargs) -> None:
    """Many-to-many changes of a tracked field (a user's groups and permissions)."""
    if reverse:
        owner_model, pks = model, list(pk_set) if pk_set is not None else None
    else:
        owner_model, pks = type(instance), [instance.pk]
    rules = policy_of(owner_model)
    if rules is None:
        return
    names = [name for name in rules.m2m if owner_model._meta.get_field(name).remote_field.through is sender]
    if not names:
        return
    if reverse:
        related_name = owner_model._meta.get_field(names[0]).related_query_name()
        if pks is None:  # a reverse clear: every owner related to this instance
            pks = list(owner_model._base_manager.filter(**{related_name: instance}).values_list("pk", flat=True))
    if action.startswith("pre_"):
        scope, _ = scope_for(instance)
        for owner in owner_model._base_manager.filter(pk__in=pks):
            note(scope, owner_model, owner.pk, {names[0]: m2m_state(owner, names[0])}, concrete=False,
                 repr_=str(owner))
    elif current() is None:
        finish(instance)


def finish(instance: models.Model) -> None:
    scope = instance.__dict__.pop("_audit_scope", None)
    if scope is not None:
        flush(scope)


# Writing entries

def flush(scope: Scope) -> list[AuditEntry]:
    """One entry per object the scope changed, from its state before and its state now."""
    pending, scope.pending = list(scope.pending.values()), {}
    entries = [entry for entry in (entry_for(scope, change) for change in pending) if entry is not None]
    if entries:
        user, key, label = scope.actors()
        for entry in entries:
            entry.actor_user, entry.actor_key, entry.actor_label = user, key, label
            entry.origin, entry.where, entry.ip, entry.request_id = scope.origin, scope.where, scope.ip, scope.request_id
        AuditEntry.objects.bulk_create(entries)
    return entries


def entry_for(scope: Scope, change: Pending) -> AuditEntry | None:
    rules = policy_of(change.model)
    now = stored(change.model, change.pk)
    before = change.before
    if before is None and now is None:
        return None  # made and undone (or never made: a rolled-back insert)
    if before is None:
        action, after = AuditEntry.Action.CREATE, full_state(now, rules)
        changes = {name: [None, shown(rules, name, value)] for name, value in after.items()}
    elif now is None:
        action = AuditEntry.Action.DELETE
        changes = {name: [shown(rules, name, value), None] for name, value in before.items()}
    else:
        action = AuditEntry.Action.UPDATE
        after = {**concrete_state(now, rules), **{name: m2m_state(now, name) for name in rules.m2m if name in before}}
        changes = {name: [shown(rules, name, value), shown(rules, name, after.get(name))]
                   for name, value in before.items() if after.get(name) != value}
        if not changes:
            return None  # saved without a change
    return AuditEntry(
        created_at=change.at, action=action, object_type=change.model._meta.label_lower, object_id=str(change.pk),
        object_repr=(str(now) if now is not None else change.repr)[:200], changes=changes,
    )


def update(queryset: models.QuerySet, **values: Any) -> int:
    """queryset.update(**values) with an entry for each row it changes (an update sends no
    signal). The rows are locked first, so the entries name exactly the rows updated."""
    model = queryset.model
    rules = policy_of(model)
    if rules is None:
        return queryset.update(**values)
    with transaction.atomic():
        rows = list(queryset.select_for_update())
        if not rows:
            return 0
        scope = current()
        own = scope is None
        if own:
            scope = implicit_scope()
        for row in rows:
            note(scope, model, row.pk, concrete_state(row, rules), concrete=True, repr_=str(row))
        # The caller's conditions stay (a revocation keeps the first revocation time).
        count = queryset.filter(pk__in=[row.pk for row in rows]).update(**values)
        if own:
            flush(scope)
    return count


def connect() -> None:
    """Connect the signals of every tracked model that this installation has."""
    for label, rules in TRACKED.items():
        try:
            model = apps.get_model(label)
        except LookupError:
            continue  # an app that is not installed
        uid = f"audit:{label}"
        pre_save.connect(before_save, sender=model, dispatch_uid=uid)
        post_save.connect(after_save, sender=model, dispatch_uid=uid)
        pre_delete.connect(before_delete, sender=model, dispatch_uid=uid)
        post_delete.connect(after_delete, sender=model, dispatch_uid=uid)
        for name in rules.m2m:
            m2m_changed.connect(m2m_change, sender=model._meta.get_field(name).remote_field.through,
                                dispatch_uid=f"{uid}.{name}")
