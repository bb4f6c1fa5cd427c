"""OpenID Connect single sign-on (mozilla-django-oidc), on when OIDC_RP_CLIENT_ID is set.

An SSO user is a Django user named ``sso-<sub>`` (the provider's stable subject), so that no
provider can claim a local account by sending its username or e-mail address; name and e-mail
are copied from the claims at every login. The team memberships of the teams named in
GATEWAY_OIDC_TEAM_ROLES follow the groups claim at every login (the highest role a group gives
wins; a team the user's groups no longer give is left); memberships of teams the mapping does not
name are managed in the admin and never touched. The local login stays as the break-glass path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation
from django.db import transaction
from django.http import Http404
from mozilla_django_oidc import views as oidc_views
from mozilla_django_oidc.auth import OIDCAuthenticationBackend

from keys.models import Membership, Team

Role = Membership.Role
RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.OWNER: 2}
USERNAME_PREFIX = "sso-"
MAX_GROUPS = 1000  # a claim is bounded like every other input


@dataclass(frozen=True)
class Grant:
    team: str
    role: str


def parse_team_roles(text: str) -> dict[str, Grant]:
    """``"group=team:role,..."`` or a JSON object ``{"group": "team:role"}`` → group → Grant."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        pairs = list(json.loads(text).items())
    else:
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    grants = {}
    for pair in pairs:
        if len(pair) != 2 or ":" not in pair[1]:
            raise ImproperlyConfigured(f"GATEWAY_OIDC_TEAM_ROLES: {'='.join(pair)!r} is not group=team:role")
        group, target = (part.strip() for part in pair)
        team, role = (part.strip() for part in target.rsplit(":", 1))
        if role not in RANK:
            raise ImproperlyConfigured(f"GATEWAY_OIDC_TEAM_ROLES: role {role!r} is not one of {', '.join(RANK)}")
        grants[group] = Grant(team, role)
    return grants


def groups_of(claims: dict) -> set[str]:
    value = claims.get(settings.GATEWAY_OIDC_TEAMS_CLAIM) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return set()
    return {str(group) for group in value[:MAX_GROUPS]}


def roles_for(groups: set[str], grants: dict[str, Grant]) -> dict[str, str]:
    """Team name → the highest role the groups give."""
    roles: dict[str, str] = {}
    for group in groups & grants.keys():
        grant = grants[group]
        if grant.team not in roles or RANK[grant.role] > RANK[roles[grant.team]]:
            roles[grant.team] = grant.role
    return roles


@transaction.atomic
def sync_memberships(user, claims: dict) -> None:
    grants = parse_team_roles(settings.GATEWAY_OIDC_TEAM_ROLES)
    wanted = roles_for(groups_of(claims), grants)
    managed = {grant.team for grant in grants.values()}
    teams = {team.name: team for team in Team.objects.filter(name__in=managed)}
    current = {m.team.name: m for m in Membership.objects.filter(user=user, team__name__in=managed).select_related("team")}
    for name, membership in current.items():
        if name not in wanted:
            membership.delete()
        elif membership.role != wanted[name]:
            membership.role = wanted[name]
            membership.save(update_fields=["role"])
    for name, role in wanted.items():
        if name not in current and name in teams:  # a team must exist: SSO never creates one
            Membership.objects.create(user=user, team=teams[name], role=role)


class TeamRoleOIDCBackend(OIDCAuthenticationBackend):
    """Creates or updates the SSO user and its team memberships from the claims."""

    def verify_token(self, token, **kwargs):
        """The library checks signature, expiry and nonce; the audience is checked here too: an
        ID token the provider issued to another client is refused."""
        payload = super().verify_token(token, **kwargs)
        audience = payload.get("aud")
        if self.OIDC_RP_CLIENT_ID not in (audience if isinstance(audience, list) else [audience]):
            raise SuspiciousOperation("ID token for another client")
        return payload

    def get_userinfo(self, access_token, id_token, payload):
        claims = super().get_userinfo(access_token, id_token, payload)
        if not isinstance(claims, dict) or claims.get("sub") != payload.get("sub"):
            raise SuspiciousOperation("userinfo is about another subject than the ID token")  # OIDC Core 5.3.2
        return claims

    def verify_claims(self, claims) -> bool:
        return bool(claims.get("sub"))

    def get_username(self, claims) -> str:
        return f"{USERNAME_PREFIX}{claims['sub']}"[:150]

    def filter_users_by_claims(self, claims):
        return self.UserModel.objects.filter(username=self.get_username(claims))

    def create_user(self, claims):
        user = self.UserModel.objects.create_user(self.get_username(claims))
        user.set_unusable_password()  # only the provider logs this user in
        return self.update_user(user, claims)

    def update_user(self, user, claims):
        if not user.is_active:
            raise SuspiciousOperation("inactive user")
        user.email = str(claims.get("email") or "")[:254]
        user.first_name = str(claims.get("given_name") or claims.get("name") or "")[:150]
        user.last_name = str(claims.get("family_name") or "")[:150]
        staff_groups = set(settings.GATEWAY_OIDC_STAFF_GROUPS)
        if staff_groups:
            user.is_staff = bool(groups_of(claims) & staff_groups)
        user.save()
        sync_memberships(user, claims)
        return user


def enabled() -> bool:
    return bool(settings.OIDC_RP_CLIENT_ID)


class Disabled404:
    """The SSO routes exist only while SSO is configured."""

    def dispatch(self, request, *args, **kwargs):
        if not enabled():
            raise Http404
        return super().dispatch(request, *args, **kwargs)


class AuthenticationRequestView(Disabled404, oidc_views.OIDCAuthenticationRequestView):
    def __init__(self, *args, **kwargs):
        if enabled():
            super().__init__(*args, **kwargs)


class CallbackView(Disabled404, oidc_views.OIDCAuthenticationCallbackView):
    pass
