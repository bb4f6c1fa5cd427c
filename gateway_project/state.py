"""Process-wide state: what one gateway process builds once and shares between its requests.

The parts are registered by the apps that own them, in AppConfig.ready():

- openai_api/apps.py: the FastChat backend (model list, templates, context lengths, worker
  addresses), the pooled upstream transports (one per event loop), the key cache;
- keys/apps.py: the limit store (memory or Redis), the usage writer, the live view's watcher
  presence.

This module imports neither app, so keys/ reaches its parts without importing openai_api.
A part is built on first use, from the settings of that moment. `reset()` is the one call the
tests make between cases: a part built by its factory is forgotten (and rebuilt on next use),
a part that other modules hold by name is emptied in place, and a test may put its own object
in (a fake transport, a Redis limit store).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Part:
    """How to build a part, and, for an object held by name elsewhere, how to empty it or
    install a replacement without rebuilding it."""

    build: Callable[[], Any]
    clear: Callable[[Any], None] | None = None
    replace: Callable[[Any], None] | None = None


_parts: dict[str, Part] = {}
_built: dict[str, Any] = {}


def provide(name: str, build: Callable[[], Any], *, clear: Callable[[Any], None] | None = None,
            replace: Callable[[Any], None] | None = None) -> None:
    """Register (or re-register) a part; an app calls it from ready()."""
    _parts[name] = Part(build, clear, replace)


def get(name: str) -> Any:
    """The process's part `name`, built on first use."""
    try:
        return _built[name]
    except KeyError:
        value = _built[name] = _parts[name].build()
        return value


def reset(**replacements: Any) -> None:
    """Forget or empty every built part, then install `replacements` (part name -> object;
    None means "build it again from the settings")."""
    for name, part in _parts.items():
        if part.clear is None:
            _built.pop(name, None)
        else:
            part.clear(get(name))
    for name, value in replacements.items():
        put(name, value)


def put(name: str, value: Any) -> None:
    """Install `value` as the part `name` (None: build it again from the settings on next use)."""
    replace = _parts[name].replace
    if replace is not None:
        replace(value)
    elif value is None:
        _built.pop(name, None)
    else:
        _built[name] = value


def forget(name: str) -> None:
    """Forget one part built by its factory (a settings change): the next use rebuilds it."""
    _built.pop(name, None)
