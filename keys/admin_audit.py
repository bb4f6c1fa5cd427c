"""The audit trail in the admin: read-only for everybody, superusers included (no add, change
or delete permission exists, and there are no actions), filtered by actor, object and date,
exported as CSV. `AuditHistoryMixin` makes an admin's "History" button open an object's trail.
"""
from __future__ import annotations

import csv
import json
from itertools import islice

from asgiref.sync import sync_to_async
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpResponseRedirect, StreamingHttpResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode

from keys.admin_site import ReadOnlyAdmin
from keys.audit.models import AuditEntry
from keys.spreadsheet import safe_row

CSV_FIELDS = ["created_at", "origin", "actor_label", "actor_user_id", "actor_key_id", "ip", "request_id", "where",
              "action", "object_type", "object_id", "object_repr", "changes"]
CSV_CHUNK_ROWS = 1000


def trail_url(object_type: str, object_id) -> str:
    return reverse("admin:keys_auditentry_changelist") + "?" + urlencode(
        {"object_type": object_type, "object_id": str(object_id)})


class AuditHistoryMixin:
    """For a ModelAdmin: its "History" button opens the object's audit trail."""

    def history_view(self, request, object_id, extra_context=None):
        return HttpResponseRedirect(trail_url(self.opts.label_lower, object_id))


class Echo:
    def write(self, value: str) -> str:
        return value


def csv_response(queryset, filename: str) -> StreamingHttpResponse:
    """Entries as CSV a chunk at a time; cells a spreadsheet would run as formulas neutralised
    (keys/spreadsheet.py): actors, names and changed values are anybody's text."""
    writer = csv.writer(Echo())

    def open_rows():
        return queryset.values_list(*CSV_FIELDS).iterator(chunk_size=CSV_CHUNK_ROWS)

    def next_chunk(rows) -> list[tuple]:
        return list(islice(rows, CSV_CHUNK_ROWS))

    def cells(row: tuple) -> list:
        *head, changes = row
        return safe_row([*head, json.dumps(changes, cls=DjangoJSONEncoder, ensure_ascii=False)])

    async def lines():
        yield writer.writerow(CSV_FIELDS)
        rows = await sync_to_async(open_rows)()
        try:
            while chunk := await sync_to_async(next_chunk)(rows):
                yield "".join(writer.writerow(cells(row)) for row in chunk)
        finally:
            await sync_to_async(rows.close)()

    response = StreamingHttpResponse(lines(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@admin.register(AuditEntry)
class AuditEntryAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "origin", "actor_label", "action", "object_type", "object_link", "summary", "ip",
                    "request_id"]
    list_filter = [("actor_user", admin.RelatedOnlyFieldListFilter), ("actor_key", admin.RelatedOnlyFieldListFilter),
                   "origin", "action", "object_type", "created_at"]
    date_hierarchy = "created_at"
    search_fields = ["actor_label", "object_repr", "=object_id", "=request_id", "=ip"]
    ordering = ["-created_at", "-id"]
    list_per_page = 100
    show_full_result_count = False
    actions = None
    fields = ["created_at", "origin", "actor_label", "actor_user", "actor_key", "ip", "request_id", "where",
              "action", "object_type", "object_id", "object_repr", "changes_table"]
    readonly_fields = fields
    change_list_template = "admin/keys/auditentry/change_list.html"

    def lookup_allowed(self, lookup: str, value: str, request=None) -> bool:
        # The object filter that each key's and team's History button applies.
        return lookup in ("object_type", "object_id") or super().lookup_allowed(lookup, value, request)

    @admin.display(description="object", ordering="object_repr")
    def object_link(self, entry: AuditEntry):
        return format_html('<a href="{}">{}</a>', trail_url(entry.object_type, entry.object_id), entry.object_repr)

    @admin.display(description="changes")
    def summary(self, entry: AuditEntry) -> str:
        names = sorted(entry.changes)
        return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    @admin.display(description="changes")
    def changes_table(self, entry: AuditEntry):
        rows = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                                ((name, before, after) for name, (before, after) in sorted(entry.changes.items())))
        return format_html("<table><tr><th>field</th><th>before</th><th>after</th></tr>{}</table>", rows)

    def export_view(self, request):
        """The current changelist (filters, search, date drill-down) as CSV."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        queryset = self.get_changelist_instance(request).get_queryset(request)
        return csv_response(queryset, f"audit-{timezone.now():%Y%m%d-%H%M%S}.csv")

    def get_urls(self):
        return [path("export/", self.admin_site.admin_view(self.export_view), name="keys_audit_export"),
                *super().get_urls()]
