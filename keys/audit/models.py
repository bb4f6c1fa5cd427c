"""The audit trail's rows: append-only (docs/decisions.md#audit).

No interface writes them but keys/audit/trail.py, and nothing changes or deletes them: the model
refuses to save an existing row or delete one, its queryset refuses update() and delete(), the
admin has no add, change or delete permission (they do not even exist), and a database trigger
refuses UPDATE and DELETE on PostgreSQL (UPDATE on SQLite too; see the migration).
"""
from __future__ import annotations

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone


class AuditEntryImmutable(Exception):
    """Audit entries are written once and never changed or deleted."""


class AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise AuditEntryImmutable("Audit entries cannot be changed.")

    def delete(self):
        raise AuditEntryImmutable("Audit entries cannot be deleted.")

    def bulk_update(self, objs, fields, batch_size=None):
        raise AuditEntryImmutable("Audit entries cannot be changed.")

    update.queryset_only = True
    delete.queryset_only = True


class AuditEntry(models.Model):
    """One change of one object: who, from where, what before and after (secrets redacted), when."""

    class Origin(models.TextChoices):
        ADMIN = "admin", "admin"
        API = "api", "REST API"
        CONSOLE = "console", "console"
        COMMAND = "command", "management command"
        WEB = "web", "other web page"
        SYSTEM = "system", "the gateway itself"

    class Action(models.TextChoices):
        CREATE = "create", "created"
        UPDATE = "update", "changed"
        DELETE = "delete", "deleted"

    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    origin = models.CharField(max_length=8, choices=Origin.choices)
    # No database constraint and no cascade: deleting a user or key must neither delete nor
    # change its entries (the names stay in actor_label).
    actor_user = models.ForeignKey("auth.User", null=True, blank=True, on_delete=models.DO_NOTHING,
                                   db_constraint=False, related_name="+", verbose_name="user")
    actor_key = models.ForeignKey("keys.APIKey", null=True, blank=True, on_delete=models.DO_NOTHING,
                                  db_constraint=False, related_name="+", verbose_name="API key")
    actor_label = models.CharField("actor", max_length=200, blank=True)
    ip = models.GenericIPAddressField("client IP", null=True, blank=True)
    request_id = models.CharField(max_length=128, blank=True)
    where = models.CharField(max_length=200, blank=True, help_text="The request (method and path) or the command.")
    action = models.CharField(max_length=6, choices=Action.choices)
    object_type = models.CharField(max_length=100, help_text="app_label.model")
    object_id = models.CharField(max_length=64)
    object_repr = models.CharField("object", max_length=200)
    changes = models.JSONField(default=dict, encoder=DjangoJSONEncoder,
                               help_text="field: [before, after]; secrets appear as [redacted].")

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        verbose_name = "audit entry"
        verbose_name_plural = "audit trail"
        ordering = ["-created_at", "-id"]
        # Viewing is the only permission there is: nobody can be given add, change or delete.
        default_permissions = ("view",)
        indexes = [models.Index(fields=["object_type", "object_id", "created_at"], name="audit_object"),
                   models.Index(fields=["actor_user", "created_at"], name="audit_actor")]

    def __str__(self) -> str:
        return f"{self.get_action_display()} {self.object_type} {self.object_repr}"

    def save(self, *args, **kwargs) -> None:
        if not self._state.adding:
            raise AuditEntryImmutable("Audit entries cannot be changed.")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise AuditEntryImmutable("Audit entries cannot be deleted.")
