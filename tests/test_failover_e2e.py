"""Routing and failover on real processes, as deployed: nginx in front of two gateway processes
sharing PostgreSQL and Redis, two fake OpenAI-compatible upstreams (tests/fake_upstream.py)
registered with `manage.py upstreams apply`, weights 3:1 in one tier.

- weights: 2,000 requests split 75 % ± 3 %;
- a route killed mid-run: 1,000 requests at concurrency 16 (half of them streamed), upstream
  "a" killed after the first 300: at least 99.9 % succeed, every stream completes or ends with an
  error event and [DONE]; "a" cools down on both processes within a second of each other; once
  it is started again it comes back by itself (probes, trials), and gets traffic again.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from cryptography.fernet import Fernet

from tests.gateway_process import StackSpec, WorkerSpec
from tests.procs import free_port, start_process, stop_process, wait_for_port
from tests.services import requires_service
from tests.test_nginx import render_nginx

pytestmark = [pytest.mark.e2e, requires_service("nginx", shutil.which("nginx") is not None)]

PUBLIC = "fake-model"
STACK = StackSpec(
    workers=(WorkerSpec(("unused-demo",)),), gateways=2, server="uvicorn", backends=True,
    env={
        "GATEWAY_ACCESS_LOG": "False", "GATEWAY_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "GATEWAY_UPSTREAM_PROBE_SECONDS": "1", "GATEWAY_UPSTREAM_PROBE_PASSES": "2",
        "GATEWAY_BREAKER_COOLDOWN_SECONDS": "2", "GATEWAY_BREAKER_FAILURES": "3",
    },
)


class FakeUpstream:
    def __init__(self, tmp, name: str):
        self.name, self.port, self.log = name, free_port(), tmp / f"fake-{name}.log"
        self.proc = None

    def start(self) -> None:
        self.proc = start_process([sys.executable, "-m", "tests.fake_upstream", "--port", str(self.port),
                                   "--name", self.name, "--models", PUBLIC], log_path=self.log)
        wait_for_port(self.port, timeout=15, proc=self.proc, what=f"fake upstream {self.name}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def generations(self) -> int:
        return httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=5).json()["generations"]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def stack(gateway_stack):
    tmp, gateways = gateway_stack.tmp, gateway_stack.gateways
    fakes = {name: FakeUpstream(tmp, name) for name in ("a", "b")}
    for fake in fakes.values():
        fake.start()
    gateways[0].apply_upstreams(tmp / "upstreams.json", [
        {"name": name, "kind": "openai", "base_url": fake.base_url, "priority": 10, "weight": weight,
         "discover_models": False, "models": [{"public_name": PUBLIC, "upstream_name": PUBLIC}]}
        for (name, fake), weight in zip(fakes.items(), (3, 1), strict=True)
    ])
    nginx_port = free_port()
    conf = render_nginx(tmp / "nginx", nginx_port, [g.port for g in gateways])
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp / "nginx")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(nginx_port, timeout=10)
        key = gateways[0].create_key("failover")
        url = f"http://127.0.0.1:{nginx_port}"
        wait_for(lambda: all(upstream_state(g.url, "a") == "healthy" for g in gateways), 15)
        yield {"url": url, "gateways": gateways, "fakes": fakes, "key": key}
    finally:
        stop_process(nginx)
        for fake in fakes.values():
            if fake.proc is not None:
                stop_process(fake.proc)


def wait_for(predicate, timeout: float, step: float = 0.05) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true after {timeout} s")
        time.sleep(step)
    return time.monotonic() - start


def upstream_state(gateway_url: str, name: str) -> str | None:
    """The upstream's state as this gateway process sees it (/health/ready's details: the test
    talks to the process directly from this host, so it is an insider)."""
    try:
        answer = httpx.get(gateway_url + "/health/ready", timeout=5).json()
    except httpx.HTTPError:
        return None
    return answer.get("upstreams", {}).get(name, {}).get("state")


async def one_request(client: httpx.AsyncClient, url: str, key: str, stream: bool) -> str:
    """'ok', 'error-event' (a stream that ended with an error event and [DONE]), or what went wrong."""
    body = {"model": PUBLIC, "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    try:
        if not stream:
            response = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
            if response.status_code != 200:
                return f"status {response.status_code}"
            return "ok" if response.json()["choices"][0]["finish_reason"] == "stop" else "incomplete"
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return f"status {response.status_code}"
            events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    except httpx.HTTPError as exc:
        return f"transport {type(exc).__name__}"
    if not events or events[-1] != "[DONE]":
        return "stream without [DONE]"
    payloads = [json.loads(event) for event in events[:-1]]
    if any("error" in payload for payload in payloads):
        return "error-event" if "error" in payloads[-1] else "error event before the end"
    finishes = [c.get("finish_reason") for p in payloads for c in p.get("choices", [])]
    return "ok" if "stop" in finishes else "stream without a finish"


async def load(url: str, key: str, total: int, concurrency: int, on_progress=None) -> list[str]:
    outcomes: list[str] = []
    queue = iter(range(total))

    async def worker(client):
        for i in queue:
            outcomes.append(await one_request(client, url, key, stream=i % 2 == 1))
            if on_progress is not None:
                on_progress(len(outcomes))

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return outcomes


def test_weights_split_three_to_one_over_two_thousand_requests(stack):
    fakes = stack["fakes"]
    before = {name: fake.generations() for name, fake in fakes.items()}
    outcomes = asyncio.run(load(stack["url"], stack["key"], 2000, 16))
    assert outcomes.count("ok") == 2000, {o: outcomes.count(o) for o in set(outcomes)}
    served = {name: fake.generations() - before[name] for name, fake in fakes.items()}
    assert sum(served.values()) == 2000
    share = served["a"] / 2000
    print(f"weights 3:1 -> a {served['a']}, b {served['b']} ({share:.1%})")
    assert abs(share - 0.75) <= 0.03, served


def test_a_route_killed_mid_run_fails_over_cools_down_everywhere_and_comes_back(stack):
    fakes, gateways, url, key = stack["fakes"], stack["gateways"], stack["url"], stack["key"]
    killed = {}

    def on_progress(done: int) -> None:
        if done == 300 and not killed:
            killed["at"] = time.monotonic()
            fakes["a"].kill()

    seen: dict[int, float] = {}

    def watch() -> None:  # each process's view of "a", every 20 ms, from the kill on
        while "at" not in killed:
            time.sleep(0.005)
        deadline = killed["at"] + 10
        while time.monotonic() < deadline and len(seen) < len(gateways):
            for i, gateway in enumerate(gateways):
                if i not in seen and upstream_state(gateway.url, "a") == "cooling_down":
                    seen[i] = time.monotonic() - killed["at"]
            time.sleep(0.02)

    import threading

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outcomes = asyncio.run(load(url, key, 1000, 16, on_progress))
    watcher.join(15)
    counts = {o: outcomes.count(o) for o in set(outcomes)}
    print(f"killed mid-run: {counts}; 'a' cooling down on each process after {seen} s")
    assert outcomes.count("ok") >= 999, counts
    assert set(outcomes) <= {"ok", "error-event"}, counts  # never a 200 left without an error event
    assert len(seen) == len(gateways), seen
    assert max(seen.values()) - min(seen.values()) <= 1.0, seen

    # Metrics tell the same story on the process that saw the failures.
    text = "".join(httpx.get(g.url + "/metrics", timeout=5).text for g in gateways)
    lines = [line for line in text.splitlines() if line.startswith("gateway_upstream_")]
    assert any(line.startswith('gateway_upstream_failures_total{kind="unreachable",upstream="a"}')
               or line.startswith('gateway_upstream_failures_total{upstream="a",kind="unreachable"}')
               for line in lines), [line for line in lines if "failures" in line or "state" in line]

    # Started again, "a" comes back without anyone touching the admin.
    fakes["a"].start()
    came_back = wait_for(lambda: all(upstream_state(g.url, "a") == "healthy" for g in gateways), 20)
    print(f"'a' healthy again on every process {came_back:.1f} s after its restart")
    before = fakes["a"].generations()
    outcomes = asyncio.run(load(url, key, 200, 8))
    assert outcomes.count("ok") == 200
    assert fakes["a"].generations() - before >= 100  # about 150 with weights 3:1
