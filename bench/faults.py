"""Fault-injection suite: real processes, one fault at a time, one table of what clients saw.

    . .venv/bin/activate && python bench/faults.py            # full durations (docs/reliability.md)
    python bench/faults.py --quick                             # short outages, fewer requests (~3 min)
    python bench/faults.py --quick --faults redis_down,sigkill # some faults only
    python bench/faults.py --json out.json                     # the rows as JSON too

The stack is the production shape: two gateway processes (``manage.py openai_api_server``,
uvicorn) behind nginx (``deploy/nginx/gateway.conf``), a throwaway PostgreSQL and Redis
(tests/services.py), FastChat's real controller and two demo workers (upstreams/fastchat/demo_worker.py)
serving one model; full runs add FastChat's real model_worker with the tests' tiny model. Each fault gets API keys of its own (one limited to parallel requests, so
that leaked slots show in Redis), sends its load through nginx, injects the fault, lets the
stack recover, then measures:

- answered: client-side outcomes by HTTP status; a 200 stream that ended with an error event
  is ``200e``, one cut without ``[DONE]`` is ``200cut``; ``left`` is a client that hung up on
  purpose, ``conn`` a connection error;
- plain 500s: any 500, and any 5xx whose body is not an OpenAI-shaped JSON error;
- usage rows against requests sent (SIGKILL: rows lost, against the bound: the requests in
  flight on either process when it was killed plus those that ended within one usage flush
  interval before it);
- parallel slots still taken in Redis (the ``gw:{key_id}:parallel`` zset) afterwards (SIGKILL:
  the slots an admission still counts, once the killed process's have had SLOT_TTL to expire);
- the demo workers' ``queue_length`` afterwards (``/worker_get_status``, before any reset);
- the slowest answer in seconds.

Targets, in every row: 0 plain 500s, 0 slots left, worker queue 0, rows = requests (SIGKILL:
lost rows within the bound). The command exits 1 when a row misses one. Logs of every process
go to a temporary directory that is printed (kept with --keep).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keys.limits import SLOT_TTL  # noqa: E402 - a slot no process renewed for this long is free
from tests.procs import (  # noqa: E402 - needs the repository root on sys.path
    HOST,
    REPO_ROOT,
    free_port,
    start_controller,
    start_demo_worker,
    start_process,
    stop_process,
    wait_for_models,
    wait_for_port,
)
from tests.services import Postgres, Redis, ServiceUnavailable, postgres, redis_server  # noqa: E402

MODEL = "fault-chat"
REPLY_WORDS = 30
WORKER_TIMEOUT = 3.0  # FASTCHAT_WORKER_API_TIMEOUT of the gateways: a stall ends after it
DRAIN_SECONDS = 2.0  # GATEWAY_DRAIN_SECONDS: streams longer than this are ended on SIGTERM
FLUSH_SECONDS = 0.5  # USAGE_FLUSH_SECONDS
PARALLEL_LIMIT = 64
METRICS_TOKEN = "faults-metrics-token"
CLIENT_TIMEOUT = 120.0


@dataclass(frozen=True)
class Scale:
    """How long outages last and how much load each fault sends."""

    pg_down: float
    redis_down: float
    controller_down: float
    disconnect_requests: int
    concurrency: int
    kill_streams: int
    stall_requests: int
    real_worker_requests: int


FULL = Scale(pg_down=60, redis_down=30, controller_down=10, disconnect_requests=1000, concurrency=16,
             kill_streams=40, stall_requests=40, real_worker_requests=60)
QUICK = Scale(pg_down=8, redis_down=5, controller_down=4, disconnect_requests=300, concurrency=8,
              kill_streams=20, stall_requests=16, real_worker_requests=20)


# Outcomes -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one client saw."""

    label: str  # "200", "503", "200e", "200cut", "left", "conn", ...
    started: float
    ended: float
    plain_500: bool = False
    request_id: str = ""


def openai_shaped(body: bytes) -> bool:
    """True for the gateway's error body: {"error": {"message", "type", ...}, "object": "error", ...}."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "type" in error


def stream_label(lines: list[str]) -> str:
    """200 for a stream that ended with [DONE] and no error, 200e with an error event, 200cut without [DONE]."""
    if not lines or lines[-1] != "data: [DONE]":
        return "200cut"
    if any(line.startswith('data: {"error"') for line in lines):
        return "200e"
    return "200"


async def send(client: httpx.AsyncClient, url: str, key: str, stream: bool, *, path: str = "/v1/chat/completions",
               max_tokens: int = 16, leave_after: float | None = None, model: str = MODEL) -> Outcome:
    """One chat request; ``leave_after`` seconds later the client hangs up (if not answered)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me something"}],
            "max_tokens": max_tokens, "stream": stream}
    started = time.monotonic()
    outcome = Outcome("conn", started, started)

    async def run() -> None:
        async with client.stream("POST", url + path, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
            outcome.request_id = response.headers.get("x-request-id", "")
            if response.status_code == 200 and stream:
                lines = [line async for line in response.aiter_lines() if line]
                outcome.label = stream_label(lines)
                return
            raw = await response.aread()
            outcome.label = str(response.status_code)
            status = response.status_code
            outcome.plain_500 = status == 500 or (status >= 500 and not openai_shaped(raw))

    try:
        if leave_after is None:
            await run()
        else:
            await asyncio.wait_for(run(), leave_after)
    except TimeoutError:
        outcome.label = "left"
    except httpx.HTTPError:
        outcome.label = "conn"
    outcome.ended = time.monotonic()
    return outcome


async def send_and_leave(url: str, key: str, stream: bool, leave_after: float) -> Outcome:
    """One chat request written whole on a raw connection; ``leave_after`` seconds after the
    last byte, the client closes the connection if the answer has not ended. (With httpx, a
    client starved of CPU could give up before its request was even written.)"""
    parsed = httpx.URL(url)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me something"}],
                       "max_tokens": REPLY_WORDS, "stream": stream}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parsed.host}:{parsed.port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    started = time.monotonic()
    outcome = Outcome("conn", started, started)
    try:
        reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
    except OSError:
        outcome.ended = time.monotonic()
        return outcome
    try:
        writer.write(head + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), leave_after)
        status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0
        content = raw.partition(b"\r\n\r\n")[2]
        if status == 200 and stream:
            outcome.label = "200" if b"data: [DONE]" in content and b'data: {"error"' not in content else "200e"
        else:
            outcome.label = str(status)
            outcome.plain_500 = status == 500 or (status >= 500 and b'"error"' not in content)
    except TimeoutError:
        outcome.label = "left"
    except OSError:
        outcome.label = "conn"
    finally:
        writer.close()
    outcome.ended = time.monotonic()
    return outcome


async def steady_load(client: httpx.AsyncClient, url: str, keys: list[str], duration: float, concurrency: int,
                      pause: float = 0.05, stream_share: float = 0.5, max_tokens: int = 16,
                      stop: asyncio.Event | None = None) -> list[Outcome]:
    """``concurrency`` loops sending requests one after another (half streamed) for ``duration`` s."""
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + duration
    rng = random.Random(7)

    async def loop(index: int) -> None:
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            key = keys[index % len(keys)]
            outcomes.append(await send(client, url, key, rng.random() < stream_share, max_tokens=max_tokens))
            await asyncio.sleep(pause)

    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    return outcomes


def http_client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    return httpx.AsyncClient(timeout=CLIENT_TIMEOUT, limits=limits)


# The stack ------------------------------------------------------------------------------------


@dataclass
class Stack:
    """Every process of the deployment, with the levers the faults pull."""

    workdir: Path
    pg: Postgres
    redis: Redis
    controller_port: int = field(default_factory=free_port)
    nginx_port: int = field(default_factory=free_port)
    worker_ports: list[int] = field(default_factory=lambda: [free_port(), free_port()])
    gateway_ports: list[int] = field(default_factory=lambda: [free_port(), free_port()])
    controller: subprocess.Popen | None = None
    workers: dict[int, subprocess.Popen] = field(default_factory=dict)
    gateways: dict[int, subprocess.Popen] = field(default_factory=dict)
    nginx: subprocess.Popen | None = None
    redis_stopped: bool = False

    @property
    def controller_url(self) -> str:
        return f"http://{HOST}:{self.controller_port}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.nginx_port}"

    def gateway_url(self, index: int) -> str:
        return f"http://{HOST}:{self.gateway_ports[index]}"

    def worker_url(self, port: int) -> str:
        return f"http://{HOST}:{port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "gateway_project.settings",
            "DJANGO_SECRET_KEY": "fault-suite-secret-key-not-for-production-use-0123456789",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DATABASE_URL": self.pg.url,
            "REDIS_URL": self.redis.url,
            "CONTROLLER_ADDRESS": self.controller_url,
            "FASTCHAT_WORKER_API_TIMEOUT": str(WORKER_TIMEOUT),
            "GATEWAY_DRAIN_SECONDS": str(DRAIN_SECONDS),
            "USAGE_FLUSH_SECONDS": str(FLUSH_SECONDS),
            "GATEWAY_METRICS_TOKEN": METRICS_TOKEN,
            "GATEWAY_ACCESS_LOG": "True",
        }

    # start and stop

    def start(self) -> None:
        self.manage("migrate", "--noinput")
        self.start_controller()
        for port in self.worker_ports:
            self.start_worker(port)
        wait_for_models(self.controller_url, [MODEL], timeout=30)
        for index in range(len(self.gateway_ports)):
            self.start_gateway(index)
        self.start_nginx()

    def stop(self) -> None:
        if self.redis_stopped:
            self.continue_redis()
        for proc in [self.nginx, *self.gateways.values(), *self.workers.values(), self.controller]:
            if proc is not None:
                stop_process(proc, timeout=DRAIN_SECONDS + 10)

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def manage(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=self.env,
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"manage.py {' '.join(args)} failed: {result.stderr[-2000:]}")
        return result.stdout

    def start_controller(self) -> None:
        self.controller = start_controller(self.controller_port, log_path=self.log("controller"))

    def stop_controller(self) -> None:
        stop_process(self.controller)

    def start_worker(self, port: int) -> None:
        self.workers[port] = start_demo_worker(
            port, self.controller_url, [MODEL], log_path=self.log(f"worker-{port}"),
            extra_args=["--heartbeat-interval", "2", "--reply-words", str(REPLY_WORDS),
                        "--limit-worker-concurrency", "16"])

    def kill_worker(self, port: int) -> None:
        self.workers[port].kill()
        self.workers[port].wait()

    def start_gateway(self, index: int) -> None:
        port = self.gateway_ports[index]
        self.gateways[index] = start_process(
            [sys.executable, "manage.py", "openai_api_server", "--host", HOST, "--port", str(port),
             "--controller-address", self.controller_url, "--no-migrate"],
            env=self.env, log_path=self.log(f"gateway-{index}"))
        wait_for_port(port, timeout=30, proc=self.gateways[index], what=f"gateway {index}")
        httpx.get(self.gateway_url(index) + "/health", timeout=10).raise_for_status()

    def start_nginx(self) -> None:
        conf = render_nginx(self.workdir / "nginx", self.nginx_port, self.gateway_ports)
        self.nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(conf.parent)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_port(self.nginx_port, timeout=10, proc=self.nginx, what="nginx")

    def stop_postgres(self) -> None:
        # "fast", not "immediate": the test cluster runs with synchronous_commit=off, so a crash
        # would lose the last commits it had acknowledged, which says nothing about the gateway.
        self.pg.run("pg_ctl", "-D", str(self.pg.data_dir), "-m", "fast", "-w", "stop", check=False)

    def start_postgres(self) -> None:
        options = (f"-F -p {self.pg.port} -k {self.pg.directory} -c listen_addresses={HOST} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300 -c shared_buffers=64MB")
        self.pg.run("pg_ctl", "-D", str(self.pg.data_dir), "-l", str(self.pg.log_path), "-w", "-t", "60",
                    "-o", options, "start")

    def stop_redis(self) -> None:
        """SIGSTOP: Redis stops answering but keeps its connections and data (so leaked slots
        still show afterwards); clients see hangs, the harder case than refused connections."""
        self.redis.proc.send_signal(signal.SIGSTOP)
        self.redis_stopped = True

    def continue_redis(self) -> None:
        self.redis.proc.send_signal(signal.SIGCONT)
        self.redis_stopped = False

    # measurements

    def create_keys(self, names: list[str]) -> dict[str, tuple[str, int]]:
        """name -> (plaintext, id); names ending in '+limited' get the parallel limit."""
        script = (
            "import json; from keys.models import APIKey\n"
            "out = {}\n"
            f"for name in {names!r}:\n"
            f"    key, plain = APIKey.objects.create_key(name, parallel_requests={PARALLEL_LIMIT} "
            "if name.endswith('+limited') else None)\n"
            "    out[name] = [plain, key.pk]\n"
            "print(json.dumps(out))\n"
        )
        output = self.manage("shell", "-c", script)
        return {name: (plain, pk) for name, (plain, pk) in json.loads(output.strip().splitlines()[-1]).items()}

    def usage_rows(self, key_ids: list[int]) -> int:
        ids = ",".join(map(str, key_ids))
        return int(self.pg.psql(f"SELECT count(*) FROM keys_usagerecord WHERE key_id IN ({ids})", self.pg.database))

    def slots_taken(self, key_ids: list[int], live_only: bool = False) -> int:
        """Members of the keys' parallel zsets; `live_only`: only those renewed within SLOT_TTL,
        the ones the acquire script still counts (a killed process's stop being renewed)."""
        client = self.redis.client()
        since = f"({int((time.time() - SLOT_TTL) * 1000)}" if live_only else "-inf"
        try:
            return sum(client.zcount(f"gw:{{{key_id}}}:parallel", since, "+inf") for key_id in key_ids)
        finally:
            client.close()

    def worker_queue(self) -> int:
        total = 0
        for port, proc in self.workers.items():
            if proc.poll() is None:
                total += httpx.post(self.worker_url(port) + "/worker_get_status", timeout=5).json()["queue_length"]
        return total

    def configure_workers(self, **settings: Any) -> None:
        for port in self.workers:
            httpx.post(self.worker_url(port) + "/_fake/config", json=settings, timeout=5).raise_for_status()

    def reset_workers(self) -> None:
        for port, proc in self.workers.items():
            if proc.poll() is None:
                httpx.post(self.worker_url(port) + "/_fake/reset", timeout=5).raise_for_status()

    def metric(self, index: int, name: str) -> float | None:
        """The sum of a metric's samples on one gateway process (None if it cannot be read)."""
        try:
            text = httpx.get(self.gateway_url(index) + "/metrics", timeout=2,
                             headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        except httpx.HTTPError:
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name + "{") or line.startswith(name + " ")]
        return sum(values) if values else None

    def wait_routed(self, index: int, key: str, timeout: float = 30.0) -> None:
        """Wait until nginx sends requests to a restarted process again (it sets an upstream
        aside for a while after a refused connection)."""
        deadline = time.monotonic() + timeout
        before = self.metric(index, "gateway_requests_total") or 0
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        while time.monotonic() < deadline:
            for _ in range(4):
                httpx.post(self.url + "/v1/chat/completions", json=body, timeout=10,
                           headers={"Authorization": f"Bearer {key}"})
            if (self.metric(index, "gateway_requests_total") or 0) > before:
                return
            time.sleep(0.5)
        raise TimeoutError(f"nginx sent nothing to gateway {index} for {timeout} s")

    def pending_usage(self, index: int) -> float | None:
        """The gateway's gauge of usage rows waiting to be written, if it has one."""
        try:
            text = httpx.get(self.gateway_url(index) + "/metrics", timeout=2,
                             headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if not line.startswith("#") and "usage" in line and "pending" in line:
                return float(line.rsplit(" ", 1)[1])
        return None


def render_nginx(directory: Path, listen: int, upstream_ports: list[int]) -> Path:
    """deploy/nginx/gateway.conf with its placeholders filled, in a minimal nginx.conf."""
    from tests.test_nginx import render_site

    site = render_site(directory, listen, upstream_ports)
    conf = directory / "nginx.conf"
    conf.write_text(f"""daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    include {site};
}}
""")
    return conf


@contextlib.contextmanager
def running_stack(workdir: Path) -> Iterator[Stack]:
    with postgres() as pg, redis_server() as redis:
        stack = Stack(workdir=workdir, pg=pg, redis=redis)
        try:
            stack.start()
            yield stack
        finally:
            stack.stop()


# Rows -----------------------------------------------------------------------------------------


@dataclass
class Row:
    fault: str
    sent: int
    answered: dict[str, int]
    plain_500: int
    rows: int
    expected_rows: int
    slots_left: int
    worker_queue: int
    slowest: float
    rows_bound: int | None = None  # SIGKILL: rows that may be lost
    note: str = ""

    @property
    def rows_ok(self) -> bool:
        if self.rows_bound is None:
            return self.rows == self.expected_rows
        return self.expected_rows - self.bound_slack() <= self.rows <= self.expected_rows

    def bound_slack(self) -> int:
        return self.rows_bound or 0

    @property
    def on_target(self) -> bool:
        return self.plain_500 == 0 and self.slots_left == 0 and self.worker_queue == 0 and self.rows_ok

    def misses(self) -> list[str]:
        missed = []
        if self.plain_500:
            missed.append(f"{self.plain_500} plain 500s")
        if not self.rows_ok:
            missed.append(f"usage rows {self.rows} of {self.expected_rows}"
                          + (f" (bound: {self.rows_bound} lost)" if self.rows_bound is not None else ""))
        if self.slots_left:
            missed.append(f"{self.slots_left} slots left taken")
        if self.worker_queue:
            missed.append(f"worker queue {self.worker_queue}")
        return missed


def answered_cell(answered: dict[str, int]) -> str:
    return " ".join(f"{label}:{count}" for label, count in sorted(answered.items(), key=lambda kv: -kv[1]))


def table(rows: list[Row]) -> str:
    head = ("| fault | sent | answered | plain 500s | usage rows / requests | slots left | worker queue | slowest (s) | target |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        usage = f"{row.rows} / {row.expected_rows}"
        if row.rows_bound is not None:
            usage += f" (lost {row.expected_rows - row.rows}, bound {row.rows_bound})"
        verdict = "yes" if row.on_target else "**no**: " + ", ".join(row.misses())
        lines.append(f"| {row.fault} | {row.sent} | {answered_cell(row.answered)} | {row.plain_500} | {usage} "
                     f"| {row.slots_left} | {row.worker_queue} | {row.slowest:.1f} | {verdict} |")
    return head + "\n".join(lines) + "\n"


async def settle(probe: Callable[[], int], want: Callable[[int], bool], timeout: float) -> int:
    """Poll ``probe`` (blocking, run in a thread) until ``want`` holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(probe)
        if want(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.25)


async def measure(stack: Stack, fault: str, outcomes: list[Outcome], key_ids: list[int],
                  expected_rows: int | None = None, rows_bound: int | None = None, note: str = "",
                  settle_seconds: float = 20.0, queue_probe: Callable[[], int] | None = None,
                  slots_seconds: float = 15.0, live_slots_only: bool = False) -> Row:
    """The row of a fault, after waiting for queues, slots and usage rows to settle."""
    expected = len(outcomes) if expected_rows is None else expected_rows
    queue = await settle(queue_probe or stack.worker_queue, lambda q: q == 0, 10)
    # Releases that failed are retried with a backoff of up to 5 s (keys/limit_store_redis.py).
    slots = await settle(lambda: stack.slots_taken(key_ids, live_slots_only), lambda s: s == 0, slots_seconds)
    rows = await settle(lambda: stack.usage_rows(key_ids), lambda r: r >= expected, settle_seconds)
    return Row(
        fault=fault, sent=len(outcomes), answered=dict(Counter(o.label for o in outcomes)),
        plain_500=sum(o.plain_500 for o in outcomes), rows=rows, expected_rows=expected,
        slots_left=slots, worker_queue=queue, slowest=max((o.ended - o.started for o in outcomes), default=0.0),
        rows_bound=rows_bound, note=note,
    )


# Faults ---------------------------------------------------------------------------------------

Fault = Callable[[Stack, Scale, dict[str, tuple[str, int]]], Awaitable[Row]]
FAULTS: dict[str, tuple[str, Fault]] = {}


def fault(name: str, title: str) -> Callable[[Fault], Fault]:
    def register(function: Fault) -> Fault:
        FAULTS[name] = (title, function)
        return function

    return register


def keys_of(keys: dict[str, tuple[str, int]], name: str) -> tuple[list[str], list[int]]:
    """The plaintexts and ids of a fault's two keys: one with a parallel limit, one without."""
    pairs = [keys[f"{name}+limited"], keys[f"{name}+free"]]
    return [plain for plain, _ in pairs], [pk for _, pk in pairs]


@fault("worker_killed", "worker killed mid-stream (SIGKILL, then restarted)")
async def worker_killed(stack: Stack, scale: Scale, keys: dict) -> Row:
    plains, ids = keys_of(keys, "worker_killed")
    victim = stack.worker_ports[0]
    stack.configure_workers(token_delay=0.05)
    async with http_client() as client:
        streams = [asyncio.create_task(send(client, stack.url, plains[i % 2], True, max_tokens=REPLY_WORDS))
                   for i in range(scale.kill_streams)]
        await asyncio.sleep(0.6)
        stack.kill_worker(victim)
        after = await steady_load(client, stack.url, plains, duration=3, concurrency=scale.concurrency,
                                  max_tokens=8)
        outcomes = list(await asyncio.gather(*streams)) + after
    stack.start_worker(victim)
    await asyncio.to_thread(wait_for_models, stack.controller_url, [MODEL], 20)
    row = await measure(stack, FAULTS["worker_killed"][0], outcomes, ids)
    stack.reset_workers()
    return row


@fault("worker_stalls", f"worker stalls (sends nothing; worker timeout {WORKER_TIMEOUT:g} s)")
async def worker_stalls(stack: Stack, scale: Scale, keys: dict) -> Row:
    plains, ids = keys_of(keys, "worker_stalls")
    stack.configure_workers(stall_seconds=3600)
    async with http_client() as client:
        outcomes = list(await asyncio.gather(*(
            send(client, stack.url, plains[i % 2], stream=i % 4 < 2) for i in range(scale.stall_requests))))
    row = await measure(stack, FAULTS["worker_stalls"][0], outcomes, ids)
    stack.reset_workers()
    return row


@fault("controller_down", "controller down")
async def controller_down(stack: Stack, scale: Scale, keys: dict) -> Row:
    plains, ids = keys_of(keys, "controller_down")
    async with http_client() as client:
        stack.stop_controller()
        during = await steady_load(client, stack.url, plains, duration=scale.controller_down,
                                   concurrency=scale.concurrency, pause=0.1)
        stack.start_controller()
        await asyncio.to_thread(wait_for_models, stack.controller_url, [MODEL], 30)
        after = await steady_load(client, stack.url, plains, duration=2, concurrency=scale.concurrency)
    outcomes = during + after
    recovered = sum(o.label == "200" for o in after)
    return await measure(stack, FAULTS["controller_down"][0], outcomes, ids,
                         note=f"{recovered}/{len(after)} answered 200 after the controller returned")


@fault("postgres_down", "PostgreSQL down")
async def postgres_down(stack: Stack, scale: Scale, keys: dict) -> Row:
    plains, ids = keys_of(keys, "postgres_down")
    title = f"PostgreSQL down {scale.pg_down:g} s"
    async with http_client() as client:
        warmup = await steady_load(client, stack.url, plains, duration=1, concurrency=2)  # the keys are cached
        stack.stop_postgres()
        try:
            during = await steady_load(client, stack.url, plains, duration=scale.pg_down,
                                       concurrency=scale.concurrency, pause=0.1)
        finally:
            stack.start_postgres()
        after = await steady_load(client, stack.url, plains, duration=2, concurrency=scale.concurrency)
    return await measure(stack, title, warmup + during + after, ids, settle_seconds=40)


@fault("redis_down", "Redis down")
async def redis_down(stack: Stack, scale: Scale, keys: dict) -> Row:
    plains, ids = keys_of(keys, "redis_down")
    title = f"Redis down {scale.redis_down:g} s (SIGSTOP)"
    async with http_client() as client:
        stack.configure_workers(token_delay=0.02)
        # Streams holding parallel slots when Redis stops, ending while it is down.
        holding = [asyncio.create_task(send(client, stack.url, plains[0], True, max_tokens=REPLY_WORDS))
                   for _ in range(8)]
        await asyncio.sleep(0.3)
        stack.stop_redis()
        stopped = time.time()
        try:
            during = await steady_load(client, stack.url, plains, duration=scale.redis_down,
                                       concurrency=scale.concurrency, pause=0.1)
        finally:
            stack.continue_redis()
        resumed = time.time()
        after = await steady_load(client, stack.url, plains, duration=2, concurrency=scale.concurrency)
        outcomes = list(await asyncio.gather(*holding)) + during + after
    free = [o for o in during if o.label.startswith("200")]
    row = await measure(stack, title, outcomes, ids,
                        note=f"{len(free)} answered 200 during the outage (the key without limits)")
    if row.slots_left:
        row.note += "; " + slot_ages(stack, ids, stopped, resumed)
    stack.reset_workers()
    return row


def slot_ages(stack: Stack, key_ids: list[int], stopped: float, resumed: float) -> str:
    """When the slots left were taken (their zset score is the acquiring process's clock, ms)."""
    client = stack.redis.client()
    try:
        scores = [score / 1000 for key_id in key_ids
                  for _, score in client.zrange(f"gw:{{{key_id}}}:parallel", 0, -1, withscores=True)]
    finally:
        client.close()
    inside = sum(stopped <= score <= resumed for score in scores)
    return (f"{inside} of the {len(scores)} slots left were taken while Redis was stopped "
            f"({', '.join(f'{score - stopped:+.1f} s' for score in sorted(scores))} from the stop)")


@fault("sigterm", "SIGTERM of one gateway process with 20 streams open")
async def sigterm(stack: Stack, scale: Scale, keys: dict) -> Row:
    plains, ids = keys_of(keys, "sigterm")
    stack.configure_workers(token_delay=0.15)
    victim = stack.gateways[0]
    async with http_client() as client:
        streams = [asyncio.create_task(send(client, stack.gateway_url(0), plains[i % 2], True, max_tokens=REPLY_WORDS))
                   for i in range(20)]
        await asyncio.sleep(1.0)
        victim.send_signal(signal.SIGTERM)
        around = await steady_load(client, stack.url, plains, duration=DRAIN_SECONDS + 2,
                                   concurrency=scale.concurrency, max_tokens=8)
        outcomes = list(await asyncio.gather(*streams)) + around
    await asyncio.to_thread(victim.wait, 60)
    stack.start_gateway(0)
    await asyncio.to_thread(stack.wait_routed, 0, keys["warmup"][0])
    row = await measure(stack, FAULTS["sigterm"][0], outcomes, ids,
                        note=f"exit status {victim.returncode}")
    stack.reset_workers()
    return row


@fault("sigkill", "SIGKILL of one gateway process")
async def sigkill(stack: Stack, scale: Scale, keys: dict) -> Row:
    plains, ids = keys_of(keys, "sigkill")
    stack.configure_workers(token_delay=0.01)
    await asyncio.to_thread(stack.wait_routed, 0, keys["warmup"][0])
    victim = stack.gateways[0]
    killed_at: list[float] = []
    pending: list[float | None] = []

    async def kill_later() -> None:
        await asyncio.sleep(2.0)
        pending.append(await asyncio.to_thread(stack.pending_usage, 0))
        victim.kill()
        killed_at.append(time.monotonic())

    async with http_client() as client:
        killer = asyncio.create_task(kill_later())
        outcomes = await steady_load(client, stack.url, plains, duration=4, concurrency=scale.concurrency, pause=0.02)
        await killer
    victim.wait()
    stack.start_gateway(0)
    await asyncio.to_thread(stack.wait_routed, 0, keys["warmup"][0])
    # In flight at the kill, or ended within a flush interval (plus the flush's own time) before it.
    window = FLUSH_SECONDS + 0.25
    bound = sum(o.started <= killed_at[0] and o.ended >= killed_at[0] - window for o in outcomes)
    # The killed process's slots stay in Redis, but no admission counts them once SLOT_TTL has
    # passed since that process last renewed them (at most SLOT_TTL after the kill).
    row = await measure(stack, FAULTS["sigkill"][0], outcomes, ids, rows_bound=bound,
                        note=f"pending usage gauge before the kill: {pending[0]}", settle_seconds=8,
                        slots_seconds=max(15.0, SLOT_TTL + 5 - (time.monotonic() - killed_at[0])),
                        live_slots_only=True)
    stack.reset_workers()
    return row


@fault("disconnects", "clients disconnecting at random points")
async def disconnects(stack: Stack, scale: Scale, keys: dict) -> Row:
    plains, ids = keys_of(keys, "disconnects")
    stack.configure_workers(token_delay=0.01)
    rng = random.Random(11)
    semaphore = asyncio.Semaphore(scale.concurrency * 2)

    async def one(i: int) -> Outcome:
        async with semaphore:
            return await send_and_leave(stack.url, plains[i % 2], rng.random() < 0.5, rng.uniform(0.02, 0.45))

    outcomes = list(await asyncio.gather(*(one(i) for i in range(scale.disconnect_requests))))
    row = await measure(stack, f"clients disconnecting at random points ({scale.disconnect_requests} requests)",
                        outcomes, ids)
    stack.reset_workers()
    return row


@fault("real_worker", "FastChat's real model_worker (tiny model): clients leaving at random points, then its SIGKILL")
async def real_worker(stack: Stack, scale: Scale, keys: dict) -> Row:
    """The real worker, unlike the demo one, keeps generating for a /worker_generate client that
    left: the gateway must not leave it busy (its queue_length must come back to 0)."""
    plains, ids = keys_of(keys, "real_worker")
    port = free_port()
    model_dir = await asyncio.to_thread(build_model)
    proc = start_process(
        [sys.executable, "-m", "fastchat.serve.model_worker", "--model-path", str(model_dir),
         "--model-names", REAL_MODEL, "--device", "cpu", "--host", HOST, "--port", str(port),
         "--worker-address", f"http://{HOST}:{port}", "--controller-address", stack.controller_url, "--seed", "42"],
        env={"LOGDIR": str(stack.workdir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"},
        log_path=stack.log("real-worker"))
    try:
        await asyncio.to_thread(wait_for_models, stack.controller_url, [REAL_MODEL], 120)
        await asyncio.to_thread(wait_for_port, port, 30)

        def queue() -> int:
            return httpx.post(f"http://{HOST}:{port}/worker_get_status", timeout=10).json()["queue_length"]

        rng = random.Random(5)
        async with http_client() as client:
            outcomes = list(await asyncio.gather(*(
                send(client, stack.url, plains[i % 2], stream=i % 2 == 0, max_tokens=200, model=REAL_MODEL,
                     leave_after=rng.uniform(0.1, 2.0) if i % 3 else None)
                for i in range(scale.real_worker_requests))))
            left_queue = await settle(queue, lambda q: q == 0, 30)
            # Then the worker dies mid-stream.
            streams = [asyncio.create_task(send(client, stack.url, plains[i % 2], True, max_tokens=400,
                                                model=REAL_MODEL)) for i in range(4)]
            await asyncio.sleep(1.0)
            proc.kill()
            outcomes += await asyncio.gather(*streams)
        return await measure(stack, FAULTS["real_worker"][0], outcomes, ids, queue_probe=lambda: left_queue,
                             note=f"real worker's queue_length after the clients left: {left_queue}")
    finally:
        stop_process(proc)


REAL_MODEL = "tiny-fault"


def build_model() -> Path:
    from tests.tiny_model import build_tiny_model  # imports torch: only when this fault runs

    return build_tiny_model()


# Main -----------------------------------------------------------------------------------------


def gateway_commit() -> str:
    if os.environ.get("GATEWAY_COMMIT"):  # a snapshot without .git (git archive) names its commit
        return os.environ["GATEWAY_COMMIT"]
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                           capture_output=True, text=True).stdout.strip()
    return result.stdout.strip() + ("+uncommitted changes" if dirty else "")


def log_problems(workdir: Path) -> dict[str, int]:
    """Tracebacks and ERROR lines in each gateway's log."""
    counts = {}
    for log in sorted(workdir.glob("gateway-*.log")):
        text = log.read_text(errors="replace")
        counts[log.stem] = text.count("Traceback (most recent call last)")
    return counts


async def run_faults(stack: Stack, scale: Scale, names: list[str]) -> list[Row]:
    keys = stack.create_keys(["warmup"] + [f"{name}+{kind}" for name in names for kind in ("limited", "free")])
    rows = []
    for name in names:
        title, function = FAULTS[name]
        print(f"faults: {title} ...", file=sys.stderr, flush=True)
        started = time.monotonic()
        row = await function(stack, scale, keys)
        print(f"faults:   {time.monotonic() - started:.0f} s; {'on target' if row.on_target else row.misses()}"
              f"{'; ' + row.note if row.note else ''}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short outages and fewer requests (the test's run)")
    parser.add_argument("--faults", help=f"comma-separated, of: {', '.join(FAULTS)} (default: all; "
                                         "--quick leaves out real_worker, which needs torch and a minute)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the process logs")
    options = parser.parse_args(argv)
    default = [name for name in FAULTS if not (options.quick and name == "real_worker")]
    options.names = [name for name in options.faults.split(",") if name] if options.faults else default
    unknown = set(options.names) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    scale = QUICK if options.quick else FULL
    if not shutil.which("nginx"):
        print("faults: nginx is not installed", file=sys.stderr)
        return 3
    workdir = Path(tempfile.mkdtemp(prefix="gw-faults-"))
    print(f"faults: logs in {workdir}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        with running_stack(workdir) as stack:
            rows = asyncio.run(run_faults(stack, scale, options.names))
    except ServiceUnavailable as exc:
        print(f"faults: {exc}", file=sys.stderr)
        return 3
    problems = log_problems(workdir)
    print(f"Fault suite ({'--quick' if options.quick else 'full durations'}), commit {gateway_commit()}, "
          f"{time.strftime('%Y-%m-%d')}, {time.monotonic() - started:.0f} s\n")
    print(table(rows))
    for row in rows:
        if row.note:
            print(f"- {row.fault}: {row.note}")
    print(f"- tracebacks in the gateways' logs: {problems}")
    if options.json:
        options.json.write_text(json.dumps({"rows": [asdict(row) | {"on_target": row.on_target} for row in rows],
                                            "tracebacks": problems, "quick": options.quick}, indent=2))
    if not options.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(row.on_target for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
