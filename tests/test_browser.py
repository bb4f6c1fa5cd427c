"""The admin in a real browser (headless Chromium through Playwright) against a real gateway
(daphne, FastChat's controller, the demo worker): log in, create a key and read its plaintext once,
call the API with it (curl), see the request in the usage list and the live view, revoke the key,
see the next call refused. Screenshots of each page go to docs/ (linked from the README)."""
from __future__ import annotations

import json
import mimetypes
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.gateway_process import Gateway, StackSpec, WorkerSpec
from tests.procs import REPO_ROOT
from tests.services import requires_service

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
DOCS = REPO_ROOT / "docs"
MODEL = "demo-chat"
USERNAME, PASSWORD = "admin", "browser-test-password"
PLAINTEXT = re.compile(r"^sk-[A-Za-z0-9_-]{43}$")

pytestmark = [
    pytest.mark.e2e,
    requires_service("Chromium", Path(CHROMIUM).exists(), f"no {CHROMIUM}"),
    requires_service("curl", shutil.which("curl") is not None),
]


STACK = StackSpec(workers=(WorkerSpec((MODEL,)),), env={"DJANGO_SUPERUSER_PASSWORD": PASSWORD})


@pytest.fixture(scope="module")
def gateway(gateway_stack) -> Gateway:
    server = gateway_stack.gateway
    server.manage("createsuperuser", "--noinput", "--username", USERNAME, "--email", "admin@example.com")
    return server


@pytest.fixture
def context(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 800})
    context.route("**/static/**", serve_static)
    # More room for the tables in the screenshots: the admin's navigation sidebar starts closed.
    context.add_init_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")
    yield context
    context.close()


def serve_static(route) -> None:
    """The admin's CSS and JS. The gateway does not serve static files (in production nginx
    serves `collectstatic`'s output), so the browser gets them from Django's finders."""
    from django.contrib.staticfiles import finders

    relative = route.request.url.split("/static/", 1)[1].split("?", 1)[0]
    found = finders.find(relative)
    if found is None:
        route.fulfill(status=404, body="")
        return
    route.fulfill(status=200, body=Path(found).read_bytes(),
                  content_type=mimetypes.guess_type(found)[0] or "application/octet-stream")


def curl_chat(gateway: Gateway, key: str, model: str = MODEL) -> tuple[int, dict, dict]:
    """POST a chat completion with curl; (status, headers, body)."""
    result = subprocess.run(
        ["curl", "-sS", "-D", "-", f"{gateway.base_url}/chat/completions",
         "-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json",
         "-d", json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8})],
        capture_output=True, text=True, check=True, timeout=30,
    )
    head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
    status_line, *header_lines = head.splitlines()
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


def shoot(page, name: str, height: int = 800, width: int = 1440) -> None:
    DOCS.mkdir(exist_ok=True)
    page.set_viewport_size({"width": width, "height": height})
    page.screenshot(path=str(DOCS / name))


def log_in(page, gateway: Gateway) -> None:
    page.goto(f"{gateway.url}/admin/")
    page.wait_for_selector("#login-form")
    page.fill("#id_username", USERNAME)
    page.fill("#id_password", PASSWORD)
    shoot(page, "admin-login.png", height=600)
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")
    assert "/admin/login/" not in page.url


def create_key(page, gateway: Gateway) -> str:
    page.goto(f"{gateway.url}/admin/keys/apikey/add/")
    page.fill("#id_name", "browser-demo")
    page.fill("#id_owner", "ops@example.com")
    page.fill("#id_allowed_models", MODEL)
    page.fill("#id_requests_per_minute", "600")
    page.click("input[name=_save]")
    page.wait_for_selector("input.plaintext-key")
    plaintext = page.input_value("input.plaintext-key")
    assert PLAINTEXT.match(plaintext), plaintext
    shoot(page, "admin-key-created.png")
    return plaintext


def wait_until(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def test_the_admin_end_to_end(gateway, context):
    page = context.new_page()
    log_in(page, gateway)
    plaintext = create_key(page, gateway)

    # Shown once: the key's pages never show it again.
    for path in ("/admin/keys/apikey/", "/admin/keys/apikey/?q=browser-demo"):
        page.goto(gateway.url + path)
        assert plaintext not in page.content()
    page.click("text=browser-demo")
    assert plaintext not in page.content()
    assert page.input_value("#id_allowed_models") == MODEL

    # The live view is open before the call; the row appears when the request finishes.
    live = context.new_page()
    live.goto(f"{gateway.url}/admin/keys/usagerecord/live/")
    live.wait_for_selector("#live-status.connected", timeout=10_000)
    status, headers, body = curl_chat(gateway, plaintext)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]
    request_id = headers["x-request-id"]
    live.wait_for_selector(f'#live-table tr[data-request-id="{request_id}"]', timeout=10_000)
    row = live.inner_text(f'#live-table tr[data-request-id="{request_id}"]')
    assert "browser-demo" in row and MODEL in row and "200" in row
    status, headers, _ = curl_chat(gateway, plaintext, model="no-such-model")
    assert status == 403  # the key may use demo-chat only
    refused_id = headers["x-request-id"]
    live.wait_for_selector(f'#live-table tr[data-request-id="{refused_id}"] td.status-error', timeout=10_000)
    shoot(live, "admin-live.png")
    live.close()

    # The usage list shows the rows once the writer thread has flushed them (every 0.5 s).
    def usage_rows_shown() -> bool:
        page.goto(f"{gateway.url}/admin/keys/usagerecord/")
        return request_id in page.content() and refused_id in page.content()

    assert wait_until(usage_rows_shown, timeout=10, interval=0.3), "the requests never reached the usage list"
    assert "browser-demo" in page.inner_text("#result_list")
    shoot(page, "admin-usage.png", width=1600)
    page.goto(f"{gateway.url}/admin/keys/usagerecord/?model={MODEL}&status_class=ok")
    assert request_id in page.content() and refused_id not in page.content()

    page.goto(f"{gateway.url}/admin/keys/usagerecord/dashboard/")
    page.wait_for_selector("svg[aria-label='Requests per day'] rect")
    assert "browser-demo" in page.inner_text(".charts")
    shoot(page, "admin-dashboard.png", height=760)

    # Revoke from the list; the API refuses the key within a second (its cache's lifetime).
    page.goto(f"{gateway.url}/admin/keys/apikey/?q=browser-demo")
    page.check("#result_list input.action-select")
    page.select_option("select[name=action]", "revoke")
    page.click("button[name=index]")
    page.wait_for_selector("ul.messagelist li.success")
    revoked_at = time.monotonic()
    assert "Revoked 1 key(s)" in page.inner_text("ul.messagelist")
    shoot(page, "admin-revoked.png")

    refused = wait_until(lambda: curl_chat(gateway, plaintext)[0] == 401, timeout=3, interval=0.1)
    assert refused, "the revoked key was still accepted"
    assert time.monotonic() - revoked_at < 1.5
    status, _, body = curl_chat(gateway, plaintext)
    assert (status, body["error"]["code"]) == (401, "revoked_api_key")
