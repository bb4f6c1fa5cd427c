"""Who may do what, as a matrix: every console route, every key-management API endpoint and the
admin's pages of the keys app (keys, teams, usage, prices, ...) × anonymous, viewer, member and
owner (of team "red", not staff), staff without permissions, staff with view permissions only,
and a superuser. Each cell asserts the status, and for lists which rows are visible.

One permission model (keys/permissions.py) decides for the three interfaces. Each cell runs in a
transaction rolled back afterwards, so actions (revoke, rotate, create) never see another
cell's effects. A last test checks that the matrix names every route there is."""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from django.contrib import admin
from django.contrib.auth.models import Permission, User
from django.db import transaction
from django.test import Client, TestCase
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone

from keys import audit
from keys.models import APIKey, Membership, Price, Team, UsageDaily, UsageRecord

PRINCIPALS = ("anonymous", "viewer", "member", "owner", "staff", "staff_view", "superuser")
NON_STAFF = ("viewer", "member", "owner")


@dataclass(frozen=True)
class Route:
    """A request and what each principal gets: `expect` maps principals to statuses (the rest
    get `default`); `rows` maps principals to the row names a list shows."""

    name: str  # the URL name it covers
    method: str
    path: Callable[[Cast], str]
    expect: dict[str, int]
    default: int = 0
    data: Callable[[Cast], dict] | None = None
    rows: dict[str, set[str]] = field(default_factory=dict)
    list_rows: Callable | None = None  # (response) -> set of names shown

    def status_for(self, principal: str) -> int:
        return self.expect.get(principal, self.default)


class Cast:
    """Teams red and blue, a key in each and one without a team, a usage row, a price, and one
    user per principal. Every model of the keys app with an admin needs a row here, so that its
    change, history and delete pages are in the matrix."""

    def __init__(self) -> None:
        self.red = Team.objects.create(name="red", allowed_models=["m1"], requests_per_minute=100)
        self.blue = Team.objects.create(name="blue")
        self.red_key, _ = APIKey.objects.create_key("red-app", team=self.red)
        self.blue_key, _ = APIKey.objects.create_key("blue-app", team=self.blue)
        self.loose_key, _ = APIKey.objects.create_key("no-team-app")
        UsageRecord.objects.create(key=self.red_key, model="m1", endpoint="/v1/chat/completions",
                                   request_id="req-1", status=200, currency="")
        Price.objects.create(model="m1", input_per_million=Decimal("1"), output_per_million=Decimal("2"))
        UsageDaily.objects.create(key=self.red_key, model="m1", day=timezone.now().date(), requests=1,
                                  currency="USD", cost=Decimal("0.5"))
        self.users: dict[str, User | None] = {"anonymous": None}
        for role in NON_STAFF:
            self.users[role] = User.objects.create_user(role)
            Membership.objects.create(team=self.red, user=self.users[role], role=role)
        self.users["staff"] = User.objects.create_user("staff", is_staff=True)
        self.users["staff_view"] = User.objects.create_user("staff_view", is_staff=True)
        self.users["staff_view"].user_permissions.set(
            Permission.objects.filter(content_type__app_label="keys", codename__startswith="view_"))
        self.users["superuser"] = User.objects.create_superuser("root", "root@example.com", None)
        # A key the member created (the audit trail says who created a key).
        with audit.context(actor=self.users["member"], origin="console"):
            self.member_key, _ = APIKey.objects.create_key("member-app", team=self.red)

    def client(self, principal: str) -> Client:
        client = Client()
        if self.users[principal] is not None:
            client.force_login(self.users[principal])
        return client


def console(name: str, *args: str) -> Callable[[Cast], str]:
    return lambda cast: reverse(f"console:{name}", args=[getattr(cast, arg).pk for arg in args])


def api(suffix: str = "", key: str | None = None) -> Callable[[Cast], str]:
    return lambda cast: "/api/keys/" + (f"{getattr(cast, key).pk}/" if key else "") + suffix


def shown(attribute: str):
    """The names of the rows a console page lists (its `data-<attribute>` ids)."""
    def read(cast: Cast, response) -> set[str]:
        ids = {int(value) for value in re.findall(rf'data-{attribute}="(\d+)"', response.content.decode())}
        model = Team if attribute == "team" else APIKey
        return set(model.objects.filter(pk__in=ids).values_list("name", flat=True))
    return read


def api_rows(cast: Cast, response) -> set[str]:
    return {row["name"] for row in response.json()["results"]}


def admin_rows(cast: Cast, response) -> set[str]:
    return {str(getattr(row, "name", row)) for row in response.context["cl"].result_list}


EVERY_TEAM, RED = {"red", "blue"}, {"red"}
EVERY_KEY = {"red-app", "blue-app", "no-team-app", "member-app"}
GLOBAL_READERS = ("staff_view", "superuser")
TEAM_READERS = (*NON_STAFF, *GLOBAL_READERS)
KEY_FORM = {"name": "changed", "allowed_models": "m1", "requests_per_minute": "10", "tokens_per_minute": "",
            "parallel_requests": "", "token_budget": "", "money_budget": "", "budget_period": "month"}


def readers(statuses: dict[str, int], **others: int) -> dict[str, int]:
    return {**statuses, **others}


# Console: anonymous visitors go to the login page; what a user cannot see is 404, what a user
# can see but not change is 403.
CONSOLE = [
    Route("login", "get", console("login"), {"anonymous": 200}, default=302),  # signed in: to their teams
    Route("logout", "post", console("logout"), {}, default=302),
    Route("home", "get", console("home"), {"anonymous": 302}, default=200, list_rows=shown("team"),
          rows={**dict.fromkeys(NON_STAFF, RED), "staff": set(), "staff_view": EVERY_TEAM, "superuser": EVERY_TEAM}),
    Route("team", "get", console("team", "red"), {"anonymous": 302, "staff": 404}, default=200,
          list_rows=shown("key"), rows=dict.fromkeys(TEAM_READERS, {"red-app", "member-app"})),
    Route("team", "get", console("team", "blue"), {"anonymous": 302, "staff_view": 200, "superuser": 200},
          default=404, list_rows=shown("key"), rows=dict.fromkeys(GLOBAL_READERS, {"blue-app"})),
    Route("key", "get", console("key", "red_key"), {"anonymous": 302, "staff": 404}, default=200),
    Route("key", "get", console("key", "blue_key"), {"anonymous": 302, "staff_view": 200, "superuser": 200},
          default=404),
    Route("key", "get", console("key", "loose_key"), {"anonymous": 302, "staff_view": 200, "superuser": 200},
          default=404),
    Route("key", "post", console("key", "red_key"), {"anonymous": 302, "owner": 302, "superuser": 302,
                                                     "staff": 404}, default=403, data=lambda cast: KEY_FORM),
    Route("key", "post", console("key", "blue_key"), {"anonymous": 302, "staff_view": 403, "superuser": 302},
          default=404, data=lambda cast: KEY_FORM),
    Route("key-create", "get", console("key-create", "red"), {"anonymous": 302, "member": 200, "owner": 200,
                                                             "superuser": 200, "staff": 404}, default=403),
    Route("key-create", "post", console("key-create", "red"), {"anonymous": 302, "member": 200, "owner": 200,
                                                              "superuser": 200, "staff": 404}, default=403,
          data=lambda cast: KEY_FORM),
    Route("key-create", "post", console("key-create", "blue"), {"anonymous": 302, "staff_view": 403,
                                                               "superuser": 200}, default=404,
          data=lambda cast: KEY_FORM),
    Route("key-revoke", "post", console("key-revoke", "red_key"), {"anonymous": 302, "owner": 302,
                                                                   "superuser": 302, "staff": 404}, default=403),
    Route("key-revoke", "post", console("key-revoke", "blue_key"), {"anonymous": 302, "staff_view": 403,
                                                                    "superuser": 302}, default=404),
    # Members manage the keys they created.
    Route("key-revoke", "post", console("key-revoke", "member_key"), {"anonymous": 302, "member": 302, "owner": 302,
                                                                      "superuser": 302, "staff": 404}, default=403),
    Route("key-rotate", "post", console("key-rotate", "member_key"), {"anonymous": 302, "member": 200, "owner": 200,
                                                                      "superuser": 200, "staff": 404}, default=403),
    Route("key", "post", console("key", "member_key"), {"anonymous": 302, "member": 302, "owner": 302,
                                                        "superuser": 302, "staff": 404}, default=403,
          data=lambda cast: KEY_FORM),
    Route("key-rotate", "post", console("key-rotate", "red_key"), {"anonymous": 302, "owner": 200,
                                                                   "superuser": 200, "staff": 404}, default=403),
    Route("key-rotate", "post", console("key-rotate", "blue_key"), {"anonymous": 302, "staff_view": 403,
                                                                    "superuser": 200}, default=404),
]

# The key-management API: staff only (401 without credentials, 403 for everybody else), then
# Django's model permissions; view-only staff read.
API_DENIED = {"anonymous": 401, **dict.fromkeys((*NON_STAFF, "staff"), 403)}
API = [
    Route("apikey-list", "get", api(), {**API_DENIED, "staff_view": 200, "superuser": 200},
          list_rows=api_rows, rows=dict.fromkeys(GLOBAL_READERS, EVERY_KEY)),
    Route("apikey-list", "post", api(), {**API_DENIED, "staff_view": 403, "superuser": 201},
          data=lambda cast: {"name": "api-made", "team": cast.red.pk, "allowed_models": ["m1"]}),
    Route("apikey-detail", "get", api(key="red_key"), {**API_DENIED, "staff_view": 200, "superuser": 200}),
    Route("apikey-detail", "patch", api(key="red_key"), {**API_DENIED, "staff_view": 403, "superuser": 200},
          data=lambda cast: {"requests_per_minute": 5}),
    Route("apikey-detail", "put", api(key="loose_key"), {**API_DENIED, "staff_view": 403, "superuser": 200},
          data=lambda cast: {"name": "renamed"}),
    Route("apikey-revoke", "post", api("revoke/", "red_key"), {**API_DENIED, "staff_view": 403, "superuser": 200}),
    Route("apikey-rotate", "post", api("rotate/", "red_key"), {**API_DENIED, "staff_view": 403, "superuser": 200}),
    Route("apikey-usage", "get", api("usage/", "red_key"), {**API_DENIED, "staff_view": 200, "superuser": 200}),
    Route("apikey-usage-summary", "get", api("usage/"), {**API_DENIED, "staff_view": 200, "superuser": 200}),
    # The schema describes the API, holds no data, and is public (drf-spectacular's default).
    Route("schema", "get", lambda cast: "/api/schema/", {}, default=200),
]

# The admin: staff only (others are sent to its login page), then model permissions.
ADMIN_DENIED = dict.fromkeys(("anonymous", *NON_STAFF), 302)
ADMIN_EXTRA = [
    Route("index", "get", lambda cast: reverse("admin:index"), {**ADMIN_DENIED}, default=200),
    Route("app_list", "get", lambda cast: reverse("admin:app_list", args=["keys"]),
          {**ADMIN_DENIED, "staff": 404}, default=200),
    Route("keys_apikey_rotate", "get", lambda cast: reverse("admin:keys_apikey_rotate", args=[cast.red_key.pk]),
          {**ADMIN_DENIED, "staff": 403, "staff_view": 403}, default=200),
    Route("keys_apikey_rotate", "post", lambda cast: reverse("admin:keys_apikey_rotate", args=[cast.red_key.pk]),
          {**ADMIN_DENIED, "staff": 403, "staff_view": 403}, default=200, data=lambda cast: {"confirm": "yes"}),
    Route("keys_usage_dashboard", "get", lambda cast: reverse("admin:keys_usage_dashboard"),
          {**ADMIN_DENIED, "staff": 403}, default=200),
    Route("keys_usage_live", "get", lambda cast: reverse("admin:keys_usage_live"),
          {**ADMIN_DENIED, "staff": 403}, default=200),
    Route("keys_usage_export", "get", lambda cast: reverse("admin:keys_usage_export"),
          {**ADMIN_DENIED, "staff": 403}, default=200),
    Route("keys_audit_export", "get", lambda cast: reverse("admin:keys_audit_export"),
          {**ADMIN_DENIED, "staff": 403}, default=200),
]


def admin_model_routes() -> list[Route]:
    """Each admin page of each model of the keys app: its list, add and change pages (view only
    without the change permission). The add page is refused to everybody for models that are
    written by the gateway only (usage rows, roll-ups, audit entries)."""
    routes = []
    for model, model_admin in admin.site._registry.items():
        if model._meta.app_label != "keys":
            continue
        name = f"keys_{model._meta.model_name}"
        addable = model_admin.has_add_permission.__func__ is admin.ModelAdmin.has_add_permission
        first = model._default_manager.order_by("pk").first
        list_rows = {}
        if model is APIKey:
            list_rows = dict.fromkeys(GLOBAL_READERS, EVERY_KEY)
        elif model is Team:
            list_rows = dict.fromkeys(GLOBAL_READERS, EVERY_TEAM)
        routes += [
            Route(f"{name}_changelist", "get", lambda cast, n=name: reverse(f"admin:{n}_changelist"),
                  {**ADMIN_DENIED, "staff": 403}, default=200, rows=list_rows,
                  list_rows=admin_rows if list_rows else None),
            Route(f"{name}_add", "get", lambda cast, n=name: reverse(f"admin:{n}_add"),
                  {**ADMIN_DENIED, "staff": 403, "staff_view": 403, "superuser": 200 if addable else 403}),
        ]
        trail = hasattr(model_admin, "history_view") and "AuditHistoryMixin" in {
            cls.__name__ for cls in type(model_admin).__mro__}
        deletable = model_admin.has_delete_permission.__func__ is admin.ModelAdmin.has_delete_permission
        if first() is not None:
            def page(view: str, n=name, f=first):
                return lambda cast: reverse(f"admin:{n}_{view}", args=[f().pk])
            routes += [
                Route(f"{name}_change", "get", page("change"), {**ADMIN_DENIED, "staff": 403}, default=200),
                # Keys' and teams' History opens their audit trail, which checks its own permission.
                Route(f"{name}_history", "get", page("history"), {**ADMIN_DENIED, "staff": 302 if trail else 403},
                      default=302 if trail else 200),
                Route(f"{name}_delete", "get", page("delete"), {**ADMIN_DENIED, "staff": 403, "staff_view": 403,
                                                              "superuser": 200 if deletable else 403}),
            ]
    return routes


class PermissionMatrixTests(TestCase):
    def setUp(self) -> None:
        super().setUp()
        self.cast = Cast()

    def run_matrix(self, routes: list[Route], content_type: str | None = None) -> None:
        for route in routes:
            for principal in PRINCIPALS:
                path = route.path(self.cast)
                with self.subTest(f"{route.method.upper()} {path} as {principal}"), transaction.atomic():
                    client = self.cast.client(principal)
                    data = route.data(self.cast) if route.data else {}
                    kwargs = {"content_type": content_type} if content_type and route.method != "get" else {}
                    body = json.dumps(data) if kwargs else data
                    response = getattr(client, route.method)(path, body, **kwargs)
                    shown_body = b"(streamed)" if response.streaming else response.content[:300]
                    self.assertEqual(response.status_code, route.status_for(principal), shown_body)
                    if route.list_rows and response.status_code == 200:
                        self.assertEqual(route.list_rows(self.cast, response), route.rows.get(principal, set()))
                    transaction.set_rollback(True)

    def test_console(self):
        self.run_matrix(CONSOLE)

    def test_key_management_api(self):
        self.run_matrix(API, content_type="application/json")

    def test_admin(self):
        self.run_matrix([*ADMIN_EXTRA, *admin_model_routes()])

    def test_console_anonymous_redirects_go_to_the_console_login(self):
        response = Client().get(reverse("console:team", args=[self.cast.red.pk]))
        self.assertTrue(response["Location"].startswith(reverse("console:login")))

    def test_the_api_keeps_a_teams_keys_within_its_models_and_limits(self):
        client = self.cast.client("superuser")
        red = self.cast.red.pk
        for data, field_name in (({"team": red, "allowed_models": ["m2"]}, "allowed_models"),
                                 ({"team": red, "requests_per_minute": 101}, "requests_per_minute")):
            response = client.post("/api/keys/", {"name": "x", **data}, content_type="application/json")
            self.assertEqual(response.status_code, 400, response.content)
            self.assertIn(field_name, response.json())
        response = client.patch(f"/api/keys/{self.cast.red_key.pk}/", {"requests_per_minute": 500},
                                content_type="application/json")
        self.assertEqual(response.status_code, 400)
        self.cast.red_key.refresh_from_db()
        self.assertIsNone(self.cast.red_key.requests_per_minute)

    def test_the_matrix_covers_every_route(self):
        covered = {route.name for route in [*CONSOLE, *API, *ADMIN_EXTRA, *admin_model_routes()]}
        names = set(walk(get_resolver(), ""))
        console = {name.split(":", 1)[1] for name in names if name.startswith("console:")}
        api_names = {name for name in names if name.startswith("apikey-") or name == "schema"}
        admin_keys = {name.split(":", 1)[1] for name in names
                      if name.startswith("admin:keys_")}
        self.assertEqual(console - covered, set())
        self.assertEqual(api_names - covered, set())
        self.assertEqual(admin_keys - covered, set())


def walk(resolver: URLResolver, namespace: str):
    """Every URL name, with its namespace ("console:key", "admin:keys_apikey_change")."""
    for pattern in resolver.url_patterns:
        if isinstance(pattern, URLResolver):
            inner = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
            yield from walk(pattern, inner)
        elif isinstance(pattern, URLPattern) and pattern.name:
            yield namespace + pattern.name


class ChangeImpliesViewTests(TestCase):
    """As in the admin, staff with a change permission read what they may change."""

    def test_change_only_staff_see_every_key_and_team(self):
        cast = Cast()
        user = User.objects.create_user("changer", is_staff=True)
        user.user_permissions.set(Permission.objects.filter(
            content_type__app_label="keys", codename__in=["change_apikey", "change_team"]))
        client = Client()
        client.force_login(user)
        keys = client.get(reverse("admin:keys_apikey_changelist"))
        self.assertEqual(admin_rows(cast, keys), EVERY_KEY)
        teams = client.get(reverse("admin:keys_team_changelist"))
        self.assertEqual(admin_rows(cast, teams), EVERY_TEAM)
        self.assertEqual(client.get(reverse("console:team", args=[cast.blue.pk])).status_code, 200)
