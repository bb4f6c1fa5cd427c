"""Budgets and prices end to end (docs/decisions.md#limits, #prices): two gateway processes
(uvicorn) sharing a PostgreSQL and a Redis, in front of FastChat's controller and a demo worker.

- 50 concurrent streams against a team whose money budget covers 10 of them: the spend stays
  within the budget (usage rows and the Redis counter), every refused request got a 429 naming
  the team budget;
- a key's own money budget binds inside a roomy team, its 429s naming the key budget;
- a price edit leaves the earlier rows' cost unchanged, and an unpriced model's rows have no cost.
"""
from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import httpx
import psycopg
import pytest

from keys.hashing import hash_key
from tests.gateway_process import Gateway, StackSpec, WorkerSpec

pytestmark = pytest.mark.e2e

MODEL, UNPRICED = "demo-chat", "demo-free"
CHAT = "/v1/chat/completions"
MAX_TOKENS = 8
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": MAX_TOKENS, "stream": True}
INPUT, OUTPUT = Decimal("1"), Decimal("1000")  # per million tokens: output dominates, as it usually does
PRICE_CACHE_SECONDS = 1

STACK = StackSpec(
    workers=(WorkerSpec((MODEL, UNPRICED), ("--limit-worker-concurrency", "64")),),
    gateways=2, server="uvicorn", backends=True,
    env={"GATEWAY_PRICE_CACHE_SECONDS": str(PRICE_CACHE_SECONDS)},
)

SETUP = """
from datetime import timedelta
from decimal import Decimal
from django.utils import timezone
from keys.models import APIKey, Price, Team
if not Price.objects.filter(model="{model}").exists():
    Price.objects.create(model="{model}", input_per_million=Decimal("{input}"), output_per_million=Decimal("{output}"),
                         valid_from=timezone.now() - timedelta(days=1))
team, _ = Team.objects.get_or_create(name="{team}", defaults={{"money_budget": {team_budget}}})
key, plaintext = APIKey.objects.create_key("{team}-key", team=team, money_budget={key_budget})
print(plaintext)
"""


@pytest.fixture(scope="module")
def cluster(gateway_stack) -> dict:
    return {"gateways": gateway_stack.gateways, "pg": gateway_stack.backends.pg,
            "redis": gateway_stack.backends.redis, "worker": gateway_stack.worker_urls[0]}


@pytest.fixture(autouse=True)
def slow_worker(cluster):
    """Streams of MAX_TOKENS tokens lasting about a second, so that the 50 overlap."""
    with httpx.Client(base_url=cluster["worker"], timeout=5) as client:
        client.post("/_fake/reset").raise_for_status()
        client.post("/_fake/config", json={"token_delay": 0.1, "reply_words": 100}).raise_for_status()
        yield
        client.post("/_fake/reset").raise_for_status()


def setup_key(gateway: Gateway, team: str, team_budget: Decimal | None, key_budget: Decimal | None) -> str:
    script = SETUP.format(model=MODEL, input=INPUT, output=OUTPUT, team=team, team_budget=repr(team_budget),
                          key_budget=repr(key_budget))
    return gateway.manage("shell", "-c", script).strip().splitlines()[-1]


def query(cluster, sql: str, *params) -> list[tuple]:
    with psycopg.connect(cluster["pg"].url) as connection:
        return connection.execute(sql, params).fetchall()


def rows_of(cluster, plaintext: str, expected: int, timeout: float = 10.0) -> list[tuple]:
    """The key's usage rows (status, prompt, completion, cost, currency), once all are written."""
    deadline = time.monotonic() + timeout
    while True:
        rows = query(cluster, "SELECT r.status, r.prompt_tokens, r.completion_tokens, r.cost, r.currency "
                              "FROM keys_usagerecord r JOIN keys_apikey k ON k.id = r.key_id "
                              "WHERE k.hashed_key = %s ORDER BY r.id", hash_key(plaintext))
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def cost_of(prompt: int, completion: int) -> Decimal:
    return (INPUT * prompt + OUTPUT * completion) / 1_000_000


async def stream(client: httpx.AsyncClient, gateway: Gateway, key: str, body: dict) -> tuple[int, str]:
    """One streamed request read to its end: (status, the error message of a refusal)."""
    async with client.stream("POST", gateway.url + CHAT, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        content = (await r.aread()).decode()
    if r.status_code != 200:
        return r.status_code, json.loads(content)["error"]["message"]
    assert content.rstrip().endswith("data: [DONE]"), content[-200:]
    return 200, ""


def burst(gateways: list[Gateway], key: str, count: int, body: dict = BODY) -> list[tuple[int, str]]:
    async def run():
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(stream(client, gateways[i % len(gateways)], key, body) for i in range(count)))

    return asyncio.run(run())


def one_stream_cost(cluster) -> Decimal:
    """What one of these streams costs, measured with a key without budgets."""
    gateway = cluster["gateways"][0]
    plaintext = setup_key(gateway, "calibration", None, None)
    assert burst([gateway], plaintext, 1) == [(200, "")]
    (status, prompt, completion, cost, currency), = rows_of(cluster, plaintext, 1)
    assert (status, currency) == (200, "USD") and 0 < completion <= MAX_TOKENS
    assert cost == cost_of(prompt, completion)
    return cost


def redis_spent(cluster, team: str) -> int:
    team_id = query(cluster, "SELECT id FROM keys_team WHERE name = %s", team)[0][0]
    client = cluster["redis"].client()
    try:
        keys = client.keys(f"gw:{{t{team_id}}}:money:*")
        return sum(int(client.get(k)) for k in keys)
    finally:
        client.close()


def test_fifty_streams_never_overshoot_a_team_budget_that_covers_ten(cluster):
    a, b = cluster["gateways"]
    budget = one_stream_cost(cluster) * 10
    plaintext = setup_key(a, "acme", budget, None)
    results = burst([a, b], plaintext, 50)
    statuses = [status for status, _ in results]
    refused = [message for status, message in results if status != 200]
    assert all(status in (200, 429) for status in statuses), results
    assert all("Team budget" in message and "acme" in message for message in refused), refused
    admitted = statuses.count(200)
    rows = rows_of(cluster, plaintext, 50)
    spend = sum(cost for status, _, _, cost, _ in rows if status == 200)
    print(f"team budget {budget} USD: {admitted} of 50 streams admitted, spend {spend} USD "
          f"({len(refused)} refused with 429 naming the team budget)")
    assert spend <= budget
    assert redis_spent(cluster, "acme") <= int(budget * 1_000_000_000)
    # Reservations are the worst case (the prompt bounded by the body's bytes): close to the 10
    # the budget covers, never more.
    assert 5 <= admitted <= 10, results
    assert sum(completion for status, _, completion, _, _ in rows if status == 429) == 0


def test_a_key_budget_binds_inside_a_roomy_team(cluster):
    a, b = cluster["gateways"]
    per_stream = cost_of(200, MAX_TOKENS)
    key_budget = per_stream * 3
    plaintext = setup_key(a, "roomy", Decimal("1000"), key_budget)
    results = burst([a, b], plaintext, 20)
    refused = [message for status, message in results if status != 200]
    assert refused and all("Key budget" in message for message in refused), results
    rows = rows_of(cluster, plaintext, 20)
    spend = sum(cost for status, _, _, cost, _ in rows if status == 200)
    assert 0 < spend <= key_budget


def test_a_price_edit_keeps_earlier_costs_and_unpriced_rows_have_none(cluster):
    a, b = cluster["gateways"]
    plaintext = setup_key(a, "pricing", None, None)
    assert burst([a], plaintext, 1) == [(200, "")]
    (_, prompt, completion, before, _), = rows_of(cluster, plaintext, 1)
    assert before == cost_of(prompt, completion)
    a.manage("shell", "-c", f"from keys.models import Price; Price.objects.filter(model='{MODEL}')"
                            ".update(output_per_million=5000)")
    time.sleep(PRICE_CACHE_SECONDS + 1.5)  # every process rereads its prices
    assert burst([b], plaintext, 1) == [(200, "")]
    assert burst([a], plaintext, 1, {**BODY, "model": UNPRICED}) == [(200, "")]
    rows = rows_of(cluster, plaintext, 3)
    assert rows[0][3] == before  # the earlier row keeps its cost
    assert rows[1][3] == (INPUT * rows[1][1] + 5000 * rows[1][2]) / 1_000_000
    assert (rows[2][3], rows[2][4]) == (None, "")  # no price: no cost, never 0
    rollup = query(cluster, "SELECT d.currency, d.cost, d.requests FROM keys_usagedaily d JOIN keys_apikey k "
                            "ON k.id = d.key_id WHERE k.hashed_key = %s AND d.model = %s", hash_key(plaintext), UNPRICED)
    assert rollup == [("", None, 1)]
