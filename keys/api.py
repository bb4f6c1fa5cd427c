"""The key-management REST API for staff (/api/keys/): keys, their limits, revocation, rotation, usage.

A key's plaintext appears in exactly two responses, create and rotate, and nowhere else; its
digest never leaves the server. Every change is a database write that the OpenAI API path
reads within GATEWAY_KEY_CACHE_SECONDS (openai_api/auth.py), on every process.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Q, QuerySet
from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, PermissionDenied
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import IsAdminUser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from keys import permissions
from keys.api_permissions import KeyModelPermissions, check_key_change
from keys.models import APIKey, KeyRevokedError, Team
from keys.usage_totals import rollups, summed

logger = logging.getLogger(__name__)

COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens")


class APIKeySerializer(serializers.ModelSerializer):
    """A key as staff see it: everything but the secret and its digest."""

    allowed_models = serializers.ListField(
        child=serializers.CharField(max_length=200), required=False,
        help_text="Model names this key may use; empty means every model.",
    )
    user = serializers.PrimaryKeyRelatedField(
        queryset=get_user_model().objects.all(), allow_null=True, required=False,
        help_text="If this user is active staff, the key may also call this API.",
    )
    status = serializers.SerializerMethodField()

    class Meta:
        model = APIKey
        fields = [
            "id", "name", "owner", "prefix", "status", "created_at", "updated_at", "expires_at",
            "revoked_at", "last_used_at", "allowed_models", "requests_per_minute", "tokens_per_minute",
            "parallel_requests", "token_budget", "money_budget", "budget_currency", "budget_period", "user", "team",
        ]
        read_only_fields = ["prefix", "created_at", "updated_at", "revoked_at", "last_used_at"]

    def get_status(self, key: APIKey) -> str:
        if key.is_revoked:
            return "revoked"
        return "expired" if key.is_expired() else "active"

    def validate_allowed_models(self, models: list[str]) -> list[str]:
        return list(dict.fromkeys(models))  # CharField has stripped them already

    def validate_budget_currency(self, currency: str) -> str:
        if len(currency) != 3 or not currency.isalpha():
            raise serializers.ValidationError("Three letters (ISO 4217), such as USD or EUR.")
        return currency.upper()


class NewAPIKeySerializer(APIKeySerializer):
    """A key with its plaintext: the create and rotate responses, the only ones that carry it."""

    key = serializers.CharField(read_only=True, help_text="The secret. Shown only in this response.")

    class Meta(APIKeySerializer.Meta):
        fields = ["key", *APIKeySerializer.Meta.fields]


class KeyFilterSerializer(serializers.Serializer):
    revoked = serializers.BooleanField(required=False, allow_null=True, default=None,
                                       help_text="Only revoked (true) or unrevoked (false) keys.")
    search = serializers.CharField(required=False, help_text="Part of a name, owner or prefix.")


class UsageQuerySerializer(serializers.Serializer):
    days = serializers.IntegerField(min_value=1, max_value=366, default=30,
                                    help_text="Days in the window, ending today (UTC).")


class UsageCountsSerializer(serializers.Serializer):
    requests = serializers.IntegerField()
    errors = serializers.IntegerField(help_text="Requests answered with a status of 400 or more.")
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    spend = serializers.DictField(
        child=serializers.DecimalField(max_digits=30, decimal_places=12, coerce_to_string=True),
        help_text="Cost of the priced requests per currency (empty if none was priced: never 0 for unpriced use).")
    unpriced_requests = serializers.IntegerField(help_text="Requests of models that had no price: no cost.")
    unpriced_tokens = serializers.IntegerField()


class DayUsageSerializer(UsageCountsSerializer):
    day = serializers.DateField()


class ModelUsageSerializer(UsageCountsSerializer):
    model = serializers.CharField()


class UpstreamUsageSerializer(UsageCountsSerializer):
    upstream = serializers.CharField(help_text="Blank for requests no upstream served.")


class TeamUsageSerializer(UsageCountsSerializer):
    team = serializers.IntegerField(allow_null=True, help_text="The key's team now; null for keys without one.")
    name = serializers.CharField()


class KeyUsageSerializer(UsageCountsSerializer):
    key = serializers.IntegerField()
    name = serializers.CharField()
    prefix = serializers.CharField()


class UsageReportSerializer(serializers.Serializer):
    since = serializers.DateField()
    until = serializers.DateField()
    days = serializers.IntegerField()
    totals = UsageCountsSerializer()
    by_day = DayUsageSerializer(many=True, help_text="Every day of the window, oldest first.")
    by_model = ModelUsageSerializer(many=True)
    by_upstream = UpstreamUsageSerializer(many=True)


class KeyUsageReportSerializer(UsageReportSerializer):
    key = serializers.IntegerField()


class UsageSummarySerializer(UsageReportSerializer):
    by_key = KeyUsageSerializer(many=True, help_text="Keys with usage in the window, busiest first.")
    by_team = TeamUsageSerializer(many=True, help_text="Teams with usage in the window, busiest first.")


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with the key's state."
    default_code = "conflict"


class KeyPagination(PageNumberPagination):
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000


def usage_rows(since: date, today: date, keys: QuerySet | None = None) -> list[dict]:
    """Usage per (key, model, day) from `since` to today, from the daily roll-ups."""
    return summed(rollups(since=since, until=today, keys=keys), "key_id", "model", "upstream", "currency", "day")


def totals(rows: Iterable[dict]) -> dict:
    """Counts, spend per currency, and unpriced usage apart (rows grouped by currency)."""
    counts = Counter({name: 0 for name in (*COUNTERS, "unpriced_requests", "unpriced_tokens")})
    spend: dict[str, Decimal] = {}
    for row in rows:
        for name in (*COUNTERS, "unpriced_requests", "unpriced_tokens"):
            counts[name] += row[name] or 0
        if row["cost"] is not None:
            spend[row["currency"]] = spend.get(row["currency"], Decimal(0)) + row["cost"]
    return {**counts, "total_tokens": counts["prompt_tokens"] + counts["completion_tokens"], "spend": spend}


def grouped(rows: list[dict], field: str) -> dict[Any, dict[str, int]]:
    groups: dict[Any, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row[field]].append(row)
    return {value: totals(members) for value, members in groups.items()}


def usage_report(days: int, keys: QuerySet | None = None) -> dict:
    """Totals, per day (zero-filled) and per model over the last `days` days including today."""
    today = timezone.now().date()
    since = today - timedelta(days=days - 1)
    rows = usage_rows(since, today, keys)
    per_day = grouped(rows, "day")
    window = [since + timedelta(days=i) for i in range(days)]
    return {
        "since": since, "until": today, "days": days, "totals": totals(rows),
        "by_day": [{"day": day, **per_day.get(day, totals([]))} for day in window],
        "by_model": [{"model": model, **counts} for model, counts in sorted(grouped(rows, "model").items())],
        "by_upstream": [{"upstream": name, **counts} for name, counts in sorted(grouped(rows, "upstream").items())],
        "rows": rows,
    }


def by_key(rows: list[dict]) -> list[dict]:
    per_key = grouped(rows, "key_id")
    names = APIKey.objects.filter(pk__in=per_key).values_list("pk", "name", "prefix")
    report = [{"key": pk, "name": name, "prefix": prefix, **per_key[pk]} for pk, name, prefix in names]
    return sorted(report, key=lambda row: (-row["requests"], row["key"]))


def by_team(rows: list[dict]) -> list[dict]:
    """Usage per team (the keys' team now); keys without a team under team null."""
    teams = dict(APIKey.objects.filter(pk__in={row["key_id"] for row in rows}).values_list("pk", "team_id"))
    names = dict(Team.objects.filter(pk__in=set(teams.values()) - {None}).values_list("pk", "name"))
    per_team = grouped([{**row, "team": teams.get(row["key_id"])} for row in rows], "team")
    report = [{"team": team, "name": names.get(team, ""), **counts} for team, counts in per_team.items()]
    return sorted(report, key=lambda row: (-row["requests"], row["team"] or 0))


@extend_schema_view(
    list=extend_schema(summary="List keys", parameters=[KeyFilterSerializer]),
    retrieve=extend_schema(summary="Show a key"),
    create=extend_schema(summary="Create a key; the response carries its plaintext, once",
                         responses={201: NewAPIKeySerializer}),
    update=extend_schema(summary="Replace a key's settings"),
    partial_update=extend_schema(summary="Change a key's name, owner, expiry, models or limits"),
)
class APIKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.UpdateModelMixin,
                    viewsets.GenericViewSet):
    """API keys for the OpenAI endpoints. Keys are revoked, never deleted, so usage history stays."""

    queryset = APIKey.objects.all()
    serializer_class = APIKeySerializer
    # Staff, and within staff Django's model permissions, as in the admin (keys/api_permissions.py).
    permission_classes = [IsAdminUser, KeyModelPermissions]
    pagination_class = KeyPagination
    # JSON only: the browsable API would render a new key's plaintext through templates,
    # whose DEBUG logging (django.template) prints the whole context.
    renderer_classes = [JSONRenderer]
    lookup_value_regex = r"[0-9]+"

    def get_queryset(self) -> QuerySet:
        # Every key for staff with view_apikey; team scoping is keys/permissions.py's.
        keys = permissions.visible_keys(self.request.user, APIKey.objects.order_by("-created_at", "-id"))
        if self.action != "list":
            return keys
        query = KeyFilterSerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        revoked, search = query.validated_data["revoked"], query.validated_data.get("search")
        if revoked is not None:
            keys = keys.filter(revoked_at__isnull=not revoked)
        if search:
            keys = keys.filter(Q(name__icontains=search) | Q(owner__icontains=search) | Q(prefix__icontains=search))
        return keys

    def create(self, request: Request) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        self.check_change(None, serializer.validated_data)
        key, plaintext = APIKey.objects.create_key(**serializer.validated_data)
        logger.info("API key %s (%s…) created by %s", key.pk, key.prefix, request.user)
        return Response(self.with_plaintext(key, plaintext), status=status.HTTP_201_CREATED)

    def perform_update(self, serializer: APIKeySerializer) -> None:
        self.check_change(serializer.instance, serializer.validated_data)
        key = serializer.save()
        logger.info("API key %s (%s…) changed by %s: %s", key.pk, key.prefix, self.request.user,
                    ", ".join(sorted(serializer.validated_data)))

    @extend_schema(summary="Revoke a key (at once, for good)", request=None, responses=APIKeySerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str) -> Response:
        key = self.get_object()
        key.revoke()
        logger.info("API key %s (%s…) revoked by %s", key.pk, key.prefix, request.user)
        return Response(self.get_serializer(key).data)

    @extend_schema(summary="Give a key a new secret; the response carries it, once",
                   request=None, responses={200: NewAPIKeySerializer, 409: None})
    @action(detail=True, methods=["post"])
    def rotate(self, request: Request, pk: str) -> Response:
        key = self.get_object()
        try:
            plaintext = key.rotate()
        except KeyRevokedError as exc:
            raise Conflict(str(exc)) from None
        logger.info("API key %s rotated to %s… by %s", key.pk, key.prefix, request.user)
        return Response(self.with_plaintext(key, plaintext))

    @extend_schema(summary="A key's usage per day and per model", operation_id="keys_usage",
                   parameters=[UsageQuerySerializer],
                   responses=KeyUsageReportSerializer)
    @action(detail=True, methods=["get"])
    def usage(self, request: Request, pk: str) -> Response:
        key = self.get_object()
        report = usage_report(self.window_days(request), APIKey.objects.filter(pk=key.pk))
        return Response(KeyUsageReportSerializer({**report, "key": key.pk}).data)

    @extend_schema(summary="Usage of all keys per day, per model and per key", operation_id="keys_usage_summary",
                   parameters=[UsageQuerySerializer], responses=UsageSummarySerializer)
    @action(detail=False, methods=["get"], url_path="usage", url_name="usage-summary")
    def usage_summary(self, request: Request) -> Response:
        report = usage_report(self.window_days(request))
        return Response(UsageSummarySerializer({**report, "by_key": by_key(report["rows"]),
                                                "by_team": by_team(report["rows"])}).data)

    def window_days(self, request: Request) -> int:
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        return query.validated_data["days"]

    def check_change(self, key: APIKey | None, changes: dict) -> None:
        refusal = check_key_change(self.request.user, self.request.auth, key, changes)
        if refusal:
            raise PermissionDenied(refusal)
        team = changes["team"] if "team" in changes else key.team if key else None
        if team is not None:
            fields = ("allowed_models", *permissions.LIMIT_FIELDS)
            values = {name: changes[name] if name in changes else getattr(key, name, None) for name in fields}
            beyond = permissions.beyond_team(team, values)
            if beyond:
                raise serializers.ValidationError(beyond)

    def with_plaintext(self, key: APIKey, plaintext: str) -> dict:
        return {"key": plaintext, **self.get_serializer(key).data}
