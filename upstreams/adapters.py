"""One adapter per upstream, built on first use and cached per process (gateway_project/state.py).

An adapter keeps its upstream's caches (model list, templates, worker addresses), so it lives as
long as its spec: a changed spec (new address, key, timeouts) gets a new adapter.
"""
from __future__ import annotations

from typing import Any

from gateway_project import state
from upstreams.base import FASTCHAT, OPENAI, Adapter


def build(spec: Any) -> Adapter:
    """A new adapter for `spec` (upstreams/registry.py's UpstreamSpec)."""
    if spec.kind == FASTCHAT:
        from upstreams.fastchat.adapter import FastChatAdapter

        return FastChatAdapter.from_spec(spec)
    if spec.kind == OPENAI:
        from upstreams.openai.adapter import OpenAIAdapter

        return OpenAIAdapter.from_spec(spec)
    raise ValueError(f"No adapter for upstream kind {spec.kind!r}.")


def adapter_for(spec: Any) -> Adapter:
    """The process's adapter for `spec` (rebuilt when the spec changes)."""
    cache: dict[str, tuple[Any, Adapter]] = state.get("adapters")
    cached = cache.get(spec.name)
    if cached is None or (cached[0] is not spec and cached[0] != spec):
        cached = cache[spec.name] = (spec, build(spec))
    return cached[1]


def reset_adapters() -> None:
    """Forget every adapter and its caches, and the router that found them (tests, settings
    changes): rebuilt from the settings on next use."""
    state.forget("adapters")
    state.forget("upstream_router")
