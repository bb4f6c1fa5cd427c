"""The FastChat adapter's view of one controller: cached model list, templates and context lengths.

Per request the gateway asks the controller for a worker address (keeping the controller's
load balancing), and only then the worker for a token count and a generation
(docs/fastchat-protocol.md, "Calls per request").
Everything else is cached here, per process.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway_project.single_flight import SingleFlight
from upstreams.errors import BadAnswer, Unreachable
from upstreams.fastchat.client import NO_WORKER, FastChatClient, WorkerGone, WorkerStream
from upstreams.fastchat.conversation import Template

T = TypeVar("T")

# How long a template or context length fetched from a worker is trusted.
WORKER_FACTS_TTL = 300.0
# How many times the controller is asked for a model's worker when the address pool is renewed:
# its dispatch (shortest queue, or a weighted lottery) hands out different workers in turn.
DISCOVERY_CALLS = 3


@dataclass
class AddressPool:
    """Worker addresses the controller handed out for a model recently, used in turn."""

    addresses: list[str]
    fetched_at: float
    turn: int = 0

    def next(self) -> str:
        self.turn += 1
        return self.addresses[self.turn % len(self.addresses)]


class Backend:
    """Caches in front of a FastChatClient. One per FastChat upstream and process (adapters.py)."""

    def __init__(self, client: FastChatClient, model_list_ttl: float, worker_retries: int,
                 address_ttl: float = 0.0, clock=time.monotonic):
        self.client = client
        self.model_list_ttl = model_list_ttl
        self.worker_retries = worker_retries
        self.address_ttl = address_ttl
        self.clock = clock
        self._address_pools: dict[str, AddressPool] = {}
        self._models: list[str] = []
        self._models_fetched_at = float("-inf")
        self._templates: dict[tuple[str, str], tuple[Template, float]] = {}
        self._context_lengths: dict[tuple[str, str], tuple[int, float]] = {}
        self._flights = SingleFlight()

    @property
    def known_models(self) -> list[str]:
        """The model list as last fetched, without asking the controller (metrics labels)."""
        return self._models

    async def models(self, refresh: bool = False) -> list[str]:
        """The controller's model names, sorted; cached for model_list_ttl seconds."""
        if refresh or self.clock() - self._models_fetched_at > self.model_list_ttl:
            await self._flights.run("models", self._fetch_models)
        return self._models

    async def _fetch_models(self) -> None:
        self._models = sorted(set(await self.client.list_models()))
        self._models_fetched_at = self.clock()

    async def has_model(self, model: str) -> bool:
        """Whether the controller serves `model`; an unknown name refreshes the list once."""
        if model in await self.models():
            return True
        return model in await self.models(refresh=True)

    async def template(self, address: str, model: str) -> Template:
        async def fetch() -> Template:
            conv = await self.client.conv_template(address, model)
            try:
                return Template.from_worker(conv)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise BadAnswer("The worker sent an invalid conversation template.") from None

        return await self._worker_fact(self._templates, address, model, fetch)

    async def context_length(self, address: str, model: str) -> int:
        return await self._worker_fact(self._context_lengths, address, model,
                                       lambda: self.client.model_details(address, model))

    # The rest of the worker protocol: views and the chat/completions/embeddings modules call these,
    # never self.client, so what reaches a worker goes through one place.

    async def count_tokens(self, address: str, model: str, prompt: str) -> int:
        """The worker's token count for `prompt` (its /count_token)."""
        return await self.client.count_tokens(address, model, prompt)

    async def embeddings(self, address: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One worker embeddings call ({"model", "input": [str, ...], "encoding_format"})."""
        return await self.client.embeddings(address, payload)

    async def open_stream(self, address: str, params: dict[str, Any]) -> WorkerStream:
        """A worker generation stream (its response headers received)."""
        return await self.client.open_stream(address, params)

    async def ping_controller(self) -> None:
        """Raises Unreachable if the controller does not answer."""
        await self.client.ping_controller()

    async def _worker_fact(self, cache: dict[tuple[str, str], tuple[T, float]], address: str, model: str,
                           fetch: Callable[[], Awaitable[T]]) -> T:
        """A worker's answer about a model, trusted for WORKER_FACTS_TTL; fetched once for all
        the requests that need it at the same time."""
        key = (address, model)
        cached = cache.get(key)
        if cached is None or self.clock() - cached[1] > WORKER_FACTS_TTL:

            async def fetch_and_store() -> tuple[T, float]:
                cache[key] = (await fetch(), self.clock())
                return cache[key]

            cached = await self._flights.run((id(cache), key), fetch_and_store)
        return cached[0]

    async def worker_address(self, model: str, fresh: bool = False) -> str:
        """A worker for `model`: from the controller, or, when GATEWAY_WORKER_ADDRESS_TTL > 0,
        from the pool of addresses it handed out in the last TTL seconds (one controller round
        trip saved per request; the pool is renewed with several answers to keep load spread)."""
        if self.address_ttl <= 0 or fresh:
            return await self.client.get_worker_address(model)
        pool = self._address_pools.get(model)
        if pool is None or self.clock() - pool.fetched_at > self.address_ttl:
            pool = await self._flights.run(("addresses", model), lambda: self._fetch_pool(model))
        return pool.next()

    async def _fetch_pool(self, model: str) -> AddressPool:
        addresses = [await self.client.get_worker_address(model) for _ in range(DISCOVERY_CALLS)]
        pool = self._address_pools[model] = AddressPool(list(dict.fromkeys(addresses)), self.clock())
        return pool

    def forget_worker(self, address: str) -> None:
        """Drop what is cached about a worker that stopped answering."""
        for cache in (self._templates, self._context_lengths):
            for key in [key for key in cache if key[0] == address]:
                del cache[key]
        for model, pool in list(self._address_pools.items()):
            if address in pool.addresses:
                del self._address_pools[model]

    async def on_worker(self, model: str, action: Callable[[str], Awaitable[T]]) -> T:
        """Run `action(worker_address)`, asking the controller again if the worker is gone.

        A killed worker stays listed by the controller for up to 90 s, so a refused
        connection is retried a bounded number of times, then answered with 503.
        """
        address = ""
        for attempt in range(self.worker_retries):
            address = await self.worker_address(model, fresh=attempt > 0)
            try:
                return await action(address)
            except WorkerGone:
                self.forget_worker(address)
        raise Unreachable(f"No worker for model {model!r} could be reached. Please retry later.",
                          code="worker_unreachable", fastchat_code=NO_WORKER, log_detail=address)
