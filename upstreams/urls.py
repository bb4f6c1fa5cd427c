"""Routes of the registry's staff API (upstreams/api.py)."""
from __future__ import annotations

from rest_framework.routers import SimpleRouter

from upstreams.api import UpstreamModelViewSet, UpstreamViewSet

router = SimpleRouter()
router.register("api/upstreams", UpstreamViewSet, basename="upstream")
router.register("api/upstream-models", UpstreamModelViewSet, basename="upstreammodel")

urlpatterns = router.urls
