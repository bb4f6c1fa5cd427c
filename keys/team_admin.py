"""The admin's teams (with their members) and prices (docs/decisions.md#limits, #prices)."""
from __future__ import annotations

from django import forms
from django.contrib import admin

from keys import permissions
from keys.admin_audit import AuditHistoryMixin
from keys.models import Membership, Price, Team


class CurrencyField(forms.CharField):
    """ISO 4217 code; empty means USD (forms that leave the budget alone need not send it)."""

    def __init__(self, **kwargs):
        super().__init__(required=False, max_length=3, min_length=3, initial="USD",
                         help_text="ISO 4217 code of the money budget (USD if empty).", **kwargs)

    def clean(self, value) -> str:
        value = super().clean(value).strip().upper() or "USD"
        if not value.isalpha():
            raise forms.ValidationError("Three letters, such as USD or EUR.")
        return value


class TeamForm(forms.ModelForm):
    budget_currency = CurrencyField()

    class Meta:
        model = Team
        fields = "__all__"

    def clean_allowed_models(self) -> list[str]:
        models = self.cleaned_data.get("allowed_models") or []
        if not isinstance(models, list) or not all(isinstance(m, str) and m.strip() for m in models):
            raise forms.ValidationError("A list of model names, such as [\"m1\", \"m2\"].")
        return list(dict.fromkeys(m.strip() for m in models))

    def clean(self) -> dict:
        data = super().clean()
        models = data.get("allowed_models")
        if self.instance.pk and models:
            # A key's models are within its team's: narrowing the team must not leave a key beyond it.
            beyond = sorted({m for key in self.instance.keys.all() for m in key.allowed_models if m not in models})
            if beyond:
                self.add_error("allowed_models", f"Keys of the team still list {', '.join(beyond)}; "
                                                 "change them first.")
        return data


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]


@admin.register(Team)
class TeamAdmin(AuditHistoryMixin, admin.ModelAdmin):
    form = TeamForm
    list_display = ["name", "models", "limits", "budgets", "budget_period", "key_count"]
    search_fields = ["name"]
    inlines = [MembershipInline]
    fieldsets = [
        (None, {"fields": ["name", "allowed_models"]}),
        ("Limits", {"fields": ["requests_per_minute", "tokens_per_minute", "parallel_requests"]}),
        ("Budgets", {"fields": ["token_budget", "money_budget", "budget_currency", "budget_period"],
                     "description": "A request reserves its worst case against every budget of its key and "
                                    "team; the tightest refuses it (docs/decisions.md#limits)."}),
    ]

    def get_queryset(self, request):
        # Team scoping is keys/permissions.py's (staff with view_team see every team).
        return permissions.visible_teams(request.user, super().get_queryset(request))

    @admin.display(description="models")
    def models(self, team: Team) -> str:
        return ", ".join(team.allowed_models) or "all"

    @admin.display(description="limits")
    def limits(self, team: Team) -> str:
        parts = [f"{team.requests_per_minute} rpm" if team.requests_per_minute is not None else "",
                 f"{team.tokens_per_minute} tpm" if team.tokens_per_minute is not None else "",
                 f"{team.parallel_requests} parallel" if team.parallel_requests is not None else ""]
        return ", ".join(p for p in parts if p) or "-"

    @admin.display(description="budgets")
    def budgets(self, team: Team) -> str:
        parts = [f"{team.token_budget:,} tokens" if team.token_budget is not None else "",
                 f"{team.money_budget} {team.budget_currency}" if team.money_budget is not None else ""]
        return ", ".join(p for p in parts if p) or "-"

    @admin.display(description="keys")
    def key_count(self, team: Team) -> int:
        return team.keys.count()


@admin.register(Price)
class PriceAdmin(AuditHistoryMixin, admin.ModelAdmin):
    """A price applies to requests from `valid_from` on; rows already written keep their cost."""

    list_display = ["model", "upstream_or_any", "input_per_million", "output_per_million", "currency", "valid_from"]
    list_filter = ["currency", "upstream"]
    search_fields = ["model", "upstream"]
    date_hierarchy = "valid_from"

    @admin.display(description="upstream", ordering="upstream")
    def upstream_or_any(self, price: Price) -> str:
        return price.upstream or "any"
