"""Who may do what, as a matrix: every console route, every staff API endpoint (keys, upstreams,
upstream models) and every admin page (index, login, logout, password change, the pages of each
registered model: keys, teams, usage, prices, upstreams, stored responses, users, groups, login
attempts, TOTP devices, ...) × anonymous, viewer, member and
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

from axes.models import AccessAttempt, AccessFailureLog, AccessLog
from django.contrib import admin
from django.contrib.auth.models import Group, Permission, User
from django.contrib.contenttypes.models import ContentType
from django.db import transaction
from django.test import Client, TestCase
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone
from django_otp.plugins.otp_totp.models import TOTPDevice

from keys import audit
from keys.models import APIKey, Membership, Price, Team, UsageDaily, UsageRecord
from openai_api.models import StoredResponse
from upstreams.models import Upstream, UpstreamModel

# Staff "view-only" holds the view permissions of these apps' models.
VIEW_ONLY_APPS = ("keys", "upstreams")
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
    """Teams red and blue, a key in each and one without a team, a usage row, a price, a stored
    response, an upstream and its model, a group, login-attempt rows, a TOTP device, and one user
    per principal. Every model with an admin needs a row here, so that its change, history and
    delete pages are in the matrix."""

    def __init__(self) -> None:
        self.red = Team.objects.create(name="red", allowed_models=["m1"], requests_per_minute=100)
        self.blue = Team.objects.create(name="blue")
        self.red_key, _ = APIKey.objects.create_key("red-app", team=self.red)
        self.blue_key, _ = APIKey.objects.create_key("blue-app", team=self.blue)
        self.loose_key, _ = APIKey.objects.create_key("no-team-app")
        UsageRecord.objects.create(key=self.red_key, model="m1", endpoint="/v1/chat/completions",
                                   request_id="req-1", status=200, currency="")
        StoredResponse.objects.create(key=self.red_key, response_id="resp_1", model="m1", status="completed",
                                      body='{"id": "resp_1", "object": "response", "output": []}')
        Price.objects.create(model="m1", input_per_million=Decimal("1"), output_per_million=Decimal("2"))
        UsageDaily.objects.create(key=self.red_key, model="m1", day=timezone.now().date(), requests=1,
                                  currency="USD", cost=Decimal("0.5"))
        self.users: dict[str, User | None] = {"anonymous": None}
        for role in NON_STAFF:
            self.users[role] = User.objects.create_user(role)
            Membership.objects.create(team=self.red, user=self.users[role], role=role)
        self.users["staff"] = User.objects.create_user("staff", is_staff=True)
        self.users["staff_view"] = User.objects.create_user("staff_view", is_staff=True)
        self.users["staff_view"].user_permissions.set(Permission.objects.filter(
            content_type__app_label__in=VIEW_ONLY_APPS, codename__startswith="view_"))
        self.users["superuser"] = User.objects.create_superuser("root", "root@example.com", None)
        # A key the member created (the audit trail says who created a key).
        with audit.context(actor=self.users["member"], origin="console"):
            self.member_key, _ = APIKey.objects.create_key("member-app", team=self.red)
        # Nothing listens on port 9: a probe or a discovery fails at once.
        self.upstream = Upstream.objects.create(name="up", base_url="http://127.0.0.1:9/v1")
        self.upstream_model = UpstreamModel.objects.create(upstream=self.upstream, public_name="m1",
                                                           upstream_name="m1")
        Group.objects.create(name="operators")
        seen = {"user_agent": "test", "ip_address": "127.0.0.1", "username": "viewer", "http_accept": "*/*",
                "path_info": "/admin/login/"}
        AccessAttempt.objects.create(**seen, get_data="", post_data="", failures_since_start=1)
        AccessLog.objects.create(**seen)
        AccessFailureLog.objects.create(**seen)
        self.device = TOTPDevice.objects.create(user=self.users["superuser"], name="phone")

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


def registry(prefix: str, obj: str | None = None, suffix: str = "") -> Callable[[Cast], str]:
    return lambda cast: f"/api/{prefix}/" + (f"{getattr(cast, obj).pk}/" if obj else "") + suffix


# The upstream registry's API: the same staff gate, then the upstreams app's model permissions.
UPSTREAM_API = [
    Route("upstream-list", "get", registry("upstreams"), {**API_DENIED, "staff_view": 200, "superuser": 200}),
    Route("upstream-list", "post", registry("upstreams"), {**API_DENIED, "staff_view": 403, "superuser": 201},
          data=lambda cast: {"name": "made", "base_url": "http://127.0.0.1:9/v1"}),
    Route("upstream-detail", "get", registry("upstreams", "upstream"),
          {**API_DENIED, "staff_view": 200, "superuser": 200}),
    Route("upstream-detail", "patch", registry("upstreams", "upstream"),
          {**API_DENIED, "staff_view": 403, "superuser": 200}, data=lambda cast: {"weight": 2}),
    Route("upstream-detail", "put", registry("upstreams", "upstream"),
          {**API_DENIED, "staff_view": 403, "superuser": 200},
          data=lambda cast: {"name": "up", "base_url": "http://127.0.0.1:9/v2"}),
    Route("upstream-detail", "delete", registry("upstreams", "upstream"),
          {**API_DENIED, "staff_view": 403, "superuser": 204}),
    # "test" reads (it probes, and changes nothing); "discover" records models, so it changes.
    Route("upstream-test", "post", registry("upstreams", "upstream", "test/"),
          {**API_DENIED, "staff_view": 200, "superuser": 200}),
    Route("upstream-discover", "post", registry("upstreams", "upstream", "discover/"),
          {**API_DENIED, "staff_view": 403, "superuser": 502}),  # nothing listens: the upstream's failure
    Route("upstreammodel-list", "get", registry("upstream-models"),
          {**API_DENIED, "staff_view": 200, "superuser": 200}),
    Route("upstreammodel-list", "post", registry("upstream-models"),
          {**API_DENIED, "staff_view": 403, "superuser": 201},
          data=lambda cast: {"upstream": "up", "public_name": "m2", "upstream_name": "m2"}),
    Route("upstreammodel-detail", "get", registry("upstream-models", "upstream_model"),
          {**API_DENIED, "staff_view": 200, "superuser": 200}),
    Route("upstreammodel-detail", "patch", registry("upstream-models", "upstream_model"),
          {**API_DENIED, "staff_view": 403, "superuser": 200}, data=lambda cast: {"enabled": False}),
    Route("upstreammodel-detail", "put", registry("upstream-models", "upstream_model"),
          {**API_DENIED, "staff_view": 403, "superuser": 200},
          data=lambda cast: {"upstream": "up", "public_name": "m1", "upstream_name": "m1-renamed"}),
    Route("upstreammodel-detail", "delete", registry("upstream-models", "upstream_model"),
          {**API_DENIED, "staff_view": 403, "superuser": 204}),
]

# The admin: staff only (others are sent to its login page), then model permissions.
ADMIN_DENIED = dict.fromkeys(("anonymous", *NON_STAFF), 302)
STAFF_ONLY = {**ADMIN_DENIED, "staff": 403, "staff_view": 403}  # the superuser alone


def app_list(app: str) -> Route:
    """An app's index: 404 to staff who may see none of its models."""
    viewer = 200 if app in VIEW_ONLY_APPS else 404
    return Route("app_list", "get", lambda cast: reverse("admin:app_list", args=[app]),
                 {**ADMIN_DENIED, "staff": 404, "staff_view": viewer}, default=200)


ADMIN_EXTRA = [
    Route("index", "get", lambda cast: reverse("admin:index"), {**ADMIN_DENIED}, default=200),
    # Signed-in staff go on to the index; the others see the form (with "not authorised").
    Route("login", "get", lambda cast: reverse("admin:login"), {"staff": 302, "staff_view": 302, "superuser": 302},
          default=200),
    Route("logout", "post", lambda cast: reverse("admin:logout"), {**ADMIN_DENIED}, default=200),
    Route("password_change", "get", lambda cast: reverse("admin:password_change"), {**ADMIN_DENIED}, default=200),
    Route("password_change_done", "get", lambda cast: reverse("admin:password_change_done"), {**ADMIN_DENIED},
          default=200),
    # Without a source field the autocomplete refuses everybody who gets that far.
    Route("autocomplete", "get", lambda cast: reverse("admin:autocomplete"), {**ADMIN_DENIED}, default=403),
    Route("jsi18n", "get", lambda cast: reverse("admin:jsi18n"), {**ADMIN_DENIED}, default=200),
    # A team has no page on the site: 404 to whoever gets past the admin's gate.
    Route("view_on_site", "get", lambda cast: reverse("admin:view_on_site", args=[
        ContentType.objects.get_for_model(Team).pk, cast.red.pk]), {**ADMIN_DENIED}, default=404),
    # Unnamed: an unknown admin address is a 404, once past the admin's gate.
    Route("(catch-all)", "get", lambda cast: "/admin/nowhere/", {**ADMIN_DENIED}, default=404),
    *(app_list(app) for app in ("keys", "upstreams", "openai_api", "auth", "axes", "otp_totp")),
    Route("auth_user_password_change", "get",
          lambda cast: reverse("admin:auth_user_password_change", args=[cast.users["viewer"].pk]),
          STAFF_ONLY, default=200),
    # A device's secret is never shown in the admin (OTP_ADMIN_HIDE_SENSITIVE_DATA), not even to the superuser.
    Route("otp_totp_totpdevice_config", "get",
          lambda cast: reverse("admin:otp_totp_totpdevice_config", args=[cast.device.pk]), STAFF_ONLY, default=403),
    Route("otp_totp_totpdevice_qrcode", "get",
          lambda cast: reverse("admin:otp_totp_totpdevice_qrcode", args=[cast.device.pk]), STAFF_ONLY, default=403),
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
    """Each admin page of each registered model: its list, add and change pages (view only
    without the change permission). The add page is refused to everybody for models that are
    written by the gateway only (usage rows, roll-ups, audit entries, login attempts). Staff
    "view-only" read the models of VIEW_ONLY_APPS and nothing else."""
    routes = []
    for model, model_admin in admin.site._registry.items():
        app = model._meta.app_label
        name = f"{app}_{model._meta.model_name}"
        viewer = 200 if app in VIEW_ONLY_APPS else 403
        addable = model_admin.has_add_permission.__func__ is admin.ModelAdmin.has_add_permission
        first = model._default_manager.order_by("pk").first
        list_rows = {}
        if model is APIKey:
            list_rows = dict.fromkeys(GLOBAL_READERS, EVERY_KEY)
        elif model is Team:
            list_rows = dict.fromkeys(GLOBAL_READERS, EVERY_TEAM)
        routes += [
            # Unnamed: an object's old address goes on to its change page.
            Route(f"{name}_(object)", "get", lambda cast, m=model: f"/admin/{m._meta.app_label}/"
                  f"{m._meta.model_name}/1/", {}, default=302),
            Route(f"{name}_changelist", "get", lambda cast, n=name: reverse(f"admin:{n}_changelist"),
                  {**ADMIN_DENIED, "staff": 403, "staff_view": viewer}, default=200, rows=list_rows,
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
                Route(f"{name}_change", "get", page("change"), {**ADMIN_DENIED, "staff": 403, "staff_view": viewer},
                      default=200),
                # Keys' and teams' History opens their audit trail, which checks its own permission.
                Route(f"{name}_history", "get", page("history"),
                      {**ADMIN_DENIED, "staff": 302 if trail else 403,
                       "staff_view": (302 if trail else 200) if viewer == 200 else 403},
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

    def test_upstream_registry_api(self):
        self.run_matrix(UPSTREAM_API, content_type="application/json")

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
        """Every route, named or not, is in the matrix or in NOT_IN_THE_MATRIX (an unnamed route
        outside it fails here: it cannot be matched to a cell)."""
        covered = {*(f"console:{route.name}" for route in CONSOLE), *(route.name for route in [*API, *UPSTREAM_API]),
                   *(f"admin:{route.name}" for route in [*ADMIN_EXTRA, *admin_model_routes()])}
        routes = [(name or unnamed(path), path) for name, path in walk(get_resolver(), "", "")]
        left_out = {(name, path) for name, path in routes if path.lstrip("^").startswith(NOT_IN_THE_MATRIX)}
        self.assertEqual({(name, path) for name, path in routes if name not in covered} - left_out, set())
        # The exclusions are what they say: the API-key face and single sign-on, nothing of the matrix's.
        self.assertTrue(left_out)
        self.assertEqual({name for name, _ in left_out} & covered, set())


# The routes the matrix leaves out, by path prefix, and why:
NOT_IN_THE_MATRIX = (
    # The OpenAI API face (/v1/..., /api/v1/..., /health..., /metrics, /v1/openapi.json)
    # authenticates by API key, not by session and permissions: its own tests cover it.
    "v1/", "api/v1/", "health", "metrics",
    # Single sign-on (OIDC) is off unless configured; its routes only run the login flow.
    "oidc/",
)


def unnamed(path: str) -> str | None:
    """The matrix's name for an unnamed admin route: its catch-all, an object's old address."""
    if path == "admin/(?P<url>.*)$":
        return "admin:(catch-all)"
    match = re.fullmatch(r"admin/(\w+)/(\w+)/<path:object_id>/", path)
    return f"admin:{match[1]}_{match[2]}_(object)" if match else None


def walk(resolver: URLResolver, namespace: str, prefix: str):
    """Every route as (name with its namespace, path pattern): ("console:key", "console/keys/<int:pk>/");
    the name is None for an unnamed route."""
    for pattern in resolver.url_patterns:
        if isinstance(pattern, URLResolver):
            inner = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
            yield from walk(pattern, inner, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield (namespace + pattern.name if pattern.name else None), prefix + str(pattern.pattern)


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
