"""FakeOpenAI: an OpenAI-compatible server for the adapter's tests.

In process behind httpx.MockTransport (`transport()`, or `handle` inside a transport that also
serves FakeFastChat: `combined_transport`), or as a real HTTP server on a free port (`serving()`,
aiohttp in a thread) for what only a real connection shows (timeouts, refused connections).
It records every request (path, headers, JSON body) and answers as its fields say: plain OpenAI,
or llama.cpp's server's ways (`llama_cpp=True`: tool-call headers repeated in every chunk, no
stream usage, one choice whatever `n`, validation errors as 500).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

OPENAI_UPSTREAM = "http://openai.test/v1"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeOpenAI:
    base_url: str = OPENAI_UPSTREAM
    models: list[str] = field(default_factory=lambda: ["served-model"])
    owned_by: str = "organization-owner"
    llama_cpp: bool = False
    words: list[str] = field(default_factory=lambda: ["Hello", " from", " the", " fake"])
    tool_arguments: list[str] = field(default_factory=lambda: ['{"city":', ' "Paris"', "}"])
    separator: bytes = b"\n\n"
    send_usage: bool = True
    # Fault injection
    status: int = 200
    error_body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chunk_delay: float = 0.0
    first_delay: float = 0.0
    error_after: int | None = None  # stream: an error event after this many chunks
    cut_after: int | None = None  # stream: the connection ends (no [DONE]) after this many chunks
    raw_stream: bytes | None = None
    raw_answer: bytes | None = None
    fail_models: bool = False  # `status` applies to GET /models too
    requests: list[Recorded] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def bodies(self, path: str = "/v1/chat/completions") -> list[Any]:
        return [record.body for record in self.requests if record.path == path]

    # The server

    async def handle(self, request: httpx.Request) -> httpx.Response:
        status, headers, content = await self.answer(
            request.method, request.url.path, dict(request.headers), request.content)
        if isinstance(content, bytes):
            return httpx.Response(status, headers=headers, content=content)
        return httpx.Response(status, headers=headers, stream=AsyncBytes(content))

    async def answer(self, method: str, path: str, headers: dict[str, str], raw: bytes):
        body = json.loads(raw) if raw else None
        self.requests.append(Recorded(method, path, {k.lower(): v for k, v in headers.items()}, body))
        if self.first_delay:
            await asyncio.sleep(self.first_delay)
        if path.endswith("/models") and method == "GET" and not (self.fail_models and self.status != 200):
            return 200, {"content-type": "application/json"}, json.dumps({"object": "list", "data": [
                {"id": name, "object": "model", "owned_by": self.owned_by} for name in self.models]}).encode()
        if self.status != 200:
            error = self.error_body or json.dumps(
                {"error": {"message": f"fake failure {self.status}", "type": "error", "param": None}}).encode()
            return self.status, {"content-type": "application/json", **self.headers}, error
        if self.llama_cpp and isinstance(body.get("response_format"), dict) \
                and body["response_format"].get("type") not in ("text", "json_object"):
            return 500, {"content-type": "application/json"}, json.dumps({"error": {
                "message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', "
                           "'type'), 'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema'}\n\n"
                           "  File \"/srv/llama_cpp/server/app.py\", line 376, in create_chat_completion",
                "type": "internal_server_error", "param": None, "code": None}}).encode()
        kind = "embeddings" if path.endswith("/embeddings") else "chat" if path.endswith("/chat/completions") \
            else "completions"
        if kind == "embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            return 200, {"content-type": "application/json"}, json.dumps({
                "object": "list", "model": body["model"],
                "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2]} for i in range(len(inputs))],
                "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)}}).encode()
        if body.get("stream"):
            return 200, {"content-type": "text/event-stream"}, self.events(kind, body)
        if self.raw_answer is not None:
            return 200, {"content-type": "application/json"}, self.raw_answer
        return 200, {"content-type": "application/json"}, json.dumps(self.complete(kind, body)).encode()

    def n_choices(self, body: dict) -> int:
        return 1 if self.llama_cpp else body.get("n") or 1

    def complete(self, kind: str, body: dict) -> dict:
        text = "".join(self.words)
        choices = []
        for i in range(self.n_choices(body)):
            if kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if body.get("tools"):
                    message = {"role": "assistant", "content": None, "tool_calls": [{
                        "id": "call_1", "type": "function",
                        "function": {"name": self.tool_name(body), "arguments": "".join(self.tool_arguments)}}]}
                choices.append({"index": i, "message": message, "finish_reason": "stop", "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": "stop", "logprobs": None})
        answer = {"id": "cmpl-fake", "object": "chat.completion" if kind == "chat" else "text_completion",
                  "created": 1700000000, "model": body["model"], "choices": choices,
                  "system_fingerprint": "fp_fake"}
        if self.send_usage:
            completion = len(self.words) * len(choices)
            answer["usage"] = {"prompt_tokens": 7, "completion_tokens": completion, "total_tokens": 7 + completion}
        return answer

    @staticmethod
    def tool_name(body: dict) -> str:
        return body["tools"][0]["function"]["name"]

    def chunks(self, kind: str, body: dict) -> list[dict]:
        head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": 1700000000, "model": body["model"]}
        chunks = []
        for i in range(self.n_choices(body)):
            if kind == "chat":
                chunks.append({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                    "finish_reason": None}]})
                if body.get("tools"):
                    name = self.tool_name(body)
                    for j, fragment in enumerate(self.tool_arguments):
                        call: dict[str, Any] = {"index": 0, "function": {"arguments": fragment}}
                        if j == 0 or self.llama_cpp:
                            call = {"index": 0, "id": "call_1", "type": "function",
                                    "function": {"name": name, "arguments": fragment}}
                        delta: dict[str, Any] = {"tool_calls": [call]}
                        if self.llama_cpp:
                            delta = {"role": None, "content": None,
                                     "function_call": {"name": name, "arguments": fragment}, **delta}
                        chunks.append({**head, "choices": [{"index": i, "delta": delta, "finish_reason": None}]})
                    finish = "tool_calls"
                else:
                    for word in self.words:
                        chunks.append({**head, "choices": [{"index": i, "delta": {"content": word},
                                                            "finish_reason": None}]})
                    finish = "stop"
                chunks.append({**head, "choices": [{"index": i, "delta": {}, "finish_reason": finish}]})
            else:
                for word in self.words:
                    chunks.append({**head, "choices": [{"index": i, "text": word, "finish_reason": None}]})
                chunks.append({**head, "choices": [{"index": i, "text": "", "finish_reason": "stop"}]})
        options = body.get("stream_options") or {}
        if self.send_usage and not self.llama_cpp and options.get("include_usage"):
            completion = len(self.words) * self.n_choices(body)
            chunks.append({**head, "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": completion,
                                                             "total_tokens": 7 + completion}})
        return chunks

    async def events(self, kind: str, body: dict) -> AsyncIterator[bytes]:
        if self.raw_stream is not None:
            yield self.raw_stream
            return
        for i, chunk in enumerate(self.chunks(kind, body)):
            if self.error_after is not None and i == self.error_after:
                yield b"event: error" + self.separator[:len(self.separator) // 2]
                yield b'data: {"error": {"message": "fake failure mid-stream"}}' + self.separator
                return
            if self.cut_after is not None and i == self.cut_after:
                return
            if self.chunk_delay and i:
                await asyncio.sleep(self.chunk_delay)
            # llama.cpp's server (json.dumps) puts spaces after separators; others do not
            text = json.dumps(chunk) if self.llama_cpp else json.dumps(chunk, separators=(",", ":"))
            data = b"data: " + text.encode() + self.separator
            yield data[:7]  # split events across network reads, as real servers do
            yield data[7:]
        yield b"data: [DONE]" + self.separator

    # A real server

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        """Serve on 127.0.0.1 (aiohttp, in a thread); yields the base URL (…/v1)."""
        from aiohttp import web

        from tests.procs import HOST, free_port

        port = free_port()
        loop = asyncio.new_event_loop()
        ready, stopping = threading.Event(), None

        async def route(request: web.Request) -> web.StreamResponse:
            status, headers, content = await self.answer(request.method, request.path, dict(request.headers),
                                                         await request.read())
            if isinstance(content, bytes):
                return web.Response(status=status, body=content, headers=headers)
            response = web.StreamResponse(status=status, headers=headers)
            await response.prepare(request)
            async for data in content:
                await response.write(data)
            await response.write_eof()
            return response

        async def main() -> None:
            nonlocal stopping
            stopping = asyncio.Event()
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", route)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            await web.TCPSite(runner, HOST, port).start()
            ready.set()
            await stopping.wait()
            await runner.cleanup()
            pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in pending:  # handlers still sleeping (a slow fake): ended, not left to the GC
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
        thread.start()
        ready.wait(10)
        try:
            yield f"http://{HOST}:{port}/v1"
        finally:
            loop.call_soon_threadsafe(stopping.set)
            thread.join(10)
            loop.close()


class AsyncBytes(httpx.AsyncByteStream):
    def __init__(self, iterator: AsyncIterator[bytes]):
        self.iterator = iterator

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for data in self.iterator:
            yield data


def combined_transport(openai: FakeOpenAI, fastchat: Any) -> httpx.MockTransport:
    """One transport for both fakes: requests to the OpenAI fake's host go to it."""
    host = httpx.URL(openai.base_url).host

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == host:
            return await openai.handle(request)
        return await fastchat.handle(request)

    return httpx.MockTransport(handle)
