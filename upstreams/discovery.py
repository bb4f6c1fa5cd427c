"""Discovery: ask an upstream which models it serves and record them as discovered UpstreamModel rows.

Rules (docs in the README's "Upstreams" section):
- a model the upstream lists gets a row with public name = its upstream name, unless a row for that
  upstream name exists already (an alias or a hand-listed row): that row is kept, its public name
  untouched;
- capabilities and context length are taken from the upstream where it tells them, except on rows
  whose capabilities were set by hand (`capabilities_by_hand`), which discovery never changes;
- a discovered row whose model the upstream no longer lists is deleted, unless it was edited by
  hand (an alias, capabilities set by hand, or disabled), which stays as it is;
- at most MAX_DISCOVERED models per upstream; names that are no valid model names are skipped.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from upstreams.models import CAPABILITIES, Upstream, UpstreamModel, validate_model_name

logger = logging.getLogger(__name__)

MAX_DISCOVERED = 1000


def list_models(upstream: Upstream, adapter: Any = None) -> list:
    """The upstream's own model list (its adapter's list_models), asked now."""
    if adapter is None:
        from upstreams.adapters import adapter_for
        from upstreams.registry import readable_key, spec_of

        adapter = adapter_for(spec_of(upstream, readable_key(upstream)))
    from upstreams.transport import call_from_sync

    return call_from_sync(adapter.list_models)


def discover(upstream: Upstream, *, adapter: Any = None, actor: Any = None) -> list[str]:
    """Ask `upstream` for its models and record them; returns what changed, one line each."""
    return record(upstream, list_models(upstream, adapter), actor=actor)


def record(upstream: Upstream, found: Iterable[Any], *, actor: Any = None) -> list[str]:
    """Make `upstream`'s discovered rows match `found` (upstreams.base.DiscoveredModel or alike)."""
    lines: list[str] = []
    listed: dict[str, Any] = {}
    for model in found:
        name = getattr(model, "name", None)
        try:
            validate_model_name(name)
        except ValidationError:
            lines.append(f"skipped a model of {upstream.name} whose name is no valid model name")
            continue
        if len(listed) >= MAX_DISCOVERED:
            lines.append(f"skipped models of {upstream.name} beyond the first {MAX_DISCOVERED}")
            break
        listed.setdefault(name, model)
    with transaction.atomic():
        rows = {row.upstream_name: row for row in UpstreamModel.objects.select_for_update().filter(upstream=upstream)}
        public_names = {row.public_name for row in rows.values()}
        for name, model in listed.items():
            capabilities = sorted(set(getattr(model, "capabilities", None) or ()) & set(CAPABILITIES))
            context_length = getattr(model, "context_length", None)
            row = rows.get(name)
            if row is None:
                if name in public_names:
                    lines.append(f"skipped {upstream.name}/{name}: another of its models has that public name")
                    continue
                row = UpstreamModel(upstream=upstream, public_name=name, upstream_name=name, discovered=True)
            if not row.capabilities_by_hand and capabilities:
                row.capabilities = capabilities
            if isinstance(context_length, int) and 0 < context_length < 2**31:
                row.context_length = context_length
            adding = row._state.adding
            changes = row.save_by(actor, "discovery")
            if adding:
                lines.append(f"discovered model {upstream.name}/{row.public_name}")
            elif changes:
                lines.append(f"updated model {upstream.name}/{row.public_name}: {describe(changes)}")
        for name, row in rows.items():
            if name in listed or not row.discovered:
                continue
            if row.public_name != row.upstream_name or row.capabilities_by_hand or not row.enabled:
                continue  # edited by hand: kept as it is
            row.delete_by(actor, "discovery")
            lines.append(f"removed model {upstream.name}/{row.public_name} (no longer listed by the upstream)")
    return lines


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{field} {old!r} → {new!r}" for field, (old, new) in changes.items())
