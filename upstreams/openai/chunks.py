"""What the gateway reads in, or corrects of, an upstream's answers and chunks.

- ToolCallHeaders: OpenAI sends a tool call's `id`, `type` and `function.name` in the first
  delta of that call only, then `function.arguments` fragments; llama.cpp's server repeats all
  three with every fragment, so a client that joins fragments gets `get_weatherget_weather...`.
- text_pieces(): the token-bearing deltas of a chunk, counted when an upstream reports no usage
  (llama.cpp's server streams one token per chunk, so the count is exact there; its prompt
  tokens are estimated from characters).
- estimated_prompt_tokens(): about four characters a token, for upstreams that never report it.
"""
from __future__ import annotations

import math
from typing import Any

import orjson


class ToolCallHeaders:
    """Remembers which (choice, tool call) has had its header; strips repeats in place."""

    __slots__ = ("seen", "drop_function_call")

    def __init__(self, drop_function_call: bool):
        self.seen: set[tuple[Any, Any]] = set()
        # llama.cpp also sends the deprecated function_call beside tool_calls: a client that asked
        # with `tools` gets tool_calls only, as from OpenAI.
        self.drop_function_call = drop_function_call

    def fix(self, chunk: dict[str, Any]) -> bool:
        """Correct `chunk` in place; True if anything changed."""
        changed = False
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return False
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            calls = delta.get("tool_calls")
            if self.drop_function_call and "function_call" in delta and (calls or delta["function_call"] is None):
                del delta["function_call"]
                changed = True
            if not isinstance(calls, list):
                continue
            for call in calls:
                if not isinstance(call, dict):
                    continue
                key = (choice.get("index", 0), call.get("index", 0))
                if key not in self.seen:
                    self.seen.add(key)
                    continue
                for field in ("id", "type"):
                    if field in call:
                        del call[field]
                        changed = True
                function = call.get("function")
                if isinstance(function, dict) and "name" in function:
                    del function["name"]
                    changed = True
        return changed


def text_pieces(chunk: dict[str, Any]) -> int:
    """How many choices of `chunk` carry generated text (content, text or tool arguments)."""
    choices = chunk.get("choices")
    if not choices or not isinstance(choices, list):
        return 0
    count = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            # An empty content is a token too (llama.cpp sends one for a byte that does not end a
            # character), except beside the role that opens a choice.
            if isinstance(content, str) and (content or delta.get("role") is None):
                count += 1
            else:
                calls = delta.get("tool_calls")
                if isinstance(calls, list) and any(
                    isinstance(call, dict) and isinstance(call.get("function"), dict)
                    and call["function"].get("arguments") for call in calls
                ):
                    count += 1
        elif isinstance(choice.get("text"), str) and (choice["text"] or not choice.get("finish_reason")):
            count += 1
    return count


def estimated_tokens(text_chars: int) -> int:
    return math.ceil(text_chars / 4)


def json_chars(value: Any) -> int:
    try:
        return len(orjson.dumps(value))
    except TypeError:
        return 0


def estimated_prompt_tokens(body: dict[str, Any]) -> int:
    """About the prompt's tokens, from the request body the upstream received."""
    chars = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            chars += 16  # the role and the template's markers around each message
            content = message.get("content")
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                chars += sum(len(part.get("text", "")) for part in content
                             if isinstance(part, dict) and isinstance(part.get("text"), str))
            if message.get("tool_calls"):  # a template writes the calls' names and arguments out
                chars += json_chars(message["tool_calls"])
    if body.get("tools"):  # and the tools' definitions, mostly into a system message
        chars += json_chars(body["tools"])
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            chars += sum(len(item) if isinstance(item, str) else 4 * len(item) if isinstance(item, list) else 4
                         for item in value)
    return estimated_tokens(chars)


def answer_text_chars(body: dict[str, Any]) -> int:
    """The characters a non-streamed answer generated (for an estimate when it reports no usage)."""
    chars = 0
    for choice in body.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            if isinstance(message.get("content"), str):
                chars += len(message["content"])
            for call in message.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    chars += len(function["arguments"])
        elif isinstance(choice.get("text"), str):
            chars += len(choice["text"])
    return chars
