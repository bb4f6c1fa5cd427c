"""What chat and completions send to a worker and read from it: worker parameters, the context
check, worker streams, per-choice text deltas and the usage the worker reported."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from upstreams.calls import Sampling
from upstreams.errors import BadAnswer, ContextOverflow
from upstreams.fastchat.backend import Backend
from upstreams.fastchat.client import CONTEXT_OVERFLOW, WorkerStream, check_worker_error
from upstreams.usage import MAX_TOKEN_COUNT, Usage, token_count

T = TypeVar("T")

# A token covers at least one byte of text, plus a few special tokens (BOS, a SentencePiece
# dummy prefix, ChatGLM's [gMASK]/sop). A prompt whose UTF-8 length plus max_tokens plus this
# margin fits the context cannot overflow it, so its count_token call is skipped.
SPECIAL_TOKENS_MARGIN = 16
# FastChat's stand-in for "no max_tokens": the rest of the context.
UNLIMITED = 1024 * 1024


async def fit_max_tokens(backend: Backend, address: str, model: str, prompt: str, max_tokens: int | None, param: str) -> int:
    """FastChat's check_length: the max_new_tokens to send, or ContextOverflow.

    A max_tokens that does not fit is lowered to what the context leaves, as FastChat does
    (docs/decisions.md#context-length).
    """
    context_length = await backend.context_length(address, model)
    if max_tokens is not None and len(prompt.encode()) + max_tokens + SPECIAL_TOKENS_MARGIN <= context_length:
        return max_tokens
    prompt_tokens = await backend.count_tokens(address, model, prompt)
    length = min(max_tokens or UNLIMITED, context_length - prompt_tokens)
    if length <= 0:
        raise ContextOverflow(
            f"This model's maximum context length is {context_length} tokens. However, your "
            f"messages resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
            param=param, fastchat_code=CONTEXT_OVERFLOW,
        )
    return length


def worker_params(model: str, prompt: str, sampling: Sampling, max_new_tokens: int, stop: list[str],
                  stop_token_ids: list[int] | None, *, echo: bool = False, logprobs: int | None = None,
                  repetition_penalty: float | None = None, **extra: Any) -> dict[str, Any]:
    """The generate payload, in FastChat's key order. Every value the worker reads is sent
    explicitly: a missing or null one can crash it and leak its slot (docs/fastchat-protocol.md,
    "Worker failure modes")."""
    params = {
        "model": model,
        "prompt": prompt,
        "temperature": sampling.temperature,
        "logprobs": logprobs,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "max_new_tokens": max_new_tokens,
        "echo": echo,
        "stop_token_ids": stop_token_ids,
    }
    params.update({name: value for name, value in extra.items() if value is not None})
    params["stop"] = stop
    if repetition_penalty is not None:
        params["repetition_penalty"] = repetition_penalty
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    return params


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Like asyncio.gather, but the first failure (or a cancellation) cancels the rest and is
    raised as is. Results that were ready are closed if they have an aclose() (open streams)."""
    awaitables = list(awaitables)
    if len(awaitables) == 1:  # the common n=1 case: no task to create
        return [await awaitables[0]]
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.aclose() for r in results if hasattr(r, "aclose")), return_exceptions=True)
        raise


@dataclass
class PrimedStream:
    """A worker stream whose first chunks have arrived, so its failures can still be HTTP errors."""

    stream: WorkerStream
    first_batch: list[dict[str, Any]]
    rest: AsyncIterator[list[dict[str, Any]]]

    async def batches(self) -> AsyncIterator[list[dict[str, Any]]]:
        """The worker's chunks, as WorkerStream.batches() read them."""
        yield self.first_batch
        async for batch in self.rest:
            yield batch

    def reported_usage(self) -> Any:
        return self.stream.reported_usage()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_primed_stream(backend: Backend, address: str, params: dict[str, Any]) -> PrimedStream:
    stream = await backend.open_stream(address, params)
    try:
        rest = stream.batches()
        first = await anext(rest)
        check_worker_error(first[0])
        return PrimedStream(stream, first, rest)
    except StopAsyncIteration:
        await stream.aclose()
        raise BadAnswer("The worker closed the stream without sending anything.", log_detail=stream.url) from None
    except BaseException:
        await stream.aclose()
        raise


async def close_all(streams: list[Any]) -> None:
    """Close every stream, whatever fails (one stream, the common case: no task)."""
    if len(streams) == 1:
        try:
            await streams[0].aclose()
        except Exception:
            pass
        return
    await asyncio.gather(*(stream.aclose() for stream in streams), return_exceptions=True)


@dataclass
class TextDelta:
    """Turns a worker's cumulative text into deltas, as FastChat's stream generators do."""

    previous_text: str = ""
    previous_tokens: int = 0
    finish_reason: str | None = None
    finish_sent: bool = False

    def update(self, chunk: dict[str, Any]) -> str:
        text = chunk.get("text", "").replace("\ufffd", "")
        delta = text[len(self.previous_text):]
        if len(text) > len(self.previous_text):
            self.previous_text = text
        if chunk.get("finish_reason") is not None:
            self.finish_reason = chunk["finish_reason"]
        return delta

    def take_finish(self, stream_ended: bool = False) -> bool:
        """True once per choice: when the worker reported its finish_reason, or its stream
        ended without one (then "stop")."""
        if self.finish_sent or (self.finish_reason is None and not stream_ended):
            return False
        if self.finish_reason is not None and not isinstance(self.finish_reason, str):
            raise BadAnswer("The worker sent an invalid finish_reason.")
        self.finish_reason = self.finish_reason or "stop"
        self.finish_sent = True
        return True

    def logprobs_delta(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """The part of the worker's cumulative logprobs that is new in this chunk."""
        logprobs = chunk.get("logprobs")
        if not logprobs:
            return None
        start = self.previous_tokens
        self.previous_tokens = len(logprobs.get("tokens", []))
        return {key: list(values[start:]) for key, values in logprobs.items() if isinstance(values, list)}


def reported_usage(streams: list[Any], n: int) -> tuple[Usage, bool]:
    """The usage the workers reported so far for streams in prompt-major order (n per prompt):
    prompt tokens once per prompt (not per choice), completion tokens over every choice.

    Every count is checked (upstreams/usage.py); an invalid one counts as 0 and makes the second value
    False, for the answer to become a 502 (the usage recorded keeps the valid counts).
    """
    valid = True

    def count(usage: Any, name: str) -> int:
        nonlocal valid
        if usage is None:
            return 0
        value = token_count(usage.get(name, 0)) if isinstance(usage, dict) else None
        if value is None:
            valid = False
            return 0
        return value

    usages = [stream.reported_usage() for stream in streams]
    prompt_tokens = completion_tokens = 0
    for start in range(0, len(usages), n):
        group = usages[start:start + n]
        prompt_tokens += max(count(usage, "prompt_tokens") for usage in group)
        completion_tokens += sum(count(usage, "completion_tokens") for usage in group)
    return Usage(min(prompt_tokens, MAX_TOKEN_COUNT), min(completion_tokens, MAX_TOKEN_COUNT)), valid
