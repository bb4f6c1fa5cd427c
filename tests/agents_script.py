"""The OpenAI Agents SDK against the gateway's /v1/responses: run by tests/test_responses_e2e.py
as a subprocess with the python of .venv-agents (`make install-agents`; the SDK needs websockets<17,
the gateway pins 17.4), never imported by the gateway's tests.

The SDK's own defaults are used: its OpenAI provider with the Responses model, the client built
from OPENAI_BASE_URL and OPENAI_API_KEY (the gateway's /v1 and a key of it). Tracing is disabled
(it would post to OpenAI). Prints one JSON object on stdout: what each agent run gave.

    OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=sk-... \\
        .venv-agents/bin/python tests/agents_script.py --tools-model tiny-tools --text-model demo-chat
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, Literal

TOOL_RESULT = "Sunny, 21 degrees in {city}"


async def run(tools_model: str, text_model: str) -> dict[str, Any]:
    from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
    from agents.items import MessageOutputItem, ToolCallItem, ToolCallOutputItem

    set_tracing_disabled(True)
    calls: list[dict[str, str]] = []

    # Literal parameters become enums: the tiny model's grammar-constrained arguments end.
    @function_tool
    def get_weather(city: Literal["Paris", "Rome"], unit: Literal["celsius", "fahrenheit"]) -> str:
        """The weather in a city."""
        calls.append({"city": city, "unit": unit})
        return TOOL_RESULT.format(city=city)

    def summary(result) -> dict[str, Any]:
        items = result.new_items
        return {
            "final_output": result.final_output,
            "items": [type(item).__name__ for item in items],
            "tool_calls": [item.raw_item.arguments for item in items if isinstance(item, ToolCallItem)],
            "tool_outputs": [item.output for item in items if isinstance(item, ToolCallOutputItem)],
            "messages": [item.raw_item.content[0].text for item in items if isinstance(item, MessageOutputItem)],
            "response_ids": [response.response_id for response in result.raw_responses],
            "usage": [[response.usage.input_tokens, response.usage.output_tokens] for response in result.raw_responses],
        }

    # The tool is forced on the first turn (the SDK resets tool_choice once a tool ran); the
    # model then answers after seeing the tool's result.
    settings = ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=64)
    weather = Agent(name="weather", instructions="Answer with the weather.", model=tools_model,
                    tools=[get_weather], model_settings=settings)
    tool_run = await Runner.run(weather, "What is the weather in Paris?", max_turns=3)
    tool_calls = list(calls)
    # The same run streamed: the SDK reads the gateway's Responses events.
    streamed_tool_run = await streamed(weather, "What is the weather in Paris?", max_turns=3)
    # The same tool whose result is the final output as it is (tool_use_behavior).
    stop = weather.clone(name="weather-stop", tool_use_behavior="stop_on_first_tool")
    stop_run = await Runner.run(stop, "What is the weather in Paris?", max_turns=2)

    chatter = Agent(name="chatter", instructions="You are brief.", model=text_model,
                    model_settings=ModelSettings(temperature=0, max_tokens=32))
    text_run = await Runner.run(chatter, "Hello there", max_turns=1)
    streamed_text_run = await streamed(chatter, "Hello there", max_turns=1)
    return {"tool": {**summary(tool_run), "calls": tool_calls}, "stop": summary(stop_run), "text": summary(text_run),
            "streamed_tool": summary(streamed_tool_run), "streamed_text": summary(streamed_text_run)}


async def streamed(agent, prompt: str, max_turns: int):
    """Runner.run_streamed, its events consumed to the end (the result is then complete)."""
    from agents import Runner

    result = Runner.run_streamed(agent, prompt, max_turns=max_turns)
    async for _event in result.stream_events():
        pass
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools-model", required=True)
    parser.add_argument("--text-model", required=True)
    args = parser.parse_args(argv)
    json.dump(asyncio.run(run(args.tools_model, args.text_model)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
