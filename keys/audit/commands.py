"""Management commands whose changes are attributed to the command (origin "command")."""
from __future__ import annotations

from django.core.management.base import BaseCommand

from keys.audit.scope import context


class AuditedCommand(BaseCommand):
    """A command whose changes, all in one transaction, each leave one entry naming the command
    and the operating-system user who ran it."""

    def execute(self, *args, **options):
        name = self.__module__.rsplit(".", 1)[-1]
        with context(origin="command", where=f"manage.py {name}"):
            return super().execute(*args, **options)
