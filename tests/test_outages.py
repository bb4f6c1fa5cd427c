"""A gateway process whose PostgreSQL goes down and comes back (a real server, stopped and
started again): known keys keep working from memory, unknown ones get 503 with Retry-After
within a second or two, never a hang or a plain 500. Redis outages: tests/test_redis_limits.py.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway_process import Gateway, start_gateway
from tests.procs import free_port, start_controller, start_demo_worker, stop_process, wait_for_models
from tests.services import Postgres, ServiceUnavailable, postgres, require_service

pytestmark = pytest.mark.e2e

MODEL = "demo-chat"
CHAT = "/v1/chat/completions"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[tuple[Gateway, Postgres]]:
    tmp = tmp_path_factory.mktemp("outages")
    processes, gateway = [], None
    try:
        with postgres() as pg:
            controller_port, worker_port = free_port(), free_port()
            controller_url = f"http://127.0.0.1:{controller_port}"
            try:
                processes.append(start_controller(controller_port, log_path=tmp / "controller.log"))
                processes.append(start_demo_worker(worker_port, controller_url, [MODEL], log_path=tmp / "worker.log"))
                wait_for_models(controller_url, [MODEL], timeout=20)
                gateway = start_gateway(tmp, controller_url, server="uvicorn", extra_env={
                    "DATABASE_URL": pg.url, "GATEWAY_KEY_CACHE_SECONDS": "0.5", "GATEWAY_KEY_GRACE_SECONDS": "60",
                })
                yield gateway, pg
            finally:
                if gateway is not None:
                    gateway.stop()
                for process in reversed(processes):
                    stop_process(process)
    except ServiceUnavailable as exc:
        require_service("PostgreSQL", False, str(exc))


def start_again(pg: Postgres) -> None:
    """Start a stopped throwaway PostgreSQL on its data directory, port and socket."""
    options = f"-F -p {pg.port} -k {pg.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg.run("pg_ctl", "-D", str(pg.data_dir), "-l", str(pg.log_path), "-w", "-t", "60", "-o", options, "start")


def timed(client: httpx.Client, key: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = client.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {key}"})
    return response, time.monotonic() - started


def test_postgresql_down_known_keys_work_unknown_keys_get_503(stack):
    gateway, pg = stack
    key = gateway.create_key("known")
    unknown = "sk-never-issued-0123456789abcdefghij"
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        assert timed(client, key)[0].status_code == 200
        assert timed(client, unknown)[0].status_code == 401
        pg.stop()
        try:
            time.sleep(1)  # past GATEWAY_KEY_CACHE_SECONDS: every key is due for a refresh
            known = [timed(client, key) for _ in range(5)]
            refused = [timed(client, unknown + str(i)) for i in range(3)]
        finally:
            start_again(pg)
        print("PostgreSQL down: known key " + ", ".join(f"{r.status_code} in {s * 1000:.0f} ms" for r, s in known)
              + "; unknown keys " + ", ".join(f"{r.status_code} in {s * 1000:.0f} ms" for r, s in refused))
        assert [response.status_code for response, _ in known] == [200] * 5
        assert max(seconds for _, seconds in known) < 1.5
        for response, seconds in refused:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "key_lookup_unavailable"
            assert int(response.headers["Retry-After"]) >= 1
            assert seconds < 2.5
        # Back: unknown keys are refused as such again, known keys keep working.
        deadline = time.monotonic() + 10
        while timed(client, unknown)[0].status_code != 401 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert timed(client, unknown)[0].status_code == 401
        assert timed(client, key)[0].status_code == 200


def cluster_pids(pg: Postgres) -> list[int]:
    """The postmaster and its children (one backend per connection)."""
    postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            children.append(int(stat.parent.name))
    return [postmaster, *children]


def test_postgresql_hung_nobody_waits_longer_than_the_lookup_timeout(stack):
    """Every PostgreSQL process stopped (SIGSTOP): connections neither fail nor answer."""
    gateway, pg = stack
    key = gateway.create_key("known-while-hung")
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        assert timed(client, key)[0].status_code == 200
        pids = cluster_pids(pg)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(1)
            known = [timed(client, key) for _ in range(5)]
            refused = timed(client, "sk-never-issued-while-hung-0123456789")
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        print("PostgreSQL hung: known key " + ", ".join(f"{r.status_code} in {s * 1000:.0f} ms" for r, s in known)
              + f"; an unknown key {refused[0].status_code} in {refused[1] * 1000:.0f} ms")
        assert [response.status_code for response, _ in known] == [200] * 5
        assert max(seconds for _, seconds in known) < 1.0  # REFRESH_WAIT, once
        assert refused[0].status_code == 503, refused[0].text
        assert refused[0].json()["error"]["code"] == "key_lookup_unavailable"
        assert refused[1] < 2.5  # GATEWAY_KEY_LOOKUP_TIMEOUT
        deadline = time.monotonic() + 10
        while timed(client, "sk-never-issued-while-hung-0123456789")[0].status_code != 401:
            assert time.monotonic() < deadline, "the gateway did not recover after PostgreSQL did"
            time.sleep(0.2)
