"""Routes of the key-management API and its OpenAPI schema."""
from __future__ import annotations

from django.urls import path
from drf_spectacular.views import SpectacularAPIView
from rest_framework.routers import SimpleRouter

from keys.api import APIKeyViewSet

router = SimpleRouter()
router.register("api/keys", APIKeyViewSet, basename="apikey")

# Only the schema: drf-spectacular's Swagger/Redoc pages load their JavaScript from a CDN,
# which an offline deployment cannot reach. Point any OpenAPI viewer at this URL instead.
urlpatterns = [
    *router.urls,
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
]
