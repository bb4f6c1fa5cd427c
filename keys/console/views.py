"""The console's pages and actions.

Every object is looked up through keys/permissions.py's visible_* querysets, so a team or key
the user may not read is a 404 (its id says nothing); one the user may read but not change is
a 403. Actions are POSTs (CSRF-checked by Django's middleware); each runs inside the audit
trail's context so that its entry names the user and the console. A new or rotated key's
plaintext is rendered into the answer to that POST and nowhere else (keys/admin.py Plaintext).
"""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from keys import dashboard, permissions
from keys.admin import Plaintext
from keys.console import spend
from keys.console.audit import console_audit
from keys.console.forms import KeyForm
from keys.models import APIKey, KeyRevokedError, Team

SITE = {"site_header": "FastChat gateway console", "site_title": "FastChat gateway console"}
LOGIN_URL = "console:login"


class LoginView(auth_views.LoginView):
    """Django's login (any active user, staff or not) on the admin's login page."""

    template_name = "admin/gateway_login.html"  # the admin's, with single sign-on when on
    redirect_authenticated_user = True  # a signed-in user goes to their teams
    extra_context = {**SITE, "title": "Log in"}

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), "app_path": self.request.get_full_path()}

    def get_default_redirect_url(self) -> str:
        return reverse("console:home")


class LogoutView(auth_views.LogoutView):
    next_page = "console:login"


def page(request: HttpRequest, template: str, title: str, **context) -> TemplateResponse:
    return TemplateResponse(request, f"console/{template}", {**SITE, "title": title, **context})


def window_days(request: HttpRequest) -> int:
    days = request.GET.get("days", "")
    return int(days) if days in {str(period) for period in dashboard.PERIODS} else dashboard.DEFAULT_DAYS


def team_or_404(request: HttpRequest, team_id: int) -> Team:
    return get_object_or_404(permissions.visible_teams(request.user), pk=team_id)


def key_or_404(request: HttpRequest, key_id: int) -> APIKey:
    return get_object_or_404(permissions.visible_keys(request.user).select_related("team"), pk=key_id)


@login_required(login_url=LOGIN_URL)
@require_GET
def home(request: HttpRequest) -> TemplateResponse:
    teams = list(permissions.visible_teams(request.user).order_by("name"))
    roles = dict(permissions.Membership.objects.filter(user=request.user).values_list("team_id", "role"))
    rows = [{"team": team, "role": roles.get(team.pk, ""), "keys": permissions.visible_keys(
        request.user, team.keys.filter(revoked_at__isnull=True)).count(),
        "spend": spend.team_spend(team)} for team in teams]
    return page(request, "home.html", "Your teams", rows=rows)


@login_required(login_url=LOGIN_URL)
@require_GET
def team_detail(request: HttpRequest, team_id: int) -> TemplateResponse:
    team = team_or_404(request, team_id)
    keys = list(permissions.visible_keys(request.user, team.keys.all()).order_by("revoked_at", "-created_at"))
    manageable = permissions.manageable_keys(request.user, team, keys)
    for key in keys:
        key.manageable = key.pk in manageable and not key.is_revoked
    days = window_days(request)
    return page(
        request, "team.html", team.name, team=team, keys=spend.with_spend(keys, team),
        role=permissions.role(request.user, team), team_spend=spend.team_spend(team),
        can_create=permissions.can_create_keys(request.user, team),
        can_manage=bool(manageable),
        **dashboard.dashboard_context(days, keys=[key.pk for key in keys]),
    )


@login_required(login_url=LOGIN_URL)
@require_http_methods(["GET", "POST"])
def key_create(request: HttpRequest, team_id: int) -> HttpResponse:
    team = team_or_404(request, team_id)
    if not permissions.can_create_keys(request.user, team):
        raise PermissionDenied
    form = KeyForm(request.POST or None, team=team)
    if request.method == "POST" and form.is_valid():
        with console_audit(request), transaction.atomic():
            key = form.save(commit=False)
            key.team = team
            plaintext = Plaintext(key.assign_new_secret())
            key.save()
        return page(request, "plaintext.html", "API key created", key=key, plaintext=plaintext)
    return page(request, "key_form.html", f"New key for {team.name}", team=team, form=form)


@login_required(login_url=LOGIN_URL)
@require_http_methods(["GET", "POST"])
def key_detail(request: HttpRequest, key_id: int) -> HttpResponse:
    key = key_or_404(request, key_id)
    can_manage = permissions.can_manage_key(request.user, key) and not key.is_revoked
    form = KeyForm(instance=key, team=key.team) if can_manage and key.team else None
    if request.method == "POST":
        if not can_manage or form is None:
            raise PermissionDenied
        form = KeyForm(request.POST, instance=key, team=key.team)
        if form.is_valid():
            with console_audit(request):
                form.save()
            messages.success(request, f"Saved {key.name}'s models and limits.")
            return redirect("console:key", key_id=key.pk)
    return page(
        request, "key.html", key.name, key=spend.with_spend([key], key.team)[0], team=key.team, form=form,
        can_manage=can_manage, **dashboard.dashboard_context(window_days(request), keys=[key.pk]),
    )


def managed_key(request: HttpRequest, key_id: int) -> APIKey:
    key = key_or_404(request, key_id)
    if not permissions.can_manage_key(request.user, key):
        raise PermissionDenied
    return key


@login_required(login_url=LOGIN_URL)
@require_POST
def key_revoke(request: HttpRequest, key_id: int) -> HttpResponse:
    key = managed_key(request, key_id)
    with console_audit(request):
        revoked = key.revoke()
    if revoked:
        messages.success(request, f"Revoked {key.name} ({key.prefix}…). It is refused within a second.")
    else:
        messages.warning(request, f"{key.name} was already revoked.")
    return redirect("console:team", team_id=key.team_id) if key.team_id else redirect("console:home")


@login_required(login_url=LOGIN_URL)
@require_POST
def key_rotate(request: HttpRequest, key_id: int) -> HttpResponse:
    key = managed_key(request, key_id)
    try:
        with console_audit(request):
            plaintext = Plaintext(key.rotate())
    except KeyRevokedError as exc:
        messages.warning(request, str(exc))
        return redirect("console:key", key_id=key.pk)
    return page(request, "plaintext.html", "API key rotated", key=key, plaintext=plaintext)
