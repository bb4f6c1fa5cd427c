"""The deployment as documented: nginx (deploy/nginx/gateway.conf) in front of two gateway
processes sharing PostgreSQL and Redis (issue 4, acceptance 1)."""
from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_process import start_gateway
from tests.procs import (
    REPO_ROOT,
    free_port,
    start_controller,
    start_demo_worker,
    stop_process,
    wait_for_models,
    wait_for_port,
)
from tests.services import services

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not shutil.which("nginx"), reason="nginx is not installed")]
MODEL = "nginx-chat"


def render_nginx(tmp: Path, listen: int, upstream_ports: list[int]) -> Path:
    """The shipped site file, with its placeholders filled, inside a minimal nginx.conf."""
    site = (REPO_ROOT / "deploy/nginx/gateway.conf").read_text()
    site = site.replace("{{listen}}", f"127.0.0.1:{listen}").replace(
        "{{upstream_servers}}", " ".join(f"server 127.0.0.1:{port};" for port in upstream_ports)).replace(
        "{{static_root}}", str(tmp / "static")).replace("{{log_dir}}", str(tmp))
    (tmp / "site.conf").write_text(site)
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    include {tmp}/site.conf;
}}
""")
    return conf


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nginx")
    controller_port, worker_port, nginx_port = free_port(), free_port(), free_port()
    controller_url = f"http://127.0.0.1:{controller_port}"
    processes, gateways = [], []
    with services() as backends:
        try:
            processes.append(start_controller(controller_port))
            processes.append(start_demo_worker(worker_port, controller_url, [MODEL]))
            wait_for_models(controller_url, [MODEL], timeout=20)
            for i in range(2):
                gateway_tmp = tmp / f"gateway{i}"
                gateway_tmp.mkdir()
                gateways.append(start_gateway(gateway_tmp, controller_url, server="uvicorn",
                                              extra_env={**backends.env, "GATEWAY_ACCESS_LOG": "False"}))
            nginx = subprocess.Popen(["nginx", "-c", str(render_nginx(tmp, nginx_port, [g.port for g in gateways])),
                                      "-p", str(tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            processes.append(nginx)
            wait_for_port(nginx_port, timeout=10)
            yield {"url": f"http://127.0.0.1:{nginx_port}", "gateways": gateways,
                   "worker": f"http://127.0.0.1:{worker_port}"}
        finally:
            for gateway in gateways:
                gateway.stop()
            for process in reversed(processes):
                stop_process(process)


def chat(stack, key: str, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}
    return httpx.post(stack["url"] + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"})


def test_streamed_chunks_reach_the_client_as_they_are_produced(stack):
    key = stack["gateways"][0].create_key("stream")
    httpx.post(stack["worker"] + "/_fake/config", json={"token_delay": 0.2}).raise_for_status()
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}
        arrivals = []
        with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    arrivals.append(time.monotonic())
    finally:
        httpx.post(stack["worker"] + "/_fake/reset").raise_for_status()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(gaps) >= 3, arrivals
    assert min(gaps) >= 0.15, gaps
    assert statistics.median(gaps) < 1.0, gaps


def requests_served(gateway) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "gateway_requests_total")


def test_requests_are_spread_over_both_processes(stack):
    key = stack["gateways"][0].create_key("spread")
    before = [requests_served(g) for g in stack["gateways"]]

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            responses = await asyncio.gather(*(
                client.post(stack["url"] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                for _ in range(40)))
            return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 40
    served = [requests_served(g) - b for g, b in zip(stack["gateways"], before, strict=True)]
    assert sum(served) == 40
    assert min(served) >= 5, served


def test_a_keys_limit_holds_across_both_processes(stack):
    key = stack["gateways"][1].create_key("limited", "--rpm", "10")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            return await asyncio.gather(*(
                client.post(stack["url"] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                for _ in range(30)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 20
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["x-ratelimit-limit-requests"] == "10"
    assert int(refused.headers["retry-after"]) >= 1
