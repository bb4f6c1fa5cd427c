"""FakeFastChat: an in-process controller and worker behind httpx.MockTransport.

It speaks FastChat's wire protocol (docs/fastchat-protocol.md: cumulative-text chunks, a final
duplicate chunk with finish_reason, NUL delimiters split across network reads) and records
every upstream call so tests can count them.

Like FastChat's real model_worker, a /worker_generate generation runs to its end even if its
client goes away, while a /worker_generate_stream generation stops when its client closes the
stream; `in_flight` counts the generations running (the worker's queue, as tests see it).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastchat.conversation import get_conv_template

CONTROLLER = "http://controller.test"
WORKER = "http://worker.test"


def worker_template(name: str) -> dict[str, Any]:
    """A template as a worker serialises it (sep_style as an int)."""
    conv = get_conv_template(name)
    conv.sep_style = int(conv.sep_style)
    return json.loads(json.dumps(dataclasses.asdict(conv)))


@dataclass
class FakeFastChat:
    models: list[str] = field(default_factory=lambda: ["m1", "embed"])
    template: str = "vicuna_v1.1"
    context_length: int = 2048
    reply: str = "Hello wörld, how are you today?"
    calls: list[tuple[str, dict | None]] = field(default_factory=list)
    # The controller hands these out in turn; requests record which one they reached.
    workers: list[str] = field(default_factory=lambda: [WORKER])
    worker_hits: list[tuple[str, str]] = field(default_factory=list)  # (worker, path)
    dead_workers: set[str] = field(default_factory=set)
    # Fault injection
    no_worker: bool = False
    worker_error: type[Exception] | None = None  # raised by the transport for worker calls
    controller_error: type[Exception] | None = None
    generate_status: int = 200
    error_chunk_after: int | None = None  # stream: an error chunk after this many chunks
    error_code: int = 50001
    finish_reason: str | None = None  # overrides the computed finish_reason
    chunk_delay: float = 0.0
    stream_closed: list[bool] = field(default_factory=list)
    # Garbage injection: every chunk goes through mutate_chunk; raw_stream replaces a stream's
    # (and /worker_generate's) whole body; answers[path] replaces the JSON answer of that route;
    # after silent_after_chunks chunks a stream raises the read timeout a silent worker causes.
    mutate_chunk: Callable[[dict], Any] | None = None
    raw_stream: bytes | None = None
    answers: dict[str, Any] = field(default_factory=dict)
    silent_after_chunks: int | None = None
    one_read: bool = False  # the whole stream in one network read, as from a fast worker
    # Generations running now (an abandoned /worker_generate one included), and all started.
    in_flight: int = 0
    generations_started: int = 0

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def paths(self) -> list[str]:
        return [path for path, _ in self.calls]

    def payloads(self, path: str) -> list[dict]:
        return [payload for p, payload in self.calls if p == path]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content) if request.content else None
        path = request.url.path
        self.calls.append((path, payload))
        if str(request.url).startswith(CONTROLLER):
            if self.controller_error:
                raise self.controller_error("controller down", request=request)
            if path in self.answers:
                return httpx.Response(200, json=self.answers[path])
            return self.controller(path, payload)
        worker = f"{request.url.scheme}://{request.url.host}"
        self.worker_hits.append((worker, path))
        if worker in self.dead_workers:
            raise httpx.ConnectError("connection refused", request=request)
        if self.worker_error:
            raise self.worker_error("worker down", request=request)
        if path in self.answers:
            return httpx.Response(200, json=self.answers[path])
        return await self.worker(path, payload)

    def controller(self, path: str, payload: dict | None) -> httpx.Response:
        if path == "/list_models":
            return httpx.Response(200, json={"models": self.models})
        if path == "/get_worker_address":
            served = payload["model"] in self.models and not self.no_worker
            address = self.workers[self.paths().count("/get_worker_address") % len(self.workers)]
            return httpx.Response(200, json={"address": address if served else ""})
        if path == "/refresh_all_workers":
            return httpx.Response(200, json=None)
        return httpx.Response(404, json={"detail": "Not Found"})

    async def worker(self, path: str, payload: dict) -> httpx.Response:
        if path == "/model_details":
            return httpx.Response(200, json={"context_length": self.context_length})
        if path == "/count_token":
            return httpx.Response(200, json={"count": count_tokens(payload["prompt"]), "error_code": 0})
        if path == "/worker_get_conv_template":
            return httpx.Response(200, json={"conv": worker_template(self.template)})
        if self.generate_status != 200:
            return httpx.Response(self.generate_status, text="Internal Server Error")
        if path == "/worker_generate":
            # The real worker generates in a thread its client cannot stop.
            last = await asyncio.shield(asyncio.ensure_future(self.generate(payload)))
            return httpx.Response(200, content=last)
        if path == "/worker_generate_stream":
            return httpx.Response(200, stream=ClosableStream(self.stream(payload), self.stream_closed))
        if path == "/worker_get_embeddings":
            return httpx.Response(200, json=self.embed(payload))
        return httpx.Response(404, json={"detail": "Not Found"})

    def chunks(self, params: dict) -> list[dict]:
        """The HF worker's chunks: cumulative text every 2 tokens, then a final duplicate."""
        words = self.reply.split(" ")[: params["max_new_tokens"]]
        finish = "length" if len(words) < len(self.reply.split(" ")) else "stop"
        prefix = params["prompt"] if params.get("echo", True) else ""
        prompt_tokens = count_tokens(params["prompt"])
        chunks = []
        for i in range(1, len(words) + 1, 2):
            text = prefix + " ".join(words[:i])
            chunks.append(self.chunk(text, prompt_tokens, i - 1, None, params, i))
        final = prefix + " ".join(words)
        chunks.append(self.chunk(final, prompt_tokens, len(words) - 1, self.finish_reason or finish, params, len(words)))
        if self.error_chunk_after is not None:
            error = {"text": "**NETWORK ERROR DUE TO HIGH TRAFFIC.**\n\n(injected)", "error_code": self.error_code}
            chunks = chunks[: self.error_chunk_after] + [error]
        if self.mutate_chunk is not None:
            chunks = [self.mutate_chunk(chunk) for chunk in chunks]
        return chunks

    def encoded_chunks(self, params: dict) -> list[bytes]:
        if self.raw_stream is not None:
            return [self.raw_stream]
        return [json.dumps(chunk).encode() + b"\0" for chunk in self.chunks(params)]

    async def generate(self, params: dict) -> bytes:
        """/worker_generate: the stream's last chunk, after the whole generation."""
        self.in_flight += 1
        self.generations_started += 1
        try:
            encoded = self.encoded_chunks(params)
            for _ in encoded:
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
            return encoded[-1].rstrip(b"\0")
        finally:
            self.in_flight -= 1

    def chunk(self, text: str, prompt_tokens: int, completion_tokens: int, finish: str | None, params: dict, n_tokens: int) -> dict:
        logprobs = None
        if params.get("logprobs") is not None:
            tokens = (" ".join(self.reply.split(" ")[:n_tokens])).split(" ")
            logprobs = {"text_offset": list(range(len(tokens))), "tokens": tokens,
                        "token_logprobs": [-0.5] * len(tokens), "top_logprobs": [{}] * len(tokens)}
        return {"text": text, "error_code": 0,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
                "finish_reason": finish, "logprobs": logprobs}

    async def stream(self, params: dict) -> AsyncIterator[bytes]:
        self.in_flight += 1
        self.generations_started += 1
        try:
            if self.one_read:
                yield b"".join(self.encoded_chunks(params))
                return
            for sent, data in enumerate(self.encoded_chunks(params)):
                if sent == self.silent_after_chunks:
                    raise httpx.ReadTimeout("the worker stayed silent")
                # Split each chunk across two reads, as TCP may.
                yield data[: len(data) // 2]
                if self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                yield data[len(data) // 2:]
        finally:
            self.in_flight -= 1

    def embed(self, params: dict) -> dict:
        inputs = params["input"]
        assert isinstance(inputs, list), "a bare string input crashes the real worker"
        vectors = [[float(len(text)), 0.5] for text in inputs]
        if params.get("encoding_format") == "base64":
            vectors = [base64.b64encode(struct.pack("<2f", *v)).decode() for v in vectors]
        return {"embedding": vectors, "token_num": sum(count_tokens(text) for text in inputs)}


class ClosableStream(httpx.AsyncByteStream):
    """A response body that records, in `closed_flags`, whether the gateway closed it."""

    def __init__(self, chunks: AsyncIterator[bytes], closed_flags: list[bool]):
        self.chunks = chunks
        self.closed_flags = closed_flags
        self.index = len(closed_flags)
        closed_flags.append(False)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        self.closed_flags[self.index] = True
        await self.chunks.aclose()


def count_tokens(prompt: str) -> int:
    """Words plus a BOS token: never more than the prompt's UTF-8 length plus one."""
    return len(prompt.split()) + 1
