"""Who may read the gateway's internals (/metrics, /health/ready's details): with
GATEWAY_METRICS_TOKEN set, whoever sends it (from anywhere, and nobody else); without it, a
caller on this very host that did not come through a proxy.

nginx connects from loopback too, so a request carrying a proxy's forwarding header counts as
remote whatever its peer address: the proxy says it came from elsewhere (and uvicorn, which
trusts loopback proxies, already replaces the peer with the forwarded client).
"""
from __future__ import annotations

import ipaddress

from django.conf import settings
from django.http import HttpRequest
from django.utils.crypto import constant_time_compare

PROXY_HEADERS = ("X-Forwarded-For", "X-Real-IP", "Forwarded")


def holds_metrics_token(request: HttpRequest) -> bool:
    """Only called when a token is set."""
    token = settings.GATEWAY_METRICS_TOKEN
    return constant_time_compare(request.headers.get("Authorization", ""), f"Bearer {token}")


def is_direct_loopback(request: HttpRequest) -> bool:
    """The peer is this host and no proxy forwarded the request."""
    if any(header in request.headers for header in PROXY_HEADERS):
        return False
    try:
        return ipaddress.ip_address(request.META.get("REMOTE_ADDR") or "").is_loopback
    except ValueError:
        return False


def is_insider(request: HttpRequest) -> bool:
    if settings.GATEWAY_METRICS_TOKEN:
        return holds_metrics_token(request)
    return is_direct_loopback(request)
