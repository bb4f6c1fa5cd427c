"""/v1/completions: raw prompts (no template text, but the template's stop words), n generations
per prompt (run and rendered by choices.py)."""
from __future__ import annotations

from typing import Any

from django.http import HttpResponse

from openai_api import choices
from openai_api.backend import Backend
from openai_api.context import RequestContext
from openai_api.conversation import stop_list
from openai_api.generation import fit_max_tokens, worker_params
from openai_api.protocol import CompletionRequest


async def completion_params(backend: Backend, address: str, request: CompletionRequest, prompts: list[str]) -> list[dict[str, Any]]:
    """One payload per prompt; every prompt gets the smallest max_tokens that fits (FastChat)."""
    template = await backend.template(address, request.model)
    max_tokens = request.sampling.max_tokens
    for prompt in prompts:
        max_tokens = await fit_max_tokens(backend, address, request.model, prompt, max_tokens, "prompt")
    # FastChat sends best_of and use_beam_search for non-streamed completions only.
    extras = {} if request.sampling.stream else {"best_of": request.best_of, "use_beam_search": request.use_beam_search}
    return [
        worker_params(
            request.model, prompt, request.sampling, max_tokens,
            stop=stop_list(request.sampling.stop, template),
            stop_token_ids=None if template.stop_token_ids is None else list(template.stop_token_ids),
            echo=request.echo, logprobs=request.logprobs, **extras,
        )
        for prompt in prompts
    ]


class CompletionRendering:
    """Completion choices: text and logprobs; streamed, the new text and logprobs of each chunk."""

    id_prefix = "cmpl-"
    object = "text_completion"
    chunk_object = "text_completion"
    streams_logprobs = True

    def choice(self, index: int, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def opening(self, index: int) -> None:
        return None

    def delta(self, index: int, text: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}

    def finish(self, index: int, finish_reason: str) -> dict[str, Any]:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}


RENDERING = CompletionRendering()


async def respond(backend: Backend, request: CompletionRequest, prompts: list[str], ctx: RequestContext) -> HttpResponse:
    async def payloads(address: str) -> list[dict[str, Any]]:
        return await completion_params(backend, address, request, prompts)

    sampling = request.sampling
    return await choices.respond(backend, choices.Generations(
        request.model, sampling.n, sampling.stream, sampling.include_usage, RENDERING, payloads), ctx)
