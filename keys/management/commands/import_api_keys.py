"""python manage.py import_api_keys k1,k2 — store FastChat --api-keys as hashed keys."""
from __future__ import annotations

from django.core.management.base import BaseCommand, CommandParser

from keys.models import APIKey


def import_keys(plaintexts: list[str], name_prefix: str = "imported") -> int:
    """Store each key by its digest; returns how many were new."""
    created = 0
    for plaintext in plaintexts:
        _, is_new = APIKey.objects.import_plaintext(plaintext, name=f"{name_prefix} {plaintext[:4]}…")
        created += is_new
    return created


class Command(BaseCommand):
    help = "Import FastChat-style plaintext API keys (comma-separated, or one per line in --file)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("keys", nargs="?", default="")
        parser.add_argument("--file", help="A file with one key per line.")

    def handle(self, *args, **options) -> None:
        plaintexts = [k for k in options["keys"].split(",") if k]
        if options["file"]:
            with open(options["file"]) as handle:
                plaintexts += [line.strip() for line in handle if line.strip()]
        created = import_keys(plaintexts)
        self.stdout.write(f"Imported {created} new key(s); {len(plaintexts) - created} already present.")
