"""python manage.py import_api_keys k1,k2 — store FastChat --api-keys as hashed keys."""
from __future__ import annotations

from django.core.management.base import CommandParser

from keys.audit.commands import AuditedCommand
from keys.models import APIKey


class Command(AuditedCommand):
    help = ("Import FastChat-style plaintext API keys (comma-separated, or one per line in --file). "
            "Only their digests are stored; the admin shows digest characters, never the key's.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("keys", nargs="?", default="")
        parser.add_argument("--file", help="A file with one key per line.")

    def handle(self, *args, **options) -> None:
        plaintexts = [k for k in options["keys"].split(",") if k]
        if options["file"]:
            with open(options["file"]) as handle:
                plaintexts += [line.strip() for line in handle if line.strip()]
        result = APIKey.objects.import_keys(plaintexts)
        self.stdout.write(f"Imported {result.created} new key(s); {result.present} already present.")
