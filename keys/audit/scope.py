"""Who is changing things, from where: one scope per request, command or console action.

A scope collects the objects changed inside it (keys/audit/trail.py notes each one's state
before its first change) and writes one entry per object when it closes, still inside its
transaction: a change and its entry are committed together or not at all. Outside any scope
(a shell, a data migration) each change is written at once, attributed to the process.
"""
from __future__ import annotations

import getpass
import ipaddress
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction
from django.http import HttpRequest

ORIGINS = ("admin", "api", "console", "command", "web", "system")


@dataclass
class Pending:
    """An object changed in a scope: its state before the scope's first change of it (None:
    it did not exist), the fields of that state known so far, and when it was first changed."""

    model: Any
    pk: Any
    before: dict[str, Any] | None
    at: datetime
    repr: str = ""
    has_fields: bool = False  # the concrete fields are in `before` (not only many-to-many ones)


@dataclass
class Scope:
    origin: str
    actor: Any = None  # a User or an APIKey; else read from the request when the scope closes
    request: HttpRequest | None = None
    where: str = ""
    pending: dict[tuple[str, str], Pending] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.origin not in ORIGINS:
            raise ValueError(f"origin must be one of {', '.join(ORIGINS)}, not {self.origin!r}")
        if self.request is not None and not self.where:
            self.where = f"{self.request.method} {self.request.path}"[:200]

    @property
    def request_id(self) -> str:
        return str(getattr(self.request, "request_id", "") or "")[:128]

    @property
    def ip(self) -> str | None:
        """The peer address: behind nginx, uvicorn has already put the forwarded client there
        (a client's own X-Forwarded-For is not trusted)."""
        address = self.request.META.get("REMOTE_ADDR", "") if self.request is not None else ""
        try:
            return str(ipaddress.ip_address(address))
        except ValueError:
            return None

    def actors(self) -> tuple[Any, Any, str]:
        """(user, key, label): a key acts for its user; a request's user is read when the scope
        closes, after the REST API's authentication has run."""
        actor = self.actor
        if actor is None and self.request is not None:
            actor = getattr(self.request, "auth", None)
            if not is_api_key(actor):
                actor = getattr(self.request, "user", None)
        if is_api_key(actor):
            user = actor.user
            label = f"key {actor.prefix}… ({actor.name})" + (f" of {user.get_username()}" if user else "")
            return user, actor, label[:200]
        if actor is not None and getattr(actor, "is_authenticated", False):
            return actor, None, actor.get_username()[:200]
        if self.origin in ("command", "system"):
            return None, None, f"{os_user()} ({self.where or process_name()})"[:200]
        return None, None, "anonymous"


_current: ContextVar[Scope | None] = ContextVar("audit_scope", default=None)


def current() -> Scope | None:
    return _current.get()


@contextmanager
def context(*, origin: str, actor: Any = None, request: HttpRequest | None = None, where: str = "",
            atomic: bool = True) -> Iterator[Scope]:
    """Attribute the changes made inside to `actor` (a User or an APIKey; by default the
    request's user or key) acting from `origin`. With `atomic` (the default) the changes and
    their entries share one transaction; an exception rolls both back.

        with audit.context(actor=request.user, origin="console", request=request):
            key.revoke()
    """
    from keys.audit.trail import flush

    scope = Scope(origin=origin, actor=actor, request=request, where=where)
    token = _current.set(scope)
    try:
        if atomic:
            with transaction.atomic():
                yield scope
                flush(scope)
        else:
            try:
                yield scope
            finally:  # without a transaction, whatever was changed stays changed: record it
                flush(scope)
    finally:
        _current.reset(token)


# Commands that serve: what their processes change on their own (model discovery) is the
# gateway's doing, not the command's.
SERVING_COMMANDS = frozenset({"openai_api_server", "runserver", "demo"})


def implicit_scope() -> Scope:
    """The scope of a change made outside any: a management command that opens none
    (createsuperuser, changepassword, upstreams…) or the process itself."""
    command = process_name()
    by_command = command.startswith("manage.py ") and command.split()[1] not in SERVING_COMMANDS
    return Scope(origin="command" if by_command else "system", where=command)


def process_name() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    if program in ("manage.py", "django-admin") and len(sys.argv) > 1:
        return f"manage.py {sys.argv[1]}"[:200]
    return program or "python"


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def is_api_key(value: Any) -> bool:
    meta = getattr(value, "_meta", None)
    return meta is not None and meta.label_lower == "keys.apikey"

