"""The router: the one interface the face talks to (models, chat, completions, embeddings, each
streamed or not, and FastChat's extras).

A public model name becomes routes (an upstream and the model's name there, upstreams/base.py's
Route); a call that needs a capability none of its routes has is refused (CapabilityMissing, a
400 naming the parameter); otherwise one route's adapter answers. With no upstream registered
(zero configuration), CONTROLLER_ADDRESS is the one FastChat upstream and every model its
controller lists is a route to it, so a bare deployment behaves as it did before the registry.

With upstreams registered, the routes of a model are chosen, failed over and kept healthy by
upstreams/routing.py's Dispatcher (tiers, weights, caps, breakers, failover before the first byte;
docs/routing.md). The chosen route is reported to the caller's observer (the face's
RequestContext), which puts the upstream and route on the request's usage row and metrics.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core.signals import setting_changed

from gateway_project import state
from upstreams import registry, routing
from upstreams.adapters import adapter_for
from upstreams.base import FASTCHAT, Answer, Observer, Route, Stream
from upstreams.calls import ChatCall, CompletionsCall, EmbeddingsCall, TokenCheckItem
from upstreams.errors import ModelUnknown, NoRoute, UpstreamFailure
from upstreams.fastchat.adapter import CAPABILITIES as FASTCHAT_CAPABILITIES
from upstreams.health import Health, get_health


class Router:
    """One per process (gateway_project/state.py: "upstream_router")."""

    def __init__(self, snapshot=registry.asnapshot, adapters=adapter_for):
        self._snapshot = snapshot
        self._adapter_for = adapters
        self._zero: tuple[int, Any] = (-1, None)
        self._known: tuple[Any, list[str]] = (None, [])
        self._dispatcher: routing.Dispatcher | None = None

    # Models

    async def models(self) -> list[str]:
        """The public models, sorted: those with a route to an upstream in rotation (enabled, not
        cooling down, credentials not rejected), or the controller's list."""
        snapshot = await self._snapshot()
        if snapshot.configured:
            usable = self.health().in_rotation
            return [name for name, routes in snapshot.routes.items()
                    if any(usable(route.upstream) for route in routes)]
        return await self._zero_adapter().models()

    def known_models(self) -> list[str]:
        """The public models as last seen, without asking anyone (metrics labels)."""
        snapshot = registry.snapshot()
        if snapshot.configured:
            if snapshot is not self._known[0]:  # the same list object while nothing changed
                self._known = (snapshot, snapshot.public_models())
            return self._known[1]
        return self._zero_adapter().known_models

    async def has_model(self, model: str) -> bool:
        """Whether any upstream serves `model`; for the controller's list, an unknown name
        refreshes it once."""
        snapshot = await self._snapshot()
        if snapshot.configured:
            return bool(snapshot.serving(model))
        return await self._zero_adapter().has_model(model)

    async def routes(self, public_model: str, call: Any = None) -> Sequence[Route]:
        """`public_model`'s routes that can serve `call` (all of them without a call);
        CapabilityMissing when routes exist but none has what the call needs, ModelUnknown when
        there is none."""
        return self._routes(await self._snapshot(), public_model, call)

    def _routes(self, snapshot: Any, public_model: str, call: Any = None) -> Sequence[Route]:
        if snapshot.configured:
            routes = snapshot.routes.get(public_model, ())
        else:
            spec = self._zero_spec()
            routes = [Route(spec.name, FASTCHAT, public_model, public_model, capabilities=FASTCHAT_CAPABILITIES,
                            spec=spec)]
        if not routes:
            raise ModelUnknown(f"The model '{public_model}' does not exist", param="model")
        return routing.capable(routes, call) if call is not None else routes

    async def check(self, call: ChatCall | CompletionsCall | EmbeddingsCall) -> None:
        """Refuse `call` now if no route of its model can serve it (before limits are taken)."""
        await self.routes(call.public_model, call)

    # Calls: an Answer, or a primed Stream when the call streams

    async def chat(self, call: ChatCall, observer: Observer | None = None) -> Answer | Stream:
        if call.stream:
            return await self._run(call, observer, lambda adapter, route: adapter.chat_stream(call, route))
        return await self._run(call, observer, lambda adapter, route: adapter.chat(call, route, observer))

    async def completions(self, call: CompletionsCall, observer: Observer | None = None) -> Answer | Stream:
        if call.stream:
            return await self._run(call, observer, lambda adapter, route: adapter.completions_stream(call, route))
        return await self._run(call, observer, lambda adapter, route: adapter.completions(call, route, observer))

    async def embeddings(self, call: EmbeddingsCall, observer: Observer | None = None) -> Answer:
        return await self._run(call, observer, lambda adapter, route: adapter.embeddings(call, route, observer))

    async def token_check(self, item: TokenCheckItem) -> dict[str, Any]:
        """FastChat's /api/v1/token_check for one prompt, on a FastChat route of its model."""
        routes = [route for route in await self.routes(item.public_model) if route.kind == FASTCHAT]
        if not routes:
            raise NoRoute(f"No FastChat upstream serves model {item.public_model!r}.")
        route = routes[0]
        return await self._adapter_for(route.spec).token_check(item, route)

    async def ready(self) -> dict[str, str]:
        """Readiness of the upstreams: name -> "ok" or "error: ..." (zero configuration: the
        controller, as "controller")."""
        snapshot = await self._snapshot()
        if snapshot.configured:
            health = self.health()
            health.ensure_started()
            if any(health.in_rotation(spec.name) for spec in snapshot.upstreams):
                return {"upstreams": "ok"}
            return {"upstreams": "error: no upstream in rotation"}
        try:
            await self._zero_adapter().ping()
            return {"controller": "ok"}
        except UpstreamFailure as exc:
            return {"controller": f"error: {exc.message}"}

    def upstream_states(self) -> dict[str, dict[str, Any]]:
        """Each registered enabled upstream's health (for /health/ready's insiders only: errors may
        name internal addresses). Never an upstream's key."""
        snapshot = registry.snapshot()
        if not snapshot.configured:
            return {}
        states = {}
        for spec in snapshot.upstreams:
            found = self.health().state_of(spec.name, enabled=True)
            error = found.last_error
            if spec.api_key and len(spec.api_key) >= 4:
                error = error.replace(spec.api_key, "…" + spec.api_key[-4:])
            states[spec.name] = {
                "state": found.state, "latency_ms": found.latency_ms, "last_error": error,
                "checked_at": found.checked_at.isoformat() if found.checked_at else None,
            }
        return states

    def health(self) -> Health:
        return get_health()

    # Plumbing

    def _zero_spec(self) -> Any:
        """registry.zero_config_upstream(), made again only after a settings change (tests
        override them), so that adapters.adapter_for() finds the same spec object and a request
        reads no setting."""
        if self._zero[0] != _settings_epoch[0]:
            self._zero = (_settings_epoch[0], registry.zero_config_upstream())
        return self._zero[1]

    def _zero_adapter(self) -> Any:
        return self._adapter_for(self._zero_spec())

    async def _run(self, call: Any, observer: Observer | None, attempt) -> Any:
        snapshot = await self._snapshot()
        routes = self._routes(snapshot, call.public_model, call)
        if not snapshot.configured:
            route = routes[0]
            # Zero configuration: one FastChat upstream with nothing to fail over to (its adapter
            # retries another worker through the controller itself). The direct call keeps the
            # FastChat path exactly as fast as before the router.
            if observer is not None:
                observer.on_route(route)
            result = await attempt(self._adapter_for(route.spec), route)
            result.route = route
            return result

        async def on_route(route: Route) -> Any:
            return await attempt(self._adapter_for(route.spec), route)

        dispatcher = self.dispatcher()
        if call.stream:
            return await dispatcher.stream(routes, call, on_route, observer)
        return await dispatcher.answer(routes, call, on_route, observer)

    def dispatcher(self) -> routing.Dispatcher:
        """Built on first use (from the settings of that moment), with the process's health."""
        health = self.health()
        if self._dispatcher is None or self._dispatcher.health is not health:
            self._dispatcher = routing.Dispatcher(health, policy=routing.RoutingPolicy.from_settings())
        return self._dispatcher


# Bumped by every settings change (only tests change settings in a running process).
_settings_epoch = [0]


def _on_setting_changed(**kwargs: Any) -> None:
    _settings_epoch[0] += 1


setting_changed.connect(_on_setting_changed)


def get_router() -> Router:
    """The process's router (gateway_project/state.py)."""
    return state.get("upstream_router")


def register_process_state() -> None:
    """The router and the adapters as process-wide parts; the adapters' pooled transport too
    (a test may install a fake: state.reset(transport=...))."""
    from upstreams import transport

    state.provide("upstream_router", Router)
    state.provide("adapters", dict)
    state.provide("transport", lambda: None, clear=lambda _: transport.reset_http_client(),
                  replace=transport.reset_http_client)
