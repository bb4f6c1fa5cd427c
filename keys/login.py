"""Logging in safely: lock-out after failed logins (django-axes), on every login page.

Failed logins are counted per user name and client address together (AXES_LOCKOUT_PARAMETERS),
so a stranger guessing one user's password from elsewhere locks out only their own pair, and
the user can still log in from their own address. Success resets the count.
The client address is the connection's peer (REMOTE_ADDR): behind nginx, uvicorn has already
replaced it with the forwarded client, and only for its trusted proxies; the forwarding headers
of a direct caller are never read here, so nobody escapes the lock-out by inventing an address.
"""
from __future__ import annotations

import ipaddress
import math

from axes.backends import AxesStandaloneBackend
from axes.helpers import get_cool_off
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from keys.admin_site import SITE_HEADER

LOCKED_OUT_STATUS = 429


class LockoutBackend(AxesStandaloneBackend):
    """Refuses a locked-out user name and address before any password is checked.

    A call of authenticate() without a request (the test client's login(), code of our own) is
    no login from a client: there is no address to count, so it is left to the other backends.
    """

    def authenticate(self, request: HttpRequest | None, username=None, password=None, **kwargs):
        if request is None:
            return None
        return super().authenticate(request, username=username, password=password, **kwargs)


def client_ip(request: HttpRequest) -> str | None:
    """None when there is no peer address (a Unix socket; the test client's force_login())."""
    address = request.META.get("REMOTE_ADDR") or ""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


def locked_out(request: HttpRequest, original_response=None, credentials=None) -> HttpResponse:
    """429 with a page that says why and for how long, and Retry-After in seconds."""
    cool_off = get_cool_off(request)
    seconds = math.ceil(cool_off.total_seconds()) if cool_off else None
    # Rendered here: Axes' middleware hands the answer back after the view, past template rendering.
    response = render(request, "admin/locked_out.html", {
        "site_header": SITE_HEADER, "site_title": SITE_HEADER, "title": "Too many failed logins",
        "minutes": math.ceil(seconds / 60) if seconds else None,
    }, status=LOCKED_OUT_STATUS)
    if seconds:
        response["Retry-After"] = str(seconds)
    return response
