"""Usage rows survive outages and shutdowns, against real processes and a real PostgreSQL:

- PostgreSQL stopped for a while (5 s here, the same path as 60 s) while 200 usage events
  arrive: the rows wait in memory, the writer retries with growing pauses without blocking the
  event loop, and when the database is back exactly 200 rows are there;
- `openai_api_server --workers 2` receiving SIGTERM with rows queued in both worker processes
  (nothing flushed before: USAGE_FLUSH_SECONDS is an hour): every row is written.
"""
from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway_process import Gateway, gateway_env
from tests.procs import (
    REPO_ROOT,
    free_port,
    start_controller,
    start_demo_worker,
    start_process,
    stop_process,
    wait_for_models,
    wait_for_port,
)
from tests.services import HOST, Postgres, ServiceUnavailable, postgres, require_service

pytestmark = pytest.mark.e2e

DOWN_SECONDS = 5.0
EVENTS = 200

# A process that records usage events on an event loop (as the gateway does) and reports its
# writer's counters and the loop's worst lag, on commands from stdin.
RECORDER = r"""
import asyncio, json, sys, time
import django
django.setup()
from keys.models import APIKey
from keys.usage import UsageEvent, usage_writer

key, _ = APIKey.objects.create_key("outage")


async def main():
    loop = asyncio.get_running_loop()
    lag, sent = [0.0], 0

    async def watch():
        while True:
            started = loop.time()
            await asyncio.sleep(0.01)
            lag[0] = max(lag[0], loop.time() - started - 0.01)

    watcher = asyncio.create_task(watch())
    while True:
        command = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not command or command[0] == "quit":
            break
        if command[0] == "record":
            lag[0] = 0.0
            for _ in range(int(command[1])):
                usage_writer.record(UsageEvent(key_id=key.pk, model="m", endpoint="/v1/chat/completions",
                                               request_id=f"r{sent}", status=200, prompt_tokens=1))
                sent += 1
                await asyncio.sleep(0.005)
        elif command[0] == "drain":
            deadline = time.monotonic() + float(command[1])
            while usage_writer.written < sent and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        print(json.dumps({"sent": sent, "pending": len(usage_writer.pending), "written": usage_writer.written,
                          "failed_flushes": usage_writer.failed_flushes, "set_aside": usage_writer.set_aside,
                          "dropped": usage_writer.dropped, "max_lag": lag[0]}), flush=True)
    watcher.cancel()


asyncio.run(main())
"""


@pytest.fixture
def database(tmp_path) -> Iterator[Postgres]:
    try:
        with postgres() as pg:
            subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=REPO_ROOT, check=True,
                           env=gateway_env(tmp_path, "http://127.0.0.1:9", {"DATABASE_URL": pg.url}),
                           capture_output=True)
            yield pg
    except ServiceUnavailable as exc:
        require_service("PostgreSQL", False, str(exc))


def stop(pg: Postgres) -> None:
    """Stop the server, cutting its clients off. Not an immediate (crash) stop: the throwaway
    server runs with synchronous_commit=off, so a crash would lose rows it had confirmed."""
    pg.run("pg_ctl", "-D", str(pg.data_dir), "-m", "fast", "-w", "stop")


def restart(pg: Postgres) -> None:
    """Start the stopped cluster again, on the same port (tests/services.py initialised it)."""
    options = f"-F -p {pg.port} -k {pg.directory} -c listen_addresses={HOST} -c fsync=off"
    pg.run("pg_ctl", "-D", str(pg.data_dir), "-l", str(pg.log_path), "-w", "-t", "60", "-o", options, "start")


class Recorder:
    def __init__(self, env: dict[str, str], log_path: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", RECORDER], cwd=REPO_ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log_path, "w"))

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the recorder died: {self.proc.wait()}"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(30)


def test_rows_wait_while_postgres_is_down_and_are_all_written_when_it_returns(database, tmp_path):
    pg = database
    env = gateway_env(tmp_path, "http://127.0.0.1:9", {
        "DATABASE_URL": pg.url, "USAGE_FLUSH_SECONDS": "0.2", "USAGE_BATCH_SIZE": "20",
        "USAGE_WRITER_THREAD": "True"})
    recorder = Recorder(env, tmp_path / "recorder.log")
    try:
        before = recorder.ask(f"record {EVENTS // 2}")
        assert recorder.ask("drain 20")["written"] == EVENTS // 2, before
        stop(pg)
        down_at = time.monotonic()
        during = recorder.ask(f"record {EVENTS // 2}")
        time.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - down_at)))
        down = recorder.ask("status")
        restart(pg)
        after = recorder.ask("drain 30")
    finally:
        recorder.close()
    assert down["pending"] == EVENTS // 2 and down["written"] == EVENTS // 2, down
    # Retried with growing pauses (0.4, 0.8, 1.6, 3.2 s...), not at every flush interval or request.
    assert 1 <= down["failed_flushes"] <= 8, down
    assert max(during["max_lag"], down["max_lag"]) < 0.25, (during, down)  # the event loop never waited
    assert (after["written"], after["pending"], after["set_aside"], after["dropped"]) == (EVENTS, 0, 0, 0), after
    assert pg.psql("SELECT count(*), count(DISTINCT request_id) FROM keys_usagerecord", database=pg.database) \
        == f"{EVENTS}|{EVENTS}"
    assert pg.psql("SELECT sum(requests) FROM keys_usagedaily", database=pg.database) == str(EVENTS)
    log = (tmp_path / "recorder.log").read_text()
    assert "Usage database unreachable" in log and "reachable again" in log


@pytest.fixture
def fastchat(tmp_path) -> Iterator[str]:
    controller_port, worker_port = free_port(), free_port()
    controller_url = f"http://127.0.0.1:{controller_port}"
    processes = [start_controller(controller_port, log_path=tmp_path / "controller.log")]
    try:
        processes.append(start_demo_worker(worker_port, controller_url, ["demo-chat"], log_path=tmp_path / "worker.log",
                                           extra_args=["--limit-worker-concurrency", "64"]))
        wait_for_models(controller_url, ["demo-chat"], timeout=20)
        yield controller_url
    finally:
        for process in reversed(processes):
            stop_process(process)


async def send_requests(url: str, key: str, count: int, concurrency: int = 16) -> list[int]:
    """`count` chat requests, each on a new connection, so both worker processes accept some."""
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> int:
        async with semaphore, httpx.AsyncClient(timeout=30) as client:
            response = await client.post(url, json=body, headers={"Authorization": f"Bearer {key}",
                                                                 "Connection": "close"})
            return response.status_code

    return await asyncio.gather(*(one() for _ in range(count)))


def test_sigterm_writes_the_queued_rows_of_every_worker_process(database, fastchat, tmp_path):
    pg, requests = database, 120
    gateway = Gateway(port=free_port(), env=gateway_env(tmp_path, fastchat, {
        "DATABASE_URL": pg.url, "USAGE_FLUSH_SECONDS": "3600", "USAGE_BATCH_SIZE": "1000000"}))
    key = gateway.create_key("workers")
    log_path = tmp_path / "gateway.log"
    gateway.proc = start_process(
        [sys.executable, "manage.py", "openai_api_server", "--host", HOST, "--port", str(gateway.port),
         "--controller-address", fastchat, "--workers", "2", "--no-migrate"], env=gateway.env, log_path=log_path)
    try:
        wait_for_port(gateway.port, timeout=30, proc=gateway.proc)
        statuses = asyncio.run(send_requests(gateway.url + "/v1/chat/completions", key, requests))
        assert statuses == [200] * requests
        assert pg.psql("SELECT count(*) FROM keys_usagerecord", database=pg.database) == "0"  # all still queued
        gateway.proc.send_signal(signal.SIGTERM)
        gateway.proc.wait(timeout=60)
    finally:
        stop_process(gateway.proc)
    log = log_path.read_text()
    flushed = {int(pid): int(rows) for pid, rows in
               re.findall(r"Process (\d+) wrote its (\d+) queued usage row\(s\) at exit", log)}
    assert len(flushed) == 2, log[-3000:]  # both worker processes had rows and wrote them
    assert sum(flushed.values()) == requests, flushed
    assert pg.psql("SELECT count(*) FROM keys_usagerecord", database=pg.database) == str(requests)
