"""Server-sent events as OpenAI-compatible servers send them, read incrementally from bytes.

Lines end with LF, CRLF (sse-starlette, hence llama.cpp's Python server) or CR; an event ends at
a blank line; `data:` lines are joined with LF; comments (`: ping`) and unknown fields are
skipped. Each event is returned as (event name, data bytes). An event may not grow beyond
`max_bytes` before its blank line arrives (the upstream size cap).
"""
from __future__ import annotations


class EventTooLarge(Exception):
    pass


class SSEParser:
    __slots__ = ("max_bytes", "_pending", "_data", "_event", "_size")

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._pending = b""  # an incomplete line
        self._data: list[bytes] = []
        self._event = b""
        self._size = 0

    def feed(self, piece: bytes) -> list[tuple[bytes, bytes]]:
        """The events that `piece` completes, in order."""
        buffer = self._pending + piece if self._pending else piece
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):  # may be the first half of a CRLF
                buffer, tail = buffer[:-1], b"\r"
            else:
                tail = b""
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            tail = b""
        *lines, rest = buffer.split(b"\n")
        self._pending = rest + tail
        if len(self._pending) + self._size > self.max_bytes:
            raise EventTooLarge
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append((self._event, b"\n".join(self._data)))
                self._data, self._event, self._size = [], b"", 0
            elif line.startswith(b"data:"):
                value = line[6:] if line[5:6] == b" " else line[5:]
                self._size += len(value)
                if self._size > self.max_bytes:
                    raise EventTooLarge
                self._data.append(value)
            elif line.startswith(b"event:"):
                self._event = line[6:].strip()
            # comments (":...") and other fields (id, retry) carry nothing the gateway uses
        return events

    def close(self) -> list[tuple[bytes, bytes]]:
        """An event the upstream left without its closing blank line."""
        events = self.feed(b"\n\n") if (self._pending or self._data) else []
        return events
