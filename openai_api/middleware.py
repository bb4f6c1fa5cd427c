"""Async-capable middleware for every path: request ids and CORS."""
from __future__ import annotations

import random
import re

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse

# A client's or proxy's own id is kept if it looks like one (nginx's $request_id does).
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
# Request ids need to be unique, not secret: no OS entropy read per request.
_random = random.Random()


def both(process_request, process_response):
    """Build a middleware factory that works in sync and async chains alike."""

    def factory(get_response):
        if iscoroutinefunction(get_response):
            async def middleware(request: HttpRequest) -> HttpResponse:
                early = process_request(request)
                response = early if early is not None else await get_response(request)
                return process_response(request, response)

            markcoroutinefunction(middleware)
        else:
            def middleware(request: HttpRequest) -> HttpResponse:
                early = process_request(request)
                response = early if early is not None else get_response(request)
                return process_response(request, response)

        return middleware

    factory.sync_capable = True
    factory.async_capable = True
    return factory


# The hot path reads headers from META: request.headers parses every header name again (HttpHeaders).


def assign_request_id(request: HttpRequest) -> None:
    given = request.META.get("HTTP_X_REQUEST_ID", "")
    request.request_id = given if SAFE_REQUEST_ID.match(given) else f"req_{_random.getrandbits(128):032x}"
    return None


def add_request_id(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    response["X-Request-ID"] = request.request_id
    return response


request_id = both(assign_request_id, add_request_id)


# Cross-origin pages may call the OpenAI API (with a key they hold), never the admin or
# /api/keys/, which a staff member's session cookie would open to them.
CORS_PATH_PREFIXES = ("/v1/", "/api/v1/")


def cors_preflight(request: HttpRequest) -> HttpResponse | None:
    if not request.path.startswith(CORS_PATH_PREFIXES):
        return None
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response = HttpResponse(status=200)
        response["Access-Control-Allow-Methods"] = allowed(settings.CORS_ALLOWED_METHODS, request.headers["Access-Control-Request-Method"])
        requested = request.headers.get("Access-Control-Request-Headers")
        if requested:
            response["Access-Control-Allow-Headers"] = allowed(settings.CORS_ALLOWED_HEADERS, requested)
        response["Access-Control-Max-Age"] = "600"
        return response
    return None


def cors_headers(request: HttpRequest, response: HttpResponse) -> HttpResponse:
    origin = request.META.get("HTTP_ORIGIN")
    if origin is None or not request.path.startswith(CORS_PATH_PREFIXES):
        return response
    origins = settings.CORS_ALLOWED_ORIGINS
    if origin in origins:
        response["Access-Control-Allow-Origin"] = origin
        response["Vary"] = "Origin"
        if settings.CORS_ALLOW_CREDENTIALS:
            response["Access-Control-Allow-Credentials"] = "true"
    elif "*" in origins:
        # Any site may call the API with a key it holds, but credentials (cookies) are shared
        # with the listed origins only: echoing every origin with credentials would let any
        # page make requests in a visitor's name (Starlette echoes it; browsers refuse "*").
        response["Access-Control-Allow-Origin"] = "*"
    return response


def allowed(configured: list[str], requested: str) -> str:
    return requested if "*" in configured else ", ".join(configured)


cors = both(cors_preflight, cors_headers)
