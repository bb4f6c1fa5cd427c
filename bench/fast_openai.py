"""The benchmark's fake OpenAI-compatible server: canned answers behind a minimal HTTP server.

What bench/fast_worker.py is for FastChat's worker protocol, this is for the OpenAI API: the
upstream of the `--preset openai` run (the gateway with an OpenAI-compatible upstream against
LiteLLM's proxy), so cheap (~0.03 ms of CPU per request, on a raw uvloop protocol with
httptools, every answer computed once per identical request body and then sent as remembered
bytes) that nearly all the CPU measured is the servers' under test. No token delay, no model.

- `GET /v1/models`: the served models (`--models`, default demo-chat,demo-embed).
- `POST /v1/chat/completions`: an answer of min(max_tokens, --reply-words) words; with
  `"stream": true`, Server-Sent Events as OpenAI sends them: a role chunk, one chunk per word
  (64 content chunks for `max_tokens: 64`), a finish chunk, a usage chunk (empty `choices`) when
  `stream_options.include_usage` is true, then `data: [DONE]`.
- `POST /v1/embeddings`: one 16-float vector per input, with usage.
Anything else gets OpenAI's error shape (400 for a body that is not JSON, 404 for an unknown
path or model, 401 when `--api-key` is set and not sent).

    python bench/fast_openai.py --port 8000 [--models demo-chat,demo-embed] [--reply-words 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections import OrderedDict
from typing import Any

import httptools
import uvloop

logger = logging.getLogger("fast_openai")
MEMO_SIZE = 4096
CREATED = 1_700_000_000
EMBEDDING_SIZE = 16
WORDS = ("Hello", "there,", "benchmark!", "This", "is", "a", "canned", "answer", "from", "the", "fake", "server.")


def dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def error(status: int, message: str, kind: str, code: str | None = None, param: str | None = None) -> tuple:
    return (
        status,
        b"application/json",
        dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )


def words_for(body: dict[str, Any], reply_words: int) -> tuple[list[str], str]:
    """The reply's words and finish reason: max_tokens (or max_completion_tokens) cuts it short."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    count = reply_words if not isinstance(limit, int) or limit <= 0 else min(limit, reply_words)
    words = [WORDS[i % len(WORDS)] + ("" if i == count - 1 else " ") for i in range(count)]
    return words, "length" if count < reply_words else "stop"


def prompt_tokens(body: dict[str, Any]) -> int:
    """A word count of the messages' text: what a tokenizer would roughly say."""
    total = 0
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content.split()) + 1
    return max(total, 1)


class Answers:
    """Each route's answer (status, content type, body bytes) for a request body, remembered."""

    def __init__(self, models: list[str], reply_words: int, api_key: str | None) -> None:
        self.models, self.reply_words = models, reply_words
        self.auth = None if api_key is None else b"Bearer " + api_key.encode()
        self.memo: OrderedDict[tuple[bytes, bytes, bytes], tuple[int, bytes, bytes]] = OrderedDict()
        self.model_list = (
            200,
            b"application/json",
            dumps(
                {
                    "object": "list",
                    "data": [
                        {"id": name, "object": "model", "created": CREATED, "owned_by": "fast-openai"}
                        for name in models
                    ],
                }
            ),
        )

    def answer(self, method: bytes, path: bytes, body: bytes) -> tuple[int, bytes, bytes]:
        key = (method, path, body)
        known = self.memo.get(key)
        if known is not None:
            return known
        result = self.compute(method, path, body)
        self.memo[key] = result
        if len(self.memo) > MEMO_SIZE:
            self.memo.popitem(last=False)
        return result

    def compute(self, method: bytes, path: bytes, body: bytes) -> tuple[int, bytes, bytes]:
        if path in (b"/v1/models", b"/models") and method == b"GET":
            return self.model_list
        route = {
            b"/v1/chat/completions": self.chat,
            b"/chat/completions": self.chat,
            b"/v1/embeddings": self.embeddings,
            b"/embeddings": self.embeddings,
        }.get(path)
        if route is None or method != b"POST":
            return error(
                404, f"Unknown request URL: {method.decode()} {path.decode()}", "invalid_request_error", "unknown_url"
            )
        try:
            data = json.loads(body)
        except ValueError:
            return error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        if not isinstance(data, dict):
            return error(400, "The body must be a JSON object.", "invalid_request_error")
        model = data.get("model")
        if model not in self.models:
            return error(
                404, f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found", "model"
            )
        return route(data)

    def chat(self, data: dict[str, Any]) -> tuple[int, bytes, bytes]:
        words, finish = words_for(data, self.reply_words)
        usage = {
            "prompt_tokens": prompt_tokens(data),
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens(data) + len(words),
        }
        head = {"id": "chatcmpl-fake", "object": "chat.completion", "created": CREATED, "model": data["model"]}
        if not data.get("stream"):
            message = {"role": "assistant", "content": "".join(words), "refusal": None}
            answer = {
                **head,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage,
                "system_fingerprint": None,
            }
            return 200, b"application/json", dumps(answer)
        head["object"] = "chat.completion.chunk"

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {
                **head,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }

        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        events += [chunk({"content": word}) for word in words]
        events.append(chunk({}, finish))
        options = data.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            events.append({**head, "system_fingerprint": None, "choices": [], "usage": usage})
        frames = [b"data: " + dumps(event) + b"\n\n" for event in events] + [b"data: [DONE]\n\n"]
        # one HTTP chunk per event, as a server that writes each event when it is generated
        return 200, b"STREAM", b"".join(b"%x\r\n%s\r\n" % (len(frame), frame) for frame in frames)

    def embeddings(self, data: dict[str, Any]) -> tuple[int, bytes, bytes]:
        inputs = data.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            return error(400, "'input' must be a string or a non-empty array.", "invalid_request_error", None, "input")
        items, tokens = [], 0
        for index, text in enumerate(inputs):
            size = len(text) if isinstance(text, list) else len(str(text).split())
            tokens += size
            vector = [round(((index + 1) * (i + 3) % 17) / 17 - 0.5, 6) for i in range(EMBEDDING_SIZE)]
            items.append({"object": "embedding", "index": index, "embedding": vector})
        answer = {
            "object": "list",
            "data": items,
            "model": data["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return 200, b"application/json", dumps(answer)


REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found"}


def http_response(status: int, content_type: bytes, body: bytes, keep_alive: bool = True) -> bytes:
    """A keep-alive HTTP/1.1 response; streams go out chunked (their body is already framed)."""
    head = b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error"))
    if not keep_alive:
        head += b"connection: close\r\n"
    if content_type == b"STREAM":
        return (
            head
            + (
                b"content-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            + body
            + b"0\r\n\r\n"
        )
    return head + b"content-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (content_type, len(body), body)


class OpenAIProtocol(asyncio.Protocol):
    """One connection: parse requests with httptools, answer each at once (in order)."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.parser = httptools.HttpRequestParser(self)
        self.url, self.body, self.authorization, self.header = b"", [], None, b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(
                http_response(*error(400, "Malformed HTTP request.", "invalid_request_error"), keep_alive=False)
            )
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self.authorization = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path, body = self.url.split(b"?", 1)[0], b"".join(self.body)
        authorization, self.url, self.body, self.authorization = self.authorization, b"", [], None
        method = self.parser.get_method()
        keep_alive = self.parser.should_keep_alive()
        if self.answers.auth is not None and authorization != self.answers.auth:
            answer = error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        else:
            answer = self.answers.answer(method, path, body)
        self.transport.write(http_response(*answer, keep_alive=keep_alive))
        if not keep_alive:
            self.transport.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--models", default="demo-chat,demo-embed", help="comma-separated model ids")
    parser.add_argument("--reply-words", type=int, default=64, help="words (chunks) in a reply without max_tokens")
    parser.add_argument("--api-key", help="answer 401 unless this bearer key is sent")
    return parser.parse_args(argv)


async def serve(argv: list[str] | None) -> None:
    options = parse_args(argv)
    answers = Answers([m for m in options.models.split(",") if m], options.reply_words, options.api_key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: OpenAIProtocol(answers), options.host, options.port, backlog=1024)
    logger.info("serving %s on http://%s:%d/v1", options.models, options.host, options.port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(serve(argv))


if __name__ == "__main__":
    main()
