"""Start-up checks for the registry: stored upstream API keys need an encryption key to be read.

Run by every management command that checks the project (`migrate`, `check --deploy`, the
gateway's serving commands) and by `manage.py check`.
"""
from __future__ import annotations

from django.core import checks
from django.db import DatabaseError

from upstreams import crypto


@checks.register(checks.Tags.security)
def encryption_key(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    try:
        crypto.cipher()
    except crypto.EncryptionKeyInvalid as exc:
        return [checks.Error(str(exc), id="upstreams.E002")]
    except crypto.EncryptionKeyMissing as exc:
        from upstreams.models import Upstream

        try:
            stored = Upstream.objects.exclude(api_key_encrypted="").exists()
        except DatabaseError:  # no database yet (before migrate): nothing stored to read
            return []
        if stored:
            return [checks.Error(f"Upstream API keys are stored: {exc}", id="upstreams.E001")]
    return []
