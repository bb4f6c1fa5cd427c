"""Budgets that never overshoot (docs/decisions.md#limits): a request reserves its worst case at
admission and settles to what it used when it finishes, at the key's and the team's level, in
the memory store (one process) and in Redis (every process, one Lua script each way)."""
from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest

from keys.exceptions import LimitExceeded
from keys.limit_store_memory import MemoryLimitStore
from keys.limit_store_redis import RedisLimitStore
from keys.limits import SLOT_TTL, Limits, Spent, Worst, over_budget
from tests.test_redis_limits import Clock, run

TEAM = Limits(7, token_budget=100, scope="team", name="acme")
KEY_IN_TEAM = Limits(1, team=TEAM, team_id=7)
MONEY_TEAM = Limits(8, money_budget=Decimal("0.000001000"), currency="USD", scope="team", name="acme")


def test_one_rule_for_every_level():
    # refused when spent, or when the worst case would take it past the budget
    assert over_budget(100, 0, 0, 100) and over_budget(60, 30, 11, 100) and over_budget(0, 0, 101, 100)
    assert not over_budget(60, 30, 10, 100) and not over_budget(99, 0, 0, 100)


def memory(spent: int = 0, nanos: int = 0, clock=None) -> MemoryLimitStore:
    async def loader(limits):
        return Spent(spent, nanos)

    return MemoryLimitStore(clock=clock or (lambda: 1000.0), load_budget_used=loader)


def redis_store(url: str, clock: Clock, prefix: str, spent: int = 0, nanos: int = 0) -> RedisLimitStore:
    async def loader(limits):
        return Spent(spent, nanos)

    return RedisLimitStore(url, clock=clock, load_budget_used=loader, prefix=prefix)


async def admitted(store, limits: Limits, worst: Worst, count: int) -> tuple[list, list[LimitExceeded]]:
    results = await asyncio.gather(*(store.acquire(limits, worst) for _ in range(count)), return_exceptions=True)
    leases = [r for r in results if not isinstance(r, BaseException)]
    refusals = [r for r in results if isinstance(r, LimitExceeded)]
    assert len(leases) + len(refusals) == count, results
    return leases, refusals


def test_memory_reservations_hold_the_budget_and_settle_to_what_was_used():
    store = memory()

    async def scenario():
        leases, refusals = await admitted(store, KEY_IN_TEAM, Worst(30), 5)
        assert len(leases) == 3  # 90 reserved; a fourth would make 120 > 100
        assert {(r.kind, r.scope) for r in refusals} == {("budget", "team")}
        await store.release(leases[0], 10)  # used 10 of its 30: 10 spent + 60 reserved
        more, _ = await admitted(store, KEY_IN_TEAM, Worst(30), 2)
        assert len(more) == 1  # 10 + 60 + 30 = 100: within; the next would pass it
        for lease in leases[1:] + more:
            await store.release(lease, 30)
        assert store.states[("team", 7)].budget_used == 100 and not store.states[("team", 7)].reserved
        with pytest.raises(LimitExceeded) as refused:
            await store.acquire(KEY_IN_TEAM, Worst(0))  # spent: nothing more, not even a free request
        assert refused.value.kind == "budget"

    asyncio.run(scenario())


def test_the_tightest_level_refuses_and_names_itself():
    store = memory()
    key = Limits(1, token_budget=50, team=TEAM, team_id=7)

    async def scenario():
        with pytest.raises(LimitExceeded) as refused:
            await store.acquire(key, Worst(60))  # within the team's 100, not the key's 50
        assert (refused.value.kind, refused.value.scope) == ("budget", "key")
        other = Limits(2, token_budget=1000, team=TEAM, team_id=7)
        with pytest.raises(LimitExceeded) as refused:
            await store.acquire(other, Worst(101))  # within the key's 1000, not the team's 100
        assert (refused.value.kind, refused.value.scope) == ("budget", "team")
        lease = await store.acquire(key, Worst(40))
        assert store.states[("key", 1)].reserved and store.states[("team", 7)].reserved
        await store.release(lease, 5)
        assert store.states[("key", 1)].budget_used == 5 == store.states[("team", 7)].budget_used

    asyncio.run(scenario())


def test_a_money_budget_counts_billionths_and_refuses_unpriced_models():
    store = memory()
    key = Limits(1, team=MONEY_TEAM, team_id=8)  # 1000 billionths

    async def scenario():
        leases, refusals = await admitted(store, key, Worst(10, 300, "USD"), 5)
        assert len(leases) == 3 and {r.kind for r in refusals} == {"money"}
        for lease in leases:
            await store.release(lease, 10, 250)
        assert store.states[("team", 8)].nanos_used == 750
        with pytest.raises(LimitExceeded) as refused:
            await store.acquire(key, Worst(10, None))
        assert refused.value.kind == "unpriced"
        with pytest.raises(LimitExceeded) as refused:
            await store.acquire(key, Worst(10, 1, "EUR"))  # priced, but not in the budget's currency
        assert refused.value.kind == "unpriced"
        await store.acquire(key, Worst())  # a request that cannot cost anything (token_check) passes
        await store.acquire(key, Worst(10, 250, "USD"))  # 750 + 250 = 1000: exactly the budget

    asyncio.run(scenario())


def test_redis_reservations_are_exact_across_processes(redis_url):
    """Two stores (two processes) admit 50 concurrent requests against one team budget of 10
    worst cases: exactly 10 pass, whichever process they went through."""
    clock, prefix = Clock(), f"b{uuid.uuid4().hex[:8]}"
    a, b = redis_store(redis_url, clock, prefix), redis_store(redis_url, clock, prefix)
    team = Limits(3, money_budget=Decimal("0.00000100"), currency="USD", scope="team", name="acme")
    key = Limits(11, team=team, team_id=3)
    worst = Worst(20, 100, "USD")

    async def scenario():
        results = await asyncio.gather(*((a, b)[i % 2].acquire(key, worst) for i in range(50)),
                                       return_exceptions=True)
        leases = [r for r in results if not isinstance(r, BaseException)]
        assert len(leases) == 10, results
        assert all(isinstance(r, LimitExceeded) and (r.kind, r.scope) == ("money", "team")
                   for r in results if isinstance(r, BaseException))
        for lease in leases[:5]:
            await a.release(lease, 20, 60)  # used less than reserved: 300 spent, 500 reserved
        again = await asyncio.gather(*(b.acquire(key, worst) for _ in range(5)), return_exceptions=True)
        assert sum(not isinstance(r, BaseException) for r in again) == 2  # 300 + 500 + 200 = 1000
        client = a.client()
        base = a.level_base(team)
        reserved = await client.hget(f"{base}:reserved", "nanos")
        assert int(reserved) == 700
        for lease in leases[5:] + [r for r in again if not isinstance(r, BaseException)]:
            await b.release(lease, 20, 100)
        assert int(await client.hget(f"{base}:reserved", "nanos")) == 0
        spent = await client.get(next(k for k in a.keys(key) if ":money:" in k and "{t3}:money" in k))
        assert int(spent) == 300 + 700  # exactly the budget, never past it
        await a.client().aclose()
        await b.client().aclose()
        a._clients.clear()
        b._clients.clear()

    asyncio.run(scenario())


def test_redis_gives_back_the_reservations_of_a_dead_process(redis_url):
    clock, prefix = Clock(), f"b{uuid.uuid4().hex[:8]}"
    store = redis_store(redis_url, clock, prefix)
    key = Limits(5, token_budget=100)

    async def scenario():
        await store.acquire(key, Worst(100))  # never released: its process died
        with pytest.raises(LimitExceeded):
            await store.acquire(key, Worst(1))
        clock.now += SLOT_TTL + 1
        await store.acquire(key, Worst(100))

    run(store, scenario())


def test_redis_keys_of_a_team_share_its_hash_slot(redis_url):
    store = redis_store(redis_url, Clock(), "gw")
    assert len(store.keys(KEY_IN_TEAM)) == 7  # a key without limits of its own: its team's level only
    keys = store.keys(Limits(1, requests_per_minute=5, team=TEAM, team_id=7))
    assert len(keys) == 14 and all(k.startswith("gw:{t7}") for k in keys)
    assert keys[0] == "gw:{t7}:k1:requests" and keys[7] == "gw:{t7}:requests"
    assert store.keys(Limits(9, requests_per_minute=1))[0] == "gw:{9}:requests"
