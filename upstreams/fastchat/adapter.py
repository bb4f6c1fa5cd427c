"""The FastChat adapter: one controller and the workers it hands out, behind upstreams/base.py's
Adapter protocol. It translates OpenAI calls into FastChat's worker protocol (prompts from the
worker's template, worker parameters, the context check) and the workers' cumulative-text
chunks back into OpenAI answers and chunks, as FastChat's own openai_api_server does."""
from __future__ import annotations

import time
from typing import Any

from django.conf import settings

from upstreams.base import FASTCHAT, Answer, DiscoveredModel, Observer, Probe, Route
from upstreams.calls import EMBEDDINGS, VISION, ChatCall, CompletionsCall, EmbeddingsCall, TokenCheckItem
from upstreams.errors import InvalidPrompt, UpstreamFailure
from upstreams.fastchat import chat, choices, completions
from upstreams.fastchat import embeddings as embeddings_module
from upstreams.fastchat.backend import Backend
from upstreams.fastchat.client import FastChatClient

# What a FastChat route can do: images go to the worker (its template says whether it takes them);
# no tools, no JSON mode or schema.
CAPABILITIES = frozenset({VISION, EMBEDDINGS})


class FastChatAdapter:
    kind = FASTCHAT

    def __init__(self, backend: Backend, *, embedding_batch_size: int = 4, embedding_concurrency: int = 4):
        self.backend = backend
        self.embedding_batch_size = embedding_batch_size
        self.embedding_concurrency = embedding_concurrency

    @classmethod
    def from_spec(cls, spec: Any) -> FastChatAdapter:
        """An adapter for a FastChat upstream (`spec.base_url`: its controller) with the timeouts of
        its spec: `connect_timeout` for controller calls, `idle_timeout` for a worker's silence."""
        client = FastChatClient(
            spec.base_url.rstrip("/"), spec.idle_timeout, spec.connect_timeout,
            deadline=settings.GATEWAY_UPSTREAM_DEADLINE,
            max_bytes=settings.GATEWAY_UPSTREAM_MAX_BYTES,
            allowed_worker_hosts=settings.GATEWAY_WORKER_ALLOWED_HOSTS,
        )
        backend = Backend(client, model_list_ttl=settings.GATEWAY_MODEL_LIST_TTL,
                          worker_retries=settings.GATEWAY_WORKER_RETRIES,
                          address_ttl=settings.GATEWAY_WORKER_ADDRESS_TTL)
        return cls(backend, embedding_batch_size=settings.FASTCHAT_WORKER_API_EMBEDDING_BATCH_SIZE,
                   embedding_concurrency=settings.GATEWAY_EMBEDDING_CONCURRENCY)

    # Models

    async def list_models(self) -> list[DiscoveredModel]:
        return [DiscoveredModel(name, CAPABILITIES) for name in await self.backend.models()]

    async def models(self, refresh: bool = False) -> list[str]:
        """The controller's model names, sorted, cached (GATEWAY_MODEL_LIST_TTL)."""
        return await self.backend.models(refresh)

    @property
    def known_models(self) -> list[str]:
        """The model list as last fetched, without asking the controller."""
        return self.backend.known_models

    async def has_model(self, model: str) -> bool:
        return await self.backend.has_model(model)

    # Calls

    async def chat(self, call: ChatCall, route: Route, observer: Observer | None = None) -> Answer:
        refuse_chat_logprobs(call)
        return await choices.answer(self.backend, chat.generations(self.backend, call, route.upstream_model), observer)

    async def chat_stream(self, call: ChatCall, route: Route) -> choices.ChoiceStream:
        refuse_chat_logprobs(call)
        return await choices.stream(self.backend, chat.generations(self.backend, call, route.upstream_model))

    async def completions(self, call: CompletionsCall, route: Route, observer: Observer | None = None) -> Answer:
        generations = completions.generations(self.backend, call, route.upstream_model)
        return await choices.answer(self.backend, generations, observer)

    async def completions_stream(self, call: CompletionsCall, route: Route) -> choices.ChoiceStream:
        return await choices.stream(self.backend, completions.generations(self.backend, call, route.upstream_model))

    async def embeddings(self, call: EmbeddingsCall, route: Route, observer: Observer | None = None) -> Answer:
        return await embeddings_module.embeddings(self.backend, call, route.upstream_model,
                                                  self.embedding_batch_size, self.embedding_concurrency)

    # FastChat's extras and health

    async def token_check(self, item: TokenCheckItem, route: Route) -> dict[str, Any]:
        """FastChat's /api/v1/token_check for one prompt: does it plus max_tokens fit the model?"""
        backend, model = self.backend, route.upstream_model

        async def count(address: str) -> tuple[int, int]:
            context_length = await backend.context_length(address, model)
            return await backend.count_tokens(address, model, item.prompt), context_length

        token_count, context_length = await backend.on_worker(model, count)
        return {"fits": token_count + item.max_tokens <= context_length, "tokenCount": token_count,
                "contextLength": context_length}

    async def ping(self) -> None:
        """Raises an UpstreamFailure if the controller does not answer."""
        await self.backend.ping_controller()

    async def probe(self) -> Probe:
        started = time.monotonic()
        try:
            await self.backend.models(refresh=True)
        except UpstreamFailure as exc:
            failure = "unreachable" if exc.retryable else "bad_answer"
            return Probe(False, (time.monotonic() - started) * 1000, failure, exc.message)
        return Probe(True, (time.monotonic() - started) * 1000)


def refuse_chat_logprobs(call: ChatCall) -> None:
    if call.body.get("logprobs"):
        raise InvalidPrompt("Chat 'logprobs' are not supported by FastChat workers; use /v1/completions.",
                            param="logprobs", code="unsupported_parameter")
