"""API key secrets: generation, display prefix and digest. Pure functions, no Django."""
from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "sk-"
# 32 random bytes -> 43 url-safe characters.
RANDOM_BYTES = 32
DISPLAY_PREFIX_LENGTH = 10


def generate_key() -> str:
    """A new plaintext key: "sk-" + 43 url-safe random characters."""
    return KEY_PREFIX + secrets.token_urlsafe(RANDOM_BYTES)


def hash_key(plaintext: str) -> str:
    """The stored form of a key. Keys are long random secrets, so plain SHA-256 is enough
    (no per-request slow hash) and survives a SECRET_KEY rotation."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def display_prefix(plaintext: str) -> str:
    """The first characters of a generated key, enough to tell keys apart in the admin and logs
    (10 of its 46 characters; the other 43 random ones stay secret)."""
    return plaintext[:DISPLAY_PREFIX_LENGTH]


IMPORTED_PREFIX = "imp-"


def digest_prefix(digest: str) -> str:
    """The display prefix of a key that came from elsewhere (FastChat's --api-keys): its
    plaintext may be short or guessable ("EMPTY", "sk-123456"), so no character of it is ever
    shown; characters of its digest tell keys apart instead."""
    return IMPORTED_PREFIX + digest[:8]
