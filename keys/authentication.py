"""Authentication for the key-management API: a staff session, or a staff user's bearer key.

Keys are looked up in the database on every request (no cache): this API is small, sync and
rare, and a revoked or expired key must stop working at once. Whether the user may manage keys
is the permissions' business (staff, then the user's model permissions: keys/api_permissions.py),
so a valid key of a non-staff user gets 403, not 401.
"""
from __future__ import annotations

from django.contrib.auth.models import AnonymousUser
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from keys.hashing import hash_key
from keys.models import APIKey


class APIKeyAuthentication(BaseAuthentication):
    """`Authorization: Bearer sk-...` of a live APIKey; request.user is the key's user."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword.lower().encode():
            return None
        if len(parts) != 2:
            raise AuthenticationFailed("Invalid Authorization header: expected 'Bearer <key>'.")
        try:
            token = parts[1].decode()
        except UnicodeDecodeError:
            raise AuthenticationFailed("Invalid API key.") from None
        return self.authenticate_key(token)

    def authenticate_key(self, token: str) -> tuple:
        key = APIKey.objects.select_related("user").filter(hashed_key=hash_key(token)).first()
        # One message for unknown, revoked and expired keys: the caller learns nothing more.
        if key is None or key.is_revoked or key.is_expired():
            raise AuthenticationFailed("Invalid, revoked or expired API key.")
        if key.user is None:
            return AnonymousUser(), key
        if not key.user.is_active:
            raise AuthenticationFailed("The key's user is inactive.")
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        # A value here makes DRF answer unauthenticated requests with 401 rather than 403.
        return f'{self.keyword} realm="api"'


class APIKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Describes APIKeyAuthentication in the OpenAPI schema (drf-spectacular)."""

    target_class = APIKeyAuthentication
    name = "bearerKey"

    def get_security_definition(self, auto_schema) -> dict:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (sk-...) whose user is an active staff user; it acts with that user's permissions.",
        }
