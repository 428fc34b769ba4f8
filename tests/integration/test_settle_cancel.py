"""Settles at the edges: a shutdown while one is in flight (it still lands, exactly once — whether the
shutdown cancels the request waiting for it, or the request had answered and posted it), and a settle
posted after the answer (its order against later scripts, NOSCRIPT, usage the ledger cannot post, which
stores allow it at all)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from gatewayutil import KEYS, make_config, running_gateway

from gateway.adapters import adapter_for_path
from gateway.engine.budgets import budget_amounts, budget_holds
from gateway.engine.compute import measure
from gateway.engine.metering import parse_request
from gateway.engine.request import Admission, Ending, Facts, Forward
from gateway.engine.settlement import post_usage, settle_to_the_end
from gateway.ledger.ledger import BudgetSpec, Ledger, Reservation, ScopeRef
from gateway.ledger.store import connect


@pytest.fixture
async def running(redis_srv, tmp_path: Path):
    """A gateway on an emptied Redis, and a client of that Redis for the test's own commands."""
    r = aioredis.from_url(redis_srv.url)
    await r.flushall()
    try:
        async with running_gateway(make_config(tmp_path, redis_srv.url)) as g:
            yield g, r
    finally:
        await r.aclose()


async def _one_request(g, rid: str):
    """A request of tina's reserved by hand, as the engine would: (its admission, the measured usage, the
    requests budget). Her budgets are on 1h and 1d windows: a check right after a settle is not at risk of
    a window turning in between, as it would be for a 1m window every minute."""
    gw, cfg = g.gw, g.gw.config
    assert gw.directory is not None and gw.ledger is not None
    principal = await gw.directory.by_key(KEYS["tina"])
    assert principal is not None
    tier = cfg.tiers[principal.tier]
    found = adapter_for_path("/v1/chat/completions")
    assert found is not None
    raw = orjson.dumps({"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    parsed = parse_request(cfg, found[0], found[1], raw)
    holds = budget_holds(tier, principal, {}, budget_amounts(parsed, tier, gw))
    reservation = await gw.ledger.reserve(rid, holds, 60)
    facts = Facts(rid, "openai.chat", 0.0, cfg, principal=principal, tier=principal.tier, model="dense")
    adm = Admission(facts, tier, parsed, reservation, Forward("sim", "/v1/chat/completions", raw, False), Ending())
    usage = parsed.adapter.usage_from_json(
        {"choices": [{"message": {"content": "x"}}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}, parsed.request)
    measured = measure(usage, parsed.model, parsed.bound)
    adm.ending.measured = measured
    return adm, measured, [b for b in holds[0].budgets if b.metric == "requests"]


async def test_a_settle_cut_short_by_cancellation_still_posts_once(running) -> None:
    g, r = running
    gw = g.gw
    assert gw.ledger is not None
    adm, measured, budgets = await _one_request(g, "req-cancelled")

    await r.execute_command("CLIENT", "PAUSE", "400", "ALL")  # the settle's script waits in Redis
    task = asyncio.create_task(settle_to_the_end(gw, adm, measured))
    await asyncio.sleep(0.1)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert gw.detached, "the settle goes on in a task of its own"
    await asyncio.wait_for(asyncio.gather(*gw.detached), 5)

    (state,) = await gw.ledger.state(ScopeRef("principal", "tina"), budgets)
    assert (state.used, state.held) == (1, 0), "posted once, hold released"


async def test_a_shutdown_waits_for_the_settles_sent_after_answers(redis_srv, tmp_path: Path) -> None:
    """post_usage leaves the settle's reply to a callback; a shutdown that begins before the reply waits for
    it (it does not close the store under it, which would send the usage to the spool instead)."""
    r = aioredis.from_url(redis_srv.url)
    await r.flushall()
    async with running_gateway(make_config(tmp_path, redis_srv.url)) as g:
        gw = g.gw
        adm, measured, budgets = await _one_request(g, "req-answered")
        await r.execute_command("CLIENT", "PAUSE", "400", "ALL")  # the reply comes after the shutdown began
        assert post_usage(gw, adm, measured)
        assert gw.settling == 1
    assert adm.ending.store == "ok" and gw.settling == 0
    client = await connect(redis_srv.url, timeout=2)
    (state,) = await Ledger(client).state(ScopeRef("principal", "tina"), budgets)
    assert (state.used, state.held) == (1, 0), "posted once, hold released"
    assert not list((tmp_path / "data" / "spool").glob("*.jsonl")) or all(
        f.stat().st_size == 0 for f in (tmp_path / "data" / "spool").glob("*.jsonl"))
    await client.aclose()
    await r.aclose()


async def test_a_settle_sent_after_the_answer_runs_before_any_later_script(running) -> None:
    """post_usage queues the settle itself: a script called right after it, without the event loop turning
    in between (as a request arriving next would), finds the request settled, not still holding."""
    g, _ = running
    gw = g.gw
    adm, measured, budgets = await _one_request(g, "req-ordered")
    assert gw.ledger is not None and gw.ledger.pipelined_now()
    assert post_usage(gw, adm, measured)
    (state,) = await gw.ledger.state(ScopeRef("principal", "tina"), budgets)
    assert (state.used, state.held) == (1, 0)


async def test_usage_the_ledger_cannot_post_leaves_the_hold_and_says_so(running) -> None:
    """Amounts the ledger refuses (not finite) must not turn an answered request into a 500: nothing is
    sent, the hold stays for its lease expiry to charge, and the request's record says why."""
    import dataclasses

    g, _ = running
    gw = g.gw
    assert gw.ledger is not None
    adm, measured, _ = await _one_request(g, "req-infinite")
    reservation = adm.reservation
    assert reservation is not None
    budgets = list(reservation.holds[0].budgets)  # generated_tokens, requests
    infinite = dataclasses.replace(measured.usage, output_tokens=float("inf"))
    assert post_usage(gw, adm, dataclasses.replace(measured, usage=infinite))
    assert gw.settling == 0 and adm.ending.store == "unsettled" and "cannot post" in adm.ending.reason
    gen, req = await gw.ledger.state(ScopeRef("principal", "tina"), budgets)
    assert (gen.used, gen.held, req.used, req.held) == (0, 8, 0, 1)


async def test_only_the_pipelined_client_settles_without_waiting(redis_srv) -> None:
    """redis-py (TLS, Sentinel, Cluster URLs) sends a script when it is awaited, so its settles are waited
    for; so are the pipelined client's while its connection is not up."""
    from gateway.ledger.resp import hot_path_client

    answers: list[BaseException | None] = []
    nothing_held = Reservation("req-none", (), (), 0.0)
    plain = aioredis.from_url(redis_srv.url)
    assert not Ledger(plain).pipelined_now()
    assert not Ledger(plain).post_settle(nothing_held, {}, answers.append)
    fast = hot_path_client(plain, redis_srv.url, timeout=2)
    ledger = Ledger(fast)
    assert not ledger.pipelined_now()  # no connection yet
    assert not ledger.post_settle(nothing_held, {}, answers.append) and answers == []
    spec = BudgetSpec("principal:requests:1d", "requests", "1d", False, 10)
    await ledger.state(ScopeRef("principal", "nobody"), [spec])
    assert ledger.pipelined_now()
    assert ledger.post_settle(nothing_held, {}, answers.append) and answers == [None]
    await fast.aclose()


async def test_a_posted_settle_that_meets_noscript_is_settled_again_not_spooled(running) -> None:
    """The scripts are loaded with each new connection, but Redis can lose them while the connection stays
    up (SCRIPT FLUSH): a posted settle then meets NOSCRIPT, and is run again awaited (which loads the
    script), not sent to the spool as if the store were away."""
    g, r = running
    gw = g.gw
    assert gw.ledger is not None
    adm, measured, budgets = await _one_request(g, "req-noscript")
    await r.script_flush()
    assert post_usage(gw, adm, measured)
    for _ in range(100):
        if gw.settling == 0 and not gw.detached:
            break
        await asyncio.sleep(0.02)
    assert adm.ending.store == "ok" and gw.settling == 0 and not gw.detached
    (state,) = await gw.ledger.state(ScopeRef("principal", "tina"), budgets)
    assert (state.used, state.held) == (1, 0)
    assert gw.spool is not None and gw.spool.depth()[0] == 0


async def test_a_request_cancelled_while_it_is_being_admitted_is_still_recorded(running) -> None:
    """A shutdown past its drain cancels handlers wherever they are, also while a request's body is still
    arriving: nothing was held, but the request still gets its audit record and its metrics."""
    from gatewayutil import audit_records
    from yarl import URL

    g, _ = running
    gw = g.gw
    url = URL(g.url)
    _reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEYS["tina"].encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\"")
    await writer.drain()
    # The handler is waiting for the rest of the body (aiohttp's: the fast path hands an incomplete request
    # over after WAIT_FOR_WHOLE).
    async with asyncio.timeout(15):
        while not gw.handlers:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    # Cancelled once it waits for the body, as the test means (the fast path hands the request over after
    # WAIT_FOR_WHOLE; the handler then still identifies the caller for a moment).
    await asyncio.sleep(0.3)
    (task,) = gw.handlers
    task.cancel()
    async with asyncio.timeout(15):
        while gw.handlers:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    writer.close()
    records: list[dict] = []
    async with asyncio.timeout(15):  # written without waiting (Engine.done): it lands a moment later
        while not records:
            records = [r for r in audit_records(g) if r.get("api") == "openai.chat"]
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    records = [r for r in audit_records(g) if r.get("api") == "openai.chat"]
    assert len(records) == 1, records
    rec = records[0]
    assert (rec["decision"], rec["principal"], rec["usage"]) == ("failed", "tina", None)
