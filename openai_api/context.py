"""Per-request bookkeeping that outlives the view: who asked, what it cost, how it ended."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from upstreams.usage import Usage, token_count

logger = logging.getLogger(__name__)

Hook = Callable[["RequestContext"], None]


@dataclass
class RequestContext:
    """Filled in as a request runs; finished once, when its response (or stream) ends."""

    request_id: str
    endpoint: str
    key: Any = None
    model: str = ""
    streamed: bool = False
    status: int = 200
    error_code: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_estimated: bool = False  # the upstream reported no usage: the adapter counted
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    lease: Any = None
    # Gives the key's limit lease back (accounting.admit sets it): runs before every other hook,
    # so that nothing another hook does can keep a parallel slot taken.
    release_lease: Hook | None = None
    # The controller or worker address of an upstream failure, for the access log only.
    upstream_url: str = ""
    # The upstream and the route (upstreams/base.py's Route) the router chose, if any.
    upstream: str = ""
    route: Any = None
    # A streamed response's closer (streaming.py): runs its end if the server never did.
    close_stream: Callable[[], Any] | None = None
    finished: bool = False
    on_finish: list[Hook] = field(default_factory=list)

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def add_usage(self, usage: Usage | dict[str, Any]) -> None:
        """Record the request's tokens; a count that is not a plausible token count is 0."""
        if isinstance(usage, Usage):
            self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens
            self.tokens_estimated = usage.estimated
            return
        self.prompt_tokens = token_count(usage.get("prompt_tokens", 0)) or 0
        self.completion_tokens = token_count(usage.get("completion_tokens", 0)) or 0

    # The router's observer (upstreams/base.py)

    def on_route(self, route: Any) -> None:
        self.route, self.upstream = route, route.upstream

    def on_usage(self, usage: Usage) -> None:
        self.add_usage(usage)

    @property
    def route_name(self) -> str:
        """The model's name at the upstream that served it (an alias's target), "" if none."""
        route = self.route
        if route is None:
            return ""
        return route if isinstance(route, str) else getattr(route, "upstream_model", "") or ""

    @property
    def latency_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    @property
    def ttft_ms(self) -> int | None:
        if self.first_token_at is None:
            return None
        return int((self.first_token_at - self.started) * 1000)

    def finish(self, status: int | None = None, error_code: str | None = None) -> None:
        """Run the finish hooks exactly once: the lease release first, then usage, metrics and
        the access log. Each hook runs even if another raised (its failure is logged)."""
        if self.finished:
            return
        self.finished = True
        if status is not None:
            self.status = status
        if error_code is not None:
            self.error_code = error_code
        if self.release_lease is not None:
            self._run(self.release_lease)
        for hook in self.on_finish:
            self._run(hook)

    def _run(self, hook: Hook) -> None:
        try:
            hook(self)
        except Exception:
            logger.exception("Finish hook %s failed (request %s)", getattr(hook, "__qualname__", hook), self.request_id)
