"""Who may see and do what with teams and their keys: one model for the admin, the REST API
(/api/keys/) and the console (/console/).

Rights come from two places, and a user has the union of both:

- **Django's model permissions** (given directly or through groups) act on every row, and only
  for active staff, as in the admin: `keys.view_apikey` reads every key, `keys.add_apikey`
  creates keys, `keys.change_apikey` changes, revokes and rotates any key, `keys.view_team`
  reads every team. Superusers have them all.
- **Team roles** (Membership.role) act on one team and the keys that belong to it, for anyone,
  staff or not:

  | role   | read the team, its keys, spend, charts | create keys | revoke, rotate, set limits |
  |--------|----------------------------------------|-------------|----------------------------|
  | viewer | yes                                    | no          | no                         |
  | member | yes                                    | yes         | of the keys they created   |
  | owner  | yes                                    | yes         | of every key of the team   |

  Who created a key is read from the audit trail (its "create" entry's user), which every
  interface writes and nobody can change. Keys without a team are reached through model
  permissions only.

Whatever cannot be seen is reported as absent (404), never as forbidden, so ids do not leak
across teams; what can be seen but not changed is 403.
"""
from __future__ import annotations

from django.db.models import QuerySet

from keys.models import APIKey, Membership, Team

# A key's limits, each bounded by its team's field of the same name when the team sets one.
LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "parallel_requests", "token_budget", "money_budget")

VIEW_KEYS, ADD_KEYS, CHANGE_KEYS = "keys.view_apikey", "keys.add_apikey", "keys.change_apikey"
VIEW_TEAMS, CHANGE_TEAMS = "keys.view_team", "keys.change_team"

VIEW, CREATE, MANAGE = "view", "create", "manage"
ROLE_RIGHTS: dict[str, frozenset[str]] = {
    Membership.Role.VIEWER: frozenset({VIEW}),
    Membership.Role.MEMBER: frozenset({VIEW, CREATE}),  # and MANAGE of the keys they created
    Membership.Role.OWNER: frozenset({VIEW, CREATE, MANAGE}),
}
# The model permission that gives a right over every team's keys.
GLOBAL_PERMISSION = {VIEW: VIEW_KEYS, CREATE: ADD_KEYS, MANAGE: CHANGE_KEYS}


def staff_can(user, permission: str) -> bool:
    """A model permission that counts on every row: an active staff user's (or a superuser's)."""
    return bool(user and user.is_authenticated and user.is_active and user.is_staff and user.has_perm(permission))


def role(user, team: Team | None) -> str | None:
    """The user's role in `team`, or None."""
    if team is None or not (user and user.is_authenticated and user.is_active):
        return None
    return Membership.objects.filter(team=team, user=user).values_list("role", flat=True).first()


def team_rights(user, team: Team | None) -> frozenset[str]:
    """What `user` may do with `team`'s keys: a subset of {view, create, manage}."""
    rights = {right for right, permission in GLOBAL_PERMISSION.items() if staff_can(user, permission)}
    return frozenset(rights | ROLE_RIGHTS.get(role(user, team), frozenset()))


def reads_every_key(user) -> bool:
    """As in the admin, the change permission implies the view permission."""
    return staff_can(user, VIEW_KEYS) or staff_can(user, CHANGE_KEYS)


def reads_every_team(user) -> bool:
    return staff_can(user, VIEW_TEAMS) or staff_can(user, CHANGE_TEAMS) or reads_every_key(user)


def can_view_team(user, team: Team) -> bool:
    return reads_every_team(user) or role(user, team) is not None


def can_create_keys(user, team: Team) -> bool:
    return CREATE in team_rights(user, team)


def can_manage_keys(user, team: Team | None) -> bool:
    """Revoke, rotate and change the limits of `team`'s keys (team None: keys without a team)."""
    return MANAGE in team_rights(user, team)


def can_view_key(user, key: APIKey) -> bool:
    return reads_every_key(user) or (key.team_id is not None and role(user, key.team) is not None)


def can_manage_key(user, key: APIKey) -> bool:
    """Revoke, rotate and change `key`: change_apikey, the key's team's owner, or the team's
    member who created it."""
    if staff_can(user, CHANGE_KEYS):
        return True
    if key.team_id is None:
        return False
    their_role = role(user, key.team)
    if their_role == Membership.Role.MEMBER:
        return key.pk in keys_created_by(user, [key.pk])
    return MANAGE in ROLE_RIGHTS.get(their_role, frozenset())


def manageable_keys(user, team: Team, keys: list[APIKey]) -> set[int]:
    """The ids of those of `team`'s `keys` that `user` may revoke, rotate and change."""
    if can_manage_keys(user, team):
        return {key.pk for key in keys}
    if role(user, team) == Membership.Role.MEMBER:
        return keys_created_by(user, [key.pk for key in keys])
    return set()


def keys_created_by(user, key_ids: list[int]) -> set[int]:
    """Those of `key_ids` whose creation the audit trail attributes to `user`."""
    from keys.audit.models import AuditEntry

    created = AuditEntry.objects.filter(object_type="keys.apikey", action=AuditEntry.Action.CREATE,
                                        actor_user=user, object_id__in=[str(pk) for pk in key_ids])
    return {int(pk) for pk in created.values_list("object_id", flat=True)}


def member_team_ids(user) -> QuerySet:
    return Membership.objects.filter(user=user).values("team_id")


def visible_teams(user, teams: QuerySet[Team] | None = None) -> QuerySet[Team]:
    """The teams `user` may read (of `teams`, default all)."""
    teams = Team.objects.all() if teams is None else teams
    if not (user and user.is_authenticated and user.is_active):
        return teams.none()
    if reads_every_team(user):
        return teams
    return teams.filter(pk__in=member_team_ids(user))


def visible_keys(user, keys: QuerySet[APIKey] | None = None) -> QuerySet[APIKey]:
    """The keys `user` may read (of `keys`, default all): every key with `view_apikey` (or
    `change_apikey`), else the keys of the user's teams."""
    keys = APIKey.objects.all() if keys is None else keys
    if not (user and user.is_authenticated and user.is_active):
        return keys.none()
    if reads_every_key(user):
        return keys
    return keys.filter(team__in=member_team_ids(user))


def manageable_teams(user, teams: QuerySet[Team] | None = None) -> QuerySet[Team]:
    """The teams whose keys `user` may revoke, rotate and limit."""
    teams = visible_teams(user, teams)
    if staff_can(user, CHANGE_KEYS):
        return teams
    return teams.filter(pk__in=Membership.objects.filter(user=user, role=Membership.Role.OWNER).values("team_id"))


def beyond_team(team: Team, values: dict) -> dict[str, str]:
    """What in `values` (a key's fields) goes beyond `team`'s models or limits, as
    {field: message}. A limit left empty is no key-level limit: the team's still binds."""
    errors = {}
    models = values.get("allowed_models")
    if models is not None and team.allowed_models:
        outside = [name for name in models if name not in team.allowed_models]
        if outside:  # an empty list is the team's models: the team's allow-list binds too
            errors["allowed_models"] = f"Not among the team's models: {', '.join(outside)}."
    for field in LIMIT_FIELDS:
        ceiling, value = getattr(team, field, None), values.get(field)
        if ceiling is not None and value is not None and value > ceiling:
            errors[field] = f"At most the team's {ceiling:,}."
    return errors
