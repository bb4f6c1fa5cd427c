"""Completions on FastChat: raw prompts (no template text, but the template's stop words), n
generations per prompt (run and rendered by choices.py)."""
from __future__ import annotations

from typing import Any

from upstreams.calls import CompletionsCall
from upstreams.fastchat import choices
from upstreams.fastchat.backend import Backend
from upstreams.fastchat.conversation import stop_list
from upstreams.fastchat.generation import fit_max_tokens, worker_params


async def completion_params(backend: Backend, address: str, call: CompletionsCall, model: str) -> list[dict[str, Any]]:
    """One payload per prompt; every prompt gets the smallest max_tokens that fits (FastChat)."""
    template = await backend.template(address, model)
    max_tokens = call.sampling.max_tokens
    for prompt in call.prompts:
        max_tokens = await fit_max_tokens(backend, address, model, prompt, max_tokens, "prompt")
    # FastChat sends best_of and use_beam_search for non-streamed completions only.
    extras = {} if call.sampling.stream else {"best_of": call.best_of, "use_beam_search": call.use_beam_search}
    return [
        worker_params(
            model, prompt, call.sampling, max_tokens,
            stop=stop_list(call.sampling.stop, template),
            stop_token_ids=None if template.stop_token_ids is None else list(template.stop_token_ids),
            echo=call.echo, logprobs=call.logprobs, **extras,
        )
        for prompt in call.prompts
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


def generations(backend: Backend, call: CompletionsCall, model: str) -> choices.Generations:
    async def payloads(address: str) -> list[dict[str, Any]]:
        return await completion_params(backend, address, call, model)

    sampling = call.sampling
    return choices.Generations(model, call.public_model, sampling.n, sampling.stream, sampling.include_usage,
                               RENDERING, payloads)
