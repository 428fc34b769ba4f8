"""Redis unreachable (docs/design.md §6.1, issue 6 item 1): deny answers 503 fast, allow spools and replays once.

Every test owns a Redis on a free loopback port, with ``appendfsync always`` so that a kill -9 loses no
acknowledged ledger write (what a deployment that kills Redis on purpose should configure too). Redis is
killed with SIGKILL, or frozen with SIGSTOP to stand for a stalled server, and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from gatewayutil import KEYS, RunningGateway, audit_records, make_config, running_gateway, scrape

from gateway.ledger.ledger import BudgetSpec, HoldRequest, Ledger, ScopeRef
from gateway.ledger.redis_server import RedisServer
from gateway.ledger.spool import Spool
from gateway.ledger.store import connect

TIMEOUT = 0.5  # store.timeout_seconds in the test policy

# While Redis is down, identifying a caller needs the directory.py patch proposed with these tests
# (lookups answer from what was read before, else from the policy): without it every caller gets 503, even
# on an on_store_error: allow tier. Remove the marker when it is applied.
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def redis_srv(durable_redis: RedisServer) -> RedisServer:
    return durable_redis


@pytest.fixture
async def gw(redis_srv: RedisServer, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_gateway(make_config(tmp_path, redis_srv.url)) as g:
        yield g


async def post(g: RunningGateway, who: str, body: dict[str, Any], path: str = CHAT,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | bytes, float]:
    """One request: (status, body, seconds taken)."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s, s.post(
            g.url + path, json=body, headers={"Authorization": f"Bearer {KEYS[who]}", **(headers or {})}) as r:
        raw = await r.read()
    try:
        doc: dict[str, Any] | bytes = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = raw
    return r.status, doc, time.monotonic() - t0


async def get_status(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def eventually(check: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``check`` (sync or async, returning a truthy value) until it succeeds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def budgets(g: RunningGateway, tier: str) -> list[BudgetSpec]:
    return [BudgetSpec.from_config(b) for b in g.gw.config.tiers[tier].budgets]


async def used_and_held(g: RunningGateway, who: str, tier: str) -> tuple[float, float]:
    assert g.gw.ledger is not None
    st = (await g.gw.ledger.state(ScopeRef("principal", who), budgets(g, tier)))[0]
    return st.used, st.held


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


async def metrics_text(g: RunningGateway) -> str:
    return await scrape(g)  # /metrics is on the admin listener


# ------------------------------------------------------------------------------------------------ deny
async def test_deny_tier_answers_503_in_each_api_shape_while_redis_is_down(gw: RunningGateway,
                                                                           redis_srv: RedisServer) -> None:
    status, _, _ = await post(gw, "alice", {"model": "dense", "messages": MSG, "max_tokens": 20})
    assert status == 200
    redis_srv.kill_sync()

    status, doc, took = await post(gw, "alice", {"model": "dense", "messages": MSG, "max_tokens": 20})
    assert status == 503, doc
    assert isinstance(doc, dict) and doc["error"]["type"] == "server_error" and doc["error"]["message"]
    assert took < TIMEOUT * 3

    status, doc, _ = await post(gw, "alice", {"model": "dense", "max_tokens": 20, "messages": MSG},
                                path="/v1/messages")
    assert status == 503 and isinstance(doc, dict)
    assert doc["type"] == "error" and doc["error"]["type"] == "overloaded_error"

    status, doc, _ = await post(gw, "alice", {"contents": [{"parts": [{"text": "hi"}]}]},
                                path="/v1beta/models/dense:generateContent")
    assert status == 503 and isinstance(doc, dict)
    assert doc["error"] == {"code": 503, "message": doc["error"]["message"], "status": "UNAVAILABLE"}

    status, ready = await get_status(gw.url + "/readyz")
    assert status == 503 and ready["store"] == "unreachable" and ready["ready"] is False
    assert metric(await metrics_text(gw), "kgate_store_errors_total") >= 1

    # Redis comes back on the same port: the gateway reconnects by itself.
    redis_srv.start_sync()
    await eventually(lambda: _ready(gw))
    status, _, _ = await post(gw, "alice", {"model": "dense", "messages": MSG, "max_tokens": 20})
    assert status == 200
    denied = [r for r in audit_records(gw) if r.get("status") == 503]
    assert len(denied) == 3 and all(r["decision"] == "denied" for r in denied)


async def _ready(g: RunningGateway) -> bool:
    status, _ = await get_status(g.url + "/readyz")
    return status == 200


async def test_stalled_redis_is_denied_within_the_store_timeout(gw: RunningGateway, redis_srv: RedisServer) -> None:
    status, _, _ = await post(gw, "alice", {"model": "dense", "messages": MSG, "max_tokens": 20})
    assert status == 200
    assert redis_srv.pid is not None
    os.kill(redis_srv.pid, signal.SIGSTOP)  # accepts connections (the kernel does), never answers
    try:
        await asyncio.sleep(1.1)  # past the directory cache: identity needs the store too
        status, doc, took = await post(gw, "alice", {"model": "dense", "messages": MSG, "max_tokens": 20})
        assert status == 503, doc
        # Bounded by the store timeout, a few times over: the first identity lookup waits for it once (later
        # lookups use what was read before), then the reserve and the ledger's rollback of it, once each.
        assert took < TIMEOUT * 4, took
        status, doc, took = await post(gw, "alice", {"model": "dense", "messages": MSG, "max_tokens": 20},
                                       path="/v1/messages")
        assert status == 503 and isinstance(doc, dict) and doc["error"]["type"] == "overloaded_error"
        assert took < TIMEOUT * 3, took  # no lookup waits now: the reserve and its rollback only
        status, _ = await get_status(gw.url + "/readyz")
        assert status == 503
    finally:
        os.kill(redis_srv.pid, signal.SIGCONT)
    await eventually(lambda: _ready(gw))
    status, _, _ = await post(gw, "alice", {"model": "dense", "messages": MSG, "max_tokens": 20})
    assert status == 200


# ----------------------------------------------------------------------------------------------- allow
async def test_allow_tier_spools_while_down_and_replays_exactly_once(gw: RunningGateway,
                                                                     redis_srv: RedisServer) -> None:
    assert gw.gw.spool is not None
    redis_srv.kill_sync()
    bodies = [{"model": "dense", "messages": MSG, "max_tokens": 20 + i} for i in range(3)]
    generated = 0.0
    for body in bodies:
        status, doc, _ = await post(gw, "olga", body)
        assert status == 200, doc
        assert isinstance(doc, dict)
        generated += doc["usage"]["completion_tokens"]
    assert gw.gw.spool.depth()[0] == 3
    status, _ = await get_status(gw.url + "/readyz")
    assert status == 503
    spooled = [r for r in audit_records(gw) if r["decision"] == "spooled"]
    assert len(spooled) == 3 and all(r["store"] == "spooled" for r in spooled)

    redis_srv.start_sync()
    await eventually(lambda: gw.gw.spool is not None and gw.gw.spool.depth()[0] == 0)
    await eventually(lambda: _ready(gw))
    used, held = await used_and_held(gw, "olga", "open")
    assert (used, held) == (generated, 0)
    replayed = await eventually(lambda: [r for r in audit_records(gw) if r["decision"] == "replayed"])
    assert sorted(r["request_id"] for r in replayed) == sorted(r["request_id"] for r in spooled)
    for r in replayed:
        assert r["principal"] == "olga" and r["tier"] == "open"

    # Exactly once: replaying the same lines again (a crash between the ledger write and the spool's
    # progress mark) changes nothing.
    lines = [orjson.dumps({"request_id": r["request_id"], "holds": [], "actual": {}}) for r in spooled]
    assert lines
    assert gw.gw.ledger is not None
    for r in spooled:
        rec = {k: v for k, v in r.items()}
        amounts = {"requests": 1, "generated_tokens": rec["usage"]["generated_tokens"]}
        holds = [HoldRequest(ScopeRef("principal", "olga"), tuple(budgets(gw, "open")), amounts)]
        assert await asyncio.to_thread(gw.gw.spool.append, r["request_id"], holds, amounts, {})
    await eventually(lambda: gw.gw.spool is not None and gw.gw.spool.depth()[0] == 0)
    used, held = await used_and_held(gw, "olga", "open")
    assert (used, held) == (generated, 0)


async def test_allow_tier_keeps_serving_after_the_directory_cache_expires(gw: RunningGateway,
                                                                           redis_srv: RedisServer) -> None:
    status, _, _ = await post(gw, "olga", {"model": "dense", "messages": MSG, "max_tokens": 20})
    assert status == 200
    redis_srv.kill_sync()
    await asyncio.sleep(1.2)  # past the directory's cache TTL: identity needs the store again
    status, doc, _ = await post(gw, "olga", {"model": "dense", "messages": MSG, "max_tokens": 20})
    assert status == 200, doc


async def test_settle_that_fails_mid_stream_is_spooled_and_corrects_the_hold(gw: RunningGateway,
                                                                            redis_srv: RedisServer) -> None:
    """Redis dies while a stream runs: the hold stays in Redis, the actual goes to the spool, and the
    replay turns the hold into the actual (nothing held, the actual used, once)."""
    async with aiohttp.ClientSession() as s:
        await s.post(gw.sim_url + "/_sim/config", json={"tokens_per_second": 400})
    body = {"model": "dense", "messages": MSG, "max_tokens": 40, "stream": True,
            "stream_options": {"include_usage": True}}
    usage: dict[str, Any] = {}
    async with aiohttp.ClientSession() as s, s.post(
            gw.url + CHAT, json=body, headers={"Authorization": f"Bearer {KEYS['tina']}"}) as r:
        assert r.status == 200
        first = True
        async for line in r.content:
            if first:
                redis_srv.kill_sync()  # the hold is in Redis (AOF fsynced); the settle will fail
                first = False
            if line.startswith(b"data: {"):
                chunk = orjson.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
    assert usage["completion_tokens"] > 0
    assert gw.gw.spool is not None
    await eventually(lambda: gw.gw.spool is not None and gw.gw.spool.depth()[0] == 1)
    redis_srv.start_sync()
    await eventually(lambda: gw.gw.spool is not None and gw.gw.spool.depth()[0] == 0)
    used, held = await used_and_held(gw, "tina", "tight")
    assert (used, held) == (usage["completion_tokens"], 0)
    recs = {r["decision"]: r for r in audit_records(gw)}
    assert "spooled" in recs and "replayed" in recs


async def test_settle_that_fails_after_the_answer_is_recorded_again_and_replayed(gw: RunningGateway,
                                                                               redis_srv: RedisServer) -> None:
    """The answer does not wait for the settle's reply, so its audit record is written before the settle's
    fate is known. Redis freezes while the upstream works: the client still gets its answer and its record;
    the settle, written but never answered, times out and goes to the spool, and a second record of the
    same request says so; the replay adds a third. The usage counts once, in the ledger and in the report."""
    from gateway.audit.report import report_rows

    async with aiohttp.ClientSession() as s:
        await s.post(gw.sim_url + "/_sim/config", json={"latency_ms": 800, "output_tokens": 12})
        call = asyncio.ensure_future(s.post(gw.url + CHAT, json={"model": "dense", "messages": MSG,
                                                                  "max_tokens": 40},
                                            headers={"Authorization": f"Bearer {KEYS['tina']}"}))
        async def holding() -> bool:
            return (await used_and_held(gw, "tina", "tight"))[1] > 0

        await eventually(holding)
        assert redis_srv.pid is not None
        os.kill(redis_srv.pid, signal.SIGSTOP)  # the hold is in Redis; the upstream is still thinking
        try:
            async with await call as r:
                assert r.status == 200
                rid = r.headers["x-kgate-request-id"]
                assert (await r.json())["usage"]["completion_tokens"] == 12
            await eventually(lambda: len([x for x in audit_records(gw) if x["request_id"] == rid]) == 2)
        finally:
            os.kill(redis_srv.pid, signal.SIGCONT)
    assert gw.gw.spool is not None
    mine = [(x["decision"], x["store"]) for x in audit_records(gw) if x["request_id"] == rid]
    assert mine == [("allowed", "ok"), ("spooled", "spooled")]
    await eventually(lambda: gw.gw.spool is not None and gw.gw.spool.depth()[0] == 0)
    assert await used_and_held(gw, "tina", "tight") == (12, 0)
    mine2 = [x["decision"] for x in audit_records(gw) if x["request_id"] == rid]
    assert mine2 == ["allowed", "spooled", "replayed"]
    report = report_rows([Path(gw.gw.config.audit.dir)], by=["principal"])
    assert report.total["generated_tokens"] == 12 and report.total["requests"] == 1


# ------------------------------------------------------------------------------------- the spool itself
def _hold(amount: float) -> HoldRequest:
    spec = BudgetSpec("principal:generated_tokens:1d", "generated_tokens", "1d", False, 1e9)
    return HoldRequest(ScopeRef("principal", "p1"), (spec,), {"requests": 1, "generated_tokens": amount})


async def test_spool_replays_in_order_and_survives_a_restart(tmp_path: Path, redis_srv: RedisServer) -> None:
    path = tmp_path / "spool" / "r1.jsonl"
    replayed: list[str] = []
    spool = Spool(path, on_replayed=lambda rec: replayed.append(rec["request_id"]))
    for i in range(3):
        assert spool.append(f"req-{i}", [_hold(10)], {"generated_tokens": 10 + i}, {"principal": "p1"})
    await spool.close()

    # A new process finds the spool and replays it; the file starts afresh afterwards.
    client = await connect(redis_srv.url, timeout=TIMEOUT)
    ledger = Ledger(client, key_prefix="sp")
    spool = Spool(path, on_replayed=lambda rec: replayed.append(rec["request_id"]))
    assert spool.depth()[0] == 3
    assert await spool.replay(ledger) == 3
    assert replayed == ["req-0", "req-1", "req-2"]
    assert spool.depth() == (0, 0) and path.stat().st_size == 0
    st = (await ledger.state(ScopeRef("principal", "p1"), _hold(0).budgets))[0]
    assert st.used == 33
    await spool.close()
    await client.aclose()


async def test_spool_replay_stops_at_a_store_error_and_resumes_where_it_stopped(
        tmp_path: Path, redis_srv: RedisServer) -> None:
    spool = Spool(tmp_path / "s.jsonl")
    client = await connect(redis_srv.url, timeout=TIMEOUT)
    ledger = Ledger(client, key_prefix="sp")
    for i in range(2):
        spool.append(f"a-{i}", [_hold(5)], {"generated_tokens": 5})
    redis_srv.kill_sync()
    with pytest.raises(Exception):  # noqa: B017 - any store error
        await spool.replay(ledger)
    assert spool.depth()[0] == 2
    redis_srv.start_sync()
    assert await eventually(lambda: _replay_ok(spool, ledger)) == 2
    st = (await ledger.state(ScopeRef("principal", "p1"), _hold(0).budgets))[0]
    assert st.used == 10
    await spool.close()
    await client.aclose()


async def _replay_ok(spool: Spool, ledger: Ledger) -> int | None:
    try:
        return await spool.replay(ledger)
    except Exception:  # the first command after a restart may meet the old connection
        return None


async def test_spool_is_bounded_and_skips_a_corrupt_line(tmp_path: Path, redis_srv: RedisServer) -> None:
    spool = Spool(tmp_path / "s.jsonl", max_bytes=600)
    n = 0
    while spool.append(f"r-{n}", [_hold(1)], {"generated_tokens": 1}):
        n += 1
    assert n >= 1 and spool.lost == 1
    with (tmp_path / "s.jsonl").open("ab") as f:
        f.write(b"{not json\n")
    client = await connect(redis_srv.url, timeout=TIMEOUT)
    ledger = Ledger(client, key_prefix="sp")
    assert await spool.replay(ledger) == n
    assert spool.depth() == (0, 0)
    await spool.close()
    await client.aclose()


async def test_usage_of_a_reserve_that_reached_redis_after_all_is_posted_once(tmp_path: Path,
                                                                             redis_srv: RedisServer) -> None:
    """A reserve that timed out may still have run in Redis, and so may the ledger's rollback of it. Either
    way the spooled usage counts, exactly once, and the late hold is not left held (nor charged later)."""
    client = await connect(redis_srv.url, timeout=TIMEOUT)
    ledger = Ledger(client, key_prefix="sp")
    spool = Spool(tmp_path / "s.jsonl")
    await ledger.reserve("late-rolled-back", [_hold(50)], 60)  # reached Redis; so did reserve's rollback:
    await ledger._rollback("late-rolled-back", [_hold(50)])  # (what Ledger.reserve runs when a call fails)
    await ledger.reserve("late-held", [_hold(50)], 60)  # reached Redis; the rollback did not
    for rid, n in (("late-rolled-back", 7), ("late-held", 8), ("never-reached", 9)):
        assert spool.append(rid, [_hold(n)], {"generated_tokens": n})
    assert await spool.replay(ledger) == 3
    st = (await ledger.state(ScopeRef("principal", "p1"), _hold(0).budgets))[0]
    assert (st.used, st.held) == (24, 0)
    # The same lines again (a crash before the progress mark): nothing changes.
    for rid, n in (("late-rolled-back", 7), ("late-held", 8), ("never-reached", 9)):
        assert spool.append(rid, [_hold(n)], {"generated_tokens": n})
    assert await spool.replay(ledger) == 3
    st = (await ledger.state(ScopeRef("principal", "p1"), _hold(0).budgets))[0]
    assert (st.used, st.held) == (24, 0)
    await spool.close()
    await client.aclose()


async def test_spool_voids_holds_that_could_not_be_released(tmp_path: Path, redis_srv: RedisServer) -> None:
    """A release that failed (or a refused reserve whose rollback failed) is spooled: replayed, it voids the
    hold, or takes back the charge its expired lease made, so a request never served is never charged."""
    client = await connect(redis_srv.url, timeout=TIMEOUT)
    ledger = Ledger(client, key_prefix="sp")
    spool = Spool(tmp_path / "s.jsonl", on_replayed=lambda rec: pytest.fail("a void is not a replayed usage"))
    await ledger.reserve("held", [_hold(50)], 60)
    await ledger.reserve("expired", [_hold(40)], 0.1)
    await asyncio.sleep(0.3)
    st = (await ledger.state(ScopeRef("principal", "p1"), _hold(0).budgets))[0]
    assert (st.used, st.held) == (40, 50)  # the expired lease was charged
    for rid, n in (("held", 50), ("expired", 40), ("never-reached", 30)):
        assert spool.append_release(rid, [_hold(n)])
    assert await spool.replay(ledger) == 3
    st = (await ledger.state(ScopeRef("principal", "p1"), _hold(0).budgets))[0]
    assert (st.used, st.held) == (0, 0)
    await spool.close()
    await client.aclose()


async def test_spool_cuts_a_torn_last_line_and_recovers_from_a_stale_offset(tmp_path: Path,
                                                                            redis_srv: RedisServer) -> None:
    path = tmp_path / "s.jsonl"
    spool = Spool(path)
    assert spool.append("a", [_hold(1)], {"generated_tokens": 1})
    await spool.close()
    with path.open("ab") as f:
        f.write(b'{"request_id": "torn", "hol')  # a crash in the middle of a write
    spool = Spool(path)
    assert spool.depth()[0] == 1
    assert spool.append("b", [_hold(2)], {"generated_tokens": 2})
    # A crash after a full replay emptied the file but before the offset was reset.
    (tmp_path / "s.jsonl.offset").write_text("100000")
    client = await connect(redis_srv.url, timeout=TIMEOUT)
    ledger = Ledger(client, key_prefix="sp")
    assert await spool.replay(ledger) == 2
    st = (await ledger.state(ScopeRef("principal", "p1"), _hold(0).budgets))[0]
    assert st.used == 3
    await spool.close()
    await client.aclose()
