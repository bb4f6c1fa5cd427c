"""Known ways OpenAI-compatible servers differ from OpenAI, and what the gateway does about each.

One row per server family (docs/openai-upstreams.md has the table with the evidence). A family is
chosen by the upstream's registry spec (`flavor`, when B's registry has it) or detected from the
`owned_by` of its `GET /v1/models` entries; unknown servers get no corrections (`GENERIC`).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Deviations:
    name: str
    # Stream chunks repeat a tool call's id, type and name with every arguments fragment: keep them
    # in the first delta of that call only, as OpenAI sends them.
    repeats_tool_call_header: bool = False
    # Streams never carry usage (stream_options is ignored): count what can be counted, estimated.
    stream_usage: bool = True
    # Answers one choice whatever `n` asks: send n requests of one choice and merge them.
    single_choice: bool = False
    # Invalid requests are answered 500 with the validation error's text: report them as 400.
    validation_errors_as_500: bool = False
    # response_format json_schema is refused (500); its own {"type": "json_object", "schema": ...}
    # does the same thing, so json_schema is sent in that form.
    json_schema_as_json_object: bool = False
    # tool_choice "required" is refused (500): with one tool, naming that tool means the same.
    tool_choice_required_unsupported: bool = False


GENERIC = Deviations("generic")

LLAMA_CPP = Deviations(
    "llama.cpp",
    repeats_tool_call_header=True,
    stream_usage=False,
    single_choice=True,
    validation_errors_as_500=True,
    json_schema_as_json_object=True,
    tool_choice_required_unsupported=True,
)

FAMILIES = {deviations.name: deviations for deviations in (GENERIC, LLAMA_CPP)}

# GET /v1/models `owned_by` -> family: llama-cpp-python's server says "me", llama.cpp's own
# llama-server says "llamacpp".
OWNED_BY = {"me": LLAMA_CPP, "llamacpp": LLAMA_CPP}


def named(name: str | None) -> Deviations | None:
    """The family called `name` ("llama.cpp", "generic"), None if unknown or empty."""
    return FAMILIES.get(name) if name else None


def detect(models_answer: object) -> Deviations:
    """The family that a `GET /v1/models` answer shows (GENERIC when it shows none)."""
    data = models_answer.get("data") if isinstance(models_answer, dict) else None
    if isinstance(data, list):
        for entry in data[:100]:
            owner = entry.get("owned_by") if isinstance(entry, dict) else None
            if isinstance(owner, str) and owner in OWNED_BY:
                return OWNED_BY[owner]
    return GENERIC
