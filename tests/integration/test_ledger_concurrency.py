"""Concurrent reserves and settles never push a strict budget past its limit (7.x, 6.2, cluster; both clients)."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.ledger import store as store_mod
from gateway.ledger.ledger import BudgetRefused, BudgetSpec, HoldRequest, Ledger, ScopeRef

ALICE = ScopeRef("principal", "alice")
ACME = ScopeRef("org", "acme")


@pytest.fixture
async def wide_store(store_target):
    # 500 requests in flight at once need that many connections (redis-py; the pipelined client has one)
    client = await store_target.connect(timeout=10.0, max_connections=600)
    yield client
    await store_mod.close(client)


async def test_500_concurrent_reserves_admit_exactly_the_limit(wide_store, key_prefix) -> None:
    ledger = Ledger(wide_store, key_prefix=key_prefix)
    budget = BudgetSpec("req-1d", "requests", "1d", False, 37)
    tokens = BudgetSpec("out-1d", "output_tokens", "1d", False, 37 * 100)
    hold = HoldRequest(ALICE, (budget, tokens), {"output_tokens": 100})

    async def attempt(i: int):
        try:
            return await ledger.reserve(f"r{i}", [hold], 60)
        except BudgetRefused:
            return None

    results = await asyncio.gather(*(attempt(i) for i in range(500)))
    admitted = [r for r in results if r is not None]
    assert len(admitted) == 37
    [req, tok] = await ledger.state(ALICE, [budget, tokens])
    assert (req.held, tok.held, req.used) == (37, 3700, 0)

    rng = random.Random(7)
    settled = await asyncio.gather(*(ledger.settle(r, {"output_tokens": rng.randint(0, 100)})
                                     for r in admitted))
    assert all(s.applied and not s.overruns for s in settled)
    [req, tok] = await ledger.state(ALICE, [budget, tokens])
    assert req.used == 37 and req.held == 0 and tok.held == 0 and tok.used <= tokens.limit


async def test_mixed_workload_keeps_used_plus_held_under_limit(wide_store, key_prefix) -> None:
    """Many clients reserve, settle below their hold, or release, on two scopes at once."""
    ledger = Ledger(wide_store, key_prefix=key_prefix)
    mine = BudgetSpec("out", "output_tokens", "1d", False, 5000)
    org = BudgetSpec("org-out", "output_tokens", "1d", False, 8000)
    rng = random.Random(11)
    peak = 0.0

    async def client(c: int) -> None:
        nonlocal peak
        for i in range(15):
            amount = rng.randint(50, 400)
            holds = [HoldRequest(ALICE, (mine,), {"output_tokens": amount}),
                     HoldRequest(ACME, (org,), {"output_tokens": amount})]
            try:
                res = await ledger.reserve(f"c{c}-{i}", holds, 60)
            except BudgetRefused:
                continue
            s = res.states[0]
            peak = max(peak, s.used + s.held)
            if rng.random() < 0.2:
                await ledger.release(res)
            else:
                await ledger.settle(res, {"output_tokens": rng.randint(0, amount)})

    await asyncio.gather(*(client(c) for c in range(40)))
    [s] = await ledger.state(ALICE, [mine])
    [o] = await ledger.state(ACME, [org])
    assert s.held == 0 and o.held == 0
    assert peak <= mine.limit and s.used <= mine.limit and o.used <= org.limit
    assert s.used == o.used  # every request charged both scopes alike
    assert await ledger.holds_outstanding() == 0
