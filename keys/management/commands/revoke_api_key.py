"""python manage.py revoke_api_key ID_OR_PREFIX [...] — revoke keys; the API refuses them within a second."""
from __future__ import annotations

from django.core.management.base import CommandError, CommandParser

from keys.audit.commands import AuditedCommand
from keys.hashing import hash_key
from keys.models import APIKey


def find_key(reference: str) -> APIKey:
    """The one key with this id, display prefix (as the admin shows it) or full plaintext."""
    reference = reference.strip().rstrip("…")
    shown = reference if len(reference) <= 16 else reference[:10] + "…"  # never echo a whole key
    if reference.isdigit():
        matches = list(APIKey.objects.filter(pk=int(reference)))
    else:
        matches = list(APIKey.objects.filter(prefix=reference)) or list(
            APIKey.objects.filter(hashed_key=hash_key(reference))
        )
    if not matches:
        raise CommandError(f"No key has the id or prefix {shown!r}.")
    if len(matches) > 1:
        ids = ", ".join(str(key.pk) for key in matches)
        raise CommandError(f"{len(matches)} keys have the prefix {shown!r} (ids {ids}); revoke by id.")
    return matches[0]


class Command(AuditedCommand):
    help = "Revoke API keys by id or display prefix. The OpenAI API refuses them within GATEWAY_KEY_CACHE_SECONDS."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("keys", nargs="+", metavar="ID_OR_PREFIX")

    def handle(self, *args, **options) -> None:
        keys = [find_key(reference) for reference in options["keys"]]  # all found, or none revoked
        for key in keys:
            if key.is_revoked:
                self.stdout.write(f"Key {key.pk} {key.name!r} ({key.prefix}…) was already revoked at {key.revoked_at:%Y-%m-%d %H:%M:%S}.")
                continue
            key.revoke()
            self.stdout.write(f"Revoked key {key.pk} {key.name!r} ({key.prefix}…).")
