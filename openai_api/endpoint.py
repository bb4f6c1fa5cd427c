"""The decorator every OpenAI endpoint wears: method check, key, errors as JSON, bookkeeping."""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from openai_api.accounting import record_usage
from openai_api.auth import authenticate
from openai_api.context import RequestContext
from openai_api.errors import MethodNotAllowedError, OpenAIError, PayloadTooLargeError, error_body
from openai_api.observability import observe
from openai_api.protocol import is_model_name, parse_json_body
from openai_api.upstream_errors import to_openai
from upstreams.errors import UpstreamFailure

logger = logging.getLogger(__name__)

View = Callable[..., Awaitable[HttpResponse]]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> HttpResponse:
    return HttpResponse(orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def error_response(exc: OpenAIError) -> HttpResponse:
    return json_response(error_body(exc), status=exc.status_code, headers=exc.headers)


def api_endpoint(*methods: str, authenticated: bool = True) -> Callable[[View], View]:
    """Wrap an async view: 405 for other methods, 401 without a valid key, and every
    failure as an OpenAI-style JSON error. The view finds `request.ctx` (RequestContext)
    and, when authenticated, the key in `request.ctx.key`."""

    def decorator(view: View) -> View:
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            ctx = RequestContext(request_id=getattr(request, "request_id", ""), endpoint=request.path)
            request.ctx = ctx
            ctx.on_finish.append(observe)
            response, finished_later = None, False
            try:
                if request.method not in methods:
                    raise MethodNotAllowedError(
                        f"Method {request.method} is not allowed for {request.path}.",
                        headers={"Allow": ", ".join(methods)},
                    )
                if authenticated:
                    try:
                        ctx.key = await authenticate(request)
                    except asyncio.CancelledError:
                        finished_later = finish_after_lookup(request, ctx)
                        raise
                    ctx.on_finish.append(record_usage)
                response = await view(request, *args, **kwargs)
            except (OpenAIError, UpstreamFailure) as raised:
                exc = to_openai(raised) if isinstance(raised, UpstreamFailure) else raised
                response = error_response(exc)
                ctx.error_code = exc.code or ""
                ctx.upstream_url = exc.upstream_url
            except Exception:
                logger.exception("Unhandled error in %s (request %s)", request.path, ctx.request_id)
                response = error_response(OpenAIError())
                ctx.error_code = "internal_error"
            finally:
                if response is None and not finished_later:  # cancelled: the client went away
                    ctx.finish(499, "client_disconnected")
            if ctx.lease is not None:
                for name, value in ctx.lease.headers.items():
                    response.headers.setdefault(name, value)
            if not isinstance(response, StreamingHttpResponse):
                ctx.finish(response.status_code)
            return response

        return csrf_exempt(wrapper)

    return decorator


_late_lookups: set[asyncio.Task] = set()


def finish_after_lookup(request: HttpRequest, ctx: RequestContext) -> bool:
    """A client that left while its key was being looked up still gets its 499 usage row: the
    look-up is shared and outlives one caller (openai_api/auth.py), so wait for it (joining it,
    or served from the cache it filled) and finish the request with the key it found."""

    async def finish() -> None:
        try:
            ctx.key = await authenticate(request)
            ctx.on_finish.append(record_usage)
        except Exception:  # no key to count the request against (401, 503): its access line only
            pass
        finally:
            ctx.finish(499, "client_disconnected")

    task = asyncio.get_running_loop().create_task(finish())
    _late_lookups.add(task)
    task.add_done_callback(_late_lookups.discard)
    return True


def read_json(request: HttpRequest) -> dict[str, Any]:
    try:
        raw = request.body
    except RequestDataTooBig:
        raise PayloadTooLargeError() from None
    body = parse_json_body(raw)
    model = body.get("model")
    if is_model_name(model):
        request.ctx.model = model  # so even a refused request's usage row names its model
    return body
