"""/v1/chat/completions: the prompt from the worker's template, then n generations of it
(run and rendered by choices.py)."""
from __future__ import annotations

from typing import Any

from django.http import HttpResponse

from openai_api import choices
from openai_api.backend import Backend
from openai_api.context import RequestContext
from openai_api.conversation import PromptError, build_prompt, stop_list
from openai_api.errors import InvalidRequestError, UpstreamError
from openai_api.generation import fit_max_tokens, worker_params
from openai_api.protocol import ChatRequest


async def chat_params(backend: Backend, address: str, request: ChatRequest) -> dict[str, Any]:
    template = await backend.template(address, request.model)
    try:
        prompt, images = build_prompt(template, request.messages)
    except PromptError as exc:
        raise InvalidRequestError(str(exc), param=exc.param) from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):  # a template with bad fields
        raise UpstreamError("The worker sent an invalid conversation template.") from None
    sampling = request.sampling
    max_new_tokens = await fit_max_tokens(backend, address, request.model, prompt, sampling.max_tokens, "messages")
    return worker_params(
        request.model, prompt, sampling, max_new_tokens,
        stop=stop_list(sampling.stop, template),
        stop_token_ids=None if template.stop_token_ids is None else list(template.stop_token_ids),
        images=images or None,
        repetition_penalty=request.repetition_penalty,
    )


class ChatRendering:
    """Chat choices: a message when answered whole, role/content/finish deltas when streamed."""

    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    streams_logprobs = False

    def choice(self, index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def opening(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    def finish(self, index: int, finish_reason: str) -> dict[str, Any]:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}


RENDERING = ChatRendering()


async def respond(backend: Backend, request: ChatRequest, ctx: RequestContext) -> HttpResponse:
    async def payloads(address: str) -> list[dict[str, Any]]:
        return [await chat_params(backend, address, request)]

    sampling = request.sampling
    return await choices.respond(backend, choices.Generations(
        request.model, sampling.n, sampling.stream, sampling.include_usage, RENDERING, payloads), ctx)
