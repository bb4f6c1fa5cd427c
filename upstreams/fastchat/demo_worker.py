"""A protocol-faithful fake FastChat model worker for demos, end-to-end tests and benchmarks.

It speaks the wire protocol of FastChat 0.2.36's HF ``model_worker`` (registration, heartbeats,
NUL-delimited cumulative stream chunks, the ``usage`` and ``echo`` quirks, leaked concurrency
permits, a /worker_generate generation that outlives its client while a stream stops with its
client) with a deterministic word tokenizer and a canned reply instead of a model. Test hooks
live under ``/_fake/`` (``/_fake/log`` shows the queue and the generations running). Run
``python -m upstreams.fastchat.demo_worker --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import signal
import time
from array import array
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any

import aiohttp
from aiohttp import web

logger = logging.getLogger("demo_worker")

# fastchat.constants, copied so that importing this module stays cheap.
SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
INTERNAL_ERROR = 50001

BOS_ID, EOS_ID, WORD_ID, FIRST_REPLY_ID = 1, 2, 3, 1000
SPECIAL_PIECES = {BOS_ID: "<s>", EOS_ID: "</s>"}
REPLY = "Hello wörld! I am a friendly demo model and happy to help.".split()
EMBEDDING_DIM = 8
LOG_LIMIT = 10_000
# What torch raises when the prompt was truncated to nothing (max_new_tokens > context).
EMPTY_INPUT_ERROR = (
    "Expected tensor for argument #1 'indices' to have one of the following scalar types: "
    "Long, Int; but got torch.FloatTensor instead (while checking arguments for embedding)"
)
WORD = re.compile(r"\S+")

Token = tuple[int, str]  # (token id, the text it decodes to on its own)
Params = Any  # the parsed JSON body, trusted as little as FastChat trusts it


# Tokenizer ---------------------------------------------------------------------------------


def count_tokens(text: str) -> int:
    """Return the token count: one BOS plus one token per whitespace-separated word."""
    return 1 + len(WORD.findall(text))


def tokenize(prompt: str) -> list[Token]:
    """Split a prompt into BOS plus words; each piece carries the whitespace before it."""
    if not isinstance(prompt, str):  # what an HF tokenizer raises
        raise ValueError("text input must be of type `str` (single example)")
    tokens, start = [(BOS_ID, SPECIAL_PIECES[BOS_ID])], 0
    for match in WORD.finditer(prompt):
        tokens.append((WORD_ID, prompt[start : match.end()]))
        start = match.end()
    if start < len(prompt) and len(tokens) > 1:  # keep trailing whitespace in the last piece
        tokens[-1] = (WORD_ID, tokens[-1][1] + prompt[start:])
    return tokens


def decode(tokens: Iterable[Token]) -> str:
    """Join the pieces, skipping special tokens like ``skip_special_tokens=True``."""
    return "".join(piece for token_id, piece in tokens if token_id not in SPECIAL_PIECES)


def reply_token(index: int, reply_words: int, after_text: bool) -> Token:
    """Return the index-th generated token: a word of the canned reply, then EOS."""
    if index >= reply_words:
        return EOS_ID, SPECIAL_PIECES[EOS_ID]
    position = index % len(REPLY)
    word = REPLY[position]
    return FIRST_REPLY_ID + position, (f" {word}" if after_text else word)


def fake_logprob(position: int) -> float:
    """Return a deterministic log-probability for the token at this output position."""
    return -round(0.05 + (position * 7 % 10) / 20, 4)


# Generation (mirrors fastchat.serve.inference.generate_stream) ------------------------------


@dataclasses.dataclass
class FakeSettings:
    """Knobs that /_fake/config may change; /_fake/reset restores the CLI values."""

    token_delay: float = 0.0
    stall_seconds: float = 0.0
    fail_after_chunks: int | None = None
    crash_after_chunks: int | None = None
    http_status: int | None = None
    count_token_status: int | None = None
    context_length: int = 2048
    reply_words: int = len(REPLY)


def is_partial_stop(output: str, stop_str: str) -> bool:
    """Copy FastChat's check (including its i=0 quirk) for text that may begin a stop string."""
    for i in range(0, min(len(output), len(stop_str))):
        if stop_str.startswith(output[-i:]):
            return True
    return False


def apply_stop(output: str, stop: Any, rfind_start: int) -> tuple[str, bool, bool]:
    """Cut ``output`` at the last stop string; return (output, stopped, partially_stopped)."""
    if not stop:
        return output, False, False
    if isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, Iterable):
        raise ValueError("Invalid stop field type.")
    partially_stopped = False
    for each_stop in stop:
        pos = output.rfind(each_stop, rfind_start)
        if pos != -1:
            return output[:pos], True, False
        partially_stopped = is_partial_stop(output, each_stop)
        if partially_stopped:
            break
    return output, False, partially_stopped


def logprobs_of(tokens: list[Token], token_logprobs: list[float | None]) -> dict[str, Any]:
    """Build the cumulative logprobs dict of the HF worker (offsets count special pieces)."""
    pieces = [piece for _, piece in tokens]
    offsets, position = [], 0
    for piece in pieces:
        offsets.append(position)
        position += len(piece)
    return {
        "text_offset": offsets,
        "tokens": pieces,
        "token_logprobs": list(token_logprobs),
        "top_logprobs": [{}] * len(token_logprobs),
    }


async def generate_stream(
    params: Params, settings: FakeSettings, stream_interval: int
) -> AsyncIterator[dict[str, Any]]:
    """Yield FastChat's raw outputs; its parameter reads and failure points are kept."""
    prompt = params["prompt"]
    len_prompt = len(prompt)
    float(params.get("temperature", 1.0))  # read like the HF worker so bad values fail alike
    float(params.get("repetition_penalty", 1.0))
    float(params.get("top_p", 1.0))
    int(params.get("top_k", -1))
    max_new_tokens = int(params.get("max_new_tokens", 256))
    logprobs = params.get("logprobs", None)
    echo = bool(params.get("echo", True))
    stop = params.get("stop", None)
    stop_token_ids = list(params.get("stop_token_ids", None) or []) + [EOS_ID]

    input_tokens = tokenize(prompt)[-(settings.context_length - max_new_tokens - 1) :]
    if max_new_tokens <= 0:
        # FastChat's loop never runs, so its final yield reads an unbound local: HTTP 500.
        raise UnboundLocalError("cannot access local variable 'output'")
    prompt_len, output_tokens = len(input_tokens), list(input_tokens)
    token_logprobs: list[float | None] = []
    if logprobs is not None:  # only read when asked for; building it costs more than the rest
        token_logprobs = [None, *(fake_logprob(k) for k in range(1, prompt_len))]
    after_text = echo and bool(decode(input_tokens))
    stopped, output, ret_logprobs = False, "", None

    for i in range(max_new_tokens):
        if not input_tokens:
            raise RuntimeError(EMPTY_INPUT_ERROR)
        if settings.token_delay:
            await asyncio.sleep(settings.token_delay)
        token = reply_token(i, settings.reply_words, after_text or i > 0)
        output_tokens.append(token)
        if logprobs is not None:
            token_logprobs.append(fake_logprob(len(output_tokens) - 1))
        stopped = token[0] in stop_token_ids
        if i % stream_interval == 0 or i == max_new_tokens - 1 or stopped:
            shown = output_tokens if echo else output_tokens[prompt_len:]
            output = decode(shown)
            if logprobs is not None:
                ret_logprobs = logprobs_of(shown, token_logprobs if echo else token_logprobs[prompt_len:])
            rfind_start = len_prompt if echo else 0
            output, cut, partially_stopped = apply_stop(output, stop, rfind_start)
            stopped = stopped or cut
            if not partially_stopped:
                yield raw_output(output, ret_logprobs, prompt_len, i, None)
        if stopped:
            break
    yield raw_output(output, ret_logprobs, prompt_len, i, "stop" if stopped else "length")


def raw_output(text: str, logprobs: Any, prompt_tokens: int, i: int, finish_reason: str | None) -> dict[str, Any]:
    """Build one output of generate_stream; ``completion_tokens`` is the 0-based index."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": i, "total_tokens": prompt_tokens + i}
    return {"text": text, "logprobs": logprobs, "usage": usage, "finish_reason": finish_reason}


def error_chunk(reason: str) -> dict[str, Any]:
    """Return the chunk FastChat yields for a caught ValueError or RuntimeError."""
    return {"text": f"{SERVER_ERROR_MSG}\n\n({reason})", "error_code": INTERNAL_ERROR}


async def generate_stream_gate(
    params: Params, settings: FakeSettings, stream_interval: int
) -> AsyncIterator[dict[str, Any]]:
    """Yield wire chunks like ModelWorker.generate_stream_gate, plus ``fail_after_chunks``."""
    try:
        sent = 0
        async for output in generate_stream(params, settings, stream_interval):
            if settings.fail_after_chunks is not None and sent >= settings.fail_after_chunks:
                yield error_chunk("injected")
                return
            yield {
                "text": output["text"],
                "error_code": 0,
                "usage": output["usage"],
                "finish_reason": output["finish_reason"],
                "logprobs": output["logprobs"],
            }
            sent += 1
    except (ValueError, RuntimeError) as exc:
        yield error_chunk(str(exc))


# Embeddings ---------------------------------------------------------------------------------


def embed(text: str) -> array:
    """Return a deterministic L2-normalised float32 vector derived from a hash of the text."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [byte - 127.5 for byte in digest[:EMBEDDING_DIM]]
    norm = math.sqrt(sum(x * x for x in raw))
    return array("f", (x / norm for x in raw))


def get_embeddings(params: Params) -> dict[str, Any]:
    """Answer /worker_get_embeddings; a bare string or non-string items raise (HTTP 500)."""
    inputs = params["input"]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) for s in inputs):
        raise TypeError("input must be a non-empty list of strings")
    vectors = [embed(text) for text in inputs]
    if params.get("encoding_format", None) == "base64":
        embedding: list[Any] = [base64.b64encode(v.tobytes()).decode() for v in vectors]
    else:
        embedding = [v.tolist() for v in vectors]
    return {"embedding": embedding, "token_num": sum(count_tokens(s) for s in inputs)}


# HTTP -----------------------------------------------------------------------------------------


def json_response(data: Any, status: int = 200) -> web.Response:
    """Render JSON like Starlette's JSONResponse (compact, raw UTF-8)."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return web.Response(body=body, status=status, content_type="application/json")


def internal_error() -> web.Response:
    """Return what uvicorn/Starlette send for an unhandled exception."""
    return web.Response(status=500, text="Internal Server Error")


def injected_error(status: int) -> web.Response:
    """Return the body of an injected HTTP error."""
    return json_response({"detail": f"injected HTTP {status}"}, status=status)


def abort_connection(request: web.Request) -> None:
    """Drop the TCP connection without finishing the response."""
    if request.transport is not None:
        request.transport.abort()


Handler = Callable[[web.Request, Params], Awaitable[web.StreamResponse]]


class DemoWorker:
    """The worker state: settings, the concurrency semaphore and the request log."""

    def __init__(self, options: argparse.Namespace) -> None:
        from fastchat.conversation import get_conv_template

        self.options = options
        conv = dataclasses.asdict(get_conv_template(options.conv_template))
        self.conv = {**conv, "sep_style": int(conv["sep_style"])}
        # Generations running, an abandoned /worker_generate one included (kept across resets:
        # they still run).
        self.generating = 0
        self.background: set[asyncio.Future] = set()
        self.reset()

    def reset(self) -> None:
        """Restore the CLI settings, a fresh semaphore and an empty log (like a restart)."""
        self.settings = FakeSettings(
            token_delay=self.options.token_delay,
            context_length=self.options.context_length,
            reply_words=self.options.reply_words,
        )
        self.semaphore = asyncio.Semaphore(self.options.limit_worker_concurrency)
        self.leaked_slots = 0
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_LIMIT)
        self.counts: Counter[str] = Counter()

    def queue_length(self) -> int:
        """Compute the queue length exactly as BaseModelWorker.get_queue_length does."""
        waiters = len(self.semaphore._waiters or ())  # type: ignore[attr-defined]
        return self.options.limit_worker_concurrency - self.semaphore._value + waiters

    def status(self) -> dict[str, Any]:
        """Return the /worker_get_status body, also sent on registration."""
        return {
            "model_names": self.options.model_names,
            "speed": 1,
            "queue_length": self.queue_length(),
        }

    @contextlib.asynccontextmanager
    async def model_slot(self) -> AsyncIterator[None]:
        """Hold a permit; like FastChat, an unexpected exception never gives it back."""
        semaphore = self.semaphore
        await semaphore.acquire()
        try:
            yield
        except (asyncio.CancelledError, ConnectionError):
            semaphore.release()
            raise
        except Exception:
            if semaphore is self.semaphore:  # a leak from before /_fake/reset is forgotten
                self.leaked_slots += 1
            raise
        else:
            semaphore.release()

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """Count a generation as running while the block runs."""
        self.generating += 1
        try:
            yield
        finally:
            self.generating -= 1

    async def stall(self) -> None:
        """Sleep for the injected stall before sending anything."""
        if self.settings.stall_seconds:
            await asyncio.sleep(self.settings.stall_seconds)

    # Protocol endpoints (each takes the parsed JSON body) ------------------------------------

    async def get_status(self, request: web.Request, params: Params) -> web.Response:
        return json_response(self.status())

    async def count_token(self, request: web.Request, params: Params) -> web.Response:
        if self.settings.count_token_status:
            return injected_error(self.settings.count_token_status)
        prompt = params["prompt"]
        if isinstance(prompt, list):  # an HF tokenizer treats a list as a batch
            return json_response({"count": len(prompt), "error_code": 0})
        return json_response({"count": len(tokenize(prompt)), "error_code": 0})

    async def model_details(self, request: web.Request, params: Params) -> web.Response:
        return json_response({"context_length": self.settings.context_length})

    async def get_conv_template(self, request: web.Request, params: Params) -> web.Response:
        return json_response({"conv": self.conv})

    async def generate(self, request: web.Request, params: Params) -> web.Response:
        """Like FastChat's worker, which generates in a thread: a client that goes away does not
        stop the generation, which keeps its slot until it ends (a stream's client does stop it)."""
        if self.settings.http_status:
            return injected_error(self.settings.http_status)
        generation = asyncio.ensure_future(self.generate_whole(request, params))
        self.background.add(generation)
        generation.add_done_callback(self.generation_done)
        return await asyncio.shield(generation)

    def generation_done(self, generation: asyncio.Future) -> None:
        self.background.discard(generation)
        if not generation.cancelled():
            generation.exception()  # retrieved: a client that left no longer waits for it

    async def generate_whole(self, request: web.Request, params: Params) -> web.Response:
        crash_after, last = self.settings.crash_after_chunks, None
        async with self.model_slot():
            await self.stall()
            with self.generation():
                chunks = generate_stream_gate(params, self.settings, self.options.stream_interval)
                async for sent, chunk in aenumerate(chunks):
                    if crash_after is not None and sent >= crash_after:
                        abort_connection(request)
                        return web.Response()
                    last = chunk
        return json_response(last)

    async def generate_stream(self, request: web.Request, params: Params) -> web.StreamResponse:
        if self.settings.http_status:
            return injected_error(self.settings.http_status)
        response = web.StreamResponse()
        try:
            async with self.model_slot():
                await self.stall()
                await response.prepare(request)
                with self.generation():
                    await self.write_chunks(request, response, params)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            # Starlette has already sent "200 OK"; uvicorn drops the connection mid-body.
            logger.exception("stream failed; the slot stays leaked")
            abort_connection(request)
        return response

    async def write_chunks(self, request: web.Request, response: web.StreamResponse, params: Params) -> None:
        """Write NUL-delimited chunks, honouring ``crash_after_chunks``."""
        crash_after = self.settings.crash_after_chunks
        chunks = generate_stream_gate(params, self.settings, self.options.stream_interval)
        async for sent, chunk in aenumerate(chunks):
            if crash_after is not None and sent >= crash_after:
                abort_connection(request)
                return
            await response.write(json.dumps(chunk).encode() + b"\0")

    async def get_embeddings(self, request: web.Request, params: Params) -> web.Response:
        if self.settings.http_status:
            return injected_error(self.settings.http_status)
        async with self.model_slot():
            await self.stall()
            result = get_embeddings(params)
        return json_response(result)

    # Test hooks -----------------------------------------------------------------------------

    async def fake_config(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            self.settings = dataclasses.replace(self.settings, **validate_settings(changes))
        except (ValueError, TypeError) as exc:
            return json_response({"error": str(exc)}, status=400)
        return json_response({"config": dataclasses.asdict(self.settings)})

    async def fake_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return json_response({"config": dataclasses.asdict(self.settings)})

    async def fake_log(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "requests": list(self.log),
                "counts": dict(self.counts),
                "leaked_slots": self.leaked_slots,
                "queue_length": self.queue_length(),
                "generating": self.generating,
                "config": dataclasses.asdict(self.settings),
            }
        )

    # Wiring --------------------------------------------------------------------------------

    def logged(self, handler: Handler, reads_body: bool = True) -> Callable[..., Any]:
        """Wrap a protocol handler: log the request, turn exceptions into FastChat's 500."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            entry = self.start_entry(request.path)
            try:
                params = await read_json(request) if reads_body else None
                entry["body"] = params
                return await handler(request, params)
            except (asyncio.CancelledError, ConnectionError) as exc:
                entry["client_disconnected"] = True
                entry["disconnected_at"] = time.time()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return web.Response(status=499)
            except Exception:
                logger.exception("%s failed", request.path)
                return internal_error()
            finally:
                entry["ended"] = time.time()

        return wrapped

    def start_entry(self, path: str) -> dict[str, Any]:
        """Append a request to the log before it is handled, so stalls are visible."""
        self.counts[path] += 1
        entry = {
            "path": path,
            "body": None,
            "started": time.time(),
            "ended": None,
            "client_disconnected": False,
            "disconnected_at": None,
        }
        self.log.append(entry)
        return entry

    def make_app(self) -> web.Application:
        """Return the aiohttp application with the protocol routes and the test hooks."""
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/worker_get_status", self.logged(self.get_status, False))
        app.router.add_post("/count_token", self.logged(self.count_token))
        app.router.add_post("/model_details", self.logged(self.model_details, False))
        app.router.add_post("/worker_get_conv_template", self.logged(self.get_conv_template, False))
        app.router.add_post("/worker_generate_stream", self.logged(self.generate_stream))
        app.router.add_post("/worker_generate", self.logged(self.generate))
        app.router.add_post("/worker_get_embeddings", self.logged(self.get_embeddings))
        app.router.add_post("/_fake/config", self.fake_config)
        app.router.add_post("/_fake/reset", self.fake_reset)
        app.router.add_get("/_fake/log", self.fake_log)
        return app


async def aenumerate(items: AsyncIterator[Any]) -> AsyncIterator[tuple[int, Any]]:
    """Enumerate an async iterator."""
    index = 0
    async for item in items:
        yield index, item
        index += 1


async def read_json(request: web.Request) -> Params:
    """Parse the body like ``await request.json()`` in FastAPI (invalid JSON raises)."""
    return json.loads(await request.read())


SETTING_LIMITS: dict[str, tuple[type, float, float, bool]] = {
    # name: (type, minimum, maximum, nullable)
    "token_delay": (float, 0, 3600, False),
    "stall_seconds": (float, 0, 86400, False),
    "fail_after_chunks": (int, 0, 10**9, True),
    "crash_after_chunks": (int, 0, 10**9, True),
    "http_status": (int, 100, 599, True),
    "count_token_status": (int, 100, 599, True),
    "context_length": (int, 1, 10**9, False),
    "reply_words": (int, 0, 10**6, False),
}


def validate_settings(changes: Any) -> dict[str, Any]:
    """Check a /_fake/config body; raise ValueError naming the first bad key."""
    if not isinstance(changes, dict):
        raise ValueError("expected a JSON object")
    clean = {}
    for key, value in changes.items():
        if key not in SETTING_LIMITS:
            raise ValueError(f"unknown setting {key!r}; known: {', '.join(SETTING_LIMITS)}")
        kind, low, high, nullable = SETTING_LIMITS[key]
        if value is None and nullable:
            clean[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"{key} must be a number in [{low}, {high}]")
        clean[key] = kind(value)
    return clean


# Registration -------------------------------------------------------------------------------


async def register(session: aiohttp.ClientSession, worker: DemoWorker) -> None:
    """Register with the controller, retrying every second until it answers 200."""
    options = worker.options
    data = {
        "worker_name": options.worker_address,
        "check_heart_beat": True,
        "worker_status": worker.status(),
        "multimodal": False,
    }
    while True:
        try:
            url = f"{options.controller_address}/register_worker"
            async with session.post(url, json=data) as response:
                response.raise_for_status()
            logger.info("registered with %s", options.controller_address)
            return
        except (TimeoutError, aiohttp.ClientError) as exc:
            logger.warning("registration failed (%s); retrying", exc)
            await asyncio.sleep(1.0)


async def heart_beat(session: aiohttp.ClientSession, worker: DemoWorker) -> bool:
    """Send one heartbeat (retried like FastChat's); return the controller's ``exist``."""
    url = f"{worker.options.controller_address}/receive_heart_beat"
    data = {"worker_name": worker.options.worker_address, "queue_length": worker.queue_length()}
    while True:
        try:
            async with session.post(url, json=data) as response:
                return bool((await response.json(content_type=None))["exist"])
        except (TimeoutError, aiohttp.ClientError, KeyError, TypeError, ValueError) as exc:
            logger.warning("heart beat error: %s", exc)
        await asyncio.sleep(min(5.0, worker.options.heartbeat_interval))


async def keep_registered(worker: DemoWorker) -> None:
    """Register, then heartbeat forever, re-registering when the controller forgot us."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        await register(session, worker)
        while True:
            await asyncio.sleep(worker.options.heartbeat_interval)
            if not await heart_beat(session, worker):
                await register(session, worker)


# CLI ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (FastChat's model_worker flags plus the fake's own)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=21002)
    parser.add_argument("--worker-address", help="default: http://HOST:PORT")
    parser.add_argument("--controller-address", default="http://localhost:21001")
    parser.add_argument("--model-names", type=lambda s: s.split(","), default=["demo-chat"])
    parser.add_argument("--conv-template", default="vicuna_v1.1")
    parser.add_argument("--context-length", type=positive_int, default=2048)
    parser.add_argument("--limit-worker-concurrency", type=positive_int, default=5)
    parser.add_argument("--stream-interval", type=positive_int, default=2)
    parser.add_argument("--no-register", action="store_true")
    parser.add_argument("--heartbeat-interval", type=float, default=45.0)
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds per token")
    parser.add_argument("--reply-words", type=int, default=len(REPLY), help="words before EOS")
    options = parser.parse_args(argv)
    options.worker_address = options.worker_address or f"http://{options.host}:{options.port}"
    options.controller_address = options.controller_address.rstrip("/")
    from fastchat.conversation import conv_templates

    if options.conv_template not in conv_templates:
        parser.error(f"unknown conversation template {options.conv_template!r}")
    return options


def positive_int(text: str) -> int:
    """Parse an integer >= 1 for argparse."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


async def serve(options: argparse.Namespace) -> None:
    """Listen, then register and heartbeat, until SIGINT or SIGTERM."""
    worker = DemoWorker(options)
    runner = web.AppRunner(worker.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    await web.TCPSite(runner, options.host, options.port, backlog=1024).start()
    logger.info("serving %s on %s", ",".join(options.model_names), options.worker_address)
    heartbeat = None if options.no_register else asyncio.create_task(keep_registered(worker))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if heartbeat is not None:
        heartbeat.cancel()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = parse_args(argv)
    try:  # the event loop uvicorn picks too; the benchmark's worker must not be the queue
        import uvloop
    except ImportError:
        asyncio.run(serve(options))
    else:
        uvloop.run(serve(options))


if __name__ == "__main__":
    main()
