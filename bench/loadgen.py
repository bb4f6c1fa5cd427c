"""Closed-loop HTTP load generator: one scenario, one target, one concurrency; JSON on stdout.

Run by bench/run.py in its own process so that its CPU is not the orchestrator's. A fixed number
of workers each loop requests until the deadline. Only requests that complete inside the
measurement window (after the warm-up) count; the CPU time of the watched processes is read
from /proc at the window's edges, so "CPU per request" covers exactly the counted traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROMPT = "Say hello to the benchmark in a few friendly words."
EMBED_INPUTS = [f"Sentence number {i} for the embedding benchmark." for i in range(8)]
ERROR_SAMPLES = 5


@dataclass(frozen=True)
class Scenario:
    """One kind of request: where it goes, what it sends, whether it streams; ``api`` names the
    answer's shape ("chat", "embeddings" or "responses"), which decides how it is checked."""

    path: str
    body: dict[str, Any]
    stream: bool = False
    api: str = "chat"


SCENARIOS = {
    "chat": Scenario(
        "/v1/chat/completions",
        {"model": "demo-chat", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16},
    ),
    "chat_stream": Scenario(
        "/v1/chat/completions",
        {
            "model": "demo-chat",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 64,
            "stream": True,
        },
        stream=True,
    ),
    "embeddings": Scenario("/v1/embeddings", {"model": "demo-embed", "input": EMBED_INPUTS}, api="embeddings"),
    # The Responses API (docs/responses.md): the chat requests above, bridged onto chat completions.
    "responses": Scenario(
        "/v1/responses",
        {"model": "demo-chat", "input": PROMPT, "max_output_tokens": 16, "store": False},
        api="responses",
    ),
    "responses_stream": Scenario(
        "/v1/responses",
        {"model": "demo-chat", "input": PROMPT, "max_output_tokens": 64, "store": False, "stream": True},
        stream=True,
        api="responses",
    ),
    # As `responses`, saved in the store (a database write per request, on the store's thread).
    "responses_stored": Scenario(
        "/v1/responses",
        {"model": "demo-chat", "input": PROMPT, "max_output_tokens": 16, "store": True},
        api="responses",
    ),
}


class RequestFailed(Exception):
    """A response that is not a complete, successful answer."""


@dataclass
class Tally:
    """What the workers saw; latencies only for requests completed inside the window."""

    window: tuple[float, float] | None = None  # (start, end) on the perf_counter clock
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    failures: int = 0
    warmup_failures: int = 0
    chunks: int = 0
    warm_completions: int = 0
    samples: list[str] = field(default_factory=list)

    def in_window(self, finished: float) -> bool:
        return self.window is not None and self.window[0] <= finished <= self.window[1]

    def fail(self, error: str) -> None:
        if self.window is None:
            self.warmup_failures += 1
        else:  # in the window or while draining: either way a failure
            self.failures += 1
        if len(self.samples) < ERROR_SAMPLES:
            self.samples.append(error)


async def plain_request(
    session: aiohttp.ClientSession, url: str, body: bytes, check: Callable[[bytes], None] | None = None
) -> tuple[None, int]:
    """POST and check a complete JSON answer (``check``: chat's or embeddings' by default);
    return (no TTFT, 1 chunk)."""
    async with session.post(url, data=body) as response:
        payload = await response.read()
        if response.status != 200:
            raise RequestFailed(f"HTTP {response.status}: {payload[:300]!r}")
    (check or check_answer)(payload)
    return None, 1


def check_answer(payload: bytes) -> None:
    """A chat completion or embeddings answer: `choices` or `data`, no `error`."""
    answer = json.loads(payload)
    if "error" in answer or not (answer.get("choices") or answer.get("data")):
        raise RequestFailed(f"HTTP 200 without an answer: {payload[:300]!r}")


def check_response_answer(payload: bytes) -> None:
    """A non-streamed Response object (docs/responses.md)."""
    try:
        answer = json.loads(payload)
    except ValueError:
        raise RequestFailed(f"HTTP 200 without JSON: {payload[:300]!r}") from None
    check_response(answer, payload)


def check_response(answer: Any, raw: bytes) -> None:
    """A finished Response: `"object": "response"`, no `error`, status `completed`, or
    `incomplete` because max_output_tokens was reached (the gateway's answer when the upstream's
    finish reason is `length`: the non-streamed scenarios ask for 16 of the fakes' 64 words, and
    FastChat's worker reports `length` at exactly 64 too), and some output text."""
    if not isinstance(answer, dict) or answer.get("object") != "response":
        raise RequestFailed(f"not a Response object: {raw[:300]!r}")
    status, details = answer.get("status"), answer.get("incomplete_details")
    limited = status == "incomplete" and isinstance(details, dict) and details.get("reason") == "max_output_tokens"
    if answer.get("error") is not None or not (status == "completed" or limited):
        raise RequestFailed(f"Response with status {status!r}: {raw[:300]!r}")
    if not output_text(answer):
        raise RequestFailed(f"Response without output text: {raw[:300]!r}")


def output_text(answer: dict[str, Any]) -> str:
    """The text of a Response's message items (what the SDK's `output_text` joins)."""
    return "".join(
        part.get("text") or ""
        for item in answer.get("output") or ()
        if isinstance(item, dict) and item.get("type") == "message"
        for part in item.get("content") or ()
        if isinstance(part, dict) and part.get("type") == "output_text"
    )


async def stream_request(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, int]:
    """POST, read the SSE stream to [DONE]; return (seconds to first content, data events)."""
    started = time.perf_counter()
    first_content, events = None, 0
    async with session.post(url, data=body) as response:
        if response.status != 200:
            raise RequestFailed(f"HTTP {response.status}: {(await response.read())[:300]!r}")
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                if first_content is None:
                    raise RequestFailed("stream ended without content")
                return first_content - started, events
            events += 1
            if b'"error"' in data:
                raise RequestFailed(f"error event in stream: {data[:300]!r}")
            if first_content is None and has_content(data):
                first_content = time.perf_counter()
    raise RequestFailed(f"stream closed before [DONE] after {events} events")


# A streamed text answer's events, each with the events that may follow it (docs/responses.md,
# "Streaming"). Anything else (`error`, `response.failed`, a function call, a refusal) fails.
RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete"})
RESPONSE_EVENTS: dict[str | None, frozenset[str]] = {
    None: frozenset({"response.created"}),
    "response.created": frozenset({"response.in_progress"}),
    "response.in_progress": frozenset({"response.output_item.added"}),
    "response.output_item.added": frozenset({"response.content_part.added"}),
    "response.content_part.added": frozenset({"response.output_text.delta", "response.output_text.done"}),
    "response.output_text.delta": frozenset({"response.output_text.delta", "response.output_text.done"}),
    "response.output_text.done": frozenset({"response.content_part.done"}),
    "response.content_part.done": frozenset({"response.output_item.done"}),
    "response.output_item.done": frozenset({"response.output_item.added"}) | RESPONSE_ENDS,
}


class ResponseStream:
    """Checks a Responses event stream line by line: `event:`/`data:` frames whose data's `type`
    is the event's, strictly increasing `sequence_number`s, the events in order, ending with
    `response.completed` or `response.incomplete` (its response checked as a non-streamed one)
    and nothing after it. ``first_delta`` is set at the first `response.output_text.delta`."""

    def __init__(self) -> None:
        self.kind: str | None = None  # the last event's type
        self.pending: str | None = None  # an `event:` line's type, until its data
        self.sequence = -1
        self.events = 0
        self.first_delta: float | None = None

    def feed(self, line: bytes) -> None:
        if line.startswith(b"event: "):
            if self.pending is not None:
                raise RequestFailed(f"event {self.pending!r} without data")
            self.pending = line[7:].strip().decode()
        elif line.startswith(b"data: "):
            self.data(line[6:].strip())
        elif line.strip():
            raise RequestFailed(f"unexpected line in stream: {line[:300]!r}")

    def data(self, raw: bytes) -> None:
        kind, self.pending = self.pending, None
        if kind in ("error", "response.failed"):
            raise RequestFailed(f"{kind} event in stream: {raw[:300]!r}")
        if kind is None or kind not in RESPONSE_EVENTS.get(self.kind, ()):
            raise RequestFailed(f"event {kind!r} after {self.kind!r}: {raw[:300]!r}")
        payload = json.loads(raw)
        sequence = payload.get("sequence_number")
        if payload.get("type") != kind or not isinstance(sequence, int) or sequence <= self.sequence:
            raise RequestFailed(f"event {kind!r} with a wrong type or sequence_number: {raw[:300]!r}")
        if kind == "response.output_text.delta" and self.first_delta is None:
            self.first_delta = time.perf_counter()
        if kind in RESPONSE_ENDS:
            check_response(payload.get("response"), raw)
        self.kind, self.sequence = kind, sequence
        self.events += 1

    def close(self) -> None:
        """The stream ended: it must have ended with its last event."""
        if self.kind not in RESPONSE_ENDS or self.pending is not None:
            raise RequestFailed(f"stream closed after {self.events} events, the last {self.kind!r}")
        if self.first_delta is None:
            raise RequestFailed("stream without response.output_text.delta")


async def response_stream_request(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, int]:
    """POST, read and check a Responses event stream to its end; return (seconds to the first
    text delta, events)."""
    started = time.perf_counter()
    stream = ResponseStream()
    async with session.post(url, data=body) as response:
        if response.status != 200:
            raise RequestFailed(f"HTTP {response.status}: {(await response.read())[:300]!r}")
        async for line in response.content:
            stream.feed(line)
    stream.close()
    return stream.first_delta - started, stream.events  # type: ignore[operator] - close() checked it


def has_content(data: bytes) -> bool:
    """Whether an SSE chat chunk carries text (the first chunk often carries only the role)."""
    choices = json.loads(data).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes and their live children (nginx's workers,
    PostgreSQL's backends), all threads, from /proc. Children that exited meanwhile are lost:
    the servers measured here keep theirs for the whole run."""
    total = 0
    for pid in with_descendants(pids):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:  # exited since the listing
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS


def with_descendants(pids: list[int]) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(b")", 1)[1].split()[1])
            except OSError:
                continue
    found, frontier = set(pids), list(pids)
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    return found


def machine_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine (all cores) spent in processes, and in interrupts.

    Interrupt time is mostly the kernel moving our own loopback traffic; process time that the
    watched processes do not account for belongs to somebody else.
    """
    with open("/proc/stat", "rb") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    return (user + nice + system + steal) / CLOCK_TICKS, (irq + softirq) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    return sum(machine_seconds())


def snapshot(watch: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of the watched processes, this process and the whole machine."""
    cpu = {name: cpu_seconds(pids) for name, pids in watch.items()}
    cpu["loadgen"] = time.process_time()
    cpu["machine"], cpu["interrupts"] = machine_seconds()
    return cpu


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of unsorted values, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def request_function(scenario: Scenario) -> Callable[[aiohttp.ClientSession, str, bytes], Awaitable[Any]]:
    """The coroutine that sends one request of ``scenario`` and checks its answer."""
    if scenario.api == "responses":
        if scenario.stream:
            return response_stream_request
        return lambda session, url, body: plain_request(session, url, body, check_response_answer)
    return stream_request if scenario.stream else plain_request


async def run_worker(
    request: Callable[[], Awaitable[tuple[float | None, int]]], tally: Tally, stop: asyncio.Event
) -> None:
    """Send one request after another until ``stop`` is set; tally each outcome."""
    while not stop.is_set():
        started = time.perf_counter()
        try:
            ttft, chunks = await request()
        except Exception as exc:  # noqa: BLE001 - every failure is counted and sampled
            tally.fail(f"{type(exc).__name__}: {exc}"[:400])
            await asyncio.sleep(0.01)  # a failing target must not turn into a busy loop
            continue
        finished = time.perf_counter()
        if tally.window is None:
            tally.warm_completions += 1
        elif tally.in_window(finished):
            tally.latencies.append(finished - started)
            tally.chunks += chunks
            if ttft is not None:
                tally.ttfts.append(ttft)


async def warm_up(tally: Tally, options: argparse.Namespace) -> None:
    """Wait the warm-up time, and longer until as many requests completed as there are workers.

    Closed-loop workers start in lockstep; with slow requests (a stream at concurrency 64 can
    take seconds) a fixed warm-up would put that first synchronised wave inside the window.
    """
    give_up = time.perf_counter() + options.warmup + options.request_timeout
    await asyncio.sleep(options.warmup)
    while tally.warm_completions < options.concurrency and time.perf_counter() < give_up:
        if not tally.warm_completions and tally.warmup_failures >= options.concurrency:
            return  # the target only fails: measure (and report) that without waiting longer
        await asyncio.sleep(0.02)


async def measure(options: argparse.Namespace) -> dict[str, Any]:
    """Warm up, measure for the duration, drain; return the numbers."""
    scenario = SCENARIOS[options.scenario]
    url = options.base_url.rstrip("/") + scenario.path
    body = json.dumps(scenario.body).encode()
    headers = {"Content-Type": "application/json"}
    if options.api_key:
        headers["Authorization"] = f"Bearer {options.api_key}"
    watch = {name: [int(pid) for pid in pids.split("+")] for name, pids in options.watch}
    tally, stop = Tally(), asyncio.Event()
    connector = aiohttp.TCPConnector(limit=options.concurrency, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=options.request_timeout)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:
        send = request_function(scenario)

        def request() -> Awaitable[tuple[float | None, int]]:
            return send(session, url, body)

        workers = [asyncio.create_task(run_worker(request, tally, stop)) for _ in range(options.concurrency)]
        await warm_up(tally, options)
        cpu_before = snapshot(watch)
        start = time.perf_counter()
        tally.window = (start, start + options.duration)
        await asyncio.sleep(options.duration)
        cpu_after = snapshot(watch)
        elapsed = time.perf_counter() - start
        stop.set()
        _, pending = await asyncio.wait(workers, timeout=options.request_timeout)
        for task in pending:
            task.cancel()
    return report(tally, elapsed, cpu_before, cpu_after)


def report(tally: Tally, elapsed: float, cpu_before: dict[str, float], cpu_after: dict[str, float]) -> dict[str, Any]:
    """Summarise a tally: rates, latency percentiles in ms, CPU ms per successful request."""
    done = len(tally.latencies)
    ms = lambda seconds: None if seconds is None else round(seconds * 1000, 2)  # noqa: E731
    return {
        "requests": done,
        "failures": tally.failures,
        "warmup_failures": tally.warmup_failures,
        "error_samples": tally.samples,
        "seconds": round(elapsed, 3),
        "warmup_requests": tally.warm_completions,
        "rps": round(done / elapsed, 1),
        "p50_ms": ms(percentile(tally.latencies, 0.50)),
        "p90_ms": ms(percentile(tally.latencies, 0.90)),
        "p99_ms": ms(percentile(tally.latencies, 0.99)),
        "ttft_p50_ms": ms(percentile(tally.ttfts, 0.50)),
        "events_per_request": round(tally.chunks / done, 1) if done else None,
        **cpu_report(cpu_before, cpu_after, elapsed, done),
    }


def cpu_report(before: dict[str, float], after: dict[str, float], elapsed: float, done: int) -> dict[str, Any]:
    """CPU ms per counted request and cores used, per watched name, plus everyone else's."""
    cores = {name: (after[name] - before[name]) / elapsed for name in before}
    # Process time the benchmark's own processes do not account for: somebody else's.
    ours = sum(v for k, v in cores.items() if k not in ("machine", "interrupts"))
    cores["other"] = cores["machine"] - ours
    return {
        "cpu_ms_per_request": {
            name: round((after[name] - before[name]) * 1000 / done, 3) if done else None for name in before
        },
        "cpu_cores": {name: round(value, 2) for name, value in cores.items()},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds, not measured")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument(
        "--watch", nargs=2, action="append", default=[], metavar=("NAME", "PID[+PID...]"),
        help="report the CPU time of these processes per request under NAME",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(measure(options))
    else:
        result = uvloop.run(measure(options))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
