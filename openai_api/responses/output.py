"""The Response object as OpenAI returns it, from a chat completion (or a stream's accumulation).

Both paths end in `finished()`, so a streamed response's final object is built exactly as the
non-streamed one (the SDK's stream accumulator must agree with the non-streamed answer). No
`output_text` field: the SDK computes it from `output` (openai.types.responses.Response).
"""
from __future__ import annotations

import time
from typing import Any

from openai_api.responses.request import ResponsesRequest
from upstreams.ids import random_id
from upstreams.usage import Usage, token_count

# Chat finish reasons that leave a response incomplete, and the reason OpenAI gives.
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_id() -> str:
    return random_id("resp_")


def base_response(request: ResponsesRequest, response_id: str, created_at: int, model: str) -> dict[str, Any]:
    """The response in progress: every echoed parameter, no output, no usage yet."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": None,
        "model": model,
        "output": [],
        "parallel_tool_calls": True if request.parallel_tool_calls is None else request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id,
        "reasoning": request.reasoning if request.reasoning is not None else {"effort": None, "summary": None},
        "service_tier": "default",
        "store": request.store,
        "temperature": request.temperature,
        "text": request.text,
        "tool_choice": request.tool_choice,
        "tools": list(request.tools),
        "top_p": request.top_p,
        "truncation": request.truncation,
        "usage": None,
        "user": request.user,
        "metadata": request.metadata,
    }


def message_item(item_id: str, text: str, status: str = "completed", refusal: bool = False) -> dict[str, Any]:
    part = refusal_part(text) if refusal else text_part(text)
    return {"id": item_id, "type": "message", "status": status, "content": [part], "role": "assistant"}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def refusal_part(text: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": text}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "arguments": arguments, "call_id": call_id,
            "name": name}


def usage_object(usage: Usage, reported: Any = None) -> dict[str, Any]:
    """Responses usage from the checked counts; cached and reasoning tokens from the upstream's
    chat usage details when it reported them (else 0)."""
    details = reported if isinstance(reported, dict) else {}
    prompt_details = details.get("prompt_tokens_details")
    completion_details = details.get("completion_tokens_details")
    cached = token_count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else None
    reasoning = token_count(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached or 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning or 0},
        "total_tokens": usage.total_tokens,
    }


def finished(base: dict[str, Any], output: list[dict[str, Any]], finish_reason: str | None,
             usage: dict[str, Any]) -> dict[str, Any]:
    """The final response: completed, or incomplete when the output hit max_output_tokens (or a
    content filter)."""
    response = dict(base)
    response["output"] = output
    response["usage"] = usage
    if finish_reason in INCOMPLETE:
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": INCOMPLETE[finish_reason]}
    else:
        response["status"] = "completed"
        response["completed_at"] = int(time.time())
    return response


def failed(base: dict[str, Any], output: list[dict[str, Any]], code: str, message: str) -> dict[str, Any]:
    response = dict(base)
    response.update(status="failed", output=output, error={"code": code, "message": message})
    return response


def output_items(completion: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """A chat completion's first choice as Responses output items (its text as one message, its
    refusal as another, then its tool calls as function_call items) and the choice's finish_reason."""
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    finish_reason = choice.get("finish_reason")
    items: list[dict[str, Any]] = []
    text = message.get("content")
    calls = [call for call in message.get("tool_calls") or () if isinstance(call, dict)]
    refusal = message.get("refusal")
    refused = isinstance(refusal, str) and bool(refusal)
    if (isinstance(text, str) and text) or not (calls or refused):
        items.append(message_item(random_id("msg_"), text if isinstance(text, str) else ""))
    if refused:
        items.append(message_item(random_id("msg_"), refusal, refusal=True))
    for call in calls:
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else random_id("call_")
        name, arguments = function.get("name"), function.get("arguments")
        items.append(function_call_item(random_id("fc_"), call_id, name if isinstance(name, str) else "",
                                        arguments if isinstance(arguments, str) else ""))
    if finish_reason in INCOMPLETE:  # the item the limit cut (a stream marks the one still open)
        items[-1]["status"] = "incomplete"
    return items, finish_reason if isinstance(finish_reason, str) else None


def from_completion(base: dict[str, Any], completion: dict[str, Any], usage: Usage) -> dict[str, Any]:
    """The final Response object of a non-streamed chat completion (`usage`: its checked counts)."""
    items, finish_reason = output_items(completion)
    return finished(base, items, finish_reason, usage_object(usage, completion.get("usage")))
