"""The contract between the router and the adapters (one adapter per kind of upstream).

Adapters speak OpenAI at their boundary whatever the upstream speaks:

- a non-streamed call returns an `Answer`: OpenAI's response object with `model` set to the public
  name, and its checked `Usage`;
- a streamed call returns a `Stream`: an async iterator of BATCHES, each a non-empty list of `bytes`,
  each the JSON of ONE chunk (no SSE framing). A batch holds the chunks that one read from the
  upstream completed: the face sends them in one write, which is what a stream costs per read
  instead of per chunk, and nothing waits for a batch to fill. The stream is already PRIMED (the
  adapter returns only once the first batch arrived, so every failure before it is an exception
  the router may retry), with `aclose()` and a `usage` that follows the chunks. The final usage
  chunk is emitted only when `call.include_usage`. The face adds `data: ` framing and `[DONE]`,
  and turns an exception raised mid-stream into one error event (after the chunks read before it).

Failures are upstreams/errors.py exceptions. A non-streamed call also reports its tokens to the
`observer` the caller passes, however it ends (failed or abandoned calls are charged too).
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from upstreams.calls import ChatCall, CompletionsCall, EmbeddingsCall
from upstreams.usage import Usage

FASTCHAT = "fastchat"
OPENAI = "openai"


@dataclass(frozen=True)
class Route:
    """A public model served by one upstream under `upstream_model` (its name there)."""

    upstream: str
    kind: str
    public_model: str
    upstream_model: str
    priority: int = 0
    weight: int = 1
    capabilities: frozenset[str] = frozenset()
    max_concurrency: int | None = None
    # The upstream's spec (upstreams/registry.py's UpstreamSpec), for adapters.adapter_for().
    spec: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class DiscoveredModel:
    """A model an upstream lists, with what it tells of it."""

    name: str
    capabilities: frozenset[str] = frozenset()
    context_length: int | None = None


@dataclass(frozen=True)
class Probe:
    """One health check's result. `failure`: "credentials" | "unreachable" | "bad_answer" | None."""

    ok: bool
    latency_ms: float
    failure: str | None = None
    message: str = ""


@dataclass
class Answer:
    """A non-streamed call's OpenAI response object and its usage; `route` is set by the router."""

    body: dict[str, Any]
    usage: Usage
    route: Route | None = None


class Stream(Protocol):
    """A primed stream of batches of chunk JSON bytes (see the module's docstring)."""

    usage: Usage
    route: Route | None

    def __aiter__(self) -> AsyncIterator[list[bytes]]: ...

    async def aclose(self) -> None: ...



class Observer(Protocol):
    """What a caller may want to hear while a call runs (the face's RequestContext implements it)."""

    def on_route(self, route: Route) -> None:
        """The route chosen (again on each retry)."""

    def on_usage(self, usage: Usage) -> None:
        """The tokens produced so far, when a non-streamed call ends, however it ends."""


class Adapter(Protocol):
    kind: str

    async def list_models(self) -> list[DiscoveredModel]: ...

    async def chat(self, call: ChatCall, route: Route, observer: Observer | None = None) -> Answer: ...

    async def chat_stream(self, call: ChatCall, route: Route) -> Stream: ...

    async def completions(self, call: CompletionsCall, route: Route, observer: Observer | None = None) -> Answer: ...

    async def completions_stream(self, call: CompletionsCall, route: Route) -> Stream: ...

    async def embeddings(self, call: EmbeddingsCall, route: Route, observer: Observer | None = None) -> Answer: ...

    async def probe(self) -> Probe: ...
