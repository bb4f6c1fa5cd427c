"""The console's key form: a key's name, models and limits, never beyond its team's."""
from __future__ import annotations

from django import forms

from keys.admin import ModelListField
from keys.models import APIKey, Team
from keys.permissions import LIMIT_FIELDS, beyond_team


class KeyForm(forms.ModelForm):
    """Create a key or change one's models and limits, within the team's (checked in clean)."""

    allowed_models = ModelListField(
        required=False, widget=forms.TextInput(attrs={"size": 60}),
        help_text="Comma-separated model names; empty means every model the team allows.",
    )

    class Meta:
        model = APIKey
        fields = ["name", "allowed_models", *LIMIT_FIELDS, "budget_period"]

    def __init__(self, *args, team: Team, **kwargs):
        super().__init__(*args, **kwargs)
        self.team = team
        if team.allowed_models:
            self.fields["allowed_models"].help_text = "Comma-separated, among the team's: " + ", ".join(
                team.allowed_models) + ". Empty means all of them."
            self.fields["allowed_models"].widget.attrs["placeholder"] = ", ".join(team.allowed_models)
        for field in LIMIT_FIELDS:
            ceiling = getattr(team, field, None)
            if ceiling is not None:
                self.fields[field].widget.attrs.update(max=ceiling, placeholder=f"team: {ceiling:,}")
                self.fields[field].help_text = f"At most the team's {ceiling:,}; empty: the team's limit."

    def clean(self) -> dict:
        data = super().clean()
        for field, message in beyond_team(self.team, data).items():
            self.add_error(field, message)
        return data

    def save(self, commit: bool = True) -> APIKey:
        self.instance.budget_currency = self.team.budget_currency  # a money budget in the team's currency
        return super().save(commit)
