"""An audit scope for each request to the admin, the REST API, the console and other pages.

Only in settings.MIDDLEWARE: the OpenAI API path (API_MIDDLEWARE) changes nothing and pays
nothing. Requests that may change things (POST, PUT, PATCH, DELETE) run in one transaction with
their entries; the others need none.
"""
from __future__ import annotations

from django.http import HttpRequest, HttpResponse

from keys.audit.scope import context

ORIGIN_BY_PATH = (("/admin/", "admin"), ("/api/", "api"), ("/console/", "console"))
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


def origin_of(path: str) -> str:
    return next((origin for prefix, origin in ORIGIN_BY_PATH if path.startswith(prefix)), "web")


def audit_scope(get_response):
    def middleware(request: HttpRequest) -> HttpResponse:
        with context(origin=origin_of(request.path), request=request, atomic=request.method not in SAFE_METHODS):
            return get_response(request)

    return middleware
