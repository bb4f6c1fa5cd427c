"""The console in a real browser (headless Chromium through Playwright) against a real gateway
(daphne, FastChat's controller, the demo worker): a team's owner logs in, creates a key and reads
its plaintext once, calls the API with it (curl), sees the request in the team's charts, revokes
the key and sees the next call refused; a member logs in, sees the team, its keys and charts,
creates a key of their own and revokes it, and gets no button on the keys of others. Screenshots go to docs/console-*.png (linked from the README)."""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from tests.gateway_process import Gateway, StackSpec, WorkerSpec
from tests.services import requires_service
from tests.test_browser import CHROMIUM, MODEL, PLAINTEXT, curl_chat, serve_static, shoot, wait_until

PASSWORD = "console-test-password"
TEAM = "research"

pytestmark = [
    pytest.mark.e2e,
    requires_service("Chromium", Path(CHROMIUM).exists(), f"no {CHROMIUM}"),
    requires_service("curl", shutil.which("curl") is not None),
]

STACK = StackSpec(workers=(WorkerSpec((MODEL,)),))

# Two users who are not staff, in one team (an owner and a member), another team they must not
# see, and a price for the demo model, so that spend shows money.
SETUP = f"""
from decimal import Decimal
from django.contrib.auth.models import User
from keys.models import APIKey, Membership, Price, Team
team = Team.objects.create(name={TEAM!r}, allowed_models=[{MODEL!r}], requests_per_minute=600,
                           money_budget=Decimal("20"))
other = Team.objects.create(name="hidden-team")
APIKey.objects.create_key("hidden-key", team=other)
APIKey.objects.create_key("nightly-batch", team=team, allowed_models=[{MODEL!r}])
for name, role in (("olivia", "owner"), ("mark", "member")):
    Membership.objects.create(team=team, user=User.objects.create_user(name, password={PASSWORD!r}), role=role)
Price.objects.create(model={MODEL!r}, input_per_million=Decimal("3"), output_per_million=Decimal("15"))
"""


@pytest.fixture(scope="module")
def gateway(gateway_stack) -> Gateway:
    server = gateway_stack.gateway
    server.manage("shell", "-c", SETUP)
    return server


@pytest.fixture
def context(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 800})
    context.route("**/static/**", serve_static)
    yield context
    context.close()


def log_in(page, gateway: Gateway, username: str, screenshot: str | None = None) -> None:
    page.goto(f"{gateway.url}/console/")
    page.wait_for_selector("#login-form")  # anonymous: sent to the login page
    assert "/console/login/" in page.url
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    if screenshot:
        shoot(page, screenshot, height=600)
    page.click("input[type=submit]")
    page.wait_for_selector("table#teams")
    assert page.url.endswith("/console/")


def open_team(page) -> None:
    page.click(f"#teams a:text('{TEAM}')")
    page.wait_for_selector("table#keys")


def test_an_owner_creates_uses_and_revokes_a_key(gateway, context):
    page = context.new_page()
    log_in(page, gateway, "olivia", screenshot="console-login.png")
    teams = page.inner_text("#teams")
    assert TEAM in teams and "hidden-team" not in teams
    assert "owner" in teams.lower()
    open_team(page)
    assert "hidden-key" not in page.content()

    page.click("#new-key")
    page.fill("#id_name", "notebook")
    page.fill("#id_allowed_models", "gpt-4")  # not among the team's models: refused
    page.click("input[name=create]")
    page.wait_for_selector(".errorlist")
    assert "Not among the team's models" in page.inner_text("#key-form")
    page.fill("#id_allowed_models", MODEL)
    page.fill("#id_requests_per_minute", "120")
    page.click("input[name=create]")
    page.wait_for_selector("input.plaintext-key")
    plaintext = page.input_value("input.plaintext-key")
    assert PLAINTEXT.match(plaintext), plaintext
    shoot(page, "console-key-created.png", height=500)

    page.click("#done")
    page.wait_for_selector("#key-form")
    assert plaintext not in page.content()

    status, headers, body = curl_chat(gateway, plaintext)
    assert status == 200, body
    request_id = headers["x-request-id"]
    assert request_id

    # The charts count the request once the usage writer has flushed it (every 0.5 s).
    def charted() -> bool:
        page.goto(f"{gateway.url}/console/")
        open_team(page)
        return "notebook" in page.inner_text(".charts")

    assert wait_until(charted, timeout=10, interval=0.3), "the request never reached the team's charts"
    assert page.locator("svg[aria-label='Requests per day'] rect").count() >= 1
    assert plaintext not in page.content()
    assert re.search(r"USD|unpriced", page.inner_text("#team-spend"))
    shoot(page, "console-team.png", height=1100)

    row = page.locator("#keys tr", has_text="notebook")
    row.locator("button.revoke").click()
    page.wait_for_selector("ul.messagelist li.success")
    revoked_at = time.monotonic()
    assert "Revoked notebook" in page.inner_text("ul.messagelist")
    assert "revoked" in page.locator("#keys tr", has_text="notebook").inner_text()
    shoot(page, "console-revoked.png")

    assert wait_until(lambda: curl_chat(gateway, plaintext)[0] == 401, timeout=3, interval=0.1)
    assert time.monotonic() - revoked_at < 2


def test_a_member_reads_the_team_and_manages_only_their_own_keys(gateway, context):
    page = context.new_page()
    log_in(page, gateway, "mark")
    teams = page.inner_text("#teams")
    assert TEAM in teams and "hidden-team" not in teams
    open_team(page)
    assert "nightly-batch" in page.inner_text("#keys")
    assert "hidden-key" not in page.content()
    assert page.locator("#keys tr", has_text="nightly-batch").locator("button").count() == 0
    page.wait_for_selector("svg[aria-label='Requests per day']", state="attached")

    page.click("#new-key")
    page.fill("#id_name", "mark-laptop")
    page.click("input[name=create]")
    page.wait_for_selector("input.plaintext-key")
    plaintext = page.input_value("input.plaintext-key")
    assert PLAINTEXT.match(plaintext), plaintext
    status, _, body = curl_chat(gateway, plaintext)
    assert status == 200, body

    page.goto(f"{gateway.url}/console/")
    open_team(page)
    assert plaintext not in page.content()
    shoot(page, "console-member.png", height=1000)
    page.locator("#keys tr", has_text="mark-laptop").locator("button.revoke").click()
    page.wait_for_selector("ul.messagelist li.success")
    assert "Revoked mark-laptop" in page.inner_text("ul.messagelist")
    assert wait_until(lambda: curl_chat(gateway, plaintext)[0] == 401, timeout=3, interval=0.1)

    page.click("#keys a:text('nightly-batch')")
    page.wait_for_selector(".limits")
    assert page.locator("#key-form").count() == 0
