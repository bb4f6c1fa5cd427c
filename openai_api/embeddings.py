"""/v1/embeddings: inputs split into worker batches, a few in flight at a time, reassembled in order."""
from __future__ import annotations

from typing import Any

from django.conf import settings

from openai_api.backend import Backend
from openai_api.context import RequestContext
from openai_api.generation import gather_all
from openai_api.protocol import EmbeddingsRequest


async def create_embeddings(backend: Backend, request: EmbeddingsRequest, inputs: list[str], ctx: RequestContext) -> dict[str, Any]:
    size = settings.FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE
    starts = range(0, len(inputs), size)
    results: list[dict[str, Any]] = [{}] * len(starts)
    pending = iter(enumerate(starts))

    async def embed(batch: list[str]) -> dict[str, Any]:
        # Always a list: a bare string input crashes the worker and leaks its slot.
        payload = {"model": request.model, "input": batch, "encoding_format": request.encoding_format}
        return await backend.on_worker(request.model, lambda address: backend.embeddings(address, payload))

    async def runner() -> None:
        # GATEWAY_EMBEDDING_CONCURRENCY runners share the batches: that many calls in flight,
        # and no task or payload made for a batch before its turn.
        for index, start in pending:
            results[index] = await embed(inputs[start:start + size])

    await gather_all(runner() for _ in range(max(1, min(settings.GATEWAY_EMBEDDING_CONCURRENCY, len(starts)))))
    data, token_count = [], 0
    for result in results:
        for vector in result.get("embedding", []):
            data.append({"object": "embedding", "embedding": vector, "index": len(data)})
        token_count += result.get("token_num", 0)
    ctx.mark_first_token()
    ctx.add_usage({"prompt_tokens": token_count, "completion_tokens": 0})
    return {
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": token_count, "total_tokens": token_count},
    }
