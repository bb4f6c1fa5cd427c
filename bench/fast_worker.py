"""The benchmark's fake worker: upstreams.fastchat.demo_worker's answers behind a minimal HTTP server.

Issue 4 measured FastChat against "a fake worker that answers in 0.1 ms" and "10,000+ requests/s",
so that nearly all the cost is the gateway's. The demo worker (aiohttp, faithful fault
injection, a request log) spends about 0.3 ms of CPU per chat request; on a 2-core machine that
is CPU taken from the servers under test. This one answers the same protocol with the same
bytes, computed by the demo worker's own generation code, then remembered per identical request
(the benchmark sends the same few requests again and again), on a raw uvloop protocol with
httptools. It registers and heartbeats like the demo worker and takes its command-line flags.
No token delay, no fault injection, no log: use upstreams.fastchat.demo_worker for anything but speed.

    python bench/fast_worker.py --port 21002 --controller-address http://127.0.0.1:21001 \\
        --model-names demo-chat,demo-embed --reply-words 64
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from upstreams.fastchat.demo_worker import (  # noqa: E402 - needs the repository root on sys.path
    DemoWorker,
    generate_stream_gate,
    get_embeddings,
    keep_registered,
    parse_args,
    tokenize,
)

logger = logging.getLogger("fast_worker")
MEMO_SIZE = 4096


class Answers:
    """Each route's answer (status, content type, body) for a request body, remembered."""

    def __init__(self, worker: DemoWorker) -> None:
        self.worker = worker
        self.memo: OrderedDict[tuple[bytes, bytes], tuple[int, bytes, bytes]] = OrderedDict()
        self.routes: dict[bytes, Callable[[Any], Awaitable[tuple[int, bytes, bytes]]]] = {
            b"/worker_get_status": self.status,
            b"/count_token": self.count_token,
            b"/model_details": self.model_details,
            b"/worker_get_conv_template": self.conv_template,
            b"/worker_generate": self.generate,
            b"/worker_generate_stream": self.generate_stream,
            b"/worker_get_embeddings": self.embeddings,
        }

    def remembered(self, path: bytes, body: bytes) -> tuple[int, bytes, bytes] | None:
        return self.memo.get((path, body))

    async def answer(self, path: bytes, body: bytes) -> tuple[int, bytes, bytes]:
        route = self.routes.get(path)
        if route is None:
            return 404, b"application/json", b'{"detail":"Not Found"}'
        try:
            result = await route(json.loads(body) if body else None)
        except Exception:  # FastChat's worker answers 500 with a plain body
            logger.exception("%s failed", path.decode())
            return 500, b"text/plain", b"Internal Server Error"
        if path != b"/worker_get_status":  # the status carries the live queue length
            self.memo[(path, body)] = result
            if len(self.memo) > MEMO_SIZE:
                self.memo.popitem(last=False)
        return result

    async def status(self, params: Any) -> tuple[int, bytes, bytes]:
        return as_json(self.worker.status())

    async def count_token(self, params: Any) -> tuple[int, bytes, bytes]:
        prompt = params["prompt"]
        return as_json({"count": len(prompt) if isinstance(prompt, list) else len(tokenize(prompt)), "error_code": 0})

    async def model_details(self, params: Any) -> tuple[int, bytes, bytes]:
        return as_json({"context_length": self.worker.settings.context_length})

    async def conv_template(self, params: Any) -> tuple[int, bytes, bytes]:
        return as_json({"conv": self.worker.conv})

    async def generate(self, params: Any) -> tuple[int, bytes, bytes]:
        last = None
        async for chunk in self.chunks(params):
            last = chunk
        return as_json(last)

    async def generate_stream(self, params: Any) -> tuple[int, bytes, bytes]:
        body = b"".join([json.dumps(chunk).encode() + b"\0" async for chunk in self.chunks(params)])
        return 200, b"STREAM", body

    async def embeddings(self, params: Any) -> tuple[int, bytes, bytes]:
        return as_json(get_embeddings(params))

    def chunks(self, params: Any):
        return generate_stream_gate(params, self.worker.settings, self.worker.options.stream_interval)


def as_json(data: Any) -> tuple[int, bytes, bytes]:
    """Like Starlette's JSONResponse (and the demo worker): compact, raw UTF-8."""
    return 200, b"application/json", json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


REASONS = {200: b"OK", 404: b"Not Found", 500: b"Internal Server Error"}


def http_response(status: int, content_type: bytes, body: bytes) -> bytes:
    """A keep-alive HTTP/1.1 response; streams go out chunked, as uvicorn sends FastChat's."""
    head = b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error"))
    if content_type == b"STREAM":
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        return head + b"content-type: text/plain; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n" + chunked
    return head + b"content-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (content_type, len(body), body)


class WorkerProtocol(asyncio.Protocol):
    """One connection: parse requests with httptools, answer in order."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.body = b"", []
        self.transport: asyncio.Transport | None = None
        self.pending: asyncio.Task | None = None  # an answer being computed; later ones wait for it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path, body = self.url.split(b"?", 1)[0], b"".join(self.body)
        self.url, self.body = b"", []
        known = self.answers.remembered(path, body)
        if known is not None and self.pending is None:
            self.transport.write(http_response(*known))
            return
        self.pending = asyncio.get_running_loop().create_task(self.respond(self.pending, path, body))

    async def respond(self, before: asyncio.Task | None, path: bytes, body: bytes) -> None:
        if before is not None:
            await before
        answer = await self.answers.answer(path, body)
        if not self.transport.is_closing():
            self.transport.write(http_response(*answer))
        if self.pending is asyncio.current_task():
            self.pending = None


async def serve(argv: list[str] | None) -> None:
    options = parse_args(argv)
    worker = DemoWorker(options)
    loop = asyncio.get_running_loop()
    answers = Answers(worker)
    server = await loop.create_server(lambda: WorkerProtocol(answers), options.host, options.port, backlog=1024)
    logger.info("serving %s on %s", ",".join(options.model_names), options.worker_address)
    registration = None if options.no_register else asyncio.create_task(keep_registered(worker))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if registration is not None:
        registration.cancel()
    server.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(serve(argv))


if __name__ == "__main__":
    main()
