"""ASGI entry point: the OpenAI API path and the admin path get different middleware stacks.

Django loads one middleware chain per handler. The admin needs sessions, CSRF and messages,
which are sync middleware and cost a thread hop each; the OpenAI API needs none of them. So
requests under settings.API_PATH_PREFIXES go to a handler built from settings.API_MIDDLEWARE.
"""
from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

django_application = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from keys.live import websocket_urlpatterns  # noqa: E402
from openai_api.handler import APIHandler, route_by_path  # noqa: E402

application = ProtocolTypeRouter({
    "http": route_by_path(
        api=APIHandler(),
        # The admin's CSS and JS, unless nginx serves /static/ (GATEWAY_SERVE_STATIC=False).
        default=ASGIStaticFilesHandler(django_application) if settings.GATEWAY_SERVE_STATIC else django_application,
    ),
    # The admin's live usage view (staff only, session-authenticated).
    "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
})
