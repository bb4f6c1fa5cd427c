from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("keys.urls")),
    path("", include("upstreams.urls")),
    path("", include("openai_api.urls")),
    path("admin/", admin.site.urls),
    path("console/", include("keys.console.urls")),
    path("oidc/", include("keys.oidc_urls")),  # single sign-on, when configured (keys/oidc.py)
]

handler404 = "openai_api.views.not_found"
handler500 = "openai_api.views.server_error"
