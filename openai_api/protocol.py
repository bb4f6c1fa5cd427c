"""Request parsing and validation for the OpenAI endpoints.

Requests become the neutral calls of upstreams/calls.py; anything wrong becomes an
InvalidRequestError that names the parameter. Range messages are FastChat's own (check_requests),
so clients that match on them keep working. Unknown fields are kept in the call's body (for
upstreams that take them). Features only some upstreams have (tools, functions, JSON mode and
schemas, images) are recorded as the call's needs: the router refuses a call none of the
model's routes can honour, with a 400 naming the parameter, rather than dropping it silently
(docs/decisions.md).

Every size a client chooses is bounded (settings GATEWAY_MAX_*), and checked before anything
is built per item: a list's length before its elements, prompts x n before any generation.
Integers fit in 64 bits (a worker payload cannot carry more), floats are finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from django.core.signals import setting_changed

from openai_api.errors import ErrorCode, InvalidJSONError, InvalidRequestError
from openai_api.json_shape import check_json_shape
from upstreams.calls import (
    EMBEDDINGS,
    JSON_MODE,
    JSON_SCHEMA,
    TOOLS,
    VISION,
    ChatCall,
    CompletionsCall,
    EmbeddingsCall,
    Need,
    Sampling,
    TokenCheckItem,
)

MISSING = object()
JSON_TYPE_NAMES = {
    str: "a string", int: "an integer", float: "a number", bool: "a boolean",
    list: "an array", dict: "an object", type(None): "null",
}
CHAT_ROLES = {"system", "developer", "user", "assistant"}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MAX = 2**31 - 1  # token counts (max_tokens, top_k): what workers take as a C int
TOKEN_ID_MAX = 2**32 - 1
NOT_AN_OBJECT = "The request body must be a JSON object."


@dataclass(frozen=True)
class Bounds:
    """The GATEWAY_MAX_* settings, read once (a Django setting costs a Python-level lookup)."""

    json_depth: int
    json_values: int
    model_chars: int
    generations: int
    messages: int
    content_parts: int
    content_chars: int
    stop: int
    stop_chars: int
    embedding_inputs: int
    token_check_items: int

    @classmethod
    def from_settings(cls) -> Bounds:
        return cls(
            json_depth=settings.GATEWAY_MAX_JSON_DEPTH, json_values=settings.GATEWAY_MAX_JSON_VALUES,
            model_chars=settings.GATEWAY_MAX_MODEL_CHARS, generations=settings.GATEWAY_MAX_GENERATIONS,
            messages=settings.GATEWAY_MAX_MESSAGES, content_parts=settings.GATEWAY_MAX_CONTENT_PARTS,
            content_chars=settings.GATEWAY_MAX_CONTENT_CHARS, stop=settings.GATEWAY_MAX_STOP,
            stop_chars=settings.GATEWAY_MAX_STOP_CHARS, embedding_inputs=settings.GATEWAY_MAX_EMBEDDING_INPUTS,
            token_check_items=settings.GATEWAY_MAX_TOKEN_CHECK_ITEMS,
        )


bounds = Bounds.from_settings()


def reread_bounds(*, setting: str, **kwargs: Any) -> None:
    global bounds
    if setting.startswith("GATEWAY_MAX_"):
        bounds = Bounds.from_settings()


setting_changed.connect(reread_bounds)  # tests' override_settings


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The body as a dict; 400 before parsing if it is not an object or is too deep or too big."""
    first = raw[:1]
    if first != b"{" and raw.lstrip()[:1] != b"{":
        # Not an object: no need to parse it (a 16 MB array would cost a second) to say so.
        raise InvalidJSONError(NOT_AN_OBJECT if raw.strip() else InvalidJSONError.default_message)
    check_json_shape(raw, bounds.json_depth, bounds.json_values)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidJSONError() from None
    if not isinstance(body, dict):
        raise InvalidJSONError(NOT_AN_OBJECT)
    return body


def type_error(param: str, expected: str, value: Any) -> InvalidRequestError:
    got = JSON_TYPE_NAMES.get(type(value), "a value of another type")
    return InvalidRequestError(
        f"Invalid type for '{param}': expected {expected}, but got {got} instead.",
        param=param, code="invalid_type", fastchat_code=ErrorCode.VALIDATION_TYPE_ERROR,
    )


def range_error(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_value")


def required(body: dict, name: str) -> Any:
    value = body.get(name, MISSING)
    if value is MISSING or value is None:
        raise missing_error(name)
    return value


def missing_error(param: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Missing required parameter: '{param}'.", param=param,
        code="missing_required_parameter", fastchat_code=ErrorCode.VALIDATION_TYPE_ERROR,
    )


def get_str(body: dict, name: str, default: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise type_error(name, "a string", value)
    return value


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise type_error(name, "a boolean", value)
    return value


def get_int(body: dict, name: str, default: int | None, minimum: int = INT64_MIN, maximum: int = INT64_MAX) -> int | None:
    """An integer within [minimum, maximum] (64-bit by default: a worker payload carries no
    more, and JSON encoding refuses bigger ints). `1e20` counts as an integer, as in FastChat."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(name, "an integer", value)
    check_range(name, value, minimum, maximum)
    return value


def get_float(body: dict, name: str, default: float, minimum: float | None = None, maximum: float | None = None) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise type_error(name, "a number", value)
    try:
        value = float(value)
    except OverflowError:  # an int too big for a float
        value = math.inf if value > 0 else -math.inf
    if not math.isfinite(value):  # NaN compares false with everything: the range check would pass it
        raise range_error(name, f"{value} is not a finite number - '{name}'")
    check_range(name, value, minimum, maximum)
    return value


def check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise range_error(name, f"{value} is less than the minimum of {minimum} - '{name}'")
    if maximum is not None and value > maximum:
        raise range_error(name, f"{value} is greater than the maximum of {maximum} - '{name}'")


def get_top_k(body: dict) -> int:
    top_k = get_int(body, "top_k", -1, maximum=INT32_MAX)
    if top_k < 1 and top_k != -1:
        # FastChat refuses only 0 and passes other negatives on to workers that misbehave.
        raise range_error("top_k", f"{top_k} is out of Range. Either set top_k to -1 or >=1.")
    return top_k


def get_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    elif isinstance(stop, list):
        # Workers test every stop string against the output after every token.
        check_length("stop", stop, bounds.stop)
        if not all(isinstance(item, str) for item in stop):
            raise type_error("stop", "a string or an array of strings", stop)
    else:
        raise type_error("stop", "a string or an array of strings", stop)
    max_chars = bounds.stop_chars
    for item in stop:
        if len(item) > max_chars:
            raise range_error("stop", f"Each 'stop' sequence may have at most {max_chars} characters.")
    return stop


def check_length(param: str, items: list, maximum: int) -> None:
    """OpenAI's message for an array that is too long (checked before its elements are)."""
    if len(items) > maximum:
        raise range_error(param, f"Invalid '{param}': array too long. Expected an array with maximum length "
                                 f"{maximum}, but got an array with length {len(items)} instead.")


def check_chars(param: str, text: str, maximum: int) -> None:
    if len(text) > maximum:
        raise range_error(param, f"Invalid '{param}': string too long. Expected a string with maximum length "
                                 f"{maximum}, but got a string with length {len(text)} instead.")


def get_model(body: dict, path_model: str | None = None, param: str = "model") -> str:
    """The model name: bounded and printable (it lands in logs, usage rows and error messages)."""
    model = body.get("model")
    if not model and path_model is not None:  # /v1/engines/{model}/embeddings
        model = path_model
    if model is None:
        raise missing_error(param)
    if not isinstance(model, str):
        raise type_error(param, "a string", model)
    check_chars(param, model, bounds.model_chars)
    if not model.isprintable():
        raise range_error(param, f"Invalid '{param}': model names may not contain control characters.")
    return model


def is_model_name(value: Any) -> bool:
    """Whether `value` would pass get_model (for naming the model of a refused request)."""
    return isinstance(value, str) and len(value) <= bounds.model_chars and value.isprintable()


def get_include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise type_error("stream_options", "an object", options)
    return get_bool(options, "include_usage")


def body_needs(body: dict, needs: list[Need]) -> None:
    """Record the tools and JSON modes a chat body asks for (the messages add theirs)."""
    for name in ("tools", "functions"):
        if body.get(name):
            needs.append(Need(TOOLS, name, f"'{name}' is not supported by this gateway's models."))
    if body.get("tool_choice") not in (None, "none"):
        needs.append(Need(TOOLS, "tool_choice", "'tool_choice' is not supported by this gateway's models."))
    if body.get("function_call") not in (None, "none"):
        needs.append(Need(TOOLS, "function_call", "'function_call' is not supported by this gateway's models."))
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind != "text":
            message = "Only 'response_format' of type 'text' is supported."
            needs.append(Need(JSON_MODE if kind == "json_object" else JSON_SCHEMA, "response_format", message))


def unsupported(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="unsupported_parameter")


# Sampling parameters shared by chat and completions


def parse_sampling(body: dict, max_tokens: int | None) -> Sampling:
    # FastChat's check order: max_tokens, n, temperature, top_p, top_k, stop.
    return Sampling(
        max_tokens=max_tokens,
        n=get_int(body, "n", 1, minimum=1, maximum=bounds.generations),
        temperature=get_float(body, "temperature", 0.7, minimum=0, maximum=2),
        top_p=get_float(body, "top_p", 1.0, minimum=0, maximum=1),
        top_k=get_top_k(body),
        stop=get_stop(body),
        presence_penalty=get_float(body, "presence_penalty", 0.0, minimum=-2, maximum=2),
        frequency_penalty=get_float(body, "frequency_penalty", 0.0, minimum=-2, maximum=2),
        seed=get_int(body, "seed", None),
        stream=get_bool(body, "stream"),
        include_usage=get_include_usage(body),
    )


# Chat


def parse_chat(body: dict, *, fastchat_extras: bool = False) -> ChatCall:
    """Validate a /v1/chat/completions body (or /api/v1/chat/completions with extras)."""
    model = get_model(body)
    needs: list[Need] = []
    messages = parse_messages(required(body, "messages"), needs)
    body_needs(body, needs)
    max_tokens = get_int(body, "max_tokens", None, minimum=1, maximum=INT32_MAX)
    if max_tokens is None:
        max_tokens = get_int(body, "max_completion_tokens", None, minimum=1, maximum=INT32_MAX)
    repetition_penalty = get_float(body, "repetition_penalty", 1.0, minimum=0) if fastchat_extras else None
    return ChatCall(
        public_model=model,
        messages=messages,
        sampling=parse_sampling(body, max_tokens),
        user=get_str(body, "user"),
        body=body,
        needs=frozenset(need.capability for need in needs),
        asked=tuple(needs),
        repetition_penalty=repetition_penalty,
    )


def parse_messages(messages: Any, needs: list[Need]) -> str | list[dict[str, Any]]:
    """A plain prompt string (FastChat allows it) or a list of normalised messages."""
    if isinstance(messages, str):
        check_chars("messages", messages, bounds.content_chars)
        return messages
    if not isinstance(messages, list):
        raise type_error("messages", "an array of messages", messages)
    if not messages:
        raise range_error("messages", "[] is too short - 'messages'")
    check_length("messages", messages, bounds.messages)
    return [parse_message(message, f"messages[{i}]", needs) for i, message in enumerate(messages)]


def parse_message(message: Any, where: str, needs: list[Need]) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise type_error(where, "an object", message)
    role = required_in(message, "role", where)
    content = message.get("content")
    if role in ("tool", "function"):
        needs.append(Need(TOOLS, f"{where}.role", f"Messages with role '{role}' are not supported by this gateway's models."))
        if content is None:
            content = ""
    elif role not in CHAT_ROLES:
        raise range_error(
            f"{where}.role",
            f"Invalid value: '{role}'. Supported values are: 'system', 'developer', 'user' and 'assistant'.",
        )
    if message.get("tool_calls"):
        needs.append(Need(TOOLS, f"{where}.tool_calls", "Assistant 'tool_calls' are not supported by this gateway's models."))
    if content is None and role == "assistant":
        content = ""
    parsed = parse_content(content, f"{where}.content", allow_images=role == "user")
    if not isinstance(parsed, str) and any(part["type"] == "image_url" for part in parsed):
        needs.append(Need(VISION, f"{where}.content", "Images are not supported by this model."))
    return {"role": role, "content": parsed}


def required_in(obj: dict, name: str, where: str) -> str:
    value = obj.get(name)
    if value is None:
        raise InvalidRequestError(
            f"Missing required parameter: '{where}.{name}'.", param=f"{where}.{name}",
            code="missing_required_parameter", fastchat_code=ErrorCode.VALIDATION_TYPE_ERROR,
        )
    if not isinstance(value, str):
        raise type_error(f"{where}.{name}", "a string", value)
    return value


def parse_content(content: Any, where: str, allow_images: bool) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        check_chars(where, content, bounds.content_chars)
        return content
    if not isinstance(content, list):
        raise type_error(where, "a string or an array of content parts", content)
    check_length(where, content, bounds.content_parts)
    return [parse_part(part, f"{where}[{i}]", allow_images) for i, part in enumerate(content)]


def parse_part(part: Any, where: str, allow_images: bool) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise type_error(where, "an object", part)
    kind = required_in(part, "type", where)
    if kind == "text":
        text = required_in(part, "text", where)
        check_chars(f"{where}.text", text, bounds.content_chars)
        return {"type": "text", "text": text}
    if kind == "image_url" and allow_images:
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise type_error(f"{where}.image_url", "an object with a 'url' string", image)
        return {"type": "image_url", "image_url": {"url": url}}
    raise unsupported(f"{where}.type", f"Content parts of type '{kind}' are not supported here.")


# Completions and embeddings input


def parse_prompt_input(value: Any, param: str, max_inputs: int) -> list[str] | list[list[int]]:
    """A str, list of str, list of token ids, or list of token-id lists; never empty, at most
    `max_inputs` inputs (checked before any element is looked at).

    Returns a list of strings, or a list of token-id lists to be decoded (see tokens.py).
    """
    max_chars = bounds.content_chars
    if isinstance(value, str):
        check_chars(param, value, max_chars)
        return [value]
    if not isinstance(value, list):
        raise type_error(param, "a string or an array", value)
    if not value:
        raise range_error(param, f"[] is too short - '{param}'")
    if isinstance(value[0], int) and not isinstance(value[0], bool):
        # One prompt of token ids (its length is bounded by the body's number of values).
        if all(is_token_id(item) for item in value):
            return [value]
        raise type_error(param, "a string, an array of strings, or token ids", value)
    check_length(param, value, max_inputs)
    if all(isinstance(item, str) and len(item) <= max_chars for item in value):
        return value
    if all(isinstance(item, list) and item and all(is_token_id(t) for t in item) for item in value):
        return value
    for i, item in enumerate(value):
        if isinstance(item, str):
            check_chars(f"{param}[{i}]", item, max_chars)
    raise type_error(param, "a string, an array of strings, or token ids", value)


def is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= TOKEN_ID_MAX


def parse_completion(body: dict) -> CompletionsCall:
    """Validate a /v1/completions body. Token-id prompts are left for the view to decode
    (openai_api/tokens.py): the call's `prompts` are replaced by their text."""
    model = get_model(body)
    max_generations = bounds.generations
    prompts = parse_prompt_input(required(body, "prompt"), "prompt", max_generations)
    # `max_tokens: null` means the default, 16 (FastChat crashes on it).
    max_tokens = get_int(body, "max_tokens", 16, minimum=1, maximum=INT32_MAX)
    sampling = parse_sampling(body, max_tokens)
    best_of = get_int(body, "best_of", None, minimum=1, maximum=max_generations)
    if best_of is not None and best_of < sampling.n:
        raise range_error("best_of", "best_of must be greater than or equal to n.")
    check_generations(len(prompts), sampling.n, best_of, max_generations)
    return CompletionsCall(
        public_model=model,
        prompts=prompts,
        sampling=sampling,
        echo=get_bool(body, "echo"),
        logprobs=get_int(body, "logprobs", None, minimum=0, maximum=5),
        best_of=best_of,
        use_beam_search=get_bool(body, "use_beam_search"),
        user=get_str(body, "user"),
        body=body,
    )


def check_generations(prompts: int, n: int, best_of: int | None, maximum: int) -> None:
    """Every prompt gets n worker calls, each generating best_of sequences (FastChat's way):
    bounded before any of them exists."""
    if prompts * n > maximum:
        raise range_error("n", f"{prompts} prompts with n={n} ask for {prompts * n} generations; "
                               f"at most {maximum} are allowed per request.")
    if best_of is not None and prompts * n * best_of > maximum:
        raise range_error("best_of", f"{prompts} prompts with n={n} and best_of={best_of} ask for "
                                     f"{prompts * n * best_of} generations; at most {maximum} are allowed per request.")


def parse_embeddings(body: dict, path_model: str | None = None) -> EmbeddingsCall:
    model = get_model(body, path_model)
    encoding_format = get_str(body, "encoding_format")
    if encoding_format not in (None, "float", "base64"):
        raise range_error(
            "encoding_format",
            f"Invalid value: '{encoding_format}'. Supported values are: 'float' and 'base64'.",
        )
    return EmbeddingsCall(
        public_model=model,
        inputs=parse_prompt_input(required(body, "input"), "input", bounds.embedding_inputs),
        encoding_format=encoding_format,
        user=get_str(body, "user"),
        body=body,
        needs=frozenset({EMBEDDINGS}),
    )


# FastChat's /api/v1/token_check


def parse_token_check(body: dict) -> list[TokenCheckItem]:
    prompts = required(body, "prompts")
    if not isinstance(prompts, list):
        raise type_error("prompts", "an array", prompts)
    check_length("prompts", prompts, bounds.token_check_items)
    max_chars = bounds.content_chars
    items = []
    for i, item in enumerate(prompts):
        where = f"prompts[{i}]"
        if not isinstance(item, dict):
            raise type_error(where, "an object", item)
        try:
            max_tokens = get_int(item, "max_tokens", None, minimum=0, maximum=INT32_MAX)
        except InvalidRequestError as exc:
            exc.param = f"{where}.max_tokens"
            raise
        if max_tokens is None:
            required_in(item, "max_tokens", where)
        model = get_model(item, param=f"{where}.model")
        prompt = required_in(item, "prompt", where)
        check_chars(f"{where}.prompt", prompt, max_chars)
        items.append(TokenCheckItem(model, prompt, max_tokens))
    return items
