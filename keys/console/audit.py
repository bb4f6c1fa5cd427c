"""The audit context of a console action: the entry names the logged-in user and the console."""
from __future__ import annotations

from contextlib import AbstractContextManager

from django.http import HttpRequest

from keys import audit


def console_audit(request: HttpRequest) -> AbstractContextManager:
    return audit.context(actor=request.user, origin="console", request=request)
