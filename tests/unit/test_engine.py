"""The engine without a transport: admit, meter, settle and record requests with no HTTP server and no
Redis process — the ledger's Lua scripts run in an in-memory Redis (fakeredis with Lua) behind the
ledger's ``ScriptStore`` protocol, the directory reads the same in-memory store, the audit log writes
to a temporary folder. What a plugin of another gateway (issue 16) would drive, step by step."""

from __future__ import annotations

import ast
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fakeredis
import orjson
import pytest
from gatewayutil import KEYS, audit_records, make_config
from multidict import CIMultiDict

from gateway.adapters import adapter_for_path
from gateway.audit.log import AuditLog
from gateway.engine.errors import BudgetExceeded, Unauthenticated, UpstreamTimeout
from gateway.engine.flow import Engine
from gateway.engine.request import Admission, Call, Denial
from gateway.engine.state import Gateway
from gateway.ledger.ledger import BudgetSpec, Ledger, ScopeRef
from gateway.ledger.scripts import RedisPyStore
from gateway.metrics.series import Metrics
from gateway.policy.directory import Directory

ENGINE_DIR = Path(__file__).resolve().parents[2] / "gateway" / "engine"
GENERATED = BudgetSpec("principal:generated_tokens:1d", "generated_tokens", "1d", False, 1000)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    cfg = make_config(tmp_path, "redis://in-memory.invalid")
    redis = fakeredis.FakeAsyncRedis()
    gw = Gateway(config=cfg, metrics=Metrics(), replica="unit")
    gw.redis = redis
    gw.ledger = Ledger(RedisPyStore(redis), key_prefix=cfg.store.key_prefix, lease_expiry=cfg.store.lease_expiry,
                       record_ttl=cfg.store.record_ttl_seconds)
    gw.directory = Directory(cfg, redis, key_prefix=cfg.store.key_prefix)
    gw.audit = AuditLog(tmp_path / "audit", "unit")
    await gw.audit.start()
    try:
        yield Engine(gw)
    finally:
        await gw.audit.close()
        await redis.aclose()


async def admit(engine: Engine, call: Call) -> Admission | Denial:
    return await engine.admit(engine.begin("openai.chat"), call)


def chat_call(key: str, body: dict[str, Any]) -> Call:
    found = adapter_for_path("/v1/chat/completions")
    assert found is not None
    headers = CIMultiDict({"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    return Call(found[0], found[1], "/v1/chat/completions", headers, {}, "", lambda: "127.0.0.1",
                body=orjson.dumps(body))


def answer(completion_tokens: int, reasoning_tokens: int = 0) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "dense",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": completion_tokens, "total_tokens": 9 + completion_tokens,
                  "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}})


async def generated(engine: Engine, principal: str = "tina") -> tuple[float, float]:
    assert engine.gw.ledger is not None
    (state,) = await engine.gw.ledger.state(ScopeRef("principal", principal), [GENERATED])
    return state.used, state.held


async def test_a_request_is_admitted_forwarded_with_its_cap_metered_settled_and_recorded(engine: Engine,
                                                                                    tmp_path: Path) -> None:
    adm = await admit(engine, chat_call(KEYS["tina"], {
        "model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}))
    assert isinstance(adm, Admission), adm
    assert adm.facts.principal is not None and adm.facts.principal.id == "tina" and adm.facts.tier == "tight"
    # The forwarded body carries the bound's cap; under strict admission the hold is the bound.
    forwarded = orjson.loads(adm.forward.body)
    assert forwarded["max_tokens"] == 100 and adm.forward.upstream == "sim"
    assert await generated(engine) == (0, adm.parsed.bound.generated_tokens_max) == (0, 100)

    engine.sent(adm)
    headers = await engine.finish_json(adm, 200, answer(completion_tokens=40))
    await engine.conclude(adm.facts, adm.ending)
    engine.done(adm.facts, adm.ending)

    assert adm.ending.decision == "allowed" and adm.ending.status == 200
    assert adm.ending.measured is not None and adm.ending.measured.usage.generated_tokens == 40
    assert headers["x-kgate-request-id"] == adm.facts.request_id and float(headers["x-kgate-k"]) > 0
    assert await generated(engine) == (40, 0), "settled: the actual usage, the hold released"
    (rec,) = audit_records(tmp_path / "audit")
    assert (rec["request_id"], rec["decision"], rec["principal"], rec["store"]) == (
        adm.facts.request_id, "allowed", "tina", "ok")
    assert rec["usage"]["generated_tokens"] == 40 and rec["bound"]["generated_tokens_max"] == 100


async def test_a_stream_without_usage_is_charged_its_bound_and_recorded_partial_when_cut(engine: Engine) -> None:
    adm = await admit(engine, chat_call(KEYS["tina"], {
        "model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True}))
    assert isinstance(adm, Admission) and adm.facts.stream
    assert orjson.loads(adm.forward.body)["stream_options"] == {"include_usage": True}, "kgate asks for usage"
    engine.sent(adm)
    meter = engine.stream_meter(adm)
    meter.feed(b'data: {"choices":[{"index":0,"delta":{"content":"par"}}]}\n\n')  # then the client left
    await engine.finish_stream(adm, meter, "client disconnected")
    assert adm.ending.decision == "partial" and "client disconnected" in adm.ending.reason
    assert adm.ending.measured is not None and adm.ending.measured.usage.source == "bound"
    assert await generated(engine) == (50, 0), "no usage came: on_missing_usage 'bound' charges the bound"


async def test_a_timeout_after_sending_is_charged_and_its_decision_comes_from_the_error(engine: Engine) -> None:
    adm = await admit(engine, chat_call(KEYS["tina"], {
        "model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30}))
    assert isinstance(adm, Admission)
    engine.sent(adm)
    err = await engine.upstream_failed(adm, UpstreamTimeout("upstream 'sim' did not answer in time"), working=True)
    ending = engine.failed(adm.facts, err, adm.ending)
    assert (ending.decision, ending.status) == ("partial", 504)
    assert await generated(engine) == (30, 0)


async def test_denials_hold_nothing_and_take_their_decision_from_the_error_type(engine: Engine) -> None:
    denial = await admit(engine, chat_call("not-a-key", {"model": "dense", "messages": []}))
    assert isinstance(denial, Denial) and isinstance(denial.error, Unauthenticated)
    assert engine.denied(denial).decision == "denied"

    big = {"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000}
    refused = await admit(engine, chat_call(KEYS["tina"], big))  # over the 1000-token budget
    assert isinstance(refused, Denial) and isinstance(refused.error, BudgetExceeded)
    assert refused.error.headers["RateLimit"].startswith('"principal:generated_tokens:1d";r=1000')
    ending = engine.denied(refused)
    assert (ending.decision, ending.status, ending.rule) == ("denied", 429, "principal:generated_tokens:1d")
    assert await generated(engine) == (0, 0)


async def test_an_upstream_error_status_releases_the_hold(engine: Engine) -> None:
    adm = await admit(engine, chat_call(KEYS["tina"], {
        "model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}))
    assert isinstance(adm, Admission)
    engine.sent(adm)
    assert await engine.upstream_refused(adm, 400) is None, "a 4xx about the request is passed on"
    assert (adm.ending.decision, adm.ending.status, adm.ending.released) == ("failed", 400, True)
    assert await generated(engine) == (0, 0)


def test_the_engine_imports_no_transport_and_no_redis_client() -> None:
    """The engine is transport-free: no aiohttp, no redis-py (the store is reached through the ledger and
    the directory, which raise kgate's own StoreError)."""
    found = []
    for path in sorted(ENGINE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("aiohttp", "redis", "multidict")]
    assert found == []
