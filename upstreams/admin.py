"""Admin for the upstream registry: upstreams with their health, their models inline, "test now".

An upstream's API key is write-only: the form has an empty password field (left empty, the
stored key stays; "clear" removes it) and every page shows only its last four characters. Every
save and delete goes through `save_by`/`delete_by` (the audit hook, upstreams/signals.py).
"""
from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.utils.html import format_html

from upstreams import discovery
from upstreams.models import CAPABILITIES, MAX_API_KEY_CHARS, Upstream, UpstreamModel
from upstreams.registry import readable_key
from upstreams.status import status_of, test_now


class CapabilitiesField(forms.CharField):
    """A list of capabilities, edited as comma-separated text."""

    def prepare_value(self, value):
        return ", ".join(value) if isinstance(value, (list, tuple)) else value

    def to_python(self, value) -> list[str]:
        names = (name.strip() for name in (super().to_python(value) or "").split(","))
        return sorted({name for name in names if name})


class UpstreamModelForm(forms.ModelForm):
    capabilities = CapabilitiesField(required=False, widget=forms.TextInput(attrs={"size": 30}),
                                     help_text=f"Comma-separated: {', '.join(CAPABILITIES)}.")

    class Meta:
        model = UpstreamModel
        fields = ["public_name", "upstream_name", "capabilities", "capabilities_by_hand", "context_length", "enabled"]

    def clean(self):
        data = super().clean()
        if "capabilities" in self.changed_data:
            data["capabilities_by_hand"] = True  # a hand edit that discovery will not overwrite
        return data


class UpstreamModelInline(admin.TabularInline):
    model = UpstreamModel
    form = UpstreamModelForm
    extra = 0
    readonly_fields = ["discovered"]
    fields = ["public_name", "upstream_name", "capabilities", "capabilities_by_hand", "context_length", "enabled",
              "discovered"]


class UpstreamForm(forms.ModelForm):
    api_key = forms.CharField(
        label="API key", required=False, max_length=MAX_API_KEY_CHARS, strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password", "size": 60}),
        help_text="Stored encrypted and never shown again (only its last 4 characters). Leave empty to keep the "
                  "current key.",
    )
    clear_api_key = forms.BooleanField(label="Remove the API key", required=False)

    class Meta:
        model = Upstream
        fields = ["name", "kind", "base_url", "api_key", "clear_api_key", "enabled", "priority", "weight",
                  "connect_timeout", "first_byte_timeout", "idle_timeout", "max_concurrency", "extra_headers",
                  "discover_models"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.has_api_key:
            self.fields["api_key"].help_text = (
                f"Current key: {self.instance.api_key_hint}. " + self.fields["api_key"].help_text)

    def _post_clean(self):
        # The key is set before the model's own validation, which refuses a key on a FastChat upstream.
        key = self.cleaned_data.get("api_key")
        try:
            if self.cleaned_data.get("clear_api_key"):
                self.instance.set_api_key(None)
            elif key:
                self.instance.set_api_key(key)
        except forms.ValidationError as exc:
            self.add_error("api_key", exc.messages)
        super()._post_clean()


@admin.register(Upstream)
class UpstreamAdmin(admin.ModelAdmin):
    form = UpstreamForm
    inlines = [UpstreamModelInline]
    list_display = ["name", "kind", "base_url", "enabled", "priority", "weight", "key", "health", "latency",
                    "last_error", "checked_at"]
    list_filter = ["kind", "enabled"]
    search_fields = ["name", "base_url"]
    actions = ["test_now", "discover_now", "enable", "disable"]
    readonly_fields = ["created_at", "updated_at"]

    def get_fieldsets(self, request, obj=None):
        return [
            (None, {"fields": ["name", "kind", "base_url", "api_key", "clear_api_key", "enabled"]}),
            ("Routing", {"fields": ["priority", "weight", "max_concurrency"]}),
            ("Timeouts (seconds)", {"fields": ["connect_timeout", "first_byte_timeout", "idle_timeout"]}),
            ("Requests and models", {"fields": ["extra_headers", "discover_models"]}),
            ("History", {"fields": ["created_at", "updated_at"]}),
        ]

    # The list's columns: health from upstreams/health.py, read once per row and page.

    def _status(self, upstream: Upstream):
        cache = getattr(self, "_status_cache", None)
        if cache is None or cache[0] is not upstream:
            self._status_cache = (upstream, status_of(upstream.name, enabled=upstream.enabled,
                                                      api_key=readable_key(upstream)))
        return self._status_cache[1]

    @admin.display(description="API key")
    def key(self, upstream: Upstream) -> str:
        return upstream.api_key_hint or "-"

    @admin.display(description="state")
    def health(self, upstream: Upstream) -> str:
        status = self._status(upstream)
        return format_html('<span class="upstream-state upstream-state-{}" data-state="{}">{}</span>',
                           status.state, status.state, status.label)

    @admin.display(description="latency")
    def latency(self, upstream: Upstream) -> str:
        latency = self._status(upstream).latency_ms
        return f"{latency:.0f} ms" if latency is not None else "-"

    @admin.display(description="last error")
    def last_error(self, upstream: Upstream) -> str:
        return self._status(upstream).last_error or "-"

    @admin.display(description="checked")
    def checked_at(self, upstream: Upstream):
        return self._status(upstream).checked_at or "-"

    # Saving and deleting through the models' methods (the audit hook).

    def save_model(self, request, obj: Upstream, form, change: bool) -> None:
        obj.save_by(request.user, "admin")

    def delete_model(self, request, obj: Upstream) -> None:
        obj.delete_by(request.user, "admin")

    def delete_queryset(self, request, queryset) -> None:
        for upstream in queryset:
            upstream.delete_by(request.user, "admin")

    def save_formset(self, request, form, formset, change: bool) -> None:
        instances = formset.save(commit=False)
        for obj in formset.deleted_objects:
            obj.delete_by(request.user, "admin")
        for obj in instances:
            obj.save_by(request.user, "admin")
        formset.save_m2m()

    # Actions.

    @admin.action(description="Test the selected upstreams now", permissions=["view"])
    def test_now(self, request, queryset) -> None:
        for upstream in queryset[:20]:
            try:
                result = test_now(upstream)
            except Exception as exc:  # an adapter that cannot even be built
                self.message_user(request, f"{upstream.name}: cannot be tested ({type(exc).__name__})", messages.ERROR)
                continue
            latency = f" in {result.latency_ms:.0f} ms" if result.latency_ms is not None else ""
            if result.ok:
                self.message_user(request, f"{upstream.name}: ok{latency}", messages.SUCCESS)
            else:
                self.message_user(request, f"{upstream.name}: {result.failure or 'failed'}{latency}: {result.message}",
                                  messages.ERROR)

    @admin.action(description="Discover the selected upstreams' models", permissions=["change"])
    def discover_now(self, request, queryset) -> None:
        for upstream in queryset[:20]:
            try:
                lines = discovery.discover(upstream, actor=request.user)
            except Exception as exc:
                self.message_user(request, f"{upstream.name}: cannot list its models ({type(exc).__name__})",
                                  messages.ERROR)
                continue
            self.message_user(request, "; ".join(lines) if lines else f"{upstream.name}: no changes", messages.INFO)

    @admin.action(description="Enable the selected upstreams", permissions=["change"])
    def enable(self, request, queryset) -> None:
        self._switch(request, queryset, True)

    @admin.action(description="Disable the selected upstreams", permissions=["change"])
    def disable(self, request, queryset) -> None:
        self._switch(request, queryset, False)

    def _switch(self, request, queryset, enabled: bool) -> None:
        count = 0
        for upstream in queryset.exclude(enabled=enabled):
            upstream.enabled = enabled
            upstream.save_by(request.user, "admin")
            count += 1
        self.message_user(request, f"{'Enabled' if enabled else 'Disabled'} {count} upstream(s); every process "
                                   "follows within a second.", messages.SUCCESS)
