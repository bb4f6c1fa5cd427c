"""What the face asks of an upstream: neutral, validated calls (docs: README "Architecture").

The face (openai_api/protocol.py) parses and bounds a client's request into one of these frozen
calls; the router and adapters only read them. Each call keeps the client's JSON body as received
(`body`, for adapters that pass it through with only `model` rewritten) beside the parsed fields
(for adapters that translate, such as FastChat's), and `needs`: the capabilities the request uses,
which the router matches against its routes (a route without one is never chosen for it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

# Capabilities a request may need and a route may have.
TOOLS = "tools"                # tools, tool_choice, functions, function_call, tool/function messages
JSON_SCHEMA = "json_schema"    # response_format {"type": "json_schema"}
JSON_MODE = "json_mode"        # response_format {"type": "json_object"}
VISION = "vision"              # image_url content parts
EMBEDDINGS = "embeddings"      # /v1/embeddings
CAPABILITIES = frozenset({TOOLS, JSON_SCHEMA, JSON_MODE, VISION, EMBEDDINGS})


@dataclass(frozen=True)
class Need:
    """A capability a request uses and the parameter that asked for it (named in the 400 when no
    route has the capability)."""

    capability: str
    param: str
    message: str


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters shared by chat and completions."""

    temperature: float
    top_p: float
    top_k: int
    n: int
    max_tokens: int | None
    stop: list[str]
    presence_penalty: float
    frequency_penalty: float
    seed: int | None
    stream: bool
    include_usage: bool  # the client asked for stream usage (stream_options.include_usage)


class SampledCall:
    """What a generating call (chat, completions) tells from its sampling parameters."""

    sampling: Sampling

    @property
    def stream(self) -> bool:
        return self.sampling.stream

    @property
    def include_usage(self) -> bool:
        return self.sampling.include_usage


@dataclass(frozen=True)
class ChatCall(SampledCall):
    endpoint: ClassVar[str] = "chat"
    public_model: str
    messages: str | list[dict[str, Any]]
    sampling: Sampling
    user: str | None
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    needs: frozenset[str] = frozenset()
    asked: tuple[Need, ...] = ()  # which parameter asked for each need, for the 400
    repetition_penalty: float | None = None  # FastChat's /api/v1/chat/completions only


@dataclass(frozen=True)
class CompletionsCall(SampledCall):
    endpoint: ClassVar[str] = "completions"
    public_model: str
    prompts: list[str]  # token-id prompts are decoded by the face (openai_api/tokens.py)
    sampling: Sampling
    echo: bool
    logprobs: int | None
    best_of: int | None
    use_beam_search: bool
    user: str | None
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    needs: frozenset[str] = frozenset()
    asked: tuple[Need, ...] = ()  # which parameter asked for each need, for the 400


@dataclass(frozen=True)
class EmbeddingsCall:
    endpoint: ClassVar[str] = "embeddings"
    stream: ClassVar[bool] = False
    include_usage: ClassVar[bool] = False
    public_model: str
    inputs: list[str]
    encoding_format: str | None
    user: str | None
    body: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    needs: frozenset[str] = frozenset()
    asked: tuple[Need, ...] = ()  # which parameter asked for each need, for the 400


@dataclass(frozen=True)
class TokenCheckItem:
    """One prompt of FastChat's /api/v1/token_check (FastChat routes only)."""

    public_model: str
    prompt: str
    max_tokens: int


Call = ChatCall | CompletionsCall | EmbeddingsCall


def first_unmet(call: Call, capabilities: frozenset[str]) -> Need | None:
    """The first need of `call` that `capabilities` lack (in the order the parser found them)."""
    for need in call.asked:
        if need.capability not in capabilities:
            return need
    for capability in sorted(call.needs - capabilities):
        return Need(capability, "model", f"The model does not support {capability}.")
    return None
