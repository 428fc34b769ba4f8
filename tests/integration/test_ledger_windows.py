"""Windows in the ledger scripts: roll-over, rolling windows, key expiry; Lua checked against windows.py."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from gateway.ledger.ledger import BudgetRefused, BudgetSpec, HoldRequest, Ledger, ScopeRef
from gateway.policy import windows

ALICE = ScopeRef("principal", "alice")


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


@pytest.fixture
def ledger(store_client, key_prefix, clock) -> Ledger:
    return Ledger(store_client, key_prefix=key_prefix, clock=clock)


async def use(ledger: Ledger, rid: str, budget: BudgetSpec, amount: float) -> None:
    res = await ledger.reserve(rid, [HoldRequest(ALICE, (budget,), {budget.metric: amount})], 600)
    await ledger.settle(res, {budget.metric: amount})


async def test_lua_windows_match_python(ledger: Ledger, clock) -> None:
    budgets = [BudgetSpec(f"b-{w}", "output_tokens", w, False, 10) for w in windows.WINDOWS]
    rng = random.Random(3)
    samples = [ts(2024, 2, 29, 23, 59, 59), ts(2025, 12, 31, 23, 59, 59) + 0.999, ts(2026, 1, 5),
               ts(2100, 3, 1)]
    samples += [rng.uniform(0, 4_102_444_800) for _ in range(40)]
    for t in samples:
        clock.t = t
        states = await ledger.state(ALICE, budgets)
        assert [s.budget.window for s in states] == list(windows.WINDOWS)
        for state in states:
            assert state.reset_at == windows.fixed_window(state.budget.window, t)[1], (state.budget.window, t)


async def test_fixed_minute_rolls_over(ledger: Ledger, clock) -> None:
    budget = BudgetSpec("req-1m", "requests", "1m", False, 2)
    clock.t = ts(2026, 1, 1, 12, 0, 10)
    await use(ledger, "a", budget, 1)
    await use(ledger, "b", budget, 1)
    with pytest.raises(BudgetRefused) as err:
        await ledger.reserve("c", [HoldRequest(ALICE, (budget,), {})], 60)
    assert err.value.refusal.reset_at == ts(2026, 1, 1, 12, 1)
    assert err.value.refusal.retry_after == 50
    clock.t = ts(2026, 1, 1, 12, 1)
    res = await ledger.reserve("c", [HoldRequest(ALICE, (budget,), {})], 60)
    assert res.states[0].used == 0 and res.states[0].reset_at == ts(2026, 1, 1, 12, 2)


async def test_calendar_month_rolls_over_at_midnight_utc(ledger: Ledger, clock) -> None:
    budget = BudgetSpec("tok-month", "output_tokens", "month", False, 100)
    clock.t = ts(2026, 1, 31, 23, 59, 59)
    await use(ledger, "a", budget, 100)
    with pytest.raises(BudgetRefused) as err:
        await use(ledger, "b", budget, 1)
    assert err.value.refusal.retry_after == 1
    clock.advance(1)
    [state] = await ledger.state(ALICE, [budget])
    assert state.used == 0 and state.reset_at == ts(2026, 3, 1)


async def test_hold_across_a_window_boundary_settles_into_the_new_window(ledger: Ledger, clock) -> None:
    budget = BudgetSpec("tok-1h", "output_tokens", "1h", False, 100)
    clock.t = ts(2026, 1, 1, 12, 59, 50)
    res = await ledger.reserve("a", [HoldRequest(ALICE, (budget,), {"output_tokens": 80})], 600)
    clock.t = ts(2026, 1, 1, 13, 0, 5)
    with pytest.raises(BudgetRefused):  # the pending hold still counts in the new window
        await ledger.reserve("b", [HoldRequest(ALICE, (budget,), {"output_tokens": 30})], 600)
    out = await ledger.settle(res, {"output_tokens": 60})
    assert out.states[0].used == 60 and out.states[0].held == 0


async def test_rolling_window_forgets_old_usage_gradually(ledger: Ledger, clock) -> None:
    budget = BudgetSpec("tok-1h-rolling", "output_tokens", "1h", True, 100)
    t0 = ts(2026, 1, 1, 12, 0, 0)
    clock.t = t0
    await use(ledger, "a", budget, 60)
    clock.t = t0 + 1800
    await use(ledger, "b", budget, 30)
    clock.t = t0 + 2400
    with pytest.raises(BudgetRefused) as err:
        await ledger.reserve("c", [HoldRequest(ALICE, (budget,), {"output_tokens": 50})], 600)
    # 40 more are needed: the 60 recorded at t0 must leave, at t0 + one window + one slice
    assert err.value.refusal.reset_at == t0 + 3600 + 60
    assert err.value.refusal.used == 90
    clock.t = t0 + 3600  # a full window later the oldest usage still counts (never forgotten early)
    [state] = await ledger.state(ALICE, [budget])
    assert state.used == 90 and state.reset_at == t0 + 3660
    clock.t = t0 + 3660
    [state] = await ledger.state(ALICE, [budget])
    assert state.used == 30 and state.reset_at == t0 + 1800 + 3660
    await ledger.reserve("c", [HoldRequest(ALICE, (budget,), {"output_tokens": 50})], 7200)
    clock.t = t0 + 1800 + 3660
    [state] = await ledger.state(ALICE, [budget])
    assert state.used == 0 and state.held == 50


async def test_rolling_refusal_blocked_by_holds_points_past_current_usage(ledger: Ledger, clock) -> None:
    budget = BudgetSpec("tok-1m-rolling", "output_tokens", "1m", True, 10)
    clock.t = ts(2026, 1, 1, 12, 0, 0)
    await ledger.reserve("a", [HoldRequest(ALICE, (budget,), {"output_tokens": 8})], 600)
    with pytest.raises(BudgetRefused) as err:
        await ledger.reserve("b", [HoldRequest(ALICE, (budget,), {"output_tokens": 5})], 600)
    assert err.value.refusal.retry_after >= 1


async def test_expired_lease_is_charged_to_the_window_of_its_expiry(ledger: Ledger, clock) -> None:
    minute = BudgetSpec("tok-1m", "output_tokens", "1m", False, 100)
    day = BudgetSpec("tok-1d", "output_tokens", "1d", False, 1000)
    clock.t = ts(2026, 1, 1, 12, 0, 0)
    hold = HoldRequest(ALICE, (minute, day), {"output_tokens": 70})
    await ledger.reserve("dead", [hold], lease_seconds=30)
    clock.t = ts(2026, 1, 1, 12, 5, 0)  # reaped long after its minute ended: only the day is charged
    m, d = await ledger.state(ALICE, [minute, day])
    assert (m.used, m.held, d.used, d.held) == (0, 0, 70, 0)


async def test_window_keys_expire_with_their_window(redis7, key_prefix, clock) -> None:
    from gateway.ledger import store as store_mod

    client = await store_mod.connect(redis7.url, timeout=5)
    try:
        ledger = Ledger(client, key_prefix=key_prefix, clock=clock)
        minute = BudgetSpec("m", "requests", "1m", False, 5)
        rolling = BudgetSpec("r", "requests", "1h", True, 5)
        month = BudgetSpec("mo", "requests", "month", False, 5)
        clock.t = ts(2026, 1, 1, 12, 0, 15)
        res = await ledger.reserve("a", [HoldRequest(ALICE, (minute, rolling, month), {})], 30)
        await ledger.settle(res, {})
        base = ledger.key_base(ALICE)
        keys = sorted(str(k) for k in await client.keys(key_prefix + "*"))
        assert all(k.startswith(base + ":") for k in keys)  # one hash tag: one cluster slot
        ttls = {k[len(base) + 1:]: await client.pttl(k) for k in keys}
        assert 44_000 < ttls[f"u:1m:m:{int(ts(2026, 1, 1, 12))}"] <= 45_000
        assert 3_600_000 < ttls["r:1h:r"] <= 3_660_000
        month_left = (ts(2026, 2, 1) - clock.t) * 1000
        assert month_left - 1000 < ttls[f"u:month:mo:{int(ts(2026, 1, 1))}"] <= month_left
        assert all(ttl > 0 for ttl in ttls.values())  # nothing lives forever
    finally:
        await store_mod.close(client)
