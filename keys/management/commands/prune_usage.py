"""python manage.py prune_usage [--days N]: delete usage rows older than the retention."""
from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from keys.usage import prune


class Command(BaseCommand):
    help = ("Delete usage rows older than USAGE_RETENTION_DAYS (or --days). The daily roll-ups, "
            "which the dashboard reads, are kept. Run it daily, e.g. from cron.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, default=None, help="Retention in days (default: USAGE_RETENTION_DAYS).")

    def handle(self, *args, **options) -> None:
        days = options["days"] if options["days"] is not None else settings.USAGE_RETENTION_DAYS
        if days < 1:
            raise CommandError("The retention must be at least one day.")
        deleted = prune(days)
        self.stdout.write(f"Deleted {deleted} usage row(s) older than {days} day(s).")
