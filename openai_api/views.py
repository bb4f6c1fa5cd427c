"""The OpenAI-compatible endpoints: validate -> authorise the model -> act -> respond."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from django.http import HttpRequest, HttpResponse

from openai_api import protocol
from openai_api.accounting import admit, demand_of
from openai_api.auth import require_model_access
from openai_api.endpoint import api_endpoint, json_response, read_json
from openai_api.errors import ModelNotFoundError, NotFoundError, OpenAIError, error_body
from openai_api.insiders import is_insider
from openai_api.streaming import stream_response
from openai_api.tokens import as_texts
from upstreams.base import Answer
from upstreams.ids import random_id
from upstreams.router import Router, get_router


async def admit_model(request: HttpRequest, router: Router, call: Any) -> None:
    """403 if the key may not use the call's model, 404 (FastChat's message) if no upstream serves
    it, 400 if none of its routes can serve the call (tools to FastChat workers), 429 if the
    key's limits refuse the request."""
    key, model = request.ctx.key, call.public_model
    request.ctx.model = model
    require_model_access(key, model)
    if not await router.has_model(model):
        visible = [name for name in await router.models() if key.allows_model(name)]
        raise ModelNotFoundError(
            f"Only {'&&'.join(visible)} allowed now, your model {model}", param="model",
        )
    await router.check(call)
    await admit(request.ctx, demand_of(call, len(request.body)))


async def respond(request: HttpRequest, result: Any, answer: Any = None, translator: Any = None) -> HttpResponse:
    """The router's Answer as JSON, or its Stream as server-sent events. Another API bridged onto
    these (the Responses API) gives `answer` (async: an Answer -> its JSON) and a `translator`
    (streaming.EventTranslator: the stream's events)."""
    ctx = request.ctx
    if isinstance(result, Answer):
        ctx.mark_first_token()
        ctx.add_usage(result.usage)
        return json_response(result.body if answer is None else await answer(result))
    ctx.streamed = True
    return await stream_response(result, ctx, translator)


def model_card(name: str, created: int) -> dict[str, Any]:
    return {
        "id": name, "object": "model", "created": created, "owned_by": "fastchat",
        "root": name, "parent": None,
        "permission": [{
            "id": random_id("modelperm-"), "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": True, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False,
        }],
    }


@api_endpoint("GET")
async def models(request: HttpRequest) -> HttpResponse:
    key, created = request.ctx.key, int(time.time())
    names = [name for name in await get_router().models() if key.allows_model(name)]
    return json_response({"object": "list", "data": [model_card(name, created) for name in names]})


@api_endpoint("GET")
async def model_detail(request: HttpRequest, model_id: str) -> HttpResponse:
    key = request.ctx.key
    if not key.allows_model(model_id) or not await get_router().has_model(model_id):
        raise ModelNotFoundError(f"The model '{model_id}' does not exist", param="model")
    return json_response(model_card(model_id, int(time.time())))


async def chat_response(request: HttpRequest, fastchat_extras: bool) -> HttpResponse:
    call = protocol.parse_chat(read_json(request), fastchat_extras=fastchat_extras)
    router = get_router()
    await admit_model(request, router, call)
    request.ctx.streamed = call.stream
    return await respond(request, await router.chat(call, request.ctx))


@api_endpoint("POST")
async def chat_completions(request: HttpRequest) -> HttpResponse:
    return await chat_response(request, fastchat_extras=False)


@api_endpoint("POST")
async def fastchat_chat_completions(request: HttpRequest) -> HttpResponse:
    """FastChat's /api/v1/chat/completions: chat plus repetition_penalty, behind keys."""
    return await chat_response(request, fastchat_extras=True)


@api_endpoint("POST")
async def completions_view(request: HttpRequest) -> HttpResponse:
    call = protocol.parse_completion(read_json(request))
    router = get_router()
    await admit_model(request, router, call)
    call = replace(call, prompts=await as_texts(call.public_model, call.prompts, "prompt"))
    request.ctx.streamed = call.stream
    return await respond(request, await router.completions(call, request.ctx))


@api_endpoint("POST")
async def embeddings(request: HttpRequest, model_name: str | None = None) -> HttpResponse:
    call = protocol.parse_embeddings(read_json(request), path_model=model_name)
    router = get_router()
    await admit_model(request, router, call)
    call = replace(call, inputs=await as_texts(call.public_model, call.inputs, "input"))
    return await respond(request, await router.embeddings(call, request.ctx))


@api_endpoint("POST")
async def token_check(request: HttpRequest) -> HttpResponse:
    """FastChat's /api/v1/token_check: does each prompt plus max_tokens fit its model?"""
    items = protocol.parse_token_check(read_json(request))
    router, key = get_router(), request.ctx.key
    for item in items:
        require_model_access(key, item.public_model)
    if items:
        request.ctx.model = items[0].public_model
    await admit(request.ctx)  # worker calls, so the key's limits apply as everywhere
    return json_response({"prompts": [await router.token_check(item) for item in items]})


@api_endpoint("GET", authenticated=False)
async def health(request: HttpRequest) -> HttpResponse:
    return json_response({"status": "ok"})


@api_endpoint("GET", authenticated=False)
async def ready(request: HttpRequest) -> HttpResponse:
    """Ready when the database and the upstreams (zero configuration: the controller) answer."""
    from asgiref.sync import sync_to_async
    from django.db import connection

    def ping_database() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    checks: dict[str, str] = {}
    try:
        await sync_to_async(ping_database)()
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    router = get_router()
    checks.update(await router.ready())  # registered upstreams: ok while one is in rotation
    healthy = all(value == "ok" for value in checks.values())
    answer = {"status": "ok" if healthy else "unavailable"}
    # What failed, and how, names internal addresses: for this host and token holders only.
    if is_insider(request):
        answer["checks"] = checks
        if states := router.upstream_states():  # each upstream's health (docs/routing.md#health)
            answer["upstreams"] = states
    return json_response(answer, status=200 if healthy else 503)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    exc = NotFoundError(f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    return json_response(error_body(exc), status=404)


def server_error(request: HttpRequest) -> HttpResponse:
    return json_response(error_body(OpenAIError()), status=500)
