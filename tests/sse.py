"""Reading server-sent events in tests."""
from __future__ import annotations

import json


def parse_sse(raw: bytes) -> list:
    """The events' payloads in order: parsed JSON, or the string "[DONE]"."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def read_stream(response) -> bytes:
    """The whole body, read the way Django's ASGI handler reads it."""
    return b"".join([part async for part in response])
