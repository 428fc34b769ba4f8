"""The ledger's semantics against real Redis: 7.x, 6.2 and a 7.x cluster (the ``store_client`` fixture), as
contract tests over both clients the gateway uses: redis-py and, for plain ``redis://``, the pipelined
client of gateway.ledger.resp (ids ``redispy-*`` and ``resp-*``).

Time is injected (``clock``) so lease expiry is tested without sleeping.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.ledger import store as store_mod
from gateway.ledger.ledger import (
    BudgetRefused,
    BudgetSpec,
    DuplicateRequest,
    HoldRequest,
    Ledger,
    Reservation,
    ScopeRef,
)

ALICE = ScopeRef("principal", "alice")
ACME = ScopeRef("org", "acme")
EVERYONE = ScopeRef("global", "*")

REQ = BudgetSpec("req-1h", "requests", "1h", False, 10)
TOK = BudgetSpec("out-1d", "output_tokens", "1d", False, 1000)
FLOPS = BudgetSpec("flops-month", "flops", "month", False, 1e16)


def hold(scope: ScopeRef = ALICE, *budgets: BudgetSpec, **amounts: float) -> HoldRequest:
    return HoldRequest(scope, budgets or (REQ, TOK), amounts or {"output_tokens": 100})


@pytest.fixture
def ledger(store_client, key_prefix, clock) -> Ledger:
    return Ledger(store_client, key_prefix=key_prefix, clock=clock)


def by_label(states) -> dict:
    return {s.budget.label: s for s in states}


async def test_reserve_holds_and_settle_posts_actual(ledger: Ledger) -> None:
    res = await ledger.reserve("r1", [hold(output_tokens=300)], lease_seconds=60)
    s = by_label(res.states)
    assert (s["req-1h"].used, s["req-1h"].held, s["req-1h"].remaining) == (0, 1, 9)
    assert (s["out-1d"].used, s["out-1d"].held, s["out-1d"].remaining) == (0, 300, 700)
    tightest = res.tightest()
    assert tightest is not None and tightest.budget.label == "out-1d"

    result = await ledger.settle(res, {"output_tokens": 120})
    assert result.applied and not result.repeat and result.outcomes == ((ALICE, "applied"),)
    s = by_label(result.states)
    assert (s["req-1h"].used, s["req-1h"].held) == (1, 0)
    assert (s["out-1d"].used, s["out-1d"].held, s["out-1d"].remaining) == (120, 0, 880)
    assert result.overruns == () and result.beyond_hold == ()


async def test_refusal_names_budget_remaining_and_reset(ledger: Ledger, clock) -> None:
    await ledger.reserve("r1", [hold(output_tokens=800)], 60)
    with pytest.raises(BudgetRefused) as err:
        await ledger.reserve("r2", [hold(output_tokens=300)], 60)
    r = err.value.refusal
    assert (r.scope, r.label, r.metric, r.limit) == (ALICE, "out-1d", "output_tokens", 1000)
    assert (r.used, r.held, r.requested, r.remaining) == (0, 800, 300, 200)
    assert r.reset_at == 1_767_312_000  # next UTC midnight
    assert r.retry_after == math.ceil(1_767_312_000 - clock()) and r.retry_after >= 1
    # nothing was held by the refused request: a fitting one still passes
    await ledger.reserve("r3", [hold(output_tokens=200)], 60)


async def test_zero_limit_refuses_any_positive_amount_and_zero_amount_passes(ledger: Ledger) -> None:
    zero = BudgetSpec("reasoning", "reasoning_tokens", "1d", False, 0)
    with pytest.raises(BudgetRefused):
        await ledger.reserve("r1", [hold(ALICE, zero, reasoning_tokens=1)], 60)
    res = await ledger.reserve("r2", [hold(ALICE, zero, reasoning_tokens=0)], 60)
    assert res.states[0].held == 0 and res.states[0].remaining == 0


async def test_requests_metric_holds_one_and_settles_one(ledger: Ledger) -> None:
    res = await ledger.reserve("r1", [HoldRequest(ALICE, (REQ,), {})], 60)
    assert res.states[0].held == 1
    out = await ledger.settle(res, {})
    assert out.states[0].used == 1 and out.states[0].held == 0


async def test_missing_or_bad_amounts_are_rejected(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="output_tokens"):
        await ledger.reserve("r1", [HoldRequest(ALICE, (TOK,), {})], 60)
    with pytest.raises(ValueError):
        await ledger.reserve("r1", [hold(output_tokens=float("nan"))], 60)
    with pytest.raises(ValueError):
        await ledger.reserve("r1", [hold(output_tokens=-1)], 60)
    with pytest.raises(ValueError):
        await ledger.reserve("r1", [hold()], 0)


async def test_settle_is_idempotent(ledger: Ledger) -> None:
    res = await ledger.reserve("r1", [hold(output_tokens=300)], 60)
    results = await asyncio.gather(*(ledger.settle(res, {"output_tokens": 250}) for _ in range(5)))
    assert sum(r.applied for r in results) == 1
    assert sum(r.repeat for r in results) == 4
    later = await ledger.settle(res, {"output_tokens": 999})
    assert later.repeat
    s = by_label(later.states)
    assert (s["out-1d"].used, s["req-1h"].used) == (250, 1)


async def test_settle_without_report_posts_the_same_and_reads_nothing_back(ledger: Ledger) -> None:
    res = await ledger.reserve("r1", [hold(output_tokens=300)], 60)
    result = await ledger.settle(res, {"output_tokens": 250}, report=False)
    assert result.applied and result.states == () and result.outcomes == ((ALICE, "applied"),)
    assert (await ledger.settle(res, {"output_tokens": 250}, report=False)).repeat
    state = by_label(await ledger.state(ALICE, [REQ, TOK]))
    assert (state["out-1d"].used, state["out-1d"].held, state["req-1h"].used) == (250, 0, 1)


async def test_retried_reserve_does_not_hold_twice(ledger: Ledger) -> None:
    await ledger.reserve("r1", [hold(output_tokens=300)], 60)
    again = await ledger.reserve("r1", [hold(output_tokens=300)], 60)
    assert by_label(again.states)["out-1d"].held == 300


async def test_release_voids_and_finishes_the_request(ledger: Ledger) -> None:
    res = await ledger.reserve("r1", [hold(output_tokens=300)], 60)
    await ledger.release(res)
    await ledger.release(res)  # idempotent
    state = by_label(await ledger.state(ALICE, [REQ, TOK]))
    assert (state["out-1d"].used, state["out-1d"].held, state["req-1h"].used) == (0, 0, 0)
    # a settle after a release changes nothing
    assert (await ledger.settle(res, {"output_tokens": 10})).repeat
    with pytest.raises(DuplicateRequest):
        await ledger.reserve("r1", [hold()], 60)


async def test_settle_without_reservation_posts_usage(ledger: Ledger) -> None:
    # e.g. usage metered while Redis was down, replayed from a spool
    replay = Reservation("spooled-1", (hold(),))
    out = await ledger.settle(replay, {"output_tokens": 40})
    assert out.outcomes == ((ALICE, "posted"),) and out.applied
    assert (await ledger.settle(replay, {"output_tokens": 40})).repeat
    assert by_label(out.states)["out-1d"].used == 40


async def test_overshoot_is_recorded_never_hidden(ledger: Ledger) -> None:
    # admission "expected": hold less than the bound, the actual comes in larger
    res = await ledger.reserve("r1", [hold(output_tokens=900)], 60)
    out = await ledger.settle(res, {"output_tokens": 1300})
    assert [s.budget.label for s in out.overruns] == ["out-1d"]
    assert out.overruns[0].used == 1300 and out.overruns[0].remaining == 0
    assert out.beyond_hold == ((ALICE, "out-1d", 400.0),)
    with pytest.raises(BudgetRefused):
        await ledger.reserve("r2", [hold(output_tokens=1)], 60)
    # an amount of 0 is still admitted on an exhausted budget
    await ledger.reserve("r3", [hold(output_tokens=0)], 60)


async def test_float_amounts_keep_precision(ledger: Ledger) -> None:
    amount = 1_234_567_890_123_457.0  # 16 digits: more than Lua's default 14
    for i in range(5):
        res = await ledger.reserve(f"r{i}", [hold(ALICE, FLOPS, flops=amount)], 60)
        await ledger.settle(res, {"flops": amount})
    [state] = await ledger.state(ALICE, [FLOPS])
    assert state.used == 5 * amount and state.held == 0
    fraction = BudgetSpec("k", "k_units", "1d", False, 10)
    res = await ledger.reserve("k1", [hold(ALICE, fraction, k_units=0.1)], 60)
    out = await ledger.settle(res, {"k_units": 2.5})
    assert out.states[0].used == 2.5 and out.states[0].held == 0


@pytest.mark.parametrize("amount", [999_999_999_999_999.0, 1e15, 2.0**53, 3e20, 1e-9, 0.1, 123_456.5, 7.0])
async def test_numbers_survive_the_scripts_exactly(ledger: Ledger, amount: float) -> None:
    """The scripts print whole numbers below 1e15 with '%d' and the rest with '%.17g': either way, what
    is held and posted reads back as the same float."""
    spec = BudgetSpec("f", "flops", "1d", False, 1e30)
    res = await ledger.reserve("r1", [hold(ALICE, spec, flops=amount)], 60)
    assert res.states[0].held == amount and res.states[0].used == 0
    out = await ledger.settle(res, {"flops": amount})
    assert out.states[0].used == amount and out.states[0].held == 0
    res = await ledger.reserve("r2", [hold(ALICE, spec, flops=amount)], 60)
    assert res.states[0].used == amount and res.states[0].held == amount


async def test_lease_expiry_charges_and_late_settle_corrects(ledger: Ledger, clock) -> None:
    res = await ledger.reserve("r1", [hold(output_tokens=300)], lease_seconds=30)
    clock.advance(31)
    # the next script touching the scope reaps the lease: the hold is charged
    s = by_label(await ledger.state(ALICE, [REQ, TOK]))
    assert (s["out-1d"].used, s["out-1d"].held, s["req-1h"].used) == (300, 0, 1)
    out = await ledger.settle(res, {"output_tokens": 120})
    assert out.outcomes == ((ALICE, "applied"),)
    s = by_label(out.states)
    assert (s["out-1d"].used, s["out-1d"].held, s["req-1h"].used) == (120, 0, 1)
    assert (await ledger.settle(res, {"output_tokens": 120})).repeat


async def test_late_settle_larger_than_charge(ledger: Ledger, clock) -> None:
    res = await ledger.reserve("r1", [hold(output_tokens=300)], lease_seconds=30)
    clock.advance(60)
    await ledger.reserve("other", [hold(output_tokens=10)], 60)  # any reserve reaps too
    out = await ledger.settle(res, {"output_tokens": 500})
    assert by_label(out.states)["out-1d"].used == 500
    assert by_label(out.states)["out-1d"].held == 10


async def test_release_after_expiry_takes_the_charge_back(ledger: Ledger, clock) -> None:
    res = await ledger.reserve("r1", [hold(output_tokens=300)], lease_seconds=30)
    clock.advance(31)
    await ledger.release(res)
    s = by_label(await ledger.state(ALICE, [REQ, TOK]))
    assert (s["out-1d"].used, s["req-1h"].used, s["out-1d"].held) == (0, 0, 0)


async def test_lease_expiry_release_mode(store_client, key_prefix, clock) -> None:
    ledger = Ledger(store_client, key_prefix=key_prefix, clock=clock, lease_expiry="release")
    res = await ledger.reserve("r1", [hold(output_tokens=300)], lease_seconds=30)
    assert await ledger.holds_outstanding() == 1
    clock.advance(31)
    s = by_label(await ledger.state(ALICE, [REQ, TOK]))
    assert (s["out-1d"].used, s["out-1d"].held, s["req-1h"].used) == (0, 0, 0)
    assert await ledger.holds_outstanding() == 0
    out = await ledger.settle(res, {"output_tokens": 120})  # the late settle still posts the actual
    assert out.outcomes == ((ALICE, "applied"),)
    assert by_label(out.states)["out-1d"].used == 120


async def test_expired_lease_frees_room_for_others(ledger: Ledger, clock) -> None:
    await ledger.reserve("dead-replica", [hold(output_tokens=900)], lease_seconds=10)
    with pytest.raises(BudgetRefused):
        await ledger.reserve("r2", [hold(output_tokens=200)], 60)
    clock.advance(11)  # charged 900: still no room for 200...
    with pytest.raises(BudgetRefused):
        await ledger.reserve("r3", [hold(output_tokens=200)], 60)
    await ledger.reserve("r4", [hold(output_tokens=100)], 60)  # ...but the 100 left is usable again


async def test_finished_ids_are_forgotten_after_record_ttl(store_target, store_client, key_prefix, clock) -> None:
    ledger = Ledger(store_client, key_prefix=key_prefix, clock=clock, record_ttl=60)
    res = await ledger.reserve("r1", [hold()], 30)
    await ledger.settle(res, {"output_tokens": 1})
    raw = await store_mod.connect(store_target.url, timeout=5)  # the ledger's store runs scripts only
    try:
        assert await raw.hget(ledger.key_base(ALICE) + ":rec", "r1") == "S"
        clock.advance(61)
        await ledger.state(ALICE, [TOK])  # reaps
        assert await raw.hget(ledger.key_base(ALICE) + ":rec", "r1") is None
    finally:
        await store_mod.close(raw)


async def test_multi_scope_refusal_rolls_back_earlier_holds(ledger: Ledger) -> None:
    org_tok = BudgetSpec("org-out", "output_tokens", "1d", False, 5000)
    global_tok = BudgetSpec("global-out", "output_tokens", "1d", False, 250)
    holds = [hold(ALICE, REQ, TOK, output_tokens=300), hold(ACME, org_tok, output_tokens=300),
             hold(EVERYONE, global_tok, output_tokens=300)]
    with pytest.raises(BudgetRefused) as err:
        await ledger.reserve("r1", holds, 60)
    assert err.value.refusal.scope == EVERYONE and err.value.refusal.label == "global-out"
    for scope, budgets in ((ALICE, [REQ, TOK]), (ACME, [org_tok]), (EVERYONE, [global_tok])):
        assert all(s.held == 0 and s.used == 0 for s in await ledger.state(scope, budgets))
    assert await ledger.holds_outstanding() == 0

    ok = await ledger.reserve("r2", [*holds[:2], hold(EVERYONE, global_tok, output_tokens=200)], 60)
    assert [s.scope for s in ok.states] == [ALICE, ALICE, ACME, EVERYONE]
    # read straight from the replies, the tightest budget is the one the states say it is
    assert ok.tightest() == min(ok.states, key=lambda s: s.remaining / s.limit)
    assert ok.tightest() is not None and ok.tightest().scope == EVERYONE  # type: ignore[union-attr]
    assert Reservation("r9", tuple(holds)).tightest() is None and Reservation("r9", tuple(holds)).states == ()
    assert await ledger.holds_outstanding() == 3
    out = await ledger.settle(ok, {"output_tokens": 50})
    assert [o for _, o in out.outcomes] == ["applied"] * 3
    assert [s.used for s in out.states] == [1, 50, 50, 50]


async def test_settle_after_a_refusal_posts_on_every_scope(ledger: Ledger) -> None:
    """Shadow mode serves a refused request anyway; its usage must land on all scopes."""
    org_tok = BudgetSpec("org-out", "output_tokens", "1d", False, 100)
    holds = [hold(ALICE, TOK, output_tokens=300), hold(ACME, org_tok, output_tokens=300)]
    with pytest.raises(BudgetRefused):
        await ledger.reserve("r1", holds, 60)
    out = await ledger.settle(Reservation("r1", tuple(holds)), {"output_tokens": 250})
    assert [o for _, o in out.outcomes] == ["posted", "posted"]
    assert [s.used for s in out.states] == [250, 250]
    assert [s.budget.label for s in out.overruns] == ["org-out"]
    # the id is single-use from now on
    with pytest.raises(DuplicateRequest):
        await ledger.reserve("r1", holds[:1], 60)


async def test_scopes_without_budgets_are_skipped(ledger: Ledger) -> None:
    res = await ledger.reserve("r1", [HoldRequest(ACME, (), {}), hold()], 60)
    assert [h.scope for h in res.holds] == [ALICE]


async def test_cancelled_reserve_leaves_no_hold(ledger: Ledger) -> None:
    task = asyncio.create_task(ledger.reserve("r1", [hold(output_tokens=500)], 60))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    state = by_label(await ledger.state(ALICE, [REQ, TOK]))
    assert state["out-1d"].held == 0


async def test_redis_time_is_the_default_clock(store_client, key_prefix) -> None:
    import time

    ledger = Ledger(store_client, key_prefix=key_prefix)
    res = await ledger.reserve("r1", [hold()], 60)
    assert abs(res.expires_at - 60 - time.time()) < 5
    await ledger.settle(res, {"output_tokens": 1})


def test_budget_spec_validation() -> None:
    with pytest.raises(ValueError):
        BudgetSpec("x", "requests", "2h", False, 1)
    with pytest.raises(ValueError):
        BudgetSpec("x", "requests", "month", True, 1)
    with pytest.raises(ValueError):
        BudgetSpec("x", "tokens", "1h", False, 1)
    with pytest.raises(ValueError):
        BudgetSpec("x", "requests", "1h", False, -1)
    with pytest.raises(ValueError):
        ScopeRef("team", "x")
    with pytest.raises(ValueError):
        Ledger(object(), key_prefix="a{b}")


def test_budget_spec_from_config() -> None:
    from gateway.policy.config import BudgetConfig

    cfg = BudgetConfig(metric="flops", window="7d", limit=1e18, rolling=True)
    spec = BudgetSpec.from_config(cfg, limit=5e17)
    assert (spec.label, spec.metric, spec.window, spec.rolling, spec.limit) == (
        "principal:flops:7d:rolling", "flops", "7d", True, 5e17)


async def test_labels_may_hold_any_character(ledger: Ledger) -> None:
    odd = BudgetSpec("team budget {x}: tokens\nper day", "output_tokens", "1d", True, 100)
    res = await ledger.reserve("r1", [hold(ALICE, odd, output_tokens=60)], 60)
    out = await ledger.settle(res, {"output_tokens": 50})
    assert out.states[0].budget.label == odd.label and out.states[0].used == 50


@pytest.mark.parametrize("server", ["redis7", "redis62"])
async def test_many_pairs_through_the_pipelined_client(server: str, request, key_prefix, clock) -> None:
    """The gateway's hot path (gateway.ledger.resp) back to back: on Redis 6.2 built with libc malloc this once
    corrupted Redis' Lua argument cache (INCRBYFLOAT in scripts) and failed within a few calls."""
    from gateway.ledger.resp import RespClient

    client = RespClient.from_url(request.getfixturevalue(server).url, timeout=5.0)
    try:
        ledger = Ledger(client, key_prefix=key_prefix, clock=clock)
        await ledger.prepare()
        budgets = (BudgetSpec("req", "requests", "1m", False, 1e9),
                   BudgetSpec("out", "output_tokens", "1d", True, 1e12), FLOPS)
        for i in range(300):
            res = await ledger.reserve(f"r{i}", [HoldRequest(ALICE, budgets, {"output_tokens": 9,
                                                                                "flops": 1e9})], 60)
            await ledger.settle(res, {"output_tokens": 7, "flops": 1e9})
        states = await ledger.state(ALICE, budgets)
        assert [s.used for s in states] == [300, 2100, 3e11]
        await ledger.reserve("open", [HoldRequest(ALICE, budgets, {"output_tokens": 1, "flops": 1})], 60)
        assert await ledger.holds_outstanding() == 1
    finally:
        await client.aclose()


async def test_the_case_runs_on_the_client_it_names(store_target, store_client, key_prefix, clock) -> None:
    """``resp-*`` cases reach Redis through the pipelined client (scripts queued at once), ``redispy-*`` not."""
    ledger = Ledger(store_client, key_prefix=key_prefix, clock=clock)
    await ledger.state(ALICE, [REQ])  # connects
    assert ledger.pipelined_now() is (store_target.kind == "resp")


async def test_post_settle_posts_without_waiting_where_pipelined(ledger: Ledger) -> None:
    """The gateway's settle after an answer (handler.post_usage): queued now on the pipelined client; on
    redis-py nothing is sent and the caller settles the usual way."""
    res = await ledger.reserve("r1", [hold(output_tokens=300)], 60)
    answered: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    if not ledger.post_settle(res, {"output_tokens": 120}, answered.set_result):
        assert not ledger.pipelined_now() and not answered.done()
        await ledger.settle(res, {"output_tokens": 120})
    else:
        assert await asyncio.wait_for(answered, 5) is None
        with pytest.raises(ValueError):  # checked before anything is sent
            ledger.post_settle(res, {"output_tokens": -1}, answered.set_result)
    s = by_label(await ledger.state(ALICE, [REQ, TOK]))
    assert (s["req-1h"].used, s["out-1d"].used, s["out-1d"].held) == (1, 120, 0)
    assert (await ledger.settle(res, {"output_tokens": 120})).repeat
