"""Chat chunks -> Responses stream events, in OpenAI's order, each with a strictly increasing
`sequence_number`, framed `event: <type>\\ndata: <json>\\n\\n` (no `[DONE]`).

    response.created, response.in_progress,
    per output item (one at a time, each with its own output_index):
      message:       output_item.added, content_part.added, output_text.delta..., output_text.done,
                     content_part.done, output_item.done
      function_call: output_item.added, function_call_arguments.delta..., function_call_arguments.done,
                     output_item.done
      refusal:       a message as text is, with refusal.delta... and refusal.done
    response.completed | response.incomplete (max_output_tokens) | response.failed (mid-stream failure)

Text opens a message item; a chunk's tool-call delta opens (by its `index`) a function_call item.
An item is done when the next one starts or the stream ends. openai_api/streaming.py drives a
`ResponseEvents` through the `EventTranslator` protocol; the final response is built by
output.finished, as the non-streamed one.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from openai_api.errors import OpenAIError
from openai_api.responses import output
from upstreams.errors import BadAnswer
from upstreams.ids import random_id
from upstreams.usage import Usage

Finalise = Callable[[dict[str, Any]], Awaitable[None]]


def frame(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class Item:
    """An output item being streamed: a message's text ("message") or refusal ("refusal"), or a
    function call's arguments ("function_call")."""

    __slots__ = ("kind", "id", "index", "parts", "call_id", "name", "done", "status")

    def __init__(self, kind: str, item_id: str, index: int, call_id: str = "", name: str = "") -> None:
        self.kind, self.id, self.index = kind, item_id, index
        self.parts: list[str] = []
        self.call_id, self.name = call_id, name
        self.done = False
        self.status = "in_progress"

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def as_output(self, status: str) -> dict[str, Any]:
        if self.kind != "function_call":
            return output.message_item(self.id, self.text, status, refusal=self.kind == "refusal")
        return output.function_call_item(self.id, self.call_id, self.name, self.text, status)


class ResponseEvents:
    """The events of one streamed response (see the module's docstring).

    `start()` -> the opening events; `chunk(raw)` -> the events of one chat chunk (b"" if none);
    `end(usage)` -> the final events, after `finalise(final response)` ran (the store's save);
    `failed(error)` -> the closing `response.failed` event.
    """

    def __init__(self, base: dict[str, Any], finalise: Finalise | None = None) -> None:
        self.base = base
        self.finalise = finalise
        self.sequence = 0
        self.items: list[Item] = []
        self.current: Item | None = None
        self.calls: dict[int, Item] = {}  # a chunk's tool_call index -> its item
        self.finish_reason: str | None = None
        self.reported_usage: Any = None
        self.response: dict[str, Any] | None = None  # the final response, once built
        self.delta_frame = (b"", b"")

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return frame(kind, payload)

    # The opening

    def start(self) -> bytes:
        return (self.event("response.created", response=self.base)
                + self.event("response.in_progress", response=self.base))

    # One chat chunk

    def chunk(self, raw: bytes) -> bytes:
        try:
            data = orjson.loads(raw)
            usage = data.get("usage")
            choices = data.get("choices") or ()
        except (orjson.JSONDecodeError, AttributeError):
            raise BadAnswer("The upstream sent a malformed stream chunk.") from None
        if usage is not None:
            self.reported_usage = usage
        events = []
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content")
                if isinstance(text, str) and text:
                    events.append(self.text_delta(text))
                refusal = delta.get("refusal")
                if isinstance(refusal, str) and refusal:
                    events.append(self.refusal_delta(refusal))
                for call in delta.get("tool_calls") or ():
                    if isinstance(call, dict):
                        events.append(self.call_delta(call))
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
        return b"".join(events)

    def open(self, item: Item) -> bytes:
        """Close the current item (OpenAI streams one item at a time), then add `item`."""
        events = self.close() if self.current is not None else b""
        self.items.append(item)
        self.current = item
        events += self.event("response.output_item.added", output_index=item.index,
                             item=item.as_output("in_progress") | ({"content": []} if item.kind != "function_call" else {}))
        if item.kind != "function_call":
            part = output.refusal_part("") if item.kind == "refusal" else output.text_part("")
            events += self.event("response.content_part.added", item_id=item.id, output_index=item.index,
                                 content_index=0, part=part)
        return events

    def text_delta(self, text: str) -> bytes:
        item = self.current
        events = b""
        if item is None or item.kind != "message":
            item = Item("message", random_id("msg_"), len(self.items))
            events = self.open(item)
            # The hot path: every text delta of this item is this frame around its number and text.
            self.delta_frame = (
                b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":',
                b',"item_id":' + orjson.dumps(item.id) + b',"output_index":' + str(item.index).encode()
                + b',"content_index":0,"delta":',
            )
        item.parts.append(text)
        head, middle = self.delta_frame
        sequence = self.sequence
        self.sequence = sequence + 1
        return events + head + str(sequence).encode() + middle + orjson.dumps(text) + b',"logprobs":[]}\n\n'

    def refusal_delta(self, text: str) -> bytes:
        item = self.current
        events = b""
        if item is None or item.kind != "refusal":
            item = Item("refusal", random_id("msg_"), len(self.items))
            events = self.open(item)
        item.parts.append(text)
        return events + self.event("response.refusal.delta", item_id=item.id, output_index=item.index,
                                   content_index=0, delta=text)

    def call_delta(self, call: dict[str, Any]) -> bytes:
        index = call.get("index", 0)
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        name = function.get("name")
        given_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else None
        item = self.calls.get(index)
        if item is not None and given_id is not None and given_id != item.call_id:
            item = None  # a server that gives every call index 0 (or none): a new id is a new call
        events = b""
        if item is None:
            call_id = given_id or random_id("call_")
            item = Item("function_call", random_id("fc_"), len(self.items), call_id, name if isinstance(name, str) else "")
            self.calls[index] = item
            events = self.open(item)
        elif item.done:
            # Its item is closed (another started since): its events cannot be taken back.
            raise BadAnswer("The upstream interleaved the deltas of several tool calls.")
        elif isinstance(name, str) and name and not item.name:
            item.name = name
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item.parts.append(arguments)
            events += self.event("response.function_call_arguments.delta", item_id=item.id,
                                 output_index=item.index, delta=arguments)
        return events

    def close(self, status: str = "completed") -> bytes:
        item, self.current = self.current, None
        item.done, item.status = True, status
        if item.kind == "message":
            text = item.text
            events = self.event("response.output_text.done", item_id=item.id, output_index=item.index,
                                content_index=0, text=text, logprobs=[])
            events += self.event("response.content_part.done", item_id=item.id, output_index=item.index,
                                 content_index=0, part=output.text_part(text))
        elif item.kind == "refusal":
            text = item.text
            events = self.event("response.refusal.done", item_id=item.id, output_index=item.index,
                                content_index=0, refusal=text)
            events += self.event("response.content_part.done", item_id=item.id, output_index=item.index,
                                 content_index=0, part=output.refusal_part(text))
        else:
            events = self.event("response.function_call_arguments.done", item_id=item.id, output_index=item.index,
                                name=item.name, arguments=item.text)
        return events + self.event("response.output_item.done", output_index=item.index, item=item.as_output(status))

    # The end

    async def end(self, usage: Usage) -> bytes:
        """Close the open item, build the final response, run `finalise` on it (the store's save:
        before the client hears of it), then `response.completed` or `response.incomplete`."""
        status = "incomplete" if self.finish_reason in output.INCOMPLETE else "completed"
        events = b""
        if not self.items:  # no text at all: still one (empty) message, as the non-streamed answer has
            events += self.open(Item("message", random_id("msg_"), 0))
        if self.current is not None:
            events += self.close(status)
        outputs = [item.as_output(item.status) for item in self.items]
        response = output.finished(self.base, outputs, self.finish_reason, output.usage_object(usage, self.reported_usage))
        self.response = response
        if self.finalise is not None:
            await self.finalise(response)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return events + self.event(kind, response=response)

    def failed(self, error: OpenAIError) -> bytes:
        """`response.failed` with the error and what was produced so far (open items in progress)."""
        outputs = [item.as_output(item.status) for item in self.items]
        code = "rate_limit_exceeded" if error.status_code == 429 else "server_error"  # OpenAI's codes
        return self.event("response.failed", response=output.failed(self.base, outputs, code, error.message))
