"""A Responses request: parsed and bounded (400s name the parameter), then a chat completions body.

The chat body is what `openai_api.protocol.parse_chat` then validates, so every chat bound, every
capability need (tools -> 400 on FastChat-only models) and the prompt a FastChat worker sees are
those of the equivalent chat request (docs/responses.md has the mapping table). Items are
normalised to the shapes the store keeps (docs/responses.md, "Items"), each with an id.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from openai_api import protocol
from openai_api.errors import InvalidRequestError
from openai_api.protocol import (
    INT32_MAX,
    check_chars,
    check_length,
    get_bool,
    get_float,
    get_int,
    get_model,
    get_str,
    missing_error,
    range_error,
    type_error,
    unsupported,
)
from upstreams.ids import random_id

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
TRUNCATIONS = ("disabled", "auto")
TOOL_CHOICES = ("auto", "none", "required")
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
# Responses parameters with no chat counterpart here: accepted and not forwarded.
IGNORED = frozenset({
    "include", "service_tier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options", "safety_identifier",
    "max_tool_calls", "top_logprobs", "stream_options", "reasoning", "context_management",
})
# Responses parameters the gateway cannot honour: a 400 naming them when set.
REFUSED = {
    "background": "Background responses are not supported by this gateway.",
    "conversation": "Conversations are not supported by this gateway; use 'previous_response_id'.",
    "prompt": "Prompt templates are not supported by this gateway.",
}
# Chat fields a Responses body must not smuggle into the chat body (they have Responses names,
# or would break the one-choice answer).
CHAT_ONLY = frozenset({
    "messages", "n", "max_tokens", "max_completion_tokens", "response_format", "functions", "function_call",
    "logprobs", "tool_calls", "modalities", "audio", "prediction", "web_search_options",
})
# Everything parse_request reads; other fields pass through to the chat body (as chat keeps them).
KNOWN = frozenset({
    "model", "input", "instructions", "previous_response_id", "store", "stream", "metadata", "truncation",
    "max_output_tokens", "temperature", "top_p", "user", "parallel_tool_calls", "tools", "tool_choice", "text",
}) | IGNORED | frozenset(REFUSED) | CHAT_ONLY


@dataclass(frozen=True)
class ResponsesRequest:
    """A validated POST /v1/responses body. `input_items` are normalised items with ids (the ones
    stored); the other fields are echoed in the Response object as given (or OpenAI's default)."""

    model: str
    input_items: tuple[dict[str, Any], ...]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    truncation: str = "disabled"
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: Any = "auto"
    text: dict[str, Any] = field(default_factory=lambda: {"format": {"type": "text"}})
    reasoning: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown fields, passed on to the chat body


def max_items() -> int:
    return settings.GATEWAY_MAX_RESPONSE_ITEMS


def parse_request(body: dict[str, Any]) -> ResponsesRequest:
    """Validate a POST /v1/responses body (400s name the Responses parameter)."""
    model = get_model(body)
    for name, message in REFUSED.items():
        if body.get(name) not in (None, False):
            raise unsupported(name, message)
    truncation = get_str(body, "truncation", "disabled")
    if truncation not in TRUNCATIONS:
        raise range_error("truncation", f"Invalid value: '{truncation}'. Supported values are: 'disabled' and 'auto'.")
    tools = parse_tools(body.get("tools"))
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise type_error("reasoning", "an object", reasoning)
    if "input" not in body or body["input"] is None:
        raise missing_error("input")
    return ResponsesRequest(
        model=model,
        input_items=parse_input(body["input"]),
        instructions=parse_instructions(body.get("instructions")),
        previous_response_id=get_previous_id(body),
        store=get_bool(body, "store", True),
        stream=get_bool(body, "stream"),
        metadata=parse_metadata(body.get("metadata")),
        truncation=truncation,
        max_output_tokens=get_int(body, "max_output_tokens", None, minimum=1, maximum=INT32_MAX),
        temperature=get_float(body, "temperature", None, minimum=0, maximum=2),
        top_p=get_float(body, "top_p", None, minimum=0, maximum=1),
        user=get_str(body, "user"),
        parallel_tool_calls=None if body.get("parallel_tool_calls") is None else get_bool(body, "parallel_tool_calls"),
        tools=tools,
        tool_choice=parse_tool_choice(body.get("tool_choice"), tools),
        text=parse_text(body.get("text")),
        reasoning=reasoning,
        extra={name: value for name, value in body.items() if name not in KNOWN},
    )


def get_previous_id(body: dict[str, Any]) -> str | None:
    previous = get_str(body, "previous_response_id")
    if previous is not None:
        check_chars("previous_response_id", previous, 200)
    return previous or None


def parse_instructions(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):  # OpenAI also takes a list of items here; the gateway only text
        raise type_error("instructions", "a string", value)
    check_chars("instructions", value, protocol.bounds.content_chars)
    return value


def parse_metadata(value: Any) -> dict[str, str]:
    """OpenAI's bounds: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise type_error("metadata", "an object", value)
    if len(value) > METADATA_PAIRS:
        raise range_error("metadata", f"Invalid 'metadata': too many properties. Expected an object with at most "
                                      f"{METADATA_PAIRS} properties, but got an object with {len(value)} properties.")
    for key, item in value.items():
        check_chars("metadata", key, METADATA_KEY_CHARS)
        if not isinstance(item, str):
            raise type_error(f"metadata.{key}", "a string", item)
        check_chars(f"metadata.{key}", item, METADATA_VALUE_CHARS)
    return dict(value)


# Tools


def parse_tools(value: Any) -> tuple[dict[str, Any], ...]:
    """Function tools, normalised as OpenAI echoes them; any other (hosted) tool type is a 400."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise type_error("tools", "an array", value)
    check_length("tools", value, protocol.bounds.messages)
    tools = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise type_error(where, "an object", tool)
        kind = tool.get("type")
        if kind != "function":
            raise unsupported("tools", f"Tools of type '{kind}' are hosted by OpenAI and not supported by this "
                                       f"gateway; only tools of type 'function' are ({where}).")
        name = get_str(tool, "name")
        if not name:
            raise missing_error(f"{where}.name")
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise type_error(f"{where}.parameters", "an object", parameters)
        strict = tool.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise type_error(f"{where}.strict", "a boolean", strict)
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise type_error(f"{where}.description", "a string", description)
        tools.append({"type": "function", "name": name, "description": description, "parameters": parameters,
                      "strict": strict})
    return tuple(tools)


def parse_tool_choice(value: Any, tools: tuple[dict[str, Any], ...]) -> Any:
    if value is None:
        return "auto"
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise range_error("tool_choice", f"Invalid value: '{value}'. Supported values are: 'auto', 'none' "
                                             "and 'required'.")
        return value
    if not isinstance(value, dict):
        raise type_error("tool_choice", "a string or an object", value)
    if value.get("type") != "function":
        raise unsupported("tool_choice", f"A 'tool_choice' of type '{value.get('type')}' is not supported by this "
                                         "gateway; only 'auto', 'none', 'required' and {'type': 'function', ...}.")
    name = get_str(value, "name")
    if not name:
        raise missing_error("tool_choice.name")
    if name not in {tool["name"] for tool in tools}:
        raise range_error("tool_choice", f"Tool choice '{name}' not found in 'tools' parameter.")
    return {"type": "function", "name": name}


def parse_text(value: Any) -> dict[str, Any]:
    """`text.format`: text, json_object or json_schema (name, schema, description, strict)."""
    if value is None:
        return {"format": {"type": "text"}}
    if not isinstance(value, dict):
        raise type_error("text", "an object", value)
    text = dict(value)
    fmt = value.get("format")
    if fmt is None:
        text["format"] = {"type": "text"}
        return text
    if not isinstance(fmt, dict):
        raise type_error("text.format", "an object", fmt)
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        text["format"] = {"type": kind}
    elif kind == "json_schema":
        name = get_str(fmt, "name")
        if not name:
            raise missing_error("text.format.name")
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise type_error("text.format.schema", "an object", schema)
        text["format"] = {"type": "json_schema", "name": name, "schema": schema,
                          "description": get_str(fmt, "description"),
                          "strict": None if fmt.get("strict") is None else get_bool(fmt, "strict")}
    else:
        raise range_error("text.format.type", f"Invalid value: '{kind}'. Supported values are: 'text', "
                                              "'json_object' and 'json_schema'.")
    return text


# Input items


def parse_input(value: Any) -> tuple[dict[str, Any], ...]:
    """A string (one user message) or a list of items, at most GATEWAY_MAX_RESPONSE_ITEMS."""
    if isinstance(value, str):
        check_chars("input", value, protocol.bounds.content_chars)
        return (message_item("user", [input_text(value)]),)
    if not isinstance(value, list):
        raise type_error("input", "a string or an array of input items", value)
    if not value:
        raise range_error("input", "[] is too short - 'input'")
    check_length("input", value, max_items())
    return tuple(parse_item(item, f"input[{i}]") for i, item in enumerate(value))


def parse_item(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise type_error(where, "an object", item)
    kind = item.get("type")
    if kind is None and "role" in item:
        kind = "message"  # EasyInputMessage
    if kind == "message":
        return parse_message(item, where)
    if kind == "function_call":
        arguments = item.get("arguments")
        if not isinstance(arguments, str):
            raise type_error(f"{where}.arguments", "a string", arguments)
        check_chars(f"{where}.arguments", arguments, protocol.bounds.content_chars)
        return {"id": item_id(item, where, "fc_"), "type": "function_call", "call_id": required(item, "call_id", where),
                "name": required(item, "name", where), "arguments": arguments, "status": "completed"}
    if kind == "function_call_output":
        return {"id": item_id(item, where, "fco_"), "type": "function_call_output",
                "call_id": required(item, "call_id", where), "output": output_text(item.get("output"), where),
                "status": "completed"}
    if kind is None:
        raise missing_error(f"{where}.type")
    raise unsupported(f"{where}.type", f"Input items of type '{kind}' are not supported by this gateway; supported: "
                                       "'message', 'function_call' and 'function_call_output'.")


def required(obj: dict[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    if value is None or value == "":
        raise missing_error(f"{where}.{name}")
    if not isinstance(value, str):
        raise type_error(f"{where}.{name}", "a string", value)
    check_chars(f"{where}.{name}", value, 256)
    return value


def item_id(item: dict[str, Any], where: str, prefix: str) -> str:
    value = item.get("id")
    if value is None:
        return random_id(prefix)
    if not isinstance(value, str) or not value:
        raise type_error(f"{where}.id", "a string", value)
    check_chars(f"{where}.id", value, 256)
    return value


def output_text(value: Any, where: str) -> str:
    """A function call's output: a string, or input_text parts (joined)."""
    if isinstance(value, str):
        check_chars(f"{where}.output", value, protocol.bounds.content_chars)
        return value
    if isinstance(value, list) and all(isinstance(part, dict) and part.get("type") == "input_text"
                                       and isinstance(part.get("text"), str) for part in value):
        return output_text("".join(part["text"] for part in value), where)
    raise type_error(f"{where}.output", "a string", value)


def message_item(role: str, content: list[dict[str, Any]], item_id_: str | None = None) -> dict[str, Any]:
    return {"id": item_id_ or random_id("msg_"), "type": "message", "role": role, "content": content,
            "status": "completed"}


def input_text(text: str) -> dict[str, Any]:
    return {"type": "input_text", "text": text}


def parse_message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role is None:
        raise missing_error(f"{where}.role")
    if role not in MESSAGE_ROLES:
        raise range_error(f"{where}.role", f"Invalid value: '{role}'. Supported values are: 'user', 'system', "
                                           "'developer' and 'assistant'.")
    content = item.get("content")
    bounds = protocol.bounds
    if isinstance(content, str):
        check_chars(f"{where}.content", content, bounds.content_chars)
        part = {"type": "output_text", "text": content, "annotations": []} if role == "assistant" else input_text(content)
        return message_item(role, [part], item_id(item, where, "msg_"))
    if not isinstance(content, list):
        raise type_error(f"{where}.content", "a string or an array of content parts", content)
    check_length(f"{where}.content", content, bounds.content_parts)
    parts = [parse_part(part, f"{where}.content[{i}]", role) for i, part in enumerate(content)]
    return message_item(role, parts, item_id(item, where, "msg_"))


def parse_part(part: Any, where: str, role: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise type_error(where, "an object", part)
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise type_error(f"{where}.text", "a string", text)
        check_chars(f"{where}.text", text, protocol.bounds.content_chars)
        if kind == "output_text":
            return {"type": "output_text", "text": text, "annotations": []}
        return input_text(text)
    if kind == "refusal" and role == "assistant":  # an earlier answer's refusal, sent back
        refusal = part.get("refusal")
        if not isinstance(refusal, str):
            raise type_error(f"{where}.refusal", "a string", refusal)
        check_chars(f"{where}.refusal", refusal, protocol.bounds.content_chars)
        return {"type": "refusal", "refusal": refusal}
    if kind == "input_image" and role == "user":
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            if part.get("file_id") is not None:
                raise unsupported(f"{where}.file_id", "Images by 'file_id' are not supported by this gateway; "
                                                      "send 'image_url'.")
            raise type_error(f"{where}.image_url", "a string", url)
        detail = part.get("detail") or "auto"
        if detail not in ("auto", "low", "high"):
            raise range_error(f"{where}.detail", f"Invalid value: '{detail}'. Supported values are: 'auto', 'low' "
                                                 "and 'high'.")
        return {"type": "input_image", "image_url": url, "detail": detail}
    raise unsupported(f"{where}.type", f"Content parts of type '{kind}' are not supported here.")


# The chat completions body


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of a conversation: `instructions` first (a system message), then the items.

    Developer messages become system messages (FastChat and older servers know no developer role);
    consecutive function calls become one assistant message's `tool_calls`, attached to a directly
    preceding assistant text message; a call's output becomes a tool message. An output whose call
    is not earlier in the conversation is a 400 (param "input").
    """
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        messages.append({"role": "system", "content": instructions})
    calls: set[str] = set()
    for item in items:
        kind = item["type"]
        if kind == "message":
            messages.append(chat_message(item))
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            calls.add(item["call_id"])
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                # Content "": llama-cpp-python's server refuses null, and its templates read a missing one.
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:  # function_call_output
            if item["call_id"] not in calls:
                raise InvalidRequestError(f"No tool call found for function call output with call_id "
                                          f"{item['call_id']}.", param="input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def chat_message(item: dict[str, Any]) -> dict[str, Any]:
    role = "system" if item["role"] == "developer" else item["role"]
    parts = item["content"]
    if role != "user" or all(part["type"] != "input_image" for part in parts):
        # Text only (assistant, system: always): one string, as the equivalent chat request sends it.
        message = {"role": role, "content": "".join(part.get("text", "") for part in parts)}
        refusals = [part["refusal"] for part in parts if part["type"] == "refusal"]
        if refusals:  # chat's assistant `refusal` (a FastChat prompt has no place for it)
            message["refusal"] = "".join(refusals)
        return message
    content = []
    for part in parts:
        if part["type"] == "input_image":
            image = {"url": part["image_url"]}
            if part.get("detail", "auto") != "auto":
                image["detail"] = part["detail"]
            content.append({"type": "image_url", "image_url": image})
        else:
            content.append({"type": "text", "text": part["text"]})
    return {"role": role, "content": content}


def chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": tool["name"]}
    for name in ("description", "parameters", "strict"):
        if tool.get(name) is not None:
            function[name] = tool[name]
    return {"type": "function", "function": function}


def response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    kind = fmt["type"]
    if kind == "text":
        return None  # the chat default: nothing to send (a FastChat route takes it as is)
    if kind == "json_object":
        return {"type": "json_object"}
    schema = {"name": fmt["name"], "schema": fmt["schema"]}
    for name in ("description", "strict"):
        if fmt.get(name) is not None:
            schema[name] = fmt[name]
    return {"type": "json_schema", "json_schema": schema}


def chat_body(request: ResponsesRequest, history: list[dict[str, Any]] | tuple = ()) -> dict[str, Any]:
    """The chat completions body for `request` after `history` (the stored chain's items, oldest
    first). A stream always asks for usage: the Response object carries it."""
    body: dict[str, Any] = dict(request.extra)
    body["model"] = request.model
    body["messages"] = chat_messages(request.instructions, [*history, *request.input_items])
    if request.max_output_tokens is not None:
        body["max_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p", "user"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.tools:
        body["tools"] = [chat_tool(tool) for tool in request.tools]
        if request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
    choice = request.tool_choice
    if isinstance(choice, dict):
        body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif request.tools:  # OpenAI's chat refuses a tool_choice without tools
        body["tool_choice"] = choice
    fmt = response_format(request.text["format"])
    if fmt is not None:
        body["response_format"] = fmt
    if request.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body
