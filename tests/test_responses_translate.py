"""The Responses API's translation, pure: requests and their 400s, the chat body, the Response object,
the stream's events (openai_api/responses/request.py, output.py, events.py)."""
from __future__ import annotations

import asyncio
import json

import orjson
import pytest
from django.test import override_settings

from openai_api.errors import InvalidRequestError, UpstreamError
from openai_api.protocol import parse_chat
from openai_api.responses import output
from openai_api.responses.create import responses_param, truncated
from openai_api.responses.events import ResponseEvents
from openai_api.responses.request import chat_body, parse_request
from upstreams.errors import BadAnswer
from upstreams.usage import Usage

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def request(**fields):
    return parse_request({"model": "m1", "input": "Hi", **fields})


def refused(param: str, **fields) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        body = {"model": "m1", "input": "Hi", **fields}
        chat_body(parse_request(body))
    assert caught.value.param == param, (caught.value.param, caught.value.message)
    assert caught.value.status_code == 400
    return caught.value


# Requests


def test_a_string_input_is_one_user_message_item_with_an_id():
    parsed = request()
    (item,) = parsed.input_items
    assert item["id"].startswith("msg_") and len(item["id"]) > 10
    assert item == {"id": item["id"], "type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": "Hi"}], "status": "completed"}
    assert (parsed.store, parsed.stream, parsed.truncation, parsed.tool_choice) == (True, False, "disabled", "auto")


def test_items_are_normalised_with_their_ids_kept_or_made():
    parsed = request(input=[
        {"role": "developer", "content": "Be terse"},
        {"type": "message", "id": "msg_given", "role": "user", "content": [
            {"type": "input_text", "text": "Look"}, {"type": "input_image", "image_url": "data:image/png;base64,AA"}]},
        {"role": "assistant", "content": "Calling"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ])
    developer, user, assistant, call, result = parsed.input_items
    assert developer["role"] == "developer" and developer["content"] == [{"type": "input_text", "text": "Be terse"}]
    assert user["id"] == "msg_given"
    assert user["content"][1] == {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "auto"}
    assert assistant["content"] == [{"type": "output_text", "text": "Calling", "annotations": []}]
    assert call["id"].startswith("fc_") and call["status"] == "completed"
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_1", "get_weather", '{"city":"Paris"}')
    assert result["id"].startswith("fco_") and result["output"] == "sunny"


@pytest.mark.parametrize(("param", "fields"), [
    ("input", {"input": None}),
    ("input", {"input": []}),
    ("input", {"input": 3}),
    ("input[0].type", {"input": [{"type": "reasoning", "summary": []}]}),
    ("input[1].type", {"input": [{"role": "user", "content": "Hi"}, {"type": "item_reference", "id": "x"}]}),
    ("input[0]", {"input": ["Hi"]}),
    ("input[0].role", {"input": [{"role": "tool", "content": "x"}]}),
    ("input[0].content[0].type", {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
    ("input[0].arguments", {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]}),
    ("input[0].call_id", {"input": [{"type": "function_call_output", "output": "x"}]}),
    ("input", {"input": [{"type": "function_call_output", "call_id": "call_nowhere", "output": "x"}]}),
    ("tools", {"tools": [{"type": "web_search"}]}),
    ("tools", {"tools": [TOOL, {"type": "file_search", "vector_store_ids": ["v"]}]}),
    ("tools", {"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}),
    ("tools", {"tools": [{"type": "computer_use_preview"}]}),
    ("tools", {"tools": [{"type": "image_generation"}]}),
    ("tools", {"tools": [{"type": "mcp", "server_label": "x"}]}),
    ("tools[0].name", {"tools": [{"type": "function"}]}),
    ("tool_choice", {"tool_choice": {"type": "web_search_preview"}}),
    ("tool_choice", {"tool_choice": "sometimes"}),
    ("tool_choice", {"tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}}),
    ("background", {"background": True}),
    ("conversation", {"conversation": "conv_1"}),
    ("metadata", {"metadata": {f"k{i}": "v" for i in range(17)}}),
    ("metadata", {"metadata": {"k" * 65: "v"}}),
    ("metadata.k", {"metadata": {"k": "v" * 513}}),
    ("metadata.k", {"metadata": {"k": 1}}),
    ("truncation", {"truncation": "sometimes"}),
    ("text.format.type", {"text": {"format": {"type": "xml"}}}),
    ("text.format.schema", {"text": {"format": {"type": "json_schema", "name": "x"}}}),
    ("max_output_tokens", {"max_output_tokens": 0}),
    ("temperature", {"temperature": 3}),
    ("store", {"store": "yes"}),
    ("instructions", {"instructions": 7}),
    ("model", {"model": None}),
])
def test_bad_requests_get_a_400_naming_the_parameter(param, fields):
    refused(param, **fields)


def test_the_number_of_input_items_is_bounded():
    with override_settings(GATEWAY_MAX_RESPONSE_ITEMS=3):
        request(input=["a"] * 0 + [{"role": "user", "content": "x"}] * 3)
        error = refused("input", input=[{"role": "user", "content": "x"}] * 4)
    assert "maximum length 3" in error.message


def test_metadata_at_openais_bounds_is_accepted():
    metadata = {("k" * 60 + f"{i:04}"): "v" * 512 for i in range(16)}
    assert request(metadata=metadata).metadata == metadata


# The chat body


def test_the_chat_body_of_a_conversation():
    parsed = request(
        instructions="You are helpful.", max_output_tokens=50, temperature=0.2, top_p=0.9, user="u-1",
        metadata={"who": "me"}, seed=7,
        input=[{"role": "developer", "content": "Be terse"}, {"role": "user", "content": "Weather?"}],
    )
    body = chat_body(parsed)
    assert body == {
        "seed": 7, "model": "m1", "max_tokens": 50, "temperature": 0.2, "top_p": 0.9, "user": "u-1",
        "messages": [{"role": "system", "content": "You are helpful."}, {"role": "system", "content": "Be terse"},
                     {"role": "user", "content": "Weather?"}],
    }
    call = parse_chat(body)
    assert call.sampling.max_tokens == 50 and call.needs == frozenset()


def test_function_calls_group_into_the_preceding_assistant_message_and_outputs_become_tool_messages():
    history = list(request(input=[
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Let me look."},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather", "arguments": '{"city":"Rome"}'},
    ]).input_items)
    parsed = request(tools=[TOOL], input=[
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "rain"}]},
    ])
    body = chat_body(parsed, history)
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "rain"},
    ]
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": TOOL["parameters"]}}]
    assert body["tool_choice"] == "auto"
    assert "tools" in parse_chat(body).needs


def test_a_call_without_preceding_text_is_its_own_assistant_message():
    body = chat_body(request(input=[
        {"role": "user", "content": "x"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
        {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
    ]))
    assert [(m["role"], m.get("content"), len(m.get("tool_calls", ()))) for m in body["messages"]] == [
        ("user", "x", 0), ("assistant", "", 1), ("tool", "1", 0), ("assistant", "", 1)]


def test_tool_choice_text_format_and_streaming_map_to_chat():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = chat_body(request(
        tools=[{**TOOL, "strict": True}], tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False, stream=True,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
    ))
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["tools"][0]["function"]["strict"] is True
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert chat_body(request(text={"format": {"type": "json_object"}}))["response_format"] == {"type": "json_object"}
    plain = chat_body(request(text={"format": {"type": "text"}}, tool_choice="none"))
    assert "response_format" not in plain and "tool_choice" not in plain and "stream" not in plain
    assert chat_body(request(tools=[TOOL], tool_choice="required"))["tool_choice"] == "required"


def test_responses_only_fields_are_not_sent_to_chat_and_chat_only_fields_not_smuggled():
    body = chat_body(request(include=["reasoning.encrypted_content"], service_tier="auto", reasoning={"effort": "low"},
                             prompt_cache_key="k", n=3, messages=[{"role": "user", "content": "x"}], top_k=5))
    assert set(body) == {"model", "messages", "top_k"}
    assert body["messages"] == [{"role": "user", "content": "Hi"}]


def test_chat_errors_name_the_responses_parameter():
    assert responses_param("messages[3].content") == "input"
    assert responses_param("messages") == "input"
    assert responses_param("max_tokens") == "max_output_tokens"
    assert responses_param("response_format") == "text.format"
    assert responses_param("tools") == "tools"
    assert responses_param(None) is None


def test_truncation_drops_whole_turns_and_never_an_output_without_its_call():
    history = list(request(input=[
        {"role": "user", "content": "one"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
        {"role": "assistant", "content": "done one"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "done two"},
    ]).input_items)
    items = request(input="three").input_items
    kept_history, kept_items = truncated(history, items, 1)
    assert [item.get("content", [{}])[0].get("text") for item in kept_history] == ["two", "done two"]
    assert kept_items == items
    assert truncated(history, items, 2) == ([], items)
    assert truncated([], items, 1) is None
    # A cut inside a turn that leaves an output without its call drops the output too
    odd = list(request(input=[
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"role": "user", "content": "between"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
    ]).input_items)
    kept_history, _ = truncated(odd, items, 1)
    assert [item["type"] for item in kept_history] == ["message"]


# The Response object


BASE = output.base_response(request(instructions="Be brief", metadata={"a": "b"}), "resp_1", 1700000000, "m1")


def completion(message, finish_reason="stop", usage=None):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m1",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": usage or {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}


def test_a_text_answer_is_one_message_with_every_parameter_echoed():
    response = output.from_completion(BASE, completion({"role": "assistant", "content": "Hello"}), Usage(5, 3))
    assert response["id"] == "resp_1" and response["object"] == "response" and response["status"] == "completed"
    assert response["created_at"] == 1700000000 and response["completed_at"] >= 1700000000
    (item,) = response["output"]
    assert item["id"].startswith("msg_")
    assert item == {"id": item["id"], "type": "message", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": "Hello"}]}
    assert response["usage"] == {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                                 "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                                 "total_tokens": 8}
    assert (response["instructions"], response["metadata"], response["model"]) == ("Be brief", {"a": "b"}, "m1")
    for name in ("max_output_tokens", "parallel_tool_calls", "previous_response_id", "store", "temperature", "text",
                 "tool_choice", "tools", "top_p", "truncation", "user", "reasoning", "error", "incomplete_details"):
        assert name in response, name
    assert "output_text" not in response  # the SDK computes it


def test_the_sdk_reads_the_object():
    from openai.types.responses import Response

    answer = completion({"role": "assistant", "content": "Hi", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
               "prompt_tokens_details": {"cached_tokens": 2}, "completion_tokens_details": {"reasoning_tokens": 1}})
    response = Response.model_validate(output.from_completion(BASE, answer, Usage(5, 3)))
    assert response.output_text == "Hi"
    assert [item.type for item in response.output] == ["message", "function_call"]
    assert response.output[1].call_id == "call_1" and response.output[1].id.startswith("fc_")
    assert response.usage.input_tokens_details.cached_tokens == 2
    assert response.usage.output_tokens_details.reasoning_tokens == 1


def test_a_refusal_is_a_message_with_a_refusal_part():
    from openai.types.responses import Response

    answer = completion({"role": "assistant", "content": None, "refusal": "I can't help with that."})
    response = output.from_completion(BASE, answer, Usage(5, 3))
    (item,) = response["output"]
    assert item["content"] == [{"type": "refusal", "refusal": "I can't help with that."}]
    assert Response.model_validate(response).output_text == ""


def test_a_refusal_sent_back_as_input_is_chats_assistant_refusal():
    body = chat_body(request(input=[
        {"role": "user", "content": "x"},
        {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        {"role": "user", "content": "y"},
    ]))
    assert body["messages"][1] == {"role": "assistant", "content": "", "refusal": "No."}
    parse_chat(body)


def test_tool_calls_without_text_are_function_call_items_only():
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
    response = output.from_completion(BASE, completion(message, "tool_calls"), Usage(5, 3))
    assert [(i["type"], i["call_id"], i["name"], i["arguments"]) for i in response["output"]] == [
        ("function_call", "call_1", "f", '{"a":1}'), ("function_call", "call_2", "g", "{}")]


def test_a_length_stop_is_incomplete_for_max_output_tokens():
    response = output.from_completion(BASE, completion({"role": "assistant", "content": "Hel"}, "length"), Usage(5, 3))
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"
    assert "completed_at" not in response


# Stream events


def chunk(delta=None, finish_reason=None, usage=None, choices=True) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m1",
            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}] if choices else []}
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)


def tool_delta(index, arguments, call_id=None, name=None):
    call = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        call.update(id=call_id, type="function")
        call["function"]["name"] = name
    return {"tool_calls": [call]}


USAGE = Usage(5, 4)


def events_of(chunks, finish=True, usage=USAGE, finalise=None):
    translator = ResponseEvents(BASE, finalise)
    raw = translator.start() + b"".join(translator.chunk(c) for c in chunks)
    if finish:
        raw += asyncio.run(translator.end(usage))
    return parse(raw), translator


def sdk_events():
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    return TypeAdapter(ResponseStreamEvent)


SDK_EVENTS = sdk_events()


def parse(raw: bytes) -> list[dict]:
    """The events, each checked against the SDK's own event types (validated, not constructed)."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block:
            kind_line, data_line = block.split("\n")
            assert kind_line.startswith("event: ") and data_line.startswith("data: ")
            event = json.loads(data_line[6:])
            assert event["type"] == kind_line[7:]
            assert SDK_EVENTS.validate_python(event).type == event["type"]
            events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


USAGE_CHUNK = chunk(usage={"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}, choices=False)


def test_a_text_stream_follows_openais_sequence():
    events, _ = events_of([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
                           chunk({"content": "lo"}), chunk(finish_reason="stop"), USAGE_CHUNK])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    added = events[2]["item"]
    assert added["status"] == "in_progress" and added["content"] == [] and added["type"] == "message"
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == ["Hel", "lo"]
    assert events[6]["text"] == "Hello" and events[7]["part"]["text"] == "Hello"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["output"] == [events[8]["item"]]
    assert final["usage"]["total_tokens"] == 9
    assert {e.get("item_id", added["id"]) for e in events[2:-1]} == {added["id"]}


def test_text_then_a_tool_call_are_two_items_one_after_the_other():
    events, _ = events_of([chunk({"content": "Checking."}),
                           chunk(tool_delta(0, '{"city":', "call_1", "get_weather")),
                           chunk(tool_delta(0, ' "Paris"}')), chunk(finish_reason="tool_calls")])
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    call_added = events[8]
    assert call_added["output_index"] == 1
    assert call_added["item"] == {"id": call_added["item"]["id"], "type": "function_call", "status": "in_progress",
                                  "arguments": "", "call_id": "call_1", "name": "get_weather"}
    done = events[11]
    assert done["arguments"] == '{"city": "Paris"}' and done["output_index"] == 1
    assert events[12]["item"]["arguments"] == '{"city": "Paris"}' and events[12]["item"]["status"] == "completed"
    final = events[-1]["response"]["output"]
    assert [item["type"] for item in final] == ["message", "function_call"]
    assert final[1]["arguments"] == '{"city": "Paris"}'


def test_parallel_tool_calls_get_their_own_items_and_joined_arguments():
    events, _ = events_of([chunk(tool_delta(0, '{"city":', "call_a", "get_weather")), chunk(tool_delta(0, '"Paris"}')),
                           chunk(tool_delta(1, '{"city":', "call_b", "get_weather")), chunk(tool_delta(1, '"Rome"}')),
                           chunk(finish_reason="tool_calls")])
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["call_id"]) for e in added] == [(0, "call_a"), (1, "call_b")]
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["output_index"], e["arguments"]) for e in done] == [(0, '{"city":"Paris"}'), (1, '{"city":"Rome"}')]
    for e in events:
        if e["type"] == "response.function_call_arguments.delta":
            assert e["item_id"] == added[e["output_index"]]["item"]["id"]
    final = events[-1]["response"]["output"]
    assert [(i["call_id"], i["arguments"]) for i in final] == [("call_a", '{"city":"Paris"}'), ("call_b", '{"city":"Rome"}')]


def test_calls_that_all_say_index_0_are_told_apart_by_their_ids():
    events, _ = events_of([chunk(tool_delta(0, '{"a":1}', "call_a", "f")), chunk(tool_delta(0, '{"b":2}', "call_b", "g")),
                           chunk(finish_reason="tool_calls")])
    final = events[-1]["response"]["output"]
    assert [(i["call_id"], i["name"], i["arguments"]) for i in final] == [("call_a", "f", '{"a":1}'),
                                                                          ("call_b", "g", '{"b":2}')]


def test_a_repeated_call_header_is_the_same_call():
    events, _ = events_of([chunk(tool_delta(0, '{"a":', "call_a", "f")), chunk(tool_delta(0, "1}", "call_a", "f")),
                           chunk(finish_reason="tool_calls")])
    (item,) = events[-1]["response"]["output"]
    assert (item["call_id"], item["name"], item["arguments"]) == ("call_a", "f", '{"a":1}')


def test_interleaved_tool_call_deltas_fail_rather_than_disagree():
    translator = ResponseEvents(BASE)
    translator.start()
    translator.chunk(chunk(tool_delta(0, "{", "call_a", "f")))
    translator.chunk(chunk(tool_delta(1, "{", "call_b", "f")))
    with pytest.raises(BadAnswer):
        translator.chunk(chunk(tool_delta(0, "}")))


def test_a_length_stop_ends_with_response_incomplete():
    events, _ = events_of([chunk({"content": "Hel"}), chunk(finish_reason="length")])
    assert events[-1]["type"] == "response.incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete" == final["output"][0]["status"]


def test_a_streamed_refusal_is_its_own_message_with_refusal_events():
    events, _ = events_of([chunk({"role": "assistant", "content": ""}), chunk({"refusal": "I can't"}),
                           chunk({"refusal": " help."}), chunk(finish_reason="stop")])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.refusal.delta", "response.refusal.delta", "response.refusal.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert events[3]["part"] == {"type": "refusal", "refusal": ""}
    assert events[6]["refusal"] == "I can't help."
    (item,) = events[-1]["response"]["output"]
    assert item["content"] == [{"type": "refusal", "refusal": "I can't help."}]


def test_a_content_filter_stop_is_incomplete_for_content_filter():
    events, _ = events_of([chunk({"content": "Hel"}), chunk(finish_reason="content_filter")])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}
    plain = output.from_completion(BASE, completion({"role": "assistant", "content": "Hel"}, "content_filter"),
                                   Usage(5, 3))
    assert plain["incomplete_details"] == {"reason": "content_filter"} and plain["output"][0]["status"] == "incomplete"


def test_an_empty_answer_still_has_its_message():
    events, _ = events_of([chunk({"role": "assistant", "content": ""}), chunk(finish_reason="stop")])
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""
    assert "response.output_item.added" in [e["type"] for e in events]


def test_the_response_is_finalised_before_response_completed_is_sent():
    seen = []

    async def finalise(response):
        seen.append(response)

    events, translator = events_of([chunk({"content": "Hi"}), chunk(finish_reason="stop")], finalise=finalise)
    assert seen == [events[-1]["response"]] == [translator.response]


def test_a_failure_mid_stream_is_response_failed_with_what_was_produced():
    translator = ResponseEvents(BASE)
    raw = translator.start() + translator.chunk(chunk({"content": "Hel"}))
    raw += translator.failed(UpstreamError("The model worker failed."))
    events = parse(raw)
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "The model worker failed."}
    assert failed["output"][0]["content"][0]["text"] == "Hel" and failed["output"][0]["status"] == "in_progress"


def test_a_malformed_chunk_is_a_bad_answer():
    translator = ResponseEvents(BASE)
    with pytest.raises(BadAnswer):
        translator.chunk(b"[1, 2")
    with pytest.raises(BadAnswer):
        translator.chunk(b"[1, 2]")
