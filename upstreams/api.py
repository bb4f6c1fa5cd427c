"""The registry's REST API for staff (/api/upstreams/, /api/upstream-models/), beside /api/keys/.

Django's model permissions, as in the admin: reading needs `view_upstream` (`view_upstreammodel`),
creating `add_…`, changing `change_…`, deleting `delete_…`; "test" needs `view_upstream`, "discover"
`change_upstream`. An upstream's `api_key` is write-only: answers carry `api_key_last4` only.
Every write goes through `save_by`/`delete_by` (the audit hook, upstreams/signals.py).
"""
from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import DjangoModelPermissions, IsAdminUser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from upstreams import discovery
from upstreams.models import CAPABILITIES, MAX_API_KEY_CHARS, Upstream, UpstreamModel
from upstreams.registry import readable_key
from upstreams.status import status_of, test_now


class RegistryPermissions(DjangoModelPermissions):
    """Model permissions by action; reading needs the view permission too."""

    READ = ("list", "retrieve", "test")

    def has_permission(self, request, view) -> bool:
        if not request.user or not request.user.is_authenticated:
            return False
        model = view.queryset.model._meta
        verb = {"create": "add", "update": "change", "partial_update": "change", "destroy": "delete",
                "discover": "change"}.get(view.action, "view" if view.action in self.READ else None)
        if verb is None:  # an action this map does not know (OPTIONS…): every permission
            return request.user.has_perms([f"{model.app_label}.{v}_{model.model_name}"
                                           for v in ("view", "add", "change", "delete")])
        return request.user.has_perm(f"{model.app_label}.{verb}_{model.model_name}")


def checked(instance, request, source: str = "api"):
    """Save through the audit hook; the model's validation errors become a 400."""
    try:
        instance.save_by(request.user, source)
    except DjangoValidationError as exc:
        raise serializers.ValidationError(exc.message_dict if hasattr(exc, "message_dict") else exc.messages) from None
    return instance


class ModelSerializer(serializers.ModelSerializer):
    upstream = serializers.SlugRelatedField(slug_field="name", queryset=Upstream.objects.all())
    capabilities = serializers.ListField(child=serializers.ChoiceField(choices=CAPABILITIES), required=False,
                                        max_length=len(CAPABILITIES))

    class Meta:
        model = UpstreamModel
        fields = ["id", "upstream", "public_name", "upstream_name", "capabilities", "capabilities_by_hand",
                  "context_length", "discovered", "enabled", "created_at", "updated_at"]
        read_only_fields = ["discovered", "created_at", "updated_at"]
        validators = []  # uniqueness is the model's full_clean, in save_by

    def validate(self, data):
        if "capabilities" in data and "capabilities_by_hand" not in data:
            data["capabilities_by_hand"] = True  # a hand edit discovery will not overwrite
        return data

    def create(self, data):
        return checked(UpstreamModel(**data), self.context["request"])

    def update(self, instance, data):
        for field, value in data.items():
            setattr(instance, field, value)
        return checked(instance, self.context["request"])


class NestedModelSerializer(ModelSerializer):
    upstream = None

    class Meta(ModelSerializer.Meta):
        fields = [field for field in ModelSerializer.Meta.fields if field != "upstream"]


class UpstreamSerializer(serializers.ModelSerializer):
    api_key = serializers.CharField(
        write_only=True, required=False, allow_blank=True, allow_null=True, max_length=MAX_API_KEY_CHARS,
        trim_whitespace=True, help_text="Write-only; stored encrypted. Empty or null removes it; left out, kept.",
    )
    api_key_last4 = serializers.SerializerMethodField(help_text="The key's last 4 characters, '' without a key.")
    models = NestedModelSerializer(many=True, read_only=True)
    state = serializers.SerializerMethodField(help_text="healthy, cooling_down, credentials_rejected, "
                                                        "unreachable, disabled or unknown")

    class Meta:
        model = Upstream
        fields = ["id", "name", "kind", "base_url", "api_key", "api_key_last4", "enabled", "priority", "weight",
                  "connect_timeout", "first_byte_timeout", "idle_timeout", "max_concurrency", "extra_headers",
                  "discover_models", "state", "models", "created_at", "updated_at"]
        read_only_fields = ["created_at", "updated_at"]
        validators = []

    def get_api_key_last4(self, upstream: Upstream) -> str:
        return upstream.api_key_last4 if upstream.has_api_key else ""

    def get_state(self, upstream: Upstream) -> dict:
        status = status_of(upstream.name, enabled=upstream.enabled, api_key=readable_key(upstream))
        checked_at = status.checked_at.isoformat() if hasattr(status.checked_at, "isoformat") else status.checked_at
        return {"state": status.state, "latency_ms": status.latency_ms, "last_error": status.last_error,
                "checked_at": checked_at}

    def _write(self, instance: Upstream, data: dict) -> Upstream:
        has_key = "api_key" in data
        key = data.pop("api_key", None)
        for field, value in data.items():
            setattr(instance, field, value)
        if has_key:
            try:
                instance.set_api_key(key or None)
            except DjangoValidationError as exc:
                raise serializers.ValidationError(exc.message_dict) from None
        return checked(instance, self.context["request"])

    def create(self, data):
        return self._write(Upstream(), data)

    def update(self, instance, data):
        return self._write(instance, data)


class Pagination(PageNumberPagination):
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000


class RegistryViewSet(viewsets.ModelViewSet):
    permission_classes = [IsAdminUser, RegistryPermissions]
    renderer_classes = [JSONRenderer]
    pagination_class = Pagination

    def perform_destroy(self, instance) -> None:
        instance.delete_by(self.request.user, "api")


class UpstreamViewSet(RegistryViewSet):
    """Upstreams, with their models and health."""

    queryset = Upstream.objects.prefetch_related("models").order_by("-priority", "name")
    serializer_class = UpstreamSerializer

    @extend_schema(request=None, responses={200: dict})
    @action(detail=True, methods=["post"])
    def test(self, request, pk=None):
        """Probe the upstream now."""
        result = test_now(self.get_object())
        return Response({"ok": result.ok, "latency_ms": result.latency_ms, "failure": result.failure,
                         "message": result.message})

    @extend_schema(request=None, responses={200: dict})
    @action(detail=True, methods=["post"])
    def discover(self, request, pk=None):
        """Ask the upstream for its models and record them."""
        upstream = self.get_object()
        try:
            changes = discovery.discover(upstream, actor=request.user)
        except Exception as exc:  # the upstream's failure, not the API's
            return Response({"detail": f"{upstream.name}: cannot list its models ({type(exc).__name__})"}, status=502)
        return Response({"changes": changes})


class UpstreamModelViewSet(RegistryViewSet):
    """The models upstreams serve (public name → upstream name, capabilities)."""

    queryset = UpstreamModel.objects.select_related("upstream").order_by("upstream__name", "public_name")
    serializer_class = ModelSerializer
