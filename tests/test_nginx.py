"""The deployment as documented: nginx (deploy/nginx/gateway.conf) in front of two gateway
processes sharing PostgreSQL and Redis (docs/decisions.md#limits)."""
from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_process import StackSpec, WorkerSpec
from tests.procs import REPO_ROOT, free_port, stop_process, wait_for_port
from tests.services import requires_service

pytestmark = [pytest.mark.e2e, requires_service("nginx", shutil.which("nginx") is not None)]
MODEL = "nginx-chat"


def self_signed_certificate(tmp: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1, for the site's HTTPS server."""
    cert, key = tmp / "tls.crt", tmp / "tls.key"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
    return cert, key


def socket_directory() -> Path:
    """A directory for the site's internal socket that nginx's workers can reach: when the tests
    run as root the workers run as nobody, and pytest's temporary directories are private."""
    directory = Path(tempfile.mkdtemp(prefix="gateway-nginx-"))
    directory.chmod(0o755)
    return directory


def render_site(tmp: Path, listen: int, upstream_ports: list[int], tls_listen: int | None = None) -> Path:
    """The shipped site files (deploy/nginx/) with their placeholders filled, in `tmp`; returns
    the file to include in nginx's http block. The HTTPS server listens on `tls_listen` (a free
    port if not given), with a self-signed certificate."""
    tmp.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed_certificate(tmp)
    sockets = socket_directory()
    values = {
        "{{listen}}": f"127.0.0.1:{listen}", "{{tls_listen}}": f"127.0.0.1:{tls_listen or free_port()}",
        "{{upstream_servers}}": " ".join(f"server 127.0.0.1:{port};" for port in upstream_ports),
        "{{static_root}}": str(tmp / "static"), "{{log_dir}}": str(tmp), "{{locations}}": str(tmp / "locations.conf"),
        "{{tls_certificate}}": str(cert), "{{tls_certificate_key}}": str(key),
        "{{unauthorized_socket}}": str(sockets / "401.sock"), "{{unavailable_socket}}": str(sockets / "503.sock"),
    }
    for source, target in (("gateway.conf", "site.conf"), ("gateway-locations.conf", "locations.conf")):
        text = (REPO_ROOT / "deploy/nginx" / source).read_text()
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        assert "{{" not in text, text
        (tmp / target).write_text(text)
    return tmp / "site.conf"


def render_nginx(tmp: Path, listen: int, upstream_ports: list[int], tls_listen: int | None = None) -> Path:
    """The shipped site, inside a minimal nginx.conf."""
    site = render_site(tmp, listen, upstream_ports, tls_listen)
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
    include {site};
}}
""")
    return conf


STACK = StackSpec(workers=(WorkerSpec((MODEL,)),), gateways=2, server="uvicorn", backends=True,
                  env={"GATEWAY_ACCESS_LOG": "False", "GATEWAY_BEHIND_TLS": "True"})


@pytest.fixture(scope="module")
def stack(gateway_stack):
    tmp, gateways, nginx_port, tls_port = gateway_stack.tmp, gateway_stack.gateways, free_port(), free_port()
    conf = render_nginx(tmp, nginx_port, [g.port for g in gateways], tls_listen=tls_port)
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(nginx_port, timeout=10)
        wait_for_port(tls_port, timeout=10)
        yield {"url": f"http://127.0.0.1:{nginx_port}", "tls_url": f"https://127.0.0.1:{tls_port}",
               "gateways": gateways, "worker": gateway_stack.worker_urls[0]}
    finally:
        stop_process(nginx)


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


def test_metrics_are_not_served_through_the_site(stack):
    for url in (stack["url"], stack["tls_url"]):
        response = httpx.get(url + "/metrics", verify=False, timeout=10)
        assert response.status_code == 404
        assert "gateway_requests_total" not in response.text
    # A process answers them to a direct caller on its host.
    assert httpx.get(stack["gateways"][0].url + "/metrics", timeout=10).status_code == 200


def test_readiness_through_the_site_tells_only_ok(stack):
    response = httpx.get(stack["url"] + "/health/ready", timeout=10)
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    direct = httpx.get(stack["gateways"][0].url + "/health/ready", timeout=10).json()
    assert direct["checks"] == {"database": "ok", "controller": "ok"}


def test_the_tls_server_proxies_and_the_gateway_sees_https(stack):
    key = stack["gateways"][0].create_key("tls")
    models = httpx.get(stack["tls_url"] + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                       verify=False, timeout=10)
    assert models.status_code == 200, models.text
    assert [m["id"] for m in models.json()["data"]] == [MODEL]
    # X-Forwarded-Proto reaches Django: HSTS and a secure CSRF cookie over HTTPS only.
    secure = httpx.get(stack["tls_url"] + "/admin/login/", verify=False, timeout=10)
    assert secure.status_code == 200
    assert secure.headers["strict-transport-security"].startswith("max-age=31536000")
    assert "secure" in secure.headers["set-cookie"].lower()
    plain = httpx.get(stack["url"] + "/admin/login/", timeout=10)
    assert "strict-transport-security" not in plain.headers


def test_admin_sign_in_attempts_are_rate_limited(stack):
    statuses = [httpx.post(stack["url"] + "/admin/login/", data={"username": "root", "password": f"guess{i}"},
                           timeout=10).status_code for i in range(12)]
    assert statuses.count(429) >= 5, statuses  # a burst of 5 (+1 for the rate), then refused
    assert 429 not in statuses[:5], statuses
    assert httpx.get(stack["url"] + "/admin/login/", timeout=10).status_code == 200  # reading the page is not counted


def test_answers_401_are_rate_limited_and_valid_keys_are_not(stack):
    """Runs last: it spends this address's allowance of 401s."""
    key = stack["gateways"][0].create_key("valid")
    wrong = {"Authorization": "Bearer sk-wrong-guess"}
    answers = [httpx.post(stack["url"] + "/v1/chat/completions", json={"model": MODEL}, headers=wrong, timeout=10)
               for _ in range(45)]
    statuses = [r.status_code for r in answers]
    assert 429 not in statuses[:30], statuses
    assert 30 <= statuses.count(401) <= 34, statuses
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["retry-after"] == "1"
    unauthorized = answers[0]
    assert unauthorized.json()["error"]["code"] == "invalid_api_key"
    assert unauthorized.headers["www-authenticate"].startswith("Bearer")
    assert unauthorized.headers["x-request-id"]
    # Clients with a valid key are never counted.
    assert [chat(stack, key).status_code for _ in range(5)] == [200] * 5


def test_the_gateways_own_502_passes_through_with_its_json(stack):
    """nginx answers its own upstream failures with JSON (the backup server), but the gateway's
    502 for a failing worker reaches the client as the gateway wrote it, request id and all."""
    key = stack["gateways"][0].create_key("worker-500")
    httpx.post(stack["worker"] + "/_fake/config", json={"http_status": 500}).raise_for_status()
    try:
        response = chat(stack, key)
    finally:
        httpx.post(stack["worker"] + "/_fake/reset").raise_for_status()
    assert response.status_code == 502
    assert response.json()["code"] == 50001
    assert response.json()["error"]["code"] != "gateway_unavailable"


def test_every_process_down_is_a_json_503_not_nginx_html(tmp_path):
    nginx_port, dead_ports = free_port(), [free_port(), free_port()]
    conf = render_nginx(tmp_path, nginx_port, dead_ports)
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(nginx_port, timeout=10)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        response = httpx.post(f"http://127.0.0.1:{nginx_port}/v1/chat/completions", json=body, timeout=10,
                              headers={"Authorization": "Bearer sk-anything"})
    finally:
        stop_process(nginx)
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "gateway_unavailable"
    assert response.headers["retry-after"] == "1"
