"""Teams: what a key inherits from its team (models, limits, budgets), in one place for the API
path, the admin and the REST API (docs/decisions.md#limits)."""
from __future__ import annotations

from keys.limits import Limits
from keys.models import APIKey, Team


def team_limits(team: Team) -> Limits:
    return Limits(
        team.id, team.requests_per_minute, team.tokens_per_minute, team.parallel_requests, team.token_budget,
        team.budget_period, money_budget=team.money_budget, currency=team.budget_currency, scope="team",
        name=team.name,
    )


def key_limits(key: APIKey) -> Limits:
    """The key's limits, with its team's (a request must pass both)."""
    team = key.team if key.team_id is not None else None
    return Limits(
        key.id, key.requests_per_minute, key.tokens_per_minute, key.parallel_requests, key.token_budget,
        key.budget_period, money_budget=key.money_budget, currency=key.budget_currency, scope="key",
        team=team_limits(team) if team is not None else None, team_id=key.team_id,
    )


def team_models(key: APIKey) -> tuple[str, ...]:
    """The models the key's team allows (empty: every model, or no team)."""
    team = key.team if key.team_id is not None else None
    return tuple(team.allowed_models or ()) if team is not None else ()


def models_outside_team(models: list[str], team: Team | None) -> list[str]:
    """The models of a key's allow-list that its team does not allow (to refuse the change)."""
    if team is None or not team.allowed_models:
        return []
    return [model for model in models if model not in team.allowed_models]


def outside_team_message(models: list[str], team: Team) -> str:
    return f"Team '{team.name}' does not allow {', '.join(repr(m) for m in models)}; a key's models are within its team's."
