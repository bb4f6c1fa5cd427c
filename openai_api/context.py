"""Per-request bookkeeping that outlives the view: who asked, what it cost, how it ended."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


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
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    lease: Any = None
    finished: bool = False
    on_finish: list[Callable[[RequestContext], None]] = field(default_factory=list)

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def add_usage(self, usage: dict[str, int]) -> None:
        self.prompt_tokens = usage.get("prompt_tokens", 0)
        self.completion_tokens = usage.get("completion_tokens", 0)

    @property
    def latency_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    @property
    def ttft_ms(self) -> int | None:
        if self.first_token_at is None:
            return None
        return int((self.first_token_at - self.started) * 1000)

    def finish(self, status: int | None = None, error_code: str | None = None) -> None:
        """Run the finish hooks exactly once (usage records, limit releases)."""
        if self.finished:
            return
        self.finished = True
        if status is not None:
            self.status = status
        if error_code is not None:
            self.error_code = error_code
        for hook in self.on_finish:
            hook(self)
