"""The console's key form: a key's name, models and limits, never beyond its team's."""
from __future__ import annotations

from django import forms

from keys.admin import ModelListField
from keys.models import APIKey, Team
from keys.permissions import LIMIT_FIELDS, beyond_team

MAX_MODELS = 1000  # names in a key's list (the field's max_length counts the cleaned list)
MAX_MODEL_CHARS = 200  # one name, as wide as the usage rows' model column


class KeyForm(forms.ModelForm):
    """Create a key or change one's models and limits, within the team's (checked in clean)."""

    allowed_models = ModelListField(
        required=False, max_length=MAX_MODELS, widget=forms.TextInput(attrs={"size": 60}),
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

    def clean_allowed_models(self) -> list[str]:
        models = self.cleaned_data["allowed_models"]
        if any(len(name) > MAX_MODEL_CHARS for name in models):
            raise forms.ValidationError(f"A model name has at most {MAX_MODEL_CHARS} characters.")
        return models

    def clean(self) -> dict:
        data = super().clean()
        for field, message in beyond_team(self.team, data).items():
            self.add_error(field, message)
        return data

    def save(self, commit: bool = True) -> APIKey:
        self.instance.budget_currency = self.team.budget_currency  # a money budget in the team's currency
        return super().save(commit)
