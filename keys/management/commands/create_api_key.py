"""python manage.py create_api_key NAME [--models a,b] [--rpm N] [--tpm N] [--expires-days N]"""
from __future__ import annotations

from django.core.management.base import CommandParser

from keys.audit.commands import AuditedCommand
from keys.models import APIKey


class Command(AuditedCommand):
    help = "Create an API key and print its plaintext (shown only this once) on the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--owner", default="")
        parser.add_argument("--models", default="", help="Comma-separated model names (default: all).")
        parser.add_argument("--rpm", type=int, help="Requests per minute.")
        parser.add_argument("--tpm", type=int, help="Tokens per minute.")
        parser.add_argument("--parallel", type=int, help="Parallel requests.")
        parser.add_argument("--budget", type=int, help="Token budget per --budget-period.")
        parser.add_argument("--budget-period", choices=["day", "month"], default="month")
        parser.add_argument("--expires-days", type=int)

    def handle(self, *args, **options) -> None:
        key, plaintext = APIKey.objects.create_key(
            options["name"],
            owner=options["owner"],
            allowed_models=[m.strip() for m in options["models"].split(",") if m.strip()],
            requests_per_minute=options["rpm"],
            tokens_per_minute=options["tpm"],
            parallel_requests=options["parallel"],
            token_budget=options["budget"],
            budget_period=options["budget_period"],
            expires_at=APIKey.expiry_in_days(options["expires_days"]),
        )
        self.stderr.write(f"Created key {key.name!r} ({key.prefix}…). Store it now: it is not kept.")
        self.stdout.write(plaintext)
