"""Embeddings on FastChat: inputs split into worker batches, a few in flight at a time,
reassembled in order."""
from __future__ import annotations

from typing import Any

from upstreams.base import Answer
from upstreams.calls import EmbeddingsCall
from upstreams.fastchat.backend import Backend
from upstreams.fastchat.generation import gather_all
from upstreams.usage import MAX_TOKEN_COUNT, Usage


async def embeddings(backend: Backend, call: EmbeddingsCall, model: str, batch_size: int, concurrency: int) -> Answer:
    inputs = call.inputs
    starts = range(0, len(inputs), batch_size)
    results: list[dict[str, Any]] = [{}] * len(starts)
    pending = iter(enumerate(starts))

    async def embed(batch: list[str]) -> dict[str, Any]:
        # Always a list: a bare string input crashes the worker and leaks its slot.
        payload = {"model": model, "input": batch, "encoding_format": call.encoding_format}
        return await backend.on_worker(model, lambda address: backend.embeddings(address, payload))

    async def runner() -> None:
        # `concurrency` runners share the batches: that many calls in flight, and no task or
        # payload made for a batch before its turn.
        for index, start in pending:
            results[index] = await embed(inputs[start:start + batch_size])

    await gather_all(runner() for _ in range(max(1, min(concurrency, len(starts)))))
    data, token_count = [], 0
    for result in results:
        for vector in result.get("embedding", []):
            data.append({"object": "embedding", "embedding": vector, "index": len(data)})
        token_count += result.get("token_num", 0)
    usage = Usage(min(token_count, MAX_TOKEN_COUNT), 0)
    return Answer({
        "object": "list",
        "data": data,
        "model": call.public_model,
        "usage": {"prompt_tokens": token_count, "total_tokens": token_count},
    }, usage)
