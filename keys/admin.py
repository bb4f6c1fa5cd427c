"""Admin for API keys and their usage.

A key's plaintext exists only in the response to the POST that creates or rotates it: it is
rendered straight into that page, never passed through messages, the session, logs or the
database (which holds only the digest). `hashed_key` stays out of every form, list and lookup.
"""
from __future__ import annotations

import csv
from datetime import timedelta
from itertools import islice

from asgiref.sync import sync_to_async
from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import StreamingHttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from keys import dashboard, permissions
from keys.admin_audit import AuditHistoryMixin  # also registers the audit trail's admin
from keys.admin_site import ReadOnlyAdmin
from keys.models import APIKey, UsageDaily, UsageRecord
from keys.spreadsheet import safe_row
from keys.team_admin import CurrencyField
from keys.usage_totals import per_key


class Plaintext:
    """A new key's plaintext on its way into the one page that shows it. Only str() gives it:
    repr() hides it, since Django's template engine logs the whole context at DEBUG (with
    reprs) whenever a variable is missing, and an error report would print it too."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def __str__(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<plaintext, not shown>"


class ModelListField(forms.CharField):
    """A JSON list of model names, edited as comma-separated text."""

    def prepare_value(self, value):
        return ", ".join(value) if isinstance(value, (list, tuple)) else value

    def to_python(self, value) -> list[str]:
        names = (name.strip() for name in super().to_python(value).split(","))
        return list(dict.fromkeys(name for name in names if name))


class APIKeyForm(forms.ModelForm):
    allowed_models = ModelListField(
        required=False, widget=forms.TextInput(attrs={"size": 60, "placeholder": "every model"}),
        help_text="Comma-separated model names; empty means every model.",
    )
    budget_currency = CurrencyField()

    class Meta:
        model = APIKey
        fields = "__all__"

    def clean(self) -> dict:
        data = super().clean()
        team = data.get("team") if "team" in self.fields else self.instance.team
        for field, message in (permissions.beyond_team(team, data).items() if team else ()):
            self.add_error(field, message)
        return data


class KeyStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("active", "Active"), ("revoked", "Revoked"), ("expired", "Expired")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True).exclude(expires_at__lte=now)
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "expired":
            return queryset.filter(expires_at__lte=now)
        return queryset


@admin.register(APIKey)
class APIKeyAdmin(AuditHistoryMixin, admin.ModelAdmin):
    form = APIKeyForm
    list_display = ["prefix", "name", "owner", "team", "models", "limits", "created_at", "expires_at",
                    "revoked_at", "last_used_at", "requests_30d"]
    list_display_links = ["prefix", "name"]
    list_filter = [KeyStateFilter, "team", "created_at", "last_used_at"]
    list_select_related = ["team"]
    search_fields = ["name", "owner", "^prefix"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at", "updated_at"]
    actions = ["revoke", "rotate"]
    change_form_template = "admin/keys/apikey/change_form.html"
    add_fieldsets = [
        (None, {"fields": ["name", "owner", "user", "team"]}),
        ("Access", {"fields": ["allowed_models", "expires_at"]}),
        ("Limits", {"fields": ["requests_per_minute", "tokens_per_minute", "parallel_requests",
                               "token_budget", "money_budget", "budget_currency", "budget_period"]}),
    ]
    fieldsets = [*add_fieldsets, ("State", {"fields": readonly_fields})]

    def get_fieldsets(self, request, obj=None):
        return self.fieldsets if obj else self.add_fieldsets

    def get_readonly_fields(self, request, obj=None):
        # A key acts with its user's permissions (/api/keys/): binding one is for superusers.
        readonly = list(super().get_readonly_fields(request, obj))
        return readonly if request.user.is_superuser else [*readonly, "user"]

    def get_queryset(self, request):
        since = timezone.now().date() - timedelta(days=29)
        # Team scoping is keys/permissions.py's (staff with view_apikey see every key).
        keys = permissions.visible_keys(request.user, super().get_queryset(request))
        return keys.annotate(requests_30d=per_key("requests", since))

    def has_delete_permission(self, request, obj=None) -> bool:
        """Keys are revoked, not deleted: deleting one would delete its usage history (and
        the confirmation page would list every usage row)."""
        return False

    def lookup_allowed(self, lookup: str, value: str, request=None) -> bool:
        if lookup.startswith("hashed_key"):
            return False
        return super().lookup_allowed(lookup, value, request)

    @admin.display(description="models")
    def models(self, key: APIKey) -> str:
        return ", ".join(key.allowed_models) if key.allowed_models else "all"

    @admin.display(description="limits")
    def limits(self, key: APIKey) -> str:
        parts = [
            f"{key.requests_per_minute:,} req/min" if key.requests_per_minute is not None else "",
            f"{key.tokens_per_minute:,} tok/min" if key.tokens_per_minute is not None else "",
            f"{key.parallel_requests} parallel" if key.parallel_requests is not None else "",
            f"{key.token_budget:,} tok/{key.budget_period}" if key.token_budget is not None else "",
            f"{key.money_budget} {key.budget_currency}/{key.budget_period}" if key.money_budget is not None else "",
        ]
        return " · ".join(part for part in parts if part) or "none"

    @admin.display(description="requests (30 d)", ordering="requests_30d")
    def requests_30d(self, key: APIKey):
        url = reverse("admin:keys_usagerecord_changelist") + f"?key__id__exact={key.pk}"
        return format_html('<a href="{}">{}</a>', url, f"{key.requests_30d or 0:,}")

    # Create: the plaintext goes into the response, and nowhere else.

    def add_view(self, request, form_url="", extra_context=None):
        extra = {"show_save_and_add_another": False, "show_save_and_continue": False, **(extra_context or {})}
        return super().add_view(request, form_url, extra)

    def save_model(self, request, obj: APIKey, form, change: bool) -> None:
        if not change:
            obj.new_plaintext = Plaintext(obj.assign_new_secret())
        super().save_model(request, obj, form, change)

    def response_add(self, request, obj: APIKey, post_url_continue=None):
        return self.plaintext_response(request, [(obj, obj.new_plaintext)], "API key created")

    def plaintext_response(self, request, keys: list[tuple[APIKey, Plaintext]], title: str) -> TemplateResponse:
        context = {**self.admin_site.each_context(request), "opts": self.opts, "title": title, "keys": keys}
        return TemplateResponse(request, "admin/keys/apikey/plaintext.html", context)

    # Revoke and rotate.

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke(self, request, queryset) -> None:
        count = 0
        for key in queryset.filter(revoked_at__isnull=True):
            if key.revoke():
                self.log_change(request, key, "Revoked.")
                count += 1
        self.message_user(request, f"Revoked {count} key(s). They are refused within a second.", messages.SUCCESS)

    @admin.action(description="Rotate selected keys (new secret, same settings)", permissions=["change"])
    def rotate(self, request, queryset):
        keys = list(queryset.filter(revoked_at__isnull=True))
        if not keys:
            self.message_user(request, "Revoked keys cannot be rotated.", messages.WARNING)
            return None
        if request.POST.get("confirm") != "yes":
            return self.rotate_confirmation(request, keys, from_action=True)
        return self.rotate_keys(request, keys)

    def rotate_view(self, request, object_id: str):
        if not self.has_change_permission(request):  # before the look-up, as Django's change view
            raise PermissionDenied
        key = self.get_object(request, unquote(object_id))
        if key is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_change_permission(request, key):
            raise PermissionDenied
        if key.is_revoked:
            self.message_user(request, "Revoked keys cannot be rotated.", messages.WARNING)
            return self.response_post_save_change(request, key)
        if request.method == "POST" and request.POST.get("confirm") == "yes":
            return self.rotate_keys(request, [key])
        return self.rotate_confirmation(request, [key], from_action=False)

    def rotate_confirmation(self, request, keys: list[APIKey], from_action: bool) -> TemplateResponse:
        context = {**self.admin_site.each_context(request), "opts": self.opts, "title": "Rotate API keys?",
                   "keys": keys, "from_action": from_action}
        return TemplateResponse(request, "admin/keys/apikey/rotate_confirmation.html", context)

    def rotate_keys(self, request, keys: list[APIKey]) -> TemplateResponse:
        rotated = []
        for key in keys:
            plaintext = Plaintext(key.rotate())
            self.log_change(request, key, "Rotated the secret.")
            rotated.append((key, plaintext))
        return self.plaintext_response(request, rotated, "API keys rotated" if len(keys) > 1 else "API key rotated")

    def get_urls(self):
        rotate = self.admin_site.admin_view(self.rotate_view)
        return [path("<path:object_id>/rotate/", rotate, name="keys_apikey_rotate"), *super().get_urls()]


class ModelFilter(admin.SimpleListFilter):
    """Models from the daily roll-ups: a DISTINCT over millions of usage rows would be slow."""

    title = "model"
    parameter_name = "model"

    def lookups(self, request, model_admin):
        names = UsageDaily.objects.order_by("model").values_list("model", flat=True).distinct()
        return [(name, name or "(none)") for name in names]

    def queryset(self, request, queryset):
        return queryset if self.value() is None else queryset.filter(model=self.value())


class StatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status_class"
    CLASSES = {
        "ok": ("Succeeded (< 400)", {"status__lt": 400}),
        "4xx": ("Client errors (4xx)", {"status__gte": 400, "status__lt": 500}),
        "401": ("Refused key (401)", {"status": 401}),
        "429": ("Rate-limited (429)", {"status": 429}),
        "5xx": ("Upstream errors (5xx)", {"status__gte": 500}),
    }

    def lookups(self, request, model_admin):
        return [(value, label) for value, (label, _) in self.CLASSES.items()]

    def queryset(self, request, queryset):
        if self.value() in self.CLASSES:
            return queryset.filter(**self.CLASSES[self.value()][1])
        return queryset


CSV_FIELDS = ["created_at", "key_id", "key__name", "key__prefix", "key__team__name", "model", "upstream", "route",
              "endpoint", "request_id", "status", "error_code", "prompt_tokens", "completion_tokens", "cost",
              "currency", "latency_ms", "ttft_ms", "streamed"]
COST_COLUMN = CSV_FIELDS.index("cost")
CSV_CHUNK_ROWS = 2000


class Echo:
    """A file-like object for csv.writer that hands each line back instead of storing it."""

    def write(self, value: str) -> str:
        return value


def unpriced_shown(row: tuple) -> tuple:
    """A row without a price says "unpriced" in its cost column: never 0, never empty."""
    if row[COST_COLUMN] is None:
        return (*row[:COST_COLUMN], "unpriced", *row[COST_COLUMN + 1:])
    return row


def csv_response(queryset, filename: str) -> StreamingHttpResponse:
    """Stream usage rows as CSV, a chunk of rows per database round trip, never all in memory.
    Text that a spreadsheet would run as a formula is neutralised (keys/spreadsheet.py).

    Async, so that ASGI servers stream it (Django reads a sync iterator to the end first). The
    rows come from one lazy database iterator, advanced a chunk at a time on Django's sync thread.
    """
    writer = csv.writer(Echo())

    def open_rows():
        return queryset.values_list(*CSV_FIELDS).iterator(chunk_size=CSV_CHUNK_ROWS)

    def next_chunk(rows) -> list[tuple]:
        return list(islice(rows, CSV_CHUNK_ROWS))

    async def lines():
        yield writer.writerow(CSV_FIELDS)
        rows = await sync_to_async(open_rows)()
        try:
            while chunk := await sync_to_async(next_chunk)(rows):
                yield "".join(writer.writerow(safe_row(unpriced_shown(row))) for row in chunk)
        finally:
            await sync_to_async(rows.close)()  # the database cursor, also when the client leaves

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    """Read-only: usage rows are written by the API path only."""

    list_display = ["created_at", "key", "model", "upstream", "endpoint", "outcome", "tokens", "spend", "latency",
                    "ttft", "streamed", "request_id"]
    list_filter = ["key", ModelFilter, StatusFilter, "streamed", "created_at"]
    list_select_related = ["key"]
    date_hierarchy = "created_at"
    show_full_result_count = False
    search_fields = ["=request_id"]
    ordering = ["-created_at"]
    list_per_page = 100
    actions = ["export_selected"]
    change_list_template = "admin/keys/usagerecord/change_list.html"

    @admin.display(description="status", ordering="status")
    def outcome(self, row: UsageRecord) -> str:
        return f"{row.status} {row.error_code}".strip()

    @admin.display(description="tokens in + out", ordering="prompt_tokens")
    def tokens(self, row: UsageRecord) -> str:
        return f"{row.prompt_tokens:,} + {row.completion_tokens:,}"

    @admin.display(description="cost", ordering="cost")
    def spend(self, row: UsageRecord) -> str:
        return f"{row.cost.normalize():f} {row.currency}" if row.cost is not None else "unpriced"

    @admin.display(description="latency", ordering="latency_ms")
    def latency(self, row: UsageRecord) -> str:
        return f"{row.latency_ms:,} ms"

    @admin.display(description="TTFT", ordering="ttft_ms")
    def ttft(self, row: UsageRecord) -> str:
        return f"{row.ttft_ms:,} ms" if row.ttft_ms is not None else "-"

    @admin.action(description="Export selected rows as CSV", permissions=["view"])
    def export_selected(self, request, queryset):
        return csv_response(queryset.order_by("-created_at"), "usage-selected.csv")

    def export_view(self, request):
        """The current changelist (filters, search, date drill-down) as CSV."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        queryset = self.get_changelist_instance(request).get_queryset(request)
        return csv_response(queryset, f"usage-{timezone.now():%Y%m%d-%H%M%S}.csv")

    def dashboard_view(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied
        days = request.GET.get("days", "")
        days = int(days) if days in {str(period) for period in dashboard.PERIODS} else dashboard.DEFAULT_DAYS
        context = {**self.admin_site.each_context(request), "opts": self.opts, "title": "Usage dashboard",
                   **dashboard.dashboard_context(days)}
        return TemplateResponse(request, "admin/keys/usagerecord/dashboard.html", context)

    def live_view(self, request):
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {**self.admin_site.each_context(request), "opts": self.opts, "title": "Live requests"}
        return TemplateResponse(request, "admin/keys/usagerecord/live.html", context)

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("dashboard/", wrap(self.dashboard_view), name="keys_usage_dashboard"),
            path("live/", wrap(self.live_view), name="keys_usage_live"),
            path("export/", wrap(self.export_view), name="keys_usage_export"),
            *super().get_urls(),
        ]
