"""A small, fast OpenAI-compatible server for routing and failover tests: one process per fake
upstream, answering every chat or completions request with its own name, so that a test can
tell which upstream served it.

    python -m tests.fake_upstream --port 9001 --name a [--api-key KEY] [--chunks 4] [--delay 0]

- GET /v1/models lists `--models` (default "fake-model"); with --api-key, every route but
  /stats answers 401 to a request without `Authorization: Bearer KEY`;
- POST /v1/chat/completions and /v1/completions, streamed or not: the text is "<name> " repeated
  `--chunks` times, one chunk each, with usage when the client asked for it;
- GET /stats: {"requests": n, "generations": m}: every API request (answered or refused), and
  the chat and completions requests among them (probes are not generations).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

COUNT = {"requests": 0, "generations": 0}


def make_app(name: str, api_key: str | None, models: list[str], chunks: int, delay: float):
    async def read_body(receive) -> bytes:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                return body

    async def send_json(send, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path, method = scope["path"], scope["method"]
        if path == "/stats":
            await send_json(send, 200, COUNT)
            return
        COUNT["requests"] += 1
        if path in ("/v1/chat/completions", "/v1/completions"):
            COUNT["generations"] += 1
        headers = dict(scope["headers"])
        if api_key is not None and headers.get(b"authorization", b"") != f"Bearer {api_key}".encode():
            await send_json(send, 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                                  "code": "invalid_api_key"}})
            return
        if method == "GET" and path == "/v1/models":
            await send_json(send, 200, {"object": "list", "data": [
                {"id": model, "object": "model", "created": 0, "owned_by": name} for model in models]})
            return
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            await send_json(send, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
            return
        request = json.loads(await read_body(receive) or b"{}")
        chat = path.endswith("chat/completions")
        model = request.get("model", models[0])
        created = int(time.time())
        usage = {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": 5 + chunks}
        if delay:
            await asyncio.sleep(delay)
        if not request.get("stream"):
            text = f"{name} " * chunks
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                      if chat else {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None})
            await send_json(send, 200, {"id": "x-1", "object": "chat.completion" if chat else "text_completion",
                                        "created": created, "model": model, "choices": [choice], "usage": usage})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice, usage_value=None, choices=True) -> bytes:
            body = {"id": "x-1", "object": kind, "created": created, "model": model,
                    "choices": [choice] if choices else []}
            if (request.get("stream_options") or {}).get("include_usage"):
                body["usage"] = usage_value
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        def delta(text=None, finish=None, role=False):
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                return {"index": 0, "delta": d, "finish_reason": finish}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        parts = []
        if chat:
            parts.append(chunk(delta(role=True)))
        parts.extend(chunk(delta(f"{name} ")) for _ in range(chunks))
        parts.append(chunk(delta(finish="stop")))
        if (request.get("stream_options") or {}).get("include_usage"):
            parts.append(chunk(None, usage, choices=False))
        parts.append(b"data: [DONE]\n\n")
        for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--api-key")
    parser.add_argument("--models", default="fake-model")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    import uvicorn

    app = make_app(args.name, args.api_key, args.models.split(","), args.chunks, args.delay)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools", lifespan="on")


if __name__ == "__main__":
    main()
