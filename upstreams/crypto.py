"""Upstream API keys at rest: Fernet tokens (AES-128-CBC + HMAC-SHA256), never the plaintext.

The keys come from GATEWAY_ENCRYPTION_KEY (or the file named by GATEWAY_ENCRYPTION_KEY_FILE):
one or more Fernet keys separated by commas or line breaks, the newest first. The first one
encrypts; every one decrypts, so a new key can be put in front of the old one, then every stored
token re-encrypted with `manage.py upstreams rotate-key`, then the old key dropped.

Without a configured key, DEBUG and `manage.py demo` derive one from SECRET_KEY (what a
development machine needs to keep working); a production process has none, and the system check
in upstreams/checks.py refuses to start when stored upstream keys need it.
"""
from __future__ import annotations

import base64
import hashlib
import re

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


class EncryptionKeyMissing(Exception):
    """No GATEWAY_ENCRYPTION_KEY in production, yet an upstream key must be encrypted or read."""

    def __init__(self) -> None:
        super().__init__(
            "GATEWAY_ENCRYPTION_KEY (or GATEWAY_ENCRYPTION_KEY_FILE) must be set to store or read upstream API "
            "keys when DJANGO_DEBUG is off; make one with: python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())'"
        )


class EncryptionKeyInvalid(Exception):
    """GATEWAY_ENCRYPTION_KEY holds something that is not a Fernet key (its value is never shown)."""


class UndecryptableSecret(Exception):
    """A stored token that none of the configured keys opens (a key was dropped too early)."""


def configured_keys() -> list[str]:
    """The Fernet keys from the settings, newest first (may be empty)."""
    return [key for key in re.split(r"[\s,]+", settings.GATEWAY_ENCRYPTION_KEY or "") if key]


def derived_key() -> bytes:
    """A Fernet key derived from SECRET_KEY: development and demo only."""
    digest = hashlib.sha256(b"gateway upstream api keys\0" + settings.SECRET_KEY.encode()).digest()
    return base64.urlsafe_b64encode(digest)


def may_derive() -> bool:
    return bool(settings.DEBUG or getattr(settings, "RUNNING_DEMO", False))


_cache: tuple[tuple[str, ...], MultiFernet] | None = None


def cipher() -> MultiFernet:
    """The MultiFernet for the configured keys (built once per distinct configuration)."""
    global _cache
    keys = tuple(configured_keys())
    if not keys:
        if not may_derive():
            raise EncryptionKeyMissing()
        keys = (derived_key().decode(),)
    if _cache is not None and _cache[0] == keys:
        return _cache[1]
    try:
        fernets = [Fernet(key) for key in keys]
    except (ValueError, TypeError):
        raise EncryptionKeyInvalid(
            "GATEWAY_ENCRYPTION_KEY must be Fernet keys (32 url-safe base64-encoded bytes each), comma-separated"
        ) from None
    _cache = (keys, MultiFernet(fernets))
    return _cache[1]


def encrypt(plaintext: str) -> str:
    return cipher().encrypt(plaintext.encode()).decode("ascii")


def decrypt(token: str) -> str:
    try:
        return cipher().decrypt(token.encode("ascii")).decode()
    except (InvalidToken, UnicodeError):
        raise UndecryptableSecret("an upstream API key cannot be decrypted with GATEWAY_ENCRYPTION_KEY") from None


def rotate(token: str) -> str:
    """The same secret encrypted with the newest key."""
    try:
        return cipher().rotate(token.encode("ascii")).decode("ascii")
    except (InvalidToken, UnicodeError):
        raise UndecryptableSecret("an upstream API key cannot be decrypted with GATEWAY_ENCRYPTION_KEY") from None
