"""Put the public model name into an upstream's JSON without re-serialising it.

OpenAI-compatible servers put `"model"` among the first keys of an answer or chunk (`id`,
`object`, `created`, `model`, then `choices`). The rewrite replaces the string value of the first
`"model"` key only when nothing before it can open a nested object or array, so it cannot touch
a nested `"model"`; anything else (a server that orders keys differently) is parsed and
re-serialised instead, which gives the same JSON.
"""
from __future__ import annotations

import re
from typing import Any

import orjson

# "model" : "<string value>" (a JSON string: escaped characters, no raw quote or backslash)
_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


def json_string(value: str) -> bytes:
    return orjson.dumps(value)


def rewrite_model(raw: bytes, model_json: bytes) -> bytes | None:
    """`raw` (one JSON object) with its top-level "model" set to `model_json` (an encoded JSON
    string), or None when the byte-level rewrite is not certain to hit the top-level key."""
    match = _MODEL.search(raw)
    if match is None:
        return None
    start = match.start()
    head = raw[1:start]
    if b"{" in head or b"[" in head or not raw.startswith(b"{"):
        return None
    return b"".join((raw[:start], b'"model":', model_json, raw[match.end():]))


def with_model(raw: bytes, data: Any, model: str, model_json: bytes) -> bytes:
    """`raw` with the public model name: byte-level where certain, else re-serialised from `data`
    (the parsed `raw`)."""
    rewritten = rewrite_model(raw, model_json)
    if rewritten is not None:
        return rewritten
    if isinstance(data, dict):
        data["model"] = model
    return orjson.dumps(data)
