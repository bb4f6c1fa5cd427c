"""POST /v1/responses: a Responses request run as the equivalent chat completion.

validate (request.py) -> the stored conversation before `previous_response_id` (store.py) -> the
chat call (protocol.parse_chat: the chat path's bounds, needs and prompt) -> admit (views.admit_model:
key, model, limits) -> the router, retried with the oldest items dropped while the context is too
small and `truncation` is "auto" (before any byte is sent) -> the Response object (output.py; saved
first when `store` is true), or its event stream (events.py; saved before `response.completed`),
whose end openai_api/streaming.py owns. docs/responses.md.
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from django.http import HttpRequest, HttpResponse

from openai_api import protocol
from openai_api.endpoint import api_endpoint, read_json
from openai_api.errors import OpenAIError
from openai_api.responses import output, store
from openai_api.responses.events import ResponseEvents
from openai_api.responses.request import ResponsesRequest, chat_body, parse_request
from openai_api.views import admit_model, respond
from upstreams.base import Answer
from upstreams.calls import ChatCall
from upstreams.errors import ContextOverflow, UpstreamFailure
from upstreams.router import Router, get_router

# Chat parameters as the Responses parameters a client sent.
PARAMS = {"max_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}
CONTEXT_TOO_SMALL = re.compile(r"context (length|window|size)|maximum context|too many tokens|prompt is too long", re.I)
MAX_TRUNCATIONS = 16


def responses_param(param: str | None) -> str | None:
    """A chat parameter's name in the Responses request ("messages[3].content" -> "input")."""
    if param is None:
        return None
    head = param.split("[", 1)[0].split(".", 1)[0]
    return PARAMS.get(head, param) if head != "messages" else "input"


@contextmanager
def named_for_responses() -> Iterator[None]:
    """Errors of the chat path name the Responses parameter."""
    try:
        yield
    except (OpenAIError, UpstreamFailure) as exc:
        exc.param = responses_param(exc.param)
        raise


def chat_call(request: ResponsesRequest, history: list[dict[str, Any]]) -> ChatCall:
    with named_for_responses():
        return protocol.parse_chat(chat_body(request, history))


@api_endpoint("POST")
async def create_response(request: HttpRequest) -> HttpResponse:
    ctx = request.ctx
    responses_request = parse_request(read_json(request))
    history: list[dict[str, Any]] = []
    if responses_request.previous_response_id is not None:
        # A chain beyond the store's bounds is refused, or with truncation "auto" cut to its newest responses.
        history = await store.conversation_before(ctx.key, responses_request.previous_response_id,
                                                           truncate=responses_request.truncation == "auto")
    call = chat_call(responses_request, history)
    router = get_router()
    with named_for_responses():
        await admit_model(request, router, call)
        ctx.streamed = call.stream
        result = await run(router, call, responses_request, history, ctx)
    base = output.base_response(responses_request, output.new_id(), int(time.time()), call.public_model)

    async def save(response: dict[str, Any]) -> None:
        await store.save(ctx.key, response, list(responses_request.input_items))

    finalise = save if responses_request.store else None

    async def answer(result: Answer) -> dict[str, Any]:
        response = output.from_completion(base, result.body, result.usage)
        if finalise is not None:
            await finalise(response)
        return response

    return await respond(request, result, answer=answer, translator=ResponseEvents(base, finalise))


async def run(router: Router, call: ChatCall, request: ResponsesRequest, history: list[dict[str, Any]],
              ctx: Any) -> Any:
    """The router's Answer or primed Stream; with truncation "auto", a context too small for the
    conversation drops its oldest items (a turn, then twice as many...) and tries again."""
    turns = 1
    for _ in range(MAX_TRUNCATIONS):
        try:
            return await router.chat(call, ctx)
        except UpstreamFailure as exc:
            if request.truncation != "auto" or not context_too_small(exc):
                raise
            shorter = truncated(history, request.input_items, turns)
            if shorter is None:
                raise
            history, items = shorter
            request = replace(request, input_items=items)
            call = chat_call(request, history)
            turns *= 2
    return await router.chat(call, ctx)


def context_too_small(exc: UpstreamFailure) -> bool:
    return isinstance(exc, ContextOverflow) or (exc.status == 400 and bool(CONTEXT_TOO_SMALL.search(exc.message)))


def truncated(history: list[dict[str, Any]], items: tuple[dict[str, Any], ...],
              turns: int) -> tuple[list[dict[str, Any]], tuple[dict[str, Any], ...]] | None:
    """The conversation without its oldest `turns` turns (a turn ends before the next user
    message), never the last turn, never leaving a function call's output without its call; None
    if nothing can be dropped. Returned as (history, input items) so that the new input is kept apart.
    (The instructions are not items: they are never dropped.)"""
    conversation = [*history, *items]
    # The last turn (from the last user message on) is what is being answered: never dropped.
    last = max((i for i, item in enumerate(conversation) if is_user_message(item)), default=len(conversation) - 1)
    cut = 0
    for _ in range(turns):
        cut += 1
        while cut < len(conversation) and not is_user_message(conversation[cut]):
            cut += 1
    cut = min(cut, last)
    if cut == 0:
        return None
    kept = conversation[cut:]
    calls = {item["call_id"] for item in kept if item["type"] == "function_call"}
    kept = [item for item in kept if item["type"] != "function_call_output" or item["call_id"] in calls]
    if not kept:
        return None
    kept_ids = {id(item) for item in kept}
    return ([item for item in history if id(item) in kept_ids],
            tuple(item for item in items if id(item) in kept_ids))


def is_user_message(item: dict[str, Any]) -> bool:
    return item["type"] == "message" and item["role"] == "user"
