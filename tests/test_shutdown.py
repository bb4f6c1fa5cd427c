"""SIGTERM while streams run: each completes or ends with an error event and [DONE], and every
request keeps its usage row (docs/decisions.md#shutdown)."""
from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys

import httpx
import pytest

from tests.gateway_process import Gateway, gateway_env
from tests.procs import (
    free_port,
    start_controller,
    start_demo_worker,
    start_process,
    stop_process,
    wait_for_models,
    wait_for_port,
)

pytestmark = pytest.mark.e2e
STREAMS = 20


@pytest.fixture
def stack(tmp_path):
    controller_port, worker_port = free_port(), free_port()
    controller_url = f"http://127.0.0.1:{controller_port}"
    processes = [start_controller(controller_port)]
    try:
        processes.append(start_demo_worker(worker_port, controller_url, ["slow-chat"],
                                           extra_args=["--reply-words", "60", "--token-delay", "0.1"]))
        wait_for_models(controller_url, ["slow-chat"], timeout=20)
        gateway = Gateway(port=free_port(), env=gateway_env(tmp_path, controller_url, {"GATEWAY_DRAIN_SECONDS": "1.5"}))
        gateway.manage("migrate", "--noinput")
        yield gateway, tmp_path
    finally:
        for process in reversed(processes):
            stop_process(process)


async def read_stream(url: str, key: str, started: asyncio.Event, counter: list[int]) -> list[str]:
    body = {"model": "slow-chat", "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 60}
    lines = []
    async with httpx.AsyncClient(timeout=30) as client:
        async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line:
                    lines.append(line)
                    if len(lines) == 2:
                        counter[0] += 1
                        if counter[0] == STREAMS:
                            started.set()
    return lines


def test_sigterm_finishes_or_cleanly_ends_every_stream(stack):
    gateway, tmp_path = stack
    key = gateway.create_key("shutdown")
    gateway.proc = start_process(
        [sys.executable, "manage.py", "openai_api_server", "--host", "127.0.0.1", "--port", str(gateway.port),
         "--controller-address", gateway.env["CONTROLLER_ADDRESS"], "--no-migrate"],
        env=gateway.env, log_path=tmp_path / "gateway.log")
    wait_for_port(gateway.port, timeout=20)

    async def scenario() -> list[list[str]]:
        started, counter = asyncio.Event(), [0]
        tasks = [asyncio.create_task(read_stream(gateway.url + "/v1/chat/completions", key, started, counter))
                 for _ in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 20)
        gateway.proc.send_signal(signal.SIGTERM)
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert gateway.proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM
    for lines in results:
        assert lines[-1] == "data: [DONE]", lines[-3:]
        ended_cleanly = '"finish_reason":"' in lines[-2] and '"finish_reason":null' not in lines[-2]
        errored = lines[-2].startswith('data: {"error"') and "shutting down" in lines[-2]
        assert ended_cleanly or errored, lines[-2]
    assert any(lines[-2].startswith('data: {"error"') for lines in results), "the streams outlived the drain time"
    rows = sqlite3.connect(tmp_path / "gateway.sqlite3").execute(
        "SELECT status, completion_tokens FROM keys_usagerecord WHERE streamed").fetchall()
    assert len(rows) == STREAMS
    assert all(tokens > 0 for _, tokens in rows)
    assert {status for status, _ in rows} <= {200, 503}
    stop_process(gateway.proc)
