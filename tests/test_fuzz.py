"""Property-based fuzzing of the OpenAI routes through the production ASGI application.

Requests come from the OpenAPI description the gateway serves (openai_api/openapi.py): bodies
valid under it, the same bodies with one field swapped for something hostile (huge or
non-finite numbers, wrong types, deep nesting, unicode, NUL, long strings) or a required field
dropped, and raw bodies no JSON parser should like. They go, with a valid key, through
gateway_project.asgi.application to the in-process fake FastChat (tests/fakes.py). Every
answer must be a non-500 with an OpenAI-shaped JSON error (checked against the description's
Error schema) or a success matching its schema; a body valid under the description must not
be refused as invalid; no ERROR log or traceback may appear; and every request's usage row
must be written (on PostgreSQL too, under `python -m tests.services`).

FUZZ_EXAMPLES sets the number of examples per endpoint group (default 2,000 in all; the run in
docs/reliability.md used more).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.parse
from collections import Counter
from typing import Any

import jsonschema
import pytest
from asgiref.testing import ApplicationCommunicator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_project.asgi import application
from keys.limits import reset_limit_store
from keys.models import APIKey, UsageRecord
from keys.usage import usage_writer
from openai_api.auth import key_cache
from openai_api.openapi import document
from tests.fakes import CONTROLLER, FakeFastChat
from upstreams.adapters import reset_adapters
from upstreams.transport import reset_http_client

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
MODELS = ["m1", "embed"]
POSTS = {
    "/v1/chat/completions": "ChatCompletionRequest",
    "/api/v1/chat/completions": "FastChatChatCompletionRequest",
    "/v1/completions": "CompletionRequest",
    "/v1/embeddings": "EmbeddingsRequest",
    "/v1/engines/m1/embeddings": "EmbeddingsRequest",
    "/api/v1/token_check": "TokenCheckRequest",
}
SUCCESS = {
    "/v1/chat/completions": "ChatCompletion", "/api/v1/chat/completions": "ChatCompletion",
    "/v1/completions": "Completion", "/v1/embeddings": "Embeddings", "/v1/engines/m1/embeddings": "Embeddings",
    "/api/v1/token_check": "TokenCheckResponse", "/v1/models": "ModelList",
}
# Small sizes keep each example cheap; the bounds themselves are probed by the hostile values.
MAX_ITEMS, MAX_CHARS = 3, 24


# From the description to strategies ---------------------------------------------------------


def resolve(schema: dict, components: dict) -> dict:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def from_schema(schema: dict, components: dict, name: str = "") -> st.SearchStrategy:
    """Values valid under a schema (the subset openapi.py uses), small."""
    schema = resolve(schema, components)
    if "allOf" in schema:
        merged: dict = {"type": "object", "properties": {}, "required": []}
        for part in [*schema["allOf"], {k: v for k, v in schema.items() if k != "allOf"}]:
            part = resolve(part, components)
            merged["properties"].update(part.get("properties", {}))
            merged["required"] += part.get("required", [])
        return from_schema(merged, components, name)
    if "anyOf" in schema:
        return st.one_of([from_schema(option, components, name) for option in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "string":
        if name == "model":
            return st.sampled_from(MODELS)
        alphabet = st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"])
        return st.text(alphabet, min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", MAX_CHARS), MAX_CHARS))
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {"type": "null"}), components), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", MAX_ITEMS), MAX_ITEMS))
    if kind == "object":
        properties = schema.get("properties", {})
        required = {key: from_schema(properties[key], components, key) for key in schema.get("required", [])}
        optional = {key: from_schema(value, components, key) for key, value in properties.items() if key not in required}
        return st.fixed_dictionaries(required, optional=optional)
    raise AssertionError(f"openapi.py uses a schema the fuzzer cannot generate: {schema}")


def hostile_values() -> st.SearchStrategy:
    """What an attacker puts in a field."""
    scalars = st.one_of(
        st.integers(), st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30, -1, 0]),
        st.floats(), st.sampled_from([1e20, 1e308, -1e308, 5e-324, -0.0]),
        st.text(), st.text(st.characters(codec="utf-8"), max_size=50),
        st.sampled_from(["\x00", "m1\x00", "\u202e", "\ud7ff" * 3, "=HYPERLINK(\"x\")", "a" * 5000, ""]),
        st.booleans(), st.none(),
    )
    nested = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                          | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20)
    deep = st.integers(20, 200).map(lambda depth: json.loads("[" * depth + "]" * depth))
    return st.one_of(nested, deep)


def encode(body: Any) -> bytes:
    """JSON as a client could send it: NaN and Infinity are written the way Python writes them."""
    return json.dumps(body, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def post_request(draw) -> tuple[str, bytes, bool]:
    """(path, body, valid under the description)."""
    doc = document()
    components = doc["components"]["schemas"]
    path = draw(st.sampled_from(sorted(POSTS)))
    schema = components[POSTS[path]]
    body = draw(from_schema(schema, components))
    if path.startswith("/v1/embeddings"):
        body.setdefault("model", draw(st.sampled_from(MODELS)))
    mutation = draw(st.sampled_from(["none", "swap", "swap", "drop", "add", "raw"]))
    if mutation == "none":
        return path, encode(body), True
    if mutation == "swap" and body:
        body[draw(st.sampled_from(sorted(body)))] = draw(hostile_values())
    elif mutation == "drop" and body:
        del body[draw(st.sampled_from(sorted(body)))]
    elif mutation == "add":
        body[draw(st.text(max_size=10))] = draw(hostile_values())
    elif mutation == "raw":
        return path, draw(raw_bodies()), False
    return path, encode(body), False


def raw_bodies() -> st.SearchStrategy[bytes]:
    broken = [
        b"", b"null", b"[]", b"NaN", b'{"model": NaN}', b'{"model": "m1", "messages": "hi", "n": Infinity}',
        b'{"model": "m1", "messages": "hi", "n": 1e999}', b'{"model": "m1", "messages": "hi", "seed": 1e20}',
        b'{"model": "m1", "prompt": "hi", "max_tokens": 99999999999999999999999}', b"\x00", b"\xff\xfe{",
        b'{"model": "m1", "messages": "\\ud800"}', b'{"model": "m1\\u0000", "messages": "hi"}',
        b"[" * 100_000, b'{"a":' * 5_000, b'{"model": "m1", "messages": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
        b'{"model": "m1", "prompt": [' + b"0," * 50_000 + b"0]}", b'{"model": "m1", "messages": "hi"',
    ]
    return st.one_of(st.sampled_from(broken), st.binary(max_size=64),
                     st.text(max_size=64).map(lambda text: ("{" + text).encode("utf-8", "surrogatepass")))


@st.composite
def other_request(draw) -> tuple[str, str, bytes]:
    """GETs (models, a model by a hostile id) and wrong methods: (method, path, body)."""
    model_id = draw(st.one_of(st.sampled_from(MODELS), st.text(min_size=1, max_size=30)))
    path = draw(st.sampled_from(["/v1/models", "/v1/models/" + urllib.parse.quote(model_id, safe=""),
                                 "/v1/openapi.json", *sorted(POSTS)]))
    method = draw(st.sampled_from(["GET", "GET", "PUT", "DELETE", "PATCH", "POST"]))
    return method, path, b"{}" if method != "GET" else b""


# Through the application ----------------------------------------------------------------------


async def call(method: str, path: str, body: bytes, key: str) -> tuple[int, dict[str, str], bytes]:
    decoded = urllib.parse.unquote(path, errors="surrogateescape")
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": decoded, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "server": ("testserver", 80), "client": ("10.0.0.1", 5000),
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }
    if key:
        scope["headers"].append((b"authorization", f"Bearer {key}".encode()))
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": body})
    start = await communicator.receive_output(timeout=20)
    chunks = []
    while True:
        message = await communicator.receive_output(timeout=20)
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    await communicator.wait(timeout=5)
    headers = {name.decode().lower(): value.decode() for name, value in start["headers"]}
    return start["status"], headers, b"".join(chunks)


class AccessRecorder(logging.Handler):
    """Counts the access-log lines of requests made with a key (each must have its usage row)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.keyed = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.keyed += json.loads(record.getMessage()).get("key") is not None


class LogRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def problems(self, since: int = 0) -> list[str]:
        return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in self.records[since:]
                if r.levelno >= logging.ERROR or r.exc_info]


class Fuzz:
    """The running state: the key, one event loop, the validators, the counts."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.loop = asyncio.new_event_loop()
        self.components = document()["components"]["schemas"]
        self.statuses: Counter[str] = Counter()
        self.keyed_requests = 0

    def validator(self, name: str) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                                "components": {"schemas": self.components}})

    def send(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        status, headers, raw = self.loop.run_until_complete(call(method, path, body, self.key))
        self.statuses[f"{'/v1/models/{id}' if path.startswith('/v1/models/') else path} {status}"] += 1
        return status, headers, raw

    def check(self, path: str, status: int, headers: dict[str, str], raw: bytes) -> dict | None:
        """The answer's contract; returns the parsed JSON (None for a stream)."""
        assert status != 500 and status < 600, (status, raw[:500])
        if status == 200 and headers.get("content-type", "").startswith("text/event-stream"):
            assert raw.rstrip().endswith(b"data: [DONE]"), raw[-300:]
            return None
        assert headers.get("content-type") == "application/json", (status, headers, raw[:300])
        data = json.loads(raw)
        if status >= 400:
            self.validator("Error").validate(data)
        elif path in SUCCESS:
            self.validator(SUCCESS[path]).validate(data)
        return data


@pytest.fixture
def fuzz(settings, transactional_db):
    """The fake FastChat and a key committed where the application's own threads see it."""
    settings.CONTROLLER_ADDRESS = CONTROLLER
    settings.GATEWAY_WORKER_ADDRESS_TTL = 0
    fake = FakeFastChat()
    reset_adapters()
    reset_http_client(fake.transport())
    key_cache.clear()
    reset_limit_store()
    settings.GATEWAY_ACCESS_LOG = True
    usage_writer.pending.clear()
    key, plaintext = APIKey.objects.create_key("fuzz")
    recorder, access = LogRecorder(), AccessRecorder()
    logging.getLogger().addHandler(recorder)
    logging.getLogger("gateway.access").addHandler(access)
    state = Fuzz(plaintext)
    state.key_id, state.recorder, state.access = key.pk, recorder, access
    yield state
    logging.getLogger().removeHandler(recorder)
    logging.getLogger("gateway.access").removeHandler(access)
    state.loop.close()
    usage_writer.pending.clear()
    reset_limit_store()
    reset_http_client()
    reset_adapters()
    key_cache.clear()


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def refused_as_invalid(path: str, status: int, data: dict | None) -> bool:
    """A 400 for a body the description calls valid (context overflows and the cross-field
    rules the description states in words aside)."""
    if status != 400 or data is None:
        return False
    error = data["error"]
    if error["code"] == "context_length_exceeded" or "tiktoken" in error["message"]:
        return False  # token-id prompts need tiktoken's encoding files offline (README)
    return not (path.endswith("/completions") and error["param"] in ("n", "best_of"))


def test_generated_requests_get_no_500_and_only_openai_errors(fuzz):
    @fuzz_settings(EXAMPLES * 4 // 5)
    @given(post_request())
    def posts(request):
        path, body, valid = request
        logged = len(fuzz.recorder.records)
        status, headers, raw = fuzz.send("POST", path, body)
        fuzz.keyed_requests += 1
        data = fuzz.check(path, status, headers, raw)
        assert not (valid and refused_as_invalid(path, status, data)), (body[:500], data)
        assert not fuzz.recorder.problems(logged), fuzz.recorder.problems(logged)

    @fuzz_settings(EXAMPLES // 5)
    @given(other_request())
    def others(request):
        method, path, body = request
        logged = len(fuzz.recorder.records)
        status, headers, raw = fuzz.send(method, path, body)
        allowed = method == ("POST" if path in POSTS else "GET")
        fuzz.keyed_requests += allowed and path != "/v1/openapi.json"
        fuzz.check(path, status, headers, raw)
        assert not fuzz.recorder.problems(logged), fuzz.recorder.problems(logged)

    posts()
    others()
    # Every keyed request left a usage row, and they all reach the database (PostgreSQL refuses
    # what SQLite accepts: NUL characters, over-long strings, out-of-range integers).
    usage_writer.flush()
    rows = UsageRecord.objects.filter(key_id=fuzz.key_id).count()
    print(f"fuzz: {sum(fuzz.statuses.values())} requests, {fuzz.keyed_requests} with a key past the method "
          f"check, {fuzz.access.keyed} access lines with a key, {rows} usage rows; "
          f"answers: {dict(sorted(fuzz.statuses.items()))}")
    assert fuzz.access.keyed == fuzz.keyed_requests
    assert rows == fuzz.keyed_requests
    assert not fuzz.recorder.problems()


def test_the_description_is_served_without_a_key_and_is_valid(transactional_db):
    async def fetch() -> tuple[int, dict[str, str], bytes]:
        return await call("GET", "/v1/openapi.json", b"", key="")

    loop = asyncio.new_event_loop()
    try:
        status, headers, raw = loop.run_until_complete(fetch())
    finally:
        loop.close()
    assert status == 200, raw[:300]
    doc = json.loads(raw)
    assert doc["openapi"] == "3.1.0"
    assert set(doc["paths"]) >= {
        "/v1/models", "/v1/models/{model_id}", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
        "/v1/engines/{model}/embeddings", "/api/v1/token_check", "/api/v1/chat/completions",
    }
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    n = chat["n"]["anyOf"][0]
    assert (n["type"], n["minimum"], n["maximum"]) == ("integer", 1, 128)
    assert chat["seed"]["anyOf"][0]["maximum"] == 2**63 - 1
