"""Chat on FastChat: the prompt from the worker's template, then n generations of it (run and
rendered by choices.py)."""
from __future__ import annotations

from typing import Any

from upstreams.calls import ChatCall
from upstreams.errors import BadAnswer, InvalidPrompt
from upstreams.fastchat import choices
from upstreams.fastchat.backend import Backend
from upstreams.fastchat.conversation import PromptError, build_prompt, stop_list
from upstreams.fastchat.generation import fit_max_tokens, worker_params


async def chat_params(backend: Backend, address: str, call: ChatCall, model: str) -> dict[str, Any]:
    """The worker payload for `call`, `model` being the worker's name for it."""
    template = await backend.template(address, model)
    try:
        prompt, images = build_prompt(template, call.messages)
    except PromptError as exc:
        raise InvalidPrompt(str(exc), param=exc.param) from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):  # a template with bad fields
        raise BadAnswer("The worker sent an invalid conversation template.") from None
    sampling = call.sampling
    max_new_tokens = await fit_max_tokens(backend, address, model, prompt, sampling.max_tokens, "messages")
    return worker_params(
        model, prompt, sampling, max_new_tokens,
        stop=stop_list(sampling.stop, template),
        stop_token_ids=None if template.stop_token_ids is None else list(template.stop_token_ids),
        images=images or None,
        repetition_penalty=call.repetition_penalty,
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


def generations(backend: Backend, call: ChatCall, model: str) -> choices.Generations:
    async def payloads(address: str) -> list[dict[str, Any]]:
        return [await chat_params(backend, address, call, model)]

    sampling = call.sampling
    return choices.Generations(model, call.public_model, sampling.n, sampling.stream, sampling.include_usage,
                               RENDERING, payloads)
