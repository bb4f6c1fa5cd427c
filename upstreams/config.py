"""Configuration as code: `manage.py upstreams apply FILE` makes the registry match a YAML or JSON file.

    upstreams:
      - name: vllm-a                      # slug, unique
        kind: openai                      # or fastchat (base_url = the controller address)
        base_url: http://10.0.0.5:8000/v1
        api_key_env: VLLM_A_KEY           # the key is read from this environment variable, never inline
        priority: 10                      # larger is preferred; default 0
        weight: 3                         # share within its priority; default 1
        connect_timeout: 5                # seconds; also first_byte_timeout, idle_timeout
        max_concurrency: 32
        extra_headers: {X-Team: research}
        discover_models: false
        enabled: true
        models:
          - public_name: llama-3-8b
            upstream_name: meta-llama/Meta-Llama-3-8B-Instruct
            capabilities: [tools, json_schema]
          - qwen2.5:7b                    # same name on both sides

What "match" means:
- every field the file leaves out takes its default (so deleting a line resets it);
- an upstream without `api_key_env` has no key; the variable must be set where `apply` runs (the
  key is stored encrypted; the gateway processes do not need the variable);
- models listed are hand-listed rows; rows of a listed upstream that the file does not list are
  deleted, except discovered ones (discovery keeps those up to date); `capabilities` left out are
  left to discovery;
- upstreams the file does not list are disabled (kept, with their history), or deleted with
  `--prune`.
The whole file is applied in one transaction, or nothing is (any error names the upstream and field).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from django.core.exceptions import ValidationError
from django.db import transaction

from upstreams.discovery import describe
from upstreams.models import Upstream, UpstreamModel

MAX_FILE_BYTES = 1024 * 1024
MAX_UPSTREAMS = 1000
MAX_MODELS = 1000
UPSTREAM_FIELDS = ("kind", "base_url", "enabled", "priority", "weight", "connect_timeout", "first_byte_timeout",
                   "idle_timeout", "max_concurrency", "extra_headers", "discover_models")
UPSTREAM_KEYS = frozenset({"name", "api_key_env", "models", *UPSTREAM_FIELDS})
MODEL_KEYS = frozenset({"public_name", "upstream_name", "capabilities", "context_length", "enabled"})
SECRET_KEYS = frozenset({"api_key", "key", "token", "secret", "password", "authorization"})


class ConfigError(Exception):
    """The file cannot be applied (nothing was changed)."""


def read(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or JSON file (JSON is YAML, but its errors read better from json)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("upstreams"), list):
        raise ConfigError('the file must be an object with a list "upstreams"')
    return data


def apply(data: Mapping[str, Any], *, prune: bool = False, dry_run: bool = False,
          environ: Mapping[str, str] | None = None, actor: Any = None) -> list[str]:
    """Make the registry match `data`; returns what changed, one line each ([] when nothing did)."""
    environ = os.environ if environ is None else environ
    entries = data.get("upstreams")
    if not isinstance(entries, list) or len(entries) > MAX_UPSTREAMS:
        raise ConfigError(f'"upstreams" must be a list of at most {MAX_UPSTREAMS} upstreams')
    unknown_top = set(data) - {"upstreams"}
    if unknown_top:
        raise ConfigError(f"unknown top-level keys: {', '.join(sorted(map(str, unknown_top)))}")
    lines: list[str] = []
    with transaction.atomic():
        seen: set[str] = set()
        for index, entry in enumerate(entries):
            name = _check_entry(entry, index)
            if name in seen:
                raise ConfigError(f"upstream {name} is listed twice")
            seen.add(name)
            lines += _apply_upstream(entry, environ, actor)
        for upstream in Upstream.objects.exclude(name__in=seen).order_by("name"):
            if prune:
                upstream.delete_by(actor, "config")
                lines.append(f"deleted upstream {upstream.name} (not in the file)")
            elif upstream.enabled:
                upstream.enabled = False
                upstream.save_by(actor, "config")
                lines.append(f"disabled upstream {upstream.name} (not in the file)")
        if dry_run:
            transaction.set_rollback(True)
    return lines


def _check_entry(entry: Any, index: int) -> str:
    if not isinstance(entry, dict):
        raise ConfigError(f"upstreams[{index}] must be an object")
    name = entry.get("name")
    where = f"upstream {name}" if isinstance(name, str) else f"upstreams[{index}]"
    secrets = SECRET_KEYS & set(map(str, entry))
    if secrets:
        raise ConfigError(f"{where}: keys are never written in the file; set api_key_env to the name of the "
                          f"environment variable that holds it (found {', '.join(sorted(secrets))})")
    unknown = set(map(str, entry)) - UPSTREAM_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: a name is required")
    for field in ("kind", "base_url"):
        if field not in entry:
            raise ConfigError(f"{where}: {field} is required")
    return name


def _apply_upstream(entry: dict[str, Any], environ: Mapping[str, str], actor: Any) -> list[str]:
    name = entry["name"]
    upstream = Upstream.objects.filter(name=name).first() or Upstream(name=name)
    defaults = {field.name: field.get_default() for field in Upstream._meta.get_fields()
                if field.name in UPSTREAM_FIELDS}
    for field in UPSTREAM_FIELDS:
        setattr(upstream, field, entry.get(field, defaults[field]))
    key_env = entry.get("api_key_env")
    if key_env is None:
        key = None
    elif not isinstance(key_env, str) or not key_env:
        raise ConfigError(f"upstream {name}: api_key_env must name an environment variable")
    else:
        key = environ.get(key_env)
        if not key:
            raise ConfigError(f"upstream {name}: the environment variable {key_env} is not set")
    adding = upstream._state.adding
    try:
        if not upstream.api_key_is(key):
            upstream.set_api_key(key)
        changes = upstream.save_by(actor, "config")
    except ValidationError as exc:
        raise ConfigError(f"upstream {name}: {_messages(exc)}") from None
    lines = []
    if adding:
        lines.append(f"created upstream {name}")
    elif changes:
        lines.append(f"updated upstream {name}: {describe(changes)}")
    return lines + _apply_models(upstream, entry.get("models", []), actor)


def _apply_models(upstream: Upstream, entries: Any, actor: Any) -> list[str]:
    where = f"upstream {upstream.name}"
    if not isinstance(entries, list) or len(entries) > MAX_MODELS:
        raise ConfigError(f"{where}: models must be a list of at most {MAX_MODELS}")
    rows = list(upstream.models.all())
    by_upstream_name = {row.upstream_name: row for row in rows}
    by_public_name = {row.public_name: row for row in rows}
    kept: set[int] = set()
    lines = []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"public_name": entry}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: models[{index}] must be a name or an object")
        unknown = set(map(str, entry)) - MODEL_KEYS
        if unknown:
            raise ConfigError(f"{where}: models[{index}]: unknown keys {', '.join(sorted(unknown))}")
        public = entry.get("public_name", entry.get("upstream_name"))
        private = entry.get("upstream_name", public)
        if public is None:
            raise ConfigError(f"{where}: models[{index}] needs a public_name or an upstream_name")
        row = by_upstream_name.get(private) or by_public_name.get(public)
        if row is None or row.pk in kept:
            row = UpstreamModel(upstream=upstream)
        row.public_name, row.upstream_name, row.discovered = public, private, False
        row.enabled = entry.get("enabled", True)
        if "capabilities" in entry:
            row.capabilities, row.capabilities_by_hand = entry["capabilities"], True
        else:
            row.capabilities_by_hand = False
        if "context_length" in entry:
            row.context_length = entry["context_length"]
        adding = row._state.adding
        try:
            changes = row.save_by(actor, "config")
        except ValidationError as exc:
            raise ConfigError(f"{where}: model {public}: {_messages(exc)}") from None
        kept.add(row.pk)
        if adding:
            lines.append(f"created model {upstream.name}/{public}")
        elif changes:
            lines.append(f"updated model {upstream.name}/{public}: {describe(changes)}")
    for row in rows:
        if row.pk not in kept and not row.discovered:
            row.delete_by(actor, "config")
            lines.append(f"deleted model {upstream.name}/{row.public_name} (not in the file)")
    return lines


def _messages(exc: ValidationError) -> str:
    if hasattr(exc, "message_dict"):
        return "; ".join(f"{field}: {' '.join(errors)}" for field, errors in exc.message_dict.items())
    return " ".join(exc.messages)
