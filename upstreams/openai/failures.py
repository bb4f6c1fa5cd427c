"""An OpenAI-compatible upstream's failures as upstreams/errors.py exceptions.

Statuses: 401/403 CredentialsRejected, 429 RateLimited (with Retry-After), 5xx ServerFailure,
another 4xx ClientFailure with the upstream's own status and message (never retried). A server
known to answer invalid requests with 500 (deviations.validation_errors_as_500) gets a 400 when
its message is certainly a request validation error. Client-facing messages never name the
upstream's address; log_detail does.
"""
from __future__ import annotations

import re
from typing import Any

import aiohttp
import httpx
import orjson

from upstreams.errors import (
    BadAnswer,
    ClientFailure,
    CredentialsRejected,
    RateLimited,
    ServerFailure,
    Unreachable,
    UpstreamFailure,
    UpstreamTimeout,
)
from upstreams.openai.deviations import Deviations

MAX_MESSAGE_CHARS = 1000
MAX_RETRY_AFTER = 3600.0
# What FastAPI/pydantic put in the text of a request validation error (llama-cpp-python's server
# answers it with 500 and that text): "validation error for ..." or the error list's
# "'loc': ('body', ...)" / "'type': 'literal_error'".
_VALIDATION = re.compile(r"validation error|'loc': \('body'|\"loc\": \[\"body\"|'type': '(?:missing|literal_error|"
                         r"\w+_type|extra_forbidden|value_error)'")
_ERROR = re.compile(r"'loc': \('body', ([^)]{0,300})\), 'msg': (['\"])(.{0,300}?)\2")
# FastAPI's text may go on with a traceback (file paths of the server): never passed on.
_TRACEBACK = re.compile(r"\s*(?:File \"|Traceback \()")


def upstream_message(body: bytes) -> tuple[str, str | None]:
    """The error message (and parameter) in an upstream's error body: OpenAI's
    {"error": {"message", "param"}}, FastAPI's {"detail": ...}, {"message": ...} or plain text."""
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:MAX_MESSAGE_CHARS].decode("utf-8", "replace").strip(), None
    param = None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            param = error.get("param") if isinstance(error.get("param"), str) else None
            message = error.get("message", error.get("detail", error.get("msg")))
        else:
            message = error
    else:
        message = data
    if not isinstance(message, str):
        message = orjson.dumps(message).decode() if message is not None else ""
    return message[:MAX_MESSAGE_CHARS], (param[:64] if param else None)


Hidden = tuple[tuple[str, str], ...]  # (text, what replaces it): the address, the API key


def hidden_in_messages(base_url: str, api_key: str | None) -> Hidden:
    """What an upstream's message may echo that a client must never see: its address and the
    gateway's key for it (servers echo a refused key, some in full)."""
    hidden = [(base_url, "the upstream")] if base_url else []
    if api_key and len(api_key) >= 4:
        hidden.append((api_key, "[redacted]"))
    return tuple(hidden)


def scrubbed(message: str, hidden: Hidden) -> str:
    """`message` without what `hidden` names."""
    for text, replacement in hidden:
        if text in message:
            message = message.replace(text, replacement)
    return message


def validation_error(message: str) -> tuple[str, str | None]:
    """A FastAPI validation error's text as "param.path: what is wrong" (and the parameter),
    without the traceback that may follow it."""
    match = _ERROR.search(message)
    if match is None:
        return _TRACEBACK.split(message, 1)[0].strip()[:300], None
    path = [part.strip().strip("'\"") for part in match.group(1).split(",") if part.strip()]
    return f"{'.'.join(path)}: {match.group(3)}", (path[0][:64] if path else None)


def retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    if seconds is None or not seconds >= 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)


def status_failure(status: int, body: bytes, headers: httpx.Headers, deviations: Deviations,
                   hidden: Hidden, url: str) -> UpstreamFailure:
    message, param = upstream_message(body)
    message = scrubbed(message, hidden)
    detail = f"{url} answered HTTP {status}: {message[:300]}"
    if status in (401, 403):
        return CredentialsRejected(log_detail=detail)
    if status == 429:
        return RateLimited(log_detail=detail, retry_after=retry_after(headers))
    if status >= 500:
        if deviations.validation_errors_as_500 and _VALIDATION.search(message):
            text, param = validation_error(message)
            return ClientFailure(f"Invalid request: {text}", status=400, param=param, log_detail=detail)
        return ServerFailure(f"The upstream failed (HTTP {status}).", log_detail=detail)
    if 400 <= status < 500:
        return ClientFailure(message or None, status=status, param=param, log_detail=detail)
    return BadAnswer(f"The upstream answered HTTP {status}.", log_detail=detail)


def transport_failure(exc: httpx.HTTPError, url: str, started: bool = False) -> UpstreamFailure:
    """A transport error (httpx-aiohttp maps aiohttp's errors coarsely, so its cause decides).
    `started`: the answer had begun (a stream), so nothing may be retried."""
    cause = exc.__cause__
    detail = f"{url}: {type(cause or exc).__name__}"
    if isinstance(cause, aiohttp.ServerTimeoutError) or (cause is None and isinstance(exc, httpx.TimeoutException)):
        if started:
            return UpstreamTimeout("The upstream stayed silent too long.", retryable=False, log_detail=detail)
        return UpstreamTimeout(log_detail=detail)
    if started:
        return BadAnswer("The upstream closed the stream before it finished.", log_detail=detail)
    return Unreachable(log_detail=detail)
