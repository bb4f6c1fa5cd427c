"""The OpenAPI 3.1 description of the OpenAI routes, served at GET /v1/openapi.json (no key).

Built from the bounds the parsers enforce (protocol.py's constants and the GATEWAY_MAX_*
settings), so that a request valid under it passes validation and a fuzzer can aim at the
edges: types, ranges, lengths, enums. Cross-field rules JSON Schema cannot say (prompts x n x
best_of generations, best_of >= n) are in the descriptions. Every error has the one shape of
errors.py (`Error`). tests/test_fuzz.py sends generated requests through the application with
this description and checks the answers against it.
"""
from __future__ import annotations

import functools
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse

from openai_api.endpoint import api_endpoint, json_response
from openai_api.protocol import INT32_MAX, INT64_MAX, INT64_MIN, TOKEN_ID_MAX

Schema = dict[str, Any]
REF = "#/components/schemas/"
MAX_RESPONSE_ID_CHARS = 100  # openai_api/models.py MAX_ID_LENGTH (the store's column)


def ref(name: str) -> Schema:
    return {"$ref": REF + name}


def nullable(schema: Schema) -> Schema:
    """The parsers treat `null` as "not given" for every optional field."""
    return {"anyOf": [schema, {"type": "null"}]}


def integer(minimum: int = INT64_MIN, maximum: int = INT64_MAX, **extra: Any) -> Schema:
    return nullable({"type": "integer", "minimum": minimum, "maximum": maximum, **extra})


def number(minimum: float, maximum: float | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "number", "minimum": minimum, **extra}
    if maximum is not None:
        schema["maximum"] = maximum
    return nullable(schema)


def boolean(**extra: Any) -> Schema:
    return nullable({"type": "boolean", **extra})


def text(max_length: int, **extra: Any) -> Schema:
    return {"type": "string", "maxLength": max_length, **extra}


def model_name() -> Schema:
    return text(settings.GATEWAY_MAX_MODEL_CHARS, minLength=1, pattern="^[^\\x00-\\x1f\\x7f-\\x9f]*$",
                description="A model a worker serves (GET /v1/models); printable characters only.")


def sampling_properties() -> dict[str, Schema]:
    """Sampling parameters shared by chat and completions (protocol.parse_sampling)."""
    return {
        "n": integer(1, settings.GATEWAY_MAX_GENERATIONS, description="Choices per prompt."),
        "temperature": number(0, 2),
        "top_p": number(0, 1),
        "top_k": nullable({"anyOf": [{"const": -1}, {"type": "integer", "minimum": 1, "maximum": INT32_MAX}]}),
        "stop": nullable({"anyOf": [
            text(settings.GATEWAY_MAX_STOP_CHARS),
            {"type": "array", "maxItems": settings.GATEWAY_MAX_STOP, "items": text(settings.GATEWAY_MAX_STOP_CHARS)},
        ]}),
        "presence_penalty": number(-2, 2),
        "frequency_penalty": number(-2, 2),
        "seed": integer(),
        "stream": boolean(),
        "stream_options": nullable({"type": "object", "properties": {"include_usage": boolean()}}),
        "user": nullable({"type": "string"}),
    }


def unsupported_properties() -> dict[str, Schema]:
    """What FastChat's workers cannot do: accepted only when empty or off (otherwise 400)."""
    return {
        "tools": nullable({"type": "array", "maxItems": 0}),
        "functions": nullable({"type": "array", "maxItems": 0}),
        "tool_choice": {"enum": ["none", None]},
        "function_call": {"enum": ["none", None]},
        "response_format": nullable({"type": "object", "required": ["type"],
                                     "properties": {"type": {"const": "text"}}}),
    }


def content(max_chars: int, *parts: Schema) -> Schema:
    """A message's content: a string or an array of parts."""
    return {"anyOf": [text(max_chars), {"type": "array", "maxItems": settings.GATEWAY_MAX_CONTENT_PARTS,
                                         "items": {"anyOf": list(parts)}}]}


def message(roles: list[str], content_schema: Schema, required: bool) -> Schema:
    """Images only in user messages; content may be left out only by the assistant."""
    return {
        "type": "object",
        "required": ["role", "content"] if required else ["role"],
        "properties": {
            "role": {"enum": roles},
            "content": content_schema,
            "name": {"type": "string"},
            "tool_calls": nullable({"type": "array", "maxItems": 0}),
        },
    }


def schemas() -> dict[str, Schema]:
    max_chars = settings.GATEWAY_MAX_CONTENT_CHARS
    token_ids = {"type": "array", "minItems": 1,
                 "items": {"type": "integer", "minimum": 0, "maximum": TOKEN_ID_MAX}}

    def prompt_input(max_items: int) -> Schema:
        return {"anyOf": [
            text(max_chars),
            {"type": "array", "minItems": 1, "maxItems": max_items, "items": text(max_chars)},
            token_ids,
            {"type": "array", "minItems": 1, "maxItems": max_items, "items": token_ids},
        ]}

    return {
        "Error": {
            "type": "object",
            "description": "Every error: OpenAI's shape plus FastChat's top-level fields.",
            "required": ["error", "object", "message", "code"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                },
                "object": {"const": "error"},
                "message": {"type": "string"},
                "code": {"type": "integer", "description": "FastChat's error code, e.g. 40301."},
            },
        },
        "TextPart": {"type": "object", "required": ["type", "text"],
                     "properties": {"type": {"const": "text"}, "text": text(max_chars)}},
        "ImagePart": {"type": "object", "required": ["type", "image_url"], "properties": {
            "type": {"const": "image_url"},
            "image_url": {"anyOf": [{"type": "string", "minLength": 1},
                                    {"type": "object", "required": ["url"],
                                     "properties": {"url": {"type": "string", "minLength": 1}}}]},
        }},
        "Message": {"anyOf": [ref("UserMessage"), ref("SystemMessage"), ref("AssistantMessage")]},
        "UserMessage": message(["user"], content(max_chars, ref("TextPart"), ref("ImagePart")), required=True),
        "SystemMessage": message(["system", "developer"], content(max_chars, ref("TextPart")), required=True),
        "AssistantMessage": message(["assistant"], nullable(content(max_chars, ref("TextPart"))), required=False),
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "properties": {
                "model": model_name(),
                "messages": {"anyOf": [
                    text(max_chars, description="A plain prompt, as FastChat allows."),
                    {"type": "array", "minItems": 1, "maxItems": settings.GATEWAY_MAX_MESSAGES,
                     "items": ref("Message")},
                ]},
                "max_tokens": integer(1, INT32_MAX),
                "max_completion_tokens": integer(1, INT32_MAX),
                "logprobs": {"enum": [False, None], "description": "Use /v1/completions for logprobs."},
                **sampling_properties(),
                **unsupported_properties(),
            },
        },
        "FastChatChatCompletionRequest": {
            "allOf": [ref("ChatCompletionRequest")],
            "properties": {"repetition_penalty": number(0)},
        },
        "CompletionRequest": {
            "type": "object",
            "required": ["model", "prompt"],
            "description": (f"At most {settings.GATEWAY_MAX_GENERATIONS} generations per request: "
                            "prompts x n (x best_of) must stay within it, and best_of >= n."),
            "properties": {
                "model": model_name(),
                "prompt": prompt_input(settings.GATEWAY_MAX_GENERATIONS),
                "max_tokens": integer(1, INT32_MAX, default=16),
                "echo": boolean(),
                "logprobs": integer(0, 5),
                "best_of": integer(1, settings.GATEWAY_MAX_GENERATIONS),
                "use_beam_search": boolean(),
                **sampling_properties(),
            },
        },
        "EmbeddingsRequest": {
            "type": "object",
            "required": ["input"],
            "description": "model is required here, except on /v1/engines/{model}/embeddings.",
            "properties": {
                "model": model_name(),
                "input": prompt_input(settings.GATEWAY_MAX_EMBEDDING_INPUTS),
                "encoding_format": {"enum": ["float", "base64", None]},
                "user": nullable({"type": "string"}),
            },
        },
        "TokenCheckRequest": {
            "type": "object",
            "required": ["prompts"],
            "properties": {"prompts": {
                "type": "array", "maxItems": settings.GATEWAY_MAX_TOKEN_CHECK_ITEMS,
                "items": {"type": "object", "required": ["model", "prompt", "max_tokens"], "properties": {
                    "model": model_name(),
                    "prompt": text(max_chars),
                    "max_tokens": {"type": "integer", "minimum": 0, "maximum": INT32_MAX},
                }},
            }},
        },
        "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
            "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        }},
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")},
        }},
        "Usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
                  "properties": {name: {"type": "integer", "minimum": 0}
                                 for name in ("prompt_tokens", "completion_tokens", "total_tokens")}},
        "ChatCompletion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                           "properties": {
                               "id": {"type": "string"}, "object": {"const": "chat.completion"},
                               "created": {"type": "integer"}, "model": {"type": "string"},
                               "choices": {"type": "array", "items": {
                                   "type": "object", "required": ["index", "message", "finish_reason"],
                                   "properties": {"index": {"type": "integer"},
                                                  "message": {"type": "object", "required": ["role", "content"]},
                                                  "finish_reason": {"type": ["string", "null"]}}}},
                               "usage": ref("Usage"),
                           }},
        "Completion": {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
                       "properties": {
                           "id": {"type": "string"}, "object": {"const": "text_completion"},
                           "created": {"type": "integer"}, "model": {"type": "string"},
                           "choices": {"type": "array", "items": {
                               "type": "object", "required": ["index", "text", "finish_reason"],
                               "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                              "finish_reason": {"type": ["string", "null"]}}}},
                           "usage": ref("Usage"),
                       }},
        "Embeddings": {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
            "object": {"const": "list"}, "model": {"type": "string"},
            "data": {"type": "array", "items": {
                "type": "object", "required": ["object", "embedding", "index"],
                "properties": {"object": {"const": "embedding"}, "index": {"type": "integer"},
                               "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}},
                                                       {"type": "string"}]}}}},
            "usage": {"type": "object"},
        }},
        **responses_schemas(max_chars),
        "TokenCheckResponse": {"type": "object", "required": ["prompts"], "properties": {"prompts": {
            "type": "array", "items": {"type": "object", "required": ["fits", "tokenCount", "contextLength"],
                                       "properties": {"fits": {"type": "boolean"},
                                                      "tokenCount": {"type": "integer"},
                                                      "contextLength": {"type": "integer"}}}}}},
    }


def responses_schemas(max_chars: int) -> dict[str, Schema]:
    """The Responses API (openai_api/responses/, docs/responses.md). As for chat, what FastChat's
    workers cannot do is described only empty or off: function tools, function_call and
    function_call_output items and JSON formats need a tool-capable route (else a 400)."""
    part_count = settings.GATEWAY_MAX_CONTENT_PARTS

    def item_content(*parts: Schema) -> Schema:
        return {"anyOf": [text(max_chars), {"type": "array", "maxItems": part_count, "items": {"anyOf": list(parts)}}]}

    def input_message(roles: list[str], content_schema: Schema) -> Schema:
        return {"type": "object", "required": ["role", "content"], "properties": {
            "type": {"const": "message"}, "role": {"enum": roles}, "content": content_schema,
            "id": text(256, minLength=1)}}

    input_text = {"type": "object", "required": ["type", "text"],
                  "properties": {"type": {"const": "input_text"}, "text": text(max_chars)}}
    output_text = {"type": "object", "required": ["type", "text"],
                   "properties": {"type": {"const": "output_text"}, "text": text(max_chars)}}
    input_image = {"type": "object", "required": ["type", "image_url"], "properties": {
        "type": {"const": "input_image"}, "image_url": {"type": "string", "minLength": 1},
        "detail": {"enum": ["auto", "low", "high", None]}}}
    response_id = {"type": "string", "pattern": f"^resp_[A-Za-z0-9_-]{{1,{MAX_RESPONSE_ID_CHARS - 5}}}$"}
    return {
        "ResponseInputItem": {"anyOf": [
            input_message(["user"], item_content(input_text, input_image)),
            input_message(["system", "developer"], item_content(input_text)),
            input_message(["assistant"], item_content(output_text)),
        ]},
        "ResponseRequest": {
            "type": "object",
            "required": ["model", "input"],
            "description": ("POST /v1/responses, bridged onto chat completions. Also: input items of type "
                            "function_call and function_call_output, tools of type function, tool_choice "
                            "'required' or a function, text.format json_object and json_schema, on routes "
                            "that support tools and JSON modes. Hosted tools and background are refused."),
            "properties": {
                "model": model_name(),
                "input": {"anyOf": [text(max_chars), {"type": "array", "minItems": 1,
                                                      "maxItems": settings.GATEWAY_MAX_RESPONSE_ITEMS,
                                                      "items": ref("ResponseInputItem")}]},
                "instructions": nullable(text(max_chars)),
                "previous_response_id": nullable(response_id),
                "store": boolean(default=True),
                "stream": boolean(),
                "metadata": nullable({"type": "object", "maxProperties": 16, "propertyNames": {"maxLength": 64},
                                      "additionalProperties": text(512)}),
                "truncation": {"enum": ["disabled", "auto", None]},
                "max_output_tokens": integer(1, INT32_MAX),
                "temperature": number(0, 2),
                "top_p": number(0, 1),
                "user": nullable({"type": "string"}),
                "parallel_tool_calls": boolean(),
                "tools": nullable({"type": "array", "maxItems": 0}),
                "tool_choice": {"enum": ["auto", "none", None]},
                "text": nullable({"type": "object", "properties": {"format": nullable({
                    "type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}})}}),
                "background": {"enum": [False, None]},
            },
        },
        "Response": {
            "type": "object",
            "required": ["id", "object", "created_at", "status", "model", "output", "usage"],
            "properties": {
                "id": {"type": "string"}, "object": {"const": "response"}, "created_at": {"type": "integer"},
                "status": {"enum": ["completed", "incomplete", "failed", "in_progress"]},
                "model": {"type": "string"},
                "output": {"type": "array", "items": {"type": "object", "required": ["id", "type", "status"]}},
                "usage": nullable({"type": "object", "required": ["input_tokens", "output_tokens", "total_tokens"],
                                   "properties": {name: {"type": "integer", "minimum": 0} for name in
                                                  ("input_tokens", "output_tokens", "total_tokens")}}),
            },
        },
        "ResponseDeleted": {"type": "object", "required": ["id", "object", "deleted"], "properties": {
            "id": {"type": "string"}, "object": {"const": "response.deleted"}, "deleted": {"const": True}}},
        "ResponseItemList": {"type": "object", "required": ["object", "data", "first_id", "last_id", "has_more"],
                             "properties": {
                                 "object": {"const": "list"},
                                 "data": {"type": "array", "items": {"type": "object", "required": ["id", "type"]}},
                                 "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]},
                                 "has_more": {"type": "boolean"}}},
    }


ERRORS = {
    "400": "Invalid request: the error's `param` names the parameter.",
    "401": "Missing, unknown, revoked or expired API key.",
    "403": "The key may not use this model.",
    "404": "Unknown model or route.",
    "405": "Method not allowed.",
    "413": "Request body larger than GATEWAY_MAX_BODY_BYTES.",
    "429": "A limit of the key (requests, tokens, parallel requests, budget); see Retry-After.",
    "502": "The worker failed or answered garbage.",
    "503": "No worker, or the controller, database or limit store is unreachable; see Retry-After.",
    "504": "The worker stayed silent longer than FASTCHAT_WORKER_API_TIMEOUT.",
}


CHUNK_EVENTS = ("Server-sent events: `data: {chunk}` lines, a failure as one `data: {\"error\": ...}` event, "
                "then `data: [DONE]`.")
RESPONSE_EVENTS = ("Server-sent events `event: <type>` + `data: {event}` with a strictly increasing "
                   "sequence_number: response.created ... response.completed (or response.incomplete); a "
                   "failure as response.failed. No `[DONE]`.")


def responses(ok: str | None, streams: bool | str = False, errors: tuple[str, ...] = tuple(ERRORS)) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    if ok:
        content: dict[str, Any] = {"application/json": {"schema": ref(ok)}}
        if streams:
            content["text/event-stream"] = {"schema": {
                "type": "string", "description": streams if isinstance(streams, str) else CHUNK_EVENTS}}
        answers["200"] = {"description": "OK", "content": content}
    for status in errors:
        answers[status] = {"description": ERRORS[status], "content": {"application/json": {"schema": ref("Error")}}}
    return answers


def post(summary: str, request: str, ok: str, streams: bool | str = False, parameters: list | None = None) -> dict:
    operation = {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref(request)}}},
        "responses": responses(ok, streams),
    }
    if parameters:
        operation["parameters"] = parameters
    return {"post": operation}


def path_parameter(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": model_name()}


def response_id_parameter() -> dict:
    # openai_api/responses/store.py RESPONSE_ID: another id gets a 400 before any query.
    return {"name": "id", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": "^resp_[A-Za-z0-9_-]{1,95}$"}}


def stored_response_paths(read_errors: tuple[str, ...]) -> dict[str, Any]:
    """GET/DELETE /v1/responses/{id} and its input items: the key's own stored responses only
    (another key's is a 404, as an absent one)."""
    errors = (*read_errors, "400", "429")  # the key's request limits (retrieve.py)
    page = [
        {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "before", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
        {"name": "order", "in": "query", "required": False, "schema": {"enum": ["asc", "desc"], "default": "desc"}},
    ]
    return {
        "/v1/responses/{id}": {
            "parameters": [response_id_parameter()],
            "get": {"summary": "A stored response", "responses": responses("Response", errors=errors)},
            "delete": {"summary": "Delete a stored response", "responses": responses("ResponseDeleted", errors=errors)},
        },
        "/v1/responses/{id}/input_items": {"get": {
            "summary": "A stored response's input items, paginated as OpenAI does",
            "parameters": [response_id_parameter(), *page],
            "responses": responses("ResponseItemList", errors=errors),
        }},
    }


@functools.cache
def document() -> dict[str, Any]:
    """The description (built once per process: the settings it reads are fixed at start)."""
    read_errors = ("401", "404", "405", "503")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "FastChat OpenAI gateway",
            "version": "1",
            "description": "OpenAI-compatible API in front of FastChat workers. Unknown fields are ignored.",
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}],
        "paths": {
            "/v1/openapi.json": {"get": {"summary": "This description", "security": [],
                                         "responses": {"200": {"description": "OpenAPI 3.1 document"}}}},
            "/v1/models": {"get": {"summary": "Models the key may use", "responses": responses("ModelList", errors=read_errors)}},
            "/v1/models/{model_id}": {"get": {"summary": "One model", "parameters": [path_parameter("model_id")],
                                              "responses": responses("Model", errors=read_errors)}},
            "/v1/chat/completions": post("Chat completion", "ChatCompletionRequest", "ChatCompletion", streams=True),
            "/v1/completions": post("Completion", "CompletionRequest", "Completion", streams=True),
            "/v1/embeddings": post("Embeddings", "EmbeddingsRequest", "Embeddings"),
            "/v1/engines/{model}/embeddings": post("Embeddings (the model in the path)", "EmbeddingsRequest",
                                                   "Embeddings", parameters=[path_parameter("model")]),
            "/api/v1/token_check": post("Does each prompt plus max_tokens fit its model's context?",
                                        "TokenCheckRequest", "TokenCheckResponse"),
            "/api/v1/chat/completions": post("Chat completion with FastChat's extras (repetition_penalty)",
                                             "FastChatChatCompletionRequest", "ChatCompletion", streams=True),
            "/v1/responses": post("Create a response (Responses API, bridged onto chat completions)",
                                  "ResponseRequest", "Response", streams=RESPONSE_EVENTS),
            **stored_response_paths(read_errors),
        },
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                           "description": "Authorization: Bearer sk-..."}},
        },
    }


@api_endpoint("GET", authenticated=False)
async def openapi_json(request: HttpRequest) -> HttpResponse:
    return json_response(document())
