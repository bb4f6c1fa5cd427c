"""The adapter for OpenAI-compatible servers: the client's request passed through, the answer passed back.

Every field the client sent is forwarded; only `model` is rewritten (to the route's
upstream_model: servers such as llama.cpp's answer an unknown model id with their one model
anyway, so the configured name is always sent). Answers and chunks come back with the public model
name and otherwise as the upstream sent them (docs/openai-upstreams.md). Streams ask the upstream
for usage (stream_options.include_usage); the usage chunk reaches the client only if it asked.
Known deviations of a server family (upstreams/openai/deviations.py) are corrected here.

Calls go through the process's pooled transport (upstreams/transport.py, shared with the FastChat
adapter: one pool per event loop), with the upstream's connect / first-byte / idle timeouts, the overall deadline
(GATEWAY_UPSTREAM_DEADLINE) and the size cap (GATEWAY_UPSTREAM_MAX_BYTES).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import httpx
import orjson
from django.conf import settings

from upstreams.base import OPENAI, Answer, DiscoveredModel, Observer, Probe, Route
from upstreams.calls import JSON_MODE, JSON_SCHEMA, ChatCall, CompletionsCall, EmbeddingsCall
from upstreams.errors import BadAnswer, ClientFailure, CredentialsRejected, UpstreamFailure, UpstreamTimeout
from upstreams.openai import deviations as known
from upstreams.openai.chunks import ToolCallHeaders, answer_text_chars, estimated_prompt_tokens, estimated_tokens
from upstreams.openai.deviations import Deviations
from upstreams.openai.failures import hidden_in_messages, status_failure, transport_failure
from upstreams.openai.rewrite import json_string
from upstreams.openai.stream import FanOutStream, PassThroughStream
from upstreams.transport import RequestHeaders, body_parts, get_transport, send
from upstreams.usage import Usage

USER_AGENT = b"Django OpenAI Gateway"
MAX_ERROR_BYTES = 64 * 1024
MAX_MODELS_BYTES = 4 * 1024 * 1024
DETECT_RETRY_SECONDS = 30.0
MAX_FAN_OUT = 128
DEFAULTS = {"connect_timeout": 10.0, "first_byte_timeout": 100.0, "idle_timeout": 100.0}
PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
CHUNK_OBJECTS = {"chat": "chat.completion.chunk", "completions": "text_completion"}


def transport() -> httpx.AsyncBaseTransport:
    return get_transport()


def spec_headers(spec: Any) -> dict[str, str]:
    """The spec's extra headers and bearer key (the registry's spec builds them itself)."""
    if callable(getattr(spec, "headers", None)):
        return dict(spec.headers())
    extra = getattr(spec, "extra_headers", None) or ()
    headers = dict(extra.items() if isinstance(extra, Mapping) else extra)
    key = getattr(spec, "api_key", None)
    if key:
        headers["Authorization"] = f"Bearer {key.reveal() if hasattr(key, 'reveal') else key}"
    return headers


class OpenAIAdapter:
    kind = OPENAI

    def __init__(self, spec: Any, *, deadline: float = 900.0, max_bytes: int = 64 * 1024 * 1024):
        self.spec = spec
        self.name = spec.name
        self.base_url = spec.base_url.rstrip("/")
        self.urls = {endpoint: httpx.URL(self.base_url + path) for endpoint, path in PATHS.items()}
        self.url_strings = {endpoint: str(url) for endpoint, url in self.urls.items()}
        self.models_url = httpx.URL(self.base_url + "/models")
        self.deadline = deadline
        self.max_bytes = max_bytes
        connect, first_byte, idle = (getattr(spec, name, None) or default for name, default in DEFAULTS.items())
        self.first_byte_timeout = first_byte
        read = max(first_byte, idle)
        # The transport's read timeout covers both waits; a per-read timer is armed only when the
        # silence allowed between chunks is shorter than the wait for the first one.
        self.idle_timeout = idle if idle < read else None
        self.timeouts = {"connect": connect, "read": read, "write": read, "pool": connect}
        self.probe_timeouts = {"connect": connect, "read": first_byte, "write": first_byte, "pool": connect}
        headers = [(b"content-type", b"application/json"), (b"accept", b"application/json, text/event-stream"),
                   (b"user-agent", USER_AGENT)]
        sent = spec_headers(spec)
        headers += [(name.lower().encode(), value.encode()) for name, value in sent.items()]
        authorization = sent.get("Authorization", "")
        self.hidden = hidden_in_messages(self.base_url, authorization.removeprefix("Bearer ") or None)
        self.headers = headers
        self.post_headers = RequestHeaders(headers)
        self.get_headers = [header for header in headers if header[0] != b"content-type"]
        self.flavor = known.named(getattr(spec, "flavor", None))
        self._detected: Deviations | None = None
        self._detect_after = 0.0

    @classmethod
    def from_spec(cls, spec: Any) -> OpenAIAdapter:
        return cls(spec, deadline=settings.GATEWAY_UPSTREAM_DEADLINE, max_bytes=settings.GATEWAY_UPSTREAM_MAX_BYTES)

    # Which server family: the spec says, or its model list shows (asked once, then remembered)

    async def deviations(self) -> Deviations:
        if self.flavor is not None:
            return self.flavor
        if self._detected is not None:
            return self._detected
        if time.monotonic() < self._detect_after:
            return known.GENERIC
        try:
            await self._models_answer()
        except ClientFailure:  # no model list here (404...): nothing to detect, ever
            self._detected = known.GENERIC
        except UpstreamFailure:
            self._detect_after = time.monotonic() + DETECT_RETRY_SECONDS
            return known.GENERIC
        return self._detected or known.GENERIC

    # Model list and health

    async def list_models(self) -> list[DiscoveredModel]:
        answer = await self._models_answer()
        data = answer.get("data")
        if not isinstance(data, list):
            raise BadAnswer("The upstream answered with an invalid model list.", log_detail=str(self.models_url))
        deviations = self.flavor or self._detected or known.GENERIC
        models = []
        for entry in data[:1000]:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
                continue
            models.append(DiscoveredModel(entry["id"][:200], told_capabilities(entry, deviations),
                                          context_length(entry)))
        return models

    async def probe(self) -> Probe:
        started = time.monotonic()
        try:
            answer = await self._models_answer()
            if not isinstance(answer.get("data"), list):
                raise BadAnswer("The upstream answered with an invalid model list.")
        except CredentialsRejected as exc:
            return Probe(False, elapsed_ms(started), "credentials", exc.message)
        except BadAnswer as exc:
            return Probe(False, elapsed_ms(started), "bad_answer", exc.message)
        except UpstreamFailure as exc:
            return Probe(False, elapsed_ms(started), "unreachable", exc.message)
        return Probe(True, elapsed_ms(started))

    async def _models_answer(self) -> dict[str, Any]:
        request = httpx.Request("GET", self.models_url, headers=self.get_headers,
                                extensions={"timeout": self.probe_timeouts})
        url = str(self.models_url)
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                response = await transport().handle_async_request(request)
                body = await self._read(response, url, MAX_MODELS_BYTES)
        except TimeoutError:
            raise UpstreamTimeout(log_detail=url) from None
        except httpx.HTTPError as exc:
            raise transport_failure(exc, url) from exc
        if response.status_code != 200:
            raise status_failure(response.status_code, body, response.headers, known.GENERIC, self.hidden, url)
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadAnswer("The upstream answered with an invalid model list.", log_detail=url) from None
        if not isinstance(answer, dict):
            raise BadAnswer("The upstream answered with an invalid model list.", log_detail=url)
        if self.flavor is None:
            self._detected = known.detect(answer)
        return answer

    # Calls

    async def chat(self, call: ChatCall, route: Route, observer: Observer | None = None) -> Answer:
        return await self._answer(call, route, observer)

    async def completions(self, call: CompletionsCall, route: Route, observer: Observer | None = None) -> Answer:
        return await self._answer(call, route, observer)

    async def embeddings(self, call: EmbeddingsCall, route: Route, observer: Observer | None = None) -> Answer:
        return await self._answer(call, route, observer)

    async def chat_stream(self, call: ChatCall, route: Route) -> PassThroughStream | FanOutStream:
        return await self._stream(call, route)

    async def completions_stream(self, call: CompletionsCall, route: Route) -> PassThroughStream | FanOutStream:
        return await self._stream(call, route)

    # Non-streamed

    async def _answer(self, call: Any, route: Route, observer: Observer | None) -> Answer:
        deviations = await self.deviations()
        body = self.request_body(call, route, deviations, stream=False)
        n = fan_out(call, body, deviations)
        if n > 1:
            answers = await asyncio.gather(*(self._one_answer(call, body, deviations) for _ in range(n)))
            answer = merged_answers(answers)
        else:
            answer = await self._one_answer(call, body, deviations)
        if observer is not None:
            observer.on_usage(answer.usage)
        return answer

    async def _one_answer(self, call: Any, body: dict[str, Any], deviations: Deviations) -> Answer:
        url = self.url_strings[call.endpoint]
        deadline = time.monotonic() + self.deadline
        response = await self._post(url, body, deviations)
        raw = await self._read(response, url, self.max_bytes, deadline)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadAnswer("The upstream answered with invalid JSON.", log_detail=url) from None
        if not isinstance(data, dict) or ("error" in data and "choices" not in data and "data" not in data):
            raise BadAnswer("The upstream answered with an unexpected body.", log_detail=url)
        data["model"] = call.public_model
        return Answer(data, self.answer_usage(call, body, data))

    def answer_usage(self, call: Any, body: dict[str, Any], data: dict[str, Any]) -> Usage:
        usage = data.get("usage")
        if isinstance(usage, dict):
            completion = 0 if call.endpoint == "embeddings" else usage.get("completion_tokens")
            checked = Usage.checked(usage.get("prompt_tokens"), completion)
            if checked is None:
                raise BadAnswer("The upstream reported an invalid usage.", log_detail=self.name)
            return checked
        completion = 0 if call.endpoint == "embeddings" else estimated_tokens(answer_text_chars(data))
        estimate = Usage(estimated_prompt_tokens(body), completion, estimated=True)
        if call.endpoint != "embeddings":
            data["usage"] = estimate.block()
        return estimate

    # Streamed

    async def _stream(self, call: Any, route: Route) -> PassThroughStream | FanOutStream:
        deviations = await self.deviations()
        body = self.request_body(call, route, deviations, stream=True)
        n = fan_out(call, body, deviations)
        if n == 1:
            return await self._one_stream(call, body, deviations, call.include_usage)
        streams: list[PassThroughStream] = []
        try:
            for stream in await asyncio.gather(*(self._one_stream(call, body, deviations, False) for _ in range(n)),
                                               return_exceptions=True):
                if isinstance(stream, BaseException):
                    raise stream
                streams.append(stream)
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        return FanOutStream(streams, public_model=call.public_model, include_usage=call.include_usage,
                            obj=CHUNK_OBJECTS[call.endpoint])

    async def _one_stream(self, call: Any, body: dict[str, Any], deviations: Deviations,
                          include_usage: bool) -> PassThroughStream:
        url = self.url_strings[call.endpoint]
        started = time.monotonic()
        deadline = started + self.deadline
        try:
            async with asyncio.timeout(self.first_byte_timeout):
                response = await self._post(url, body, deviations)
        except TimeoutError:
            raise UpstreamTimeout(log_detail=f"{url}: no answer within the first-byte timeout") from None
        tool_headers = None
        if deviations.repeats_tool_call_header and call.endpoint == "chat" and "tools" in body:
            tool_headers = ToolCallHeaders(drop_function_call="functions" not in body)
        stream = PassThroughStream(
            response, url=url, public_model=call.public_model, model_json=json_string(call.public_model),
            include_usage=include_usage, prompt_estimate=estimated_prompt_tokens(body), deadline=deadline,
            max_bytes=self.max_bytes, idle_timeout=self.idle_timeout, tool_headers=tool_headers,
            obj=CHUNK_OBJECTS[call.endpoint], hidden=self.hidden,
        )
        remaining = self.first_byte_timeout - (time.monotonic() - started)
        return await stream.prime(max(remaining, 0.001))

    # The request

    def request_body(self, call: Any, route: Route, deviations: Deviations, stream: bool) -> dict[str, Any]:
        """The client's body with the upstream's model name, asking for stream usage, corrected
        for the server's known deviations."""
        body = dict(call.body)
        body["model"] = route.upstream_model
        if call.endpoint == "embeddings":
            return body
        if stream:
            body["stream"] = True
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        if call.endpoint == "chat":
            if deviations.json_schema_as_json_object:
                json_schema_as_json_object(body)
            if deviations.tool_choice_required_unsupported and body.get("tool_choice") == "required":
                required_tool_named(body)
        return body

    async def _post(self, url: str, body: dict[str, Any], deviations: Deviations) -> httpx.Response:
        """POST `body`; the response (status 200, body unread) or the failure its status means."""
        try:
            response = await send("POST", url, orjson.dumps(body), self.post_headers, self.timeouts, transport())
        except httpx.HTTPError as exc:
            raise transport_failure(exc, url) from exc
        if response.status_code != 200:
            error_body = await self._read(response, url, MAX_ERROR_BYTES, truncate=True)
            raise status_failure(response.status_code, error_body, response.headers, deviations, self.hidden, url)
        return response

    async def _read(self, response: httpx.Response, url: str, limit: int, deadline: float | None = None, *,
                    truncate: bool = False) -> bytes:
        """The whole body (at most `limit` bytes, else BadAnswer; or cut there when `truncate`),
        within the deadline; the response is closed."""
        parts, size = [], 0
        try:
            async for data in body_parts(response):
                size += len(data)
                if size > limit:
                    if truncate:
                        parts.append(data[: limit - size])
                        break
                    raise BadAnswer(f"The upstream's answer exceeded GATEWAY_UPSTREAM_MAX_BYTES ({limit} bytes).",
                                    log_detail=url)
                if deadline is not None and time.monotonic() > deadline:
                    raise UpstreamTimeout("The upstream did not finish within GATEWAY_UPSTREAM_DEADLINE.",
                                          log_detail=url)
                parts.append(data)
        except httpx.HTTPError as exc:
            raise transport_failure(exc, url) from exc
        finally:
            await response.aclose()
        return b"".join(parts)


# Deviations corrected in the request


def fan_out(call: Any, body: dict[str, Any], deviations: Deviations) -> int:
    """How many one-choice requests to send for a server that answers one choice only (1: none)."""
    n = body.get("n")
    if not deviations.single_choice or call.endpoint == "embeddings" or type(n) is not int or n <= 1:
        return 1
    if n > MAX_FAN_OUT:
        raise ClientFailure(f"n may be at most {MAX_FAN_OUT} for this model.", param="n")
    body["n"] = 1
    return n


def json_schema_as_json_object(body: dict[str, Any]) -> None:
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        body["response_format"] = {"type": "json_object", **({"schema": schema} if isinstance(schema, dict) else {})}


def required_tool_named(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    names = [tool["function"]["name"] for tool in tools or ()
             if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
             and isinstance(tool["function"].get("name"), str)] if isinstance(tools, list) else []
    if len(names) != 1:
        raise ClientFailure('tool_choice "required" needs exactly one tool on this model; name the tool to call '
                            'instead ({"type": "function", "function": {"name": ...}}).', param="tool_choice")
    body["tool_choice"] = {"type": "function", "function": {"name": names[0]}}


# Answers


def merged_answers(answers: list[Answer]) -> Answer:
    """n one-choice answers as one answer of n choices (the first answer's id, prompt counted once)."""
    body = answers[0].body
    choices = []
    for index, answer in enumerate(answers):
        for choice in answer.body.get("choices") or ():
            if isinstance(choice, dict):
                choice["index"] = index
                choices.append(choice)
    body["choices"] = choices
    usage = Usage(answers[0].usage.prompt_tokens, sum(answer.usage.completion_tokens for answer in answers),
                  estimated=any(answer.usage.estimated for answer in answers))
    if "usage" in body:
        body["usage"] = usage.block()
    return Answer(body, usage)


def told_capabilities(entry: dict[str, Any], deviations: Deviations) -> frozenset[str]:
    """What a model list entry (or the server family) tells of a model's capabilities."""
    told: set[str] = set()
    capabilities = entry.get("capabilities")
    if isinstance(capabilities, list):
        told.update(item for item in capabilities if isinstance(item, str))
    elif isinstance(capabilities, dict):
        told.update(name for name, value in capabilities.items() if value is True)
    if entry.get("type") in ("embedding", "embeddings"):
        told.add("embeddings")
    if deviations.json_schema_as_json_object:
        told.update((JSON_MODE, JSON_SCHEMA))
    known_names = {"tools", JSON_SCHEMA, JSON_MODE, "vision", "embeddings"}
    aliases = {"function_calling": "tools", "tool_use": "tools", "json_schema": JSON_SCHEMA}
    return frozenset(aliases.get(name, name) for name in told if aliases.get(name, name) in known_names)


def context_length(entry: dict[str, Any]) -> int | None:
    """vLLM's max_model_len, or a context_length / meta.n_ctx_train some servers give."""
    meta = entry.get("meta")
    for value in (entry.get("max_model_len"), entry.get("context_length"), entry.get("context_window"),
                  meta.get("n_ctx_train") if isinstance(meta, dict) else None):
        if type(value) is int and 0 < value < 2**31:
            return value
    return None


def elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
