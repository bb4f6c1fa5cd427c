"""python manage.py prune_responses [--days N]: delete stored responses older than the retention."""
from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from openai_api.responses.store import prune


class Command(BaseCommand):
    help = ("Delete stored /v1/responses responses (and their input items) older than "
            "RESPONSES_RETENTION_DAYS (or --days). Each gateway process also does it daily.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, default=None,
                            help="Retention in days (default: RESPONSES_RETENTION_DAYS).")

    def handle(self, *args, **options) -> None:
        days = options["days"] if options["days"] is not None else settings.RESPONSES_RETENTION_DAYS
        if days < 1:
            raise CommandError("The retention must be at least one day.")
        deleted = prune(days)
        self.stdout.write(f"Deleted {deleted} stored response(s) older than {days} day(s).")
