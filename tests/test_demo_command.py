"""`make demo` (manage.py demo): the README's first command serves (the printed key and the printed
admin login both work), and stops all it started,
cleanly: no "Unclosed client session"/"Unclosed connector" warnings (pooled upstream
connections are closed at shutdown), whether it is stopped with SIGTERM or Ctrl-C."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.gateway_process import gateway_env
from tests.procs import REPO_ROOT, free_port, wait_for_port

pytestmark = pytest.mark.e2e


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def assert_the_printed_admin_login_works(log) -> None:
    output = log.read_text()
    login = re.search(r"The admin .*: (http://\S+/admin/)\n  user: (\S+)  password \(shown once\): (\S+)", output)
    assert login, output
    admin, user, password = login.groups()
    with httpx.Client(base_url=admin, timeout=10) as browser:
        page = browser.get("login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        answer = browser.post("login/?next=/admin/", data={"csrfmiddlewaretoken": token, "username": user,
                                                          "password": password, "next": "/admin/"})
        assert answer.status_code == 302 and answer.headers["location"] == "/admin/", log.read_text()
        index = browser.get(admin)
        assert index.status_code == 200 and "FastChat gateway" in index.text, index.text
        assert "/admin/keys/usagerecord/dashboard/" in index.text, index.text


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_the_demo_serves_with_the_printed_key_and_a_signal_stops_everything_cleanly(tmp_path, stop_signal):
    ports = {"--port": free_port(), "--controller-port": free_port(), "--worker-port": free_port()}
    env = {k: v for k, v in gateway_env(tmp_path, "unused").items() if k not in ("REDIS_URL", "CONTROLLER_ADDRESS")}
    log = tmp_path / "demo.log"
    with open(log, "wb") as output:
        demo = subprocess.Popen([sys.executable, "manage.py", "demo", *(str(x) for item in ports.items() for x in item)],
                                cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for_port(ports["--port"], timeout=60)
        key = re.search(r"API key \(shown once\): (sk-\S+)", log.read_text()).group(1)
        answer = httpx.post(f"http://127.0.0.1:{ports['--port']}/v1/chat/completions",
                            headers={"Authorization": f"Bearer {key}"}, timeout=10,
                            json={"model": "demo-chat", "messages": [{"role": "user", "content": "Hello!"}]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        streamed = httpx.post(f"http://127.0.0.1:{ports['--port']}/v1/chat/completions",
                              headers={"Authorization": f"Bearer {key}"}, timeout=10,
                              json={"model": "demo-chat", "stream": True, "messages": [{"role": "user", "content": "Hi"}]})
        assert streamed.text.endswith("data: [DONE]\n\n"), streamed.text
        assert_the_printed_admin_login_works(log)
        demo.send_signal(stop_signal)
        assert demo.wait(timeout=30) == 0, log.read_text()
        output = log.read_text()
        assert "Unclosed" not in output, output
        assert "Traceback" not in output, output
        deadline = time.monotonic() + 10
        while any(listening(port) for port in ports.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(listening(port) for port in ports.values()), log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
