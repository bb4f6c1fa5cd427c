"""The stored responses in the admin (the gateway's site, keys/admin_site.py): read-only for
everybody, superusers included (they are written by the API path only, deleted by their key or
the retention); listed newest first, searchable by response id (exact) and by key prefix or name."""
from __future__ import annotations

import orjson
from django.contrib import admin
from django.utils.html import format_html

from keys.admin_site import ReadOnlyAdmin
from openai_api.models import StoredInputItem, StoredResponse

# The most of a stored response the page shows (a body may be megabytes).
SHOWN_CHARS = 100_000
SHOWN_ITEMS = 200


def pretty(text: str) -> str:
    try:
        text = orjson.dumps(orjson.loads(text), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        pass
    if len(text) > SHOWN_CHARS:
        text = f"{text[:SHOWN_CHARS]}\n… ({len(text) - SHOWN_CHARS} more characters)"
    return text


class StatusFilter(admin.SimpleListFilter):
    """OpenAI's statuses, listed as such: no DISTINCT over every stored row to find them."""

    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [(status, status) for status in ("completed", "incomplete", "failed")]

    def queryset(self, request, queryset):
        return queryset.filter(status=self.value()) if self.value() else queryset


@admin.register(StoredResponse)
class StoredResponseAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "response_id", "key", "model", "status", "previous_response_id", "item_count",
                    "size_bytes"]
    list_select_related = ["key"]
    list_filter = [StatusFilter, "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["=response_id", "^key__prefix", "key__name"]
    ordering = ["-created_at", "-id"]
    list_per_page = 100
    show_full_result_count = False
    actions = None
    fields = ["response_id", "key", "created_at", "model", "status", "previous_response_id", "item_count",
              "size_bytes", "shown_input_items", "shown_body"]
    readonly_fields = fields

    def get_queryset(self, request):
        # The list reads no body (a body may be megabytes); one response's page reads its own.
        return super().get_queryset(request).defer("body")

    @admin.display(description="response")
    def shown_body(self, row: StoredResponse):
        return format_html("<pre style='white-space: pre-wrap'>{}</pre>", pretty(row.body))

    @admin.display(description="input items")
    def shown_input_items(self, row: StoredResponse):
        bodies = list(StoredInputItem.objects.filter(response=row).order_by("position")
                      .values_list("body", flat=True)[: SHOWN_ITEMS + 1])
        more = f"\n… and more (the first {SHOWN_ITEMS} are shown)" if len(bodies) > SHOWN_ITEMS else ""
        return format_html("<pre style='white-space: pre-wrap'>{}{}</pre>",
                           pretty("[" + ",".join(bodies[:SHOWN_ITEMS]) + "]"), more)
