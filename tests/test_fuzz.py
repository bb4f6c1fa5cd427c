"""Property-based fuzzing of the OpenAI routes through the production ASGI application.

Requests come from the OpenAPI description the gateway serves (openai_api/openapi.py): bodies
valid under it, the same bodies with one field swapped for something hostile (huge or
non-finite numbers, wrong types, deep nesting, unicode, NUL, long strings) or a required field
dropped, and raw bodies no JSON parser should like. They go, with a valid key, through
gateway_project.asgi.application to the in-process fake FastChat (tests/fakes.py). Every
answer must be a non-500 with an OpenAI-shaped JSON error (checked against the description's
Error schema) or a success matching its schema; a body valid under the description must not
be refused as invalid; no ERROR log or traceback may appear; and every request's usage row
must be written (on PostgreSQL too, under `python -m tests.services`). A chat or completions
stream ends with `data: [DONE]`; a Responses stream has no `[DONE]`, strictly increasing
sequence numbers and exactly one closing event (response.completed, .incomplete or .failed), last.

The Responses API's stored responses are fuzzed too: a few are created first (one chained to
another, one streamed), and every response the fuzzed POSTs store joins them, so that
`previous_response_id`, GET/DELETE /v1/responses/{id} and its input_items (with hostile
pagination) reach the database, not only the 404 of an unknown id.

FUZZ_EXAMPLES sets the number of examples (default 2,000, shared by the groups: 4/5 POSTs, a
quarter of those to /v1/responses, 1/5 other methods and GETs, then 1/8 more for the stored
responses' routes; the run in docs/reliability.md used more).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from typing import Any

import jsonschema
import pytest
from asgiref.testing import ApplicationCommunicator
from django.conf import settings as django_settings
from django.urls import Resolver404, resolve
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
    "/v1/responses": "ResponseRequest",
}
# The POSTs' paths as drawn: /v1/responses twice (its request is the richest, and it is new).
POST_PATHS = [*sorted(POSTS), "/v1/responses"]
# A success's schema by route (the stored responses' routes by their template).
SUCCESS = {
    "/v1/chat/completions": "ChatCompletion", "/api/v1/chat/completions": "ChatCompletion",
    "/v1/completions": "Completion", "/v1/embeddings": "Embeddings", "/v1/engines/m1/embeddings": "Embeddings",
    "/api/v1/token_check": "TokenCheckResponse", "/v1/models": "ModelList", "/v1/responses": "Response",
    "GET /v1/responses/{id}": "Response", "DELETE /v1/responses/{id}": "ResponseDeleted",
    "GET /v1/responses/{id}/input_items": "ResponseItemList",
}
RESPONSE_ID = "^resp_[A-Za-z0-9_-]{1,95}$"  # openapi.py response_id_parameter
# The events that close a Responses stream (openai_api/responses/events.py): exactly one, last.
CLOSING_EVENTS = {"response.completed", "response.incomplete", "response.failed"}
# Small sizes keep each example cheap; the bounds themselves are probed by the hostile values.
MAX_ITEMS, MAX_CHARS = 3, 24


# From the description to strategies ---------------------------------------------------------


def resolve_ref(schema: dict, components: dict) -> dict:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def live_choice(values: Sequence[str]) -> st.SearchStrategy[str]:
    """One of `values`, a list that grows during the run (hypothesis wants each draw's
    constraints the same from one example to the next, so not sampled_from)."""
    return st.integers(0, 2**16).map(lambda index: values[index % len(values)] if values else "resp_none")


def from_schema(schema: dict, components: dict, name: str = "", stored: Sequence[str] = ()) -> st.SearchStrategy:
    """Values valid under a schema (the subset openapi.py uses), small. A `previous_response_id`
    is often one of the `stored` responses' ids."""
    schema = resolve_ref(schema, components)
    if "allOf" in schema:
        merged: dict = {"type": "object", "properties": {}, "required": []}
        for part in [*schema["allOf"], {k: v for k, v in schema.items() if k != "allOf"}]:
            part = resolve_ref(part, components)
            merged["properties"].update(part.get("properties", {}))
            merged["required"] += part.get("required", [])
        return from_schema(merged, components, name, stored)
    if "anyOf" in schema:
        return st.one_of([from_schema(option, components, name, stored) for option in schema["anyOf"]])
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
        if "pattern" in schema:
            # A response id: its form (resp_ + [A-Za-z0-9_-]), or one that was stored.
            matching = st.from_regex(schema["pattern"], fullmatch=True).filter(
                lambda value: schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)))
            return st.one_of(matching, live_choice(stored)) if name == "previous_response_id" else matching
        alphabet = st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"])
        return st.text(alphabet, min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", MAX_CHARS), MAX_CHARS))
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {"type": "null"}), components, stored=stored),
                        min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", MAX_ITEMS), MAX_ITEMS))
    if kind == "object":
        properties = schema.get("properties", {})
        required = {key: from_schema(properties[key], components, key, stored) for key in schema.get("required", [])}
        optional = {key: from_schema(value, components, key, stored)
                    for key, value in properties.items() if key not in required}
        named = st.fixed_dictionaries(required, optional=optional)
        if "additionalProperties" not in schema:
            return named
        # A map (metadata): its keys bounded by propertyNames, its values by additionalProperties.
        key_length = min(schema.get("propertyNames", {}).get("maxLength", MAX_CHARS), MAX_CHARS)
        extra = st.dictionaries(st.text(max_size=key_length), from_schema(schema["additionalProperties"], components),
                                max_size=min(schema.get("maxProperties", MAX_ITEMS), MAX_ITEMS))
        return st.tuples(extra, named).map(lambda pair: {**pair[0], **pair[1]})
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
def post_request(draw, stored: Sequence[str] = ()) -> tuple[str, bytes, bool]:
    """(path, body, valid under the description). `stored`: ids of stored responses."""
    doc = document()
    components = doc["components"]["schemas"]
    path = draw(st.sampled_from(POST_PATHS))
    schema = components[POSTS[path]]
    body = draw(from_schema(schema, components, stored=stored))
    if path.startswith("/v1/embeddings"):
        body.setdefault("model", draw(st.sampled_from(MODELS)))
    if path == "/v1/responses" and draw(st.integers(0, 2)) == 0:
        body["stream"] = True  # a third streamed: its events are checked (Fuzz.check_events)
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
        b'{"model": "m1", "input": [{"role": "user", "content": [{"type": "input_text", "text": NaN}]}]}',
        b'{"model": "m1", "input": "hi", "previous_response_id": "resp_\\u0000"}',
        b'{"model": "m1", "input": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
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
                                 "/v1/openapi.json", *POST_PATHS]))
    method = draw(st.sampled_from(["GET", "GET", "PUT", "DELETE", "PATCH", "POST"]))
    return method, path, b"{}" if method != "GET" else b""


# (route, method) as drawn: each route mostly with its methods, the others get the 405.
STORED_ROUTES = [*[("response", "GET")] * 3, *[("response", "DELETE")] * 2, ("response", "PUT"), ("response", "POST"),
                 *[("items", "GET")] * 4, ("items", "POST"), ("items", "DELETE")]


@st.composite
def stored_request(draw, seeds: dict[str, list[str]], pool: Sequence[str]) -> tuple[str, str, str, bool]:
    """GET/DELETE /v1/responses/{id} and GET .../input_items (and wrong methods): (method, path,
    query, valid under the description). The id is mostly a stored one: `seeds` (kept: never
    deleted here; with their input items' ids, the cursors) or `pool` (the fuzzed POSTs' stored
    responses, which DELETEs take); else one of the id's form, or hostile text."""
    route, method = draw(st.sampled_from(STORED_ROUTES))
    sources = ["pool", "form", "hostile"] + (["seed", "seed", "seed"] if method != "DELETE" else [])
    source = draw(st.sampled_from(sources if pool else [s for s in sources if s != "pool"]))
    if source == "seed":
        response_id = draw(st.sampled_from(sorted(seeds)))
    elif source == "pool":
        response_id = draw(st.sampled_from(list(pool)))
    elif source == "form":
        response_id = draw(st.from_regex(RESPONSE_ID, fullmatch=True))
    else:
        response_id = draw(st.one_of(st.text(max_size=120), st.sampled_from(
            ["resp_", "resp_" + "a" * 96, "resp_a\x00", "resp_a b", "resp_\u00e9", "resp_a/input_items", ".."])))
    valid = re.fullmatch(RESPONSE_ID, response_id) is not None
    path = "/v1/responses/" + urllib.parse.quote(response_id, safe="") + ("/input_items" if route == "items" else "")
    params: list[tuple[str, str]] = []
    if route == "items" or draw(st.integers(0, 9)) == 0:  # the page's parameters (ignored by the other route)
        cursors = seeds.get(response_id) or ["msg_x"]
        hostile_text = st.text(st.characters(codec="utf-8"), max_size=40)
        for param, good, bad in [
            ("limit", st.integers(1, 100).map(str), st.one_of(st.sampled_from(["0", "101", "-1", "1e2", " 5", "0x10", "", "20.0", "٣"]), hostile_text)),
            ("order", st.sampled_from(["asc", "desc"]), st.one_of(st.sampled_from(["ASC", "", "random"]), hostile_text)),
            ("after", st.sampled_from(cursors), hostile_text),
            ("before", st.sampled_from(cursors), hostile_text),
        ]:
            choice = draw(st.sampled_from(["absent", "absent", "good", "good", "bad"]))
            if choice != "absent":
                params.append((param, draw(good if choice == "good" else bad)))
                # A cursor must be an item of that response (else 400), so only a seed's is valid.
                valid &= route == "response" or choice == "good" and (param in ("limit", "order") or response_id in seeds)
        if draw(st.booleans()):
            params.append((draw(st.sampled_from(["include[]", "include", "x"])), draw(hostile_text)))
    query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote, errors="surrogatepass")
    return method, path, query, valid


# Through the application ----------------------------------------------------------------------


async def call(method: str, path: str, body: bytes, key: str, query: str = "") -> tuple[int, dict[str, str], bytes]:
    decoded = urllib.parse.unquote(path, errors="surrogateescape")
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": decoded, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
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


def label(path: str) -> str:
    """The route of a path, its ids as the template's names (the statuses' counts)."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}/input_items" if path.endswith("/input_items") else "/v1/responses/{id}"
    return path


def routed(path: str) -> bool:
    """Whether the API's URLconf routes the path: an unrouted one gets its 404 without a key check."""
    try:
        resolve(urllib.parse.unquote(path, errors="surrogateescape"), urlconf=django_settings.API_URLCONF)
    except Resolver404:
        return False
    return True


class Fuzz:
    """The running state: the key, one event loop, the validators, the counts, the stored
    responses (`seeds` with their input items' ids, never deleted; `stored`: the fuzzed POSTs';
    `ids`: both, deleted or not, for `previous_response_id`)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.loop = asyncio.new_event_loop()
        self.components = document()["components"]["schemas"]
        self.statuses: Counter[str] = Counter()
        self.keyed_requests = 0
        self.seeds: dict[str, list[str]] = {}
        self.stored: list[str] = []
        self.ids: list[str] = []
        self.events: Counter[str] = Counter()  # the closing events of Responses streams
        self.chained: Counter[int] = Counter()  # statuses of POSTs following a stored response

    def validator(self, name: str) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                                "components": {"schemas": self.components}})

    def send(self, method: str, path: str, body: bytes, query: str = "") -> tuple[int, dict[str, str], bytes]:
        status, headers, raw = self.loop.run_until_complete(call(method, path, body, self.key, query))
        route = label(urllib.parse.unquote(path, errors="surrogateescape"))
        self.statuses[f"{method} {route} {status}" if route.startswith("/v1/responses/") else f"{route} {status}"] += 1
        return status, headers, raw

    def check(self, path: str, status: int, headers: dict[str, str], raw: bytes, method: str = "POST") -> dict | None:
        """The answer's contract; returns the parsed JSON, or a Responses stream's final response
        (None for other streams)."""
        assert status != 500 and status < 600, (status, raw[:500])
        if status == 200 and headers.get("content-type", "").startswith("text/event-stream"):
            if path == "/v1/responses":
                return self.check_events(raw)
            assert raw.rstrip().endswith(b"data: [DONE]"), raw[-300:]
            return None
        assert headers.get("content-type") == "application/json", (status, headers, raw[:300])
        data = json.loads(raw)
        if status >= 400:
            self.validator("Error").validate(data)
        elif (schema := SUCCESS.get(f"{method} {label(urllib.parse.unquote(path))}", SUCCESS.get(path))) is not None:
            self.validator(schema).validate(data)
        return data

    def check_events(self, raw: bytes) -> dict:
        """A Responses stream: `event: <type>` + `data: <its JSON>` frames, no `[DONE]`, sequence
        numbers strictly increasing, response.created first, exactly one closing event, last."""
        assert raw.endswith(b"\n\n") and b"[DONE]" not in raw, raw[-300:]
        kinds, sequence = [], -1
        for frame in raw[:-2].decode().split("\n\n"):  # JSON never holds a raw newline
            event_line, data_line = frame.split("\n")
            assert event_line.startswith("event: ") and data_line.startswith("data: "), frame[:300]
            event = json.loads(data_line[len("data: "):])
            kinds.append(event_line[len("event: "):])
            assert event["type"] == kinds[-1], frame[:300]
            assert event["sequence_number"] > sequence, (sequence, frame[:300])
            sequence = event["sequence_number"]
        assert kinds[0] == "response.created", kinds
        assert [kind for kind in kinds if kind in CLOSING_EVENTS] == [kinds[-1]], kinds
        self.events[kinds[-1]] += 1
        self.validator("Response").validate(event["response"])
        return event["response"]

    def remember(self, response: dict | None) -> None:
        """A successful POST /v1/responses: its id joins the stored ones if it was stored."""
        if response and response.get("object") == "response" and response.get("store") and response["status"] != "failed":
            self.stored.append(response["id"])
            self.ids.append(response["id"])

    def seed(self) -> None:
        """The responses the stored routes are fuzzed with: items of every role, one chained to
        another, one streamed; their input items' ids are the cursors."""
        bodies = [
            {"model": "m1", "instructions": "Be brief.", "metadata": {"k": "v"}, "input": [
                {"role": "system", "content": "Answer."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
                {"role": "user", "content": [{"type": "input_text", "text": "Again"}]}]},
            {"model": "m1", "input": "And now?"},  # chained to the first, below
            {"model": "m1", "input": [{"type": "message", "role": "developer", "content": "x", "id": "mine"}],
             "stream": True, "max_output_tokens": 3},
        ]
        for index, body in enumerate(bodies):
            if index == 1:
                body["previous_response_id"] = next(iter(self.seeds))
            status, headers, raw = self.send("POST", "/v1/responses", encode(body))
            response = self.check("/v1/responses", status, headers, raw)
            assert status == 200 and response["store"], raw[:500]
            status, headers, raw = self.send("GET", f"/v1/responses/{response['id']}/input_items", b"", "order=asc")
            items = self.check(f"/v1/responses/{response['id']}/input_items", status, headers, raw, "GET")
            assert status == 200 and items["data"], raw[:500]
            self.seeds[response["id"]] = [item["id"] for item in items["data"]]
            self.ids.append(response["id"])
            self.keyed_requests += 2


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
    @given(post_request(fuzz.ids))
    def posts(request):
        path, body, valid = request
        logged = len(fuzz.recorder.records)
        status, headers, raw = fuzz.send("POST", path, body)
        fuzz.keyed_requests += 1
        data = fuzz.check(path, status, headers, raw)
        assert not (valid and refused_as_invalid(path, status, data)), (body[:500], data)
        assert not fuzz.recorder.problems(logged), fuzz.recorder.problems(logged)
        if path == "/v1/responses":
            previous = json.loads(body).get("previous_response_id") if valid else None
            if previous in fuzz.ids:
                fuzz.chained[status] += 1
            if status == 200:
                fuzz.remember(data)

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

    @fuzz_settings(EXAMPLES // 8)
    @given(st.data())
    def stored(data):
        # Drawn here: the ids the POSTs stored are known only now (and DELETEs remove some).
        method, path, query, valid = data.draw(stored_request(fuzz.seeds, fuzz.stored))
        logged = len(fuzz.recorder.records)
        status, headers, raw = fuzz.send(method, path, b"" if method == "GET" else b"{}", query)
        route = label(urllib.parse.unquote(path, errors="surrogateescape"))
        allowed = method in (("GET", "DELETE") if route == "/v1/responses/{id}" else ("GET",))
        fuzz.keyed_requests += allowed and routed(path)
        answer = fuzz.check(path, status, headers, raw, method)
        assert not (valid and allowed and status == 400), (method, path, query, answer)
        if valid and allowed and urllib.parse.unquote(path).split("/")[3] in fuzz.seeds:
            assert status == 200, (method, path, query, answer)  # a seed is never deleted
        assert not fuzz.recorder.problems(logged), fuzz.recorder.problems(logged)

    fuzz.seed()
    posts()
    others()
    stored()
    # Every keyed request left a usage row, and they all reach the database (PostgreSQL refuses
    # what SQLite accepts: NUL characters, over-long strings, out-of-range integers).
    usage_writer.flush()
    rows = UsageRecord.objects.filter(key_id=fuzz.key_id).count()
    print(f"fuzz: {sum(fuzz.statuses.values())} requests, {fuzz.keyed_requests} with a key past the method "
          f"check, {fuzz.access.keyed} access lines with a key, {rows} usage rows; {len(fuzz.stored)} responses "
          f"stored by the POSTs, Responses streams closed by {dict(fuzz.events)}, valid POSTs following a stored "
          f"response by status {dict(fuzz.chained)}; "
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
        "/v1/responses", "/v1/responses/{id}", "/v1/responses/{id}/input_items",
    }
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    n = chat["n"]["anyOf"][0]
    assert (n["type"], n["minimum"], n["maximum"]) == ("integer", 1, 128)
    assert chat["seed"]["anyOf"][0]["maximum"] == 2**63 - 1
