"""The gateway end to end: real SDK clients → kgate → the simulator, with a real Redis (docs/design.md §4)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import anthropic
import openai
import orjson
import pytest
from gatewayutil import KEYS, audit_records, make_config, running_gateway

from gateway.ledger.ledger import ScopeRef


@pytest.fixture
async def gw(flushed_redis_url: str, tmp_path: Path):
    async with running_gateway(make_config(tmp_path, flushed_redis_url)) as g:
        yield g


def oai(g, who: str = "alice") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=KEYS[who], max_retries=0)


def claude(g, who: str = "alice") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=g.url, api_key=KEYS[who], max_retries=0)


async def sim_last(g) -> dict:
    async with aiohttp.ClientSession() as s, s.get(g.sim_url + "/_sim/stats") as r:
        return await r.json()


MSG = [{"role": "user", "content": "What is the capital of France?"}]


# ------------------------------------------------------------------------------------------ OpenAI SDK
async def test_chat_non_streaming_meters_and_reports(gw):
    raw = await oai(gw).chat.completions.with_raw_response.create(model="dense", messages=MSG, n=3,
                                                                  max_tokens=50)
    resp = raw.parse()
    assert len(resp.choices) == 3
    assert resp.usage is not None and resp.usage.completion_tokens > 0
    h = raw.headers
    assert float(h["x-kgate-k-max"]) == 3.0
    k = float(h["x-kgate-k"])
    assert 0 < k <= 3.0
    assert float(h["x-kgate-flops"]) > 0
    assert h["x-kgate-request-id"]
    assert "RateLimit" in h and "RateLimit-Policy" in h
    # the model name was mapped and the client's key did not travel upstream
    last = (await sim_last(gw))["last_request"]
    assert last["body"]["model"] == "llama-sim-8b"
    headers = {k.lower(): v for k, v in last["headers"].items()}
    assert KEYS["alice"] not in str(headers)


async def test_chat_reasoning_effort_reports_reasoning_tokens(gw):
    resp = await oai(gw).chat.completions.create(model="reasoner", messages=MSG, reasoning_effort="low",
                                                 max_completion_tokens=1500)
    assert resp.usage.completion_tokens_details.reasoning_tokens > 0


async def test_chat_stream_without_usage_request_gets_no_usage_chunk(gw):
    stream = await oai(gw).chat.completions.create(model="dense", messages=MSG, stream=True, n=2)
    chunks = [c async for c in stream]
    assert chunks, "the stream carried chunks"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks), "the injected usage-only chunk was stripped"
    # ...but the gateway asked the upstream for usage and metered it exactly
    last = (await sim_last(gw))["last_request"]
    assert last["body"]["stream_options"]["include_usage"] is True
    st = await gw.gw.ledger.state(ScopeRef("principal", "alice"), _budgets(gw, "basic"))
    assert st[0].used == 1


async def test_chat_stream_with_usage_request_keeps_usage_chunk(gw):
    stream = await oai(gw).chat.completions.create(model="reasoner", messages=MSG, stream=True,
                                                   stream_options={"include_usage": True},
                                                   reasoning_effort="low", max_completion_tokens=1500)
    chunks = [c async for c in stream]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens_details.reasoning_tokens > 0


async def test_responses_api(gw):
    resp = await oai(gw).responses.create(model="reasoner", input="hello", max_output_tokens=1500,
                                          reasoning={"effort": "low"})
    assert resp.usage.output_tokens_details.reasoning_tokens > 0
    stream = await oai(gw).responses.create(model="dense", input="hello", stream=True)
    kinds = [ev.type async for ev in stream]
    assert kinds[-1] == "response.completed"


async def test_legacy_completions_best_of(gw):
    resp = await oai(gw).completions.create(model="dense", prompt=["a", "b"], n=1, best_of=2, max_tokens=20)
    assert len(resp.choices) == 2


# --------------------------------------------------------------------------------------- Anthropic SDK
async def test_anthropic_thinking_budget(gw):
    raw = await claude(gw).messages.with_raw_response.create(
        model="reasoner", max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 1024}, messages=MSG)
    msg = raw.parse()
    if asyncio.iscoroutine(msg):
        msg = await msg
    assert msg.usage.output_tokens > 0
    assert float(raw.headers["x-kgate-k-max"]) == pytest.approx(1 + 1024 / 256)


async def test_anthropic_stream(gw):
    async with claude(gw).messages.stream(model="reasoner", max_tokens=3000, messages=MSG,
                                          thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        final = await stream.get_final_message()
    assert final.usage.output_tokens > 0


async def test_anthropic_errors_have_anthropic_shape(gw):
    with pytest.raises(anthropic.BadRequestError) as info:
        await claude(gw).messages.create(model="reasoner", max_tokens=-5, messages=MSG)
    assert info.value.body["type"] == "error"
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic.AsyncAnthropic(base_url=gw.url, api_key="nope", max_retries=0).messages.create(
            model="reasoner", max_tokens=10, messages=MSG)


# ------------------------------------------------------------------------------------------- Gemini
async def test_gemini_generate_and_stream(gw):
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
            "generationConfig": {"candidateCount": 2, "maxOutputTokens": 200}}
    headers = {"x-goog-api-key": KEYS["alice"]}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1beta/models/dense:generateContent", json=body, headers=headers) as r:
            doc = await r.json()
            assert r.status == 200, doc
            assert len(doc["candidates"]) == 2
            assert float(r.headers["x-kgate-k-max"]) == 2.0
        async with s.post(gw.url + "/v1beta/models/dense:streamGenerateContent?alt=sse", json=body,
                          headers=headers) as r:
            text = await r.text()
            assert r.status == 200 and text.count("data:") >= 2 and "usageMetadata" in text
        async with s.post(gw.url + "/v1beta/models/nope:generateContent", json=body, headers=headers) as r:
            doc = await r.json()
            assert r.status == 404 and doc["error"]["status"] == "NOT_FOUND"


# ----------------------------------------------------------------------------------- identity & caps
async def test_missing_and_invalid_keys_are_401(gw):
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json={"model": "dense", "messages": MSG}) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="dense", messages=MSG)


async def test_model_outside_tier_is_403(gw):
    with pytest.raises(openai.PermissionDeniedError) as info:
        await oai(gw, "carol").chat.completions.create(model="moe", messages=MSG)
    assert "not available to your tier" in str(info.value)


async def test_cap_rejects_with_403_naming_cap_bound_and_limit(gw):
    with pytest.raises(openai.PermissionDeniedError) as info:
        await oai(gw).chat.completions.create(model="dense", messages=MSG, n=6, max_tokens=10)
    msg = str(info.value)
    assert "max_samples" in msg and "bound 6" in msg and "limit 4" in msg
    st = await sim_last(gw)
    assert st["requests"].get("/v1/chat/completions", 0) == 0, "a refused request never reaches the upstream"


async def test_clamp_rewrites_and_says_so(gw):
    raw = await oai(gw, "carol").chat.completions.with_raw_response.create(
        model="reasoner", messages=MSG, n=4, reasoning_effort="high", max_completion_tokens=8000)
    clamped = raw.headers["x-kgate-clamped"]
    assert "n=" in clamped and "reasoning_effort=medium" in clamped
    assert float(raw.headers["x-kgate-k-max"]) <= 4
    last = (await sim_last(gw))["last_request"]["body"]
    assert last["n"] <= 2 and last["reasoning_effort"] == "medium"
    assert raw.parse().usage.completion_tokens <= last["n"] * last["max_completion_tokens"]


async def test_budget_exhausted_is_429_with_retry_after(gw):
    client = oai(gw, "tina")
    # generated_tokens budget 1000: each request holds n × max_tokens = 400 (strict)
    await client.chat.completions.create(model="dense", messages=MSG, max_tokens=400)
    await client.chat.completions.create(model="dense", messages=MSG, max_tokens=400)
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(20):
            await client.chat.completions.create(model="dense", messages=MSG, max_tokens=400)
    resp = info.value.response
    assert int(resp.headers["Retry-After"]) >= 1
    assert "generated_tokens" in str(info.value)
    st = await gw.gw.ledger.state(ScopeRef("principal", "tina"), _budgets(gw, "tight"))
    assert st[0].used <= 1000 and st[0].held == 0


@pytest.mark.parametrize("scopes", [("principal",), ("principal", "org", "global")])
async def test_each_request_finds_the_one_before_it_settled(flushed_redis_url: str, tmp_path: Path, scopes):
    """The answer does not wait for the settle's reply, yet a client's next request must find the previous
    one settled, not still holding its upper bound: the settle leaves first on the same connection. At the
    edge of a budget that decides every answer: each request holds max_tokens = 500 of 1000 and uses 10, so
    exactly 51 fit back to back — and only the first two would if a settle lagged behind its answer."""
    budgets = [{"metric": "generated_tokens", "window": "1d", "limit": 1000, "scope": s} for s in scopes]
    async with running_gateway(make_config(tmp_path, flushed_redis_url, tight={"budgets": budgets})) as g:
        async with aiohttp.ClientSession() as s:
            await s.post(g.sim_url + "/_sim/config", json={"output_tokens": 10})
        client = oai(g, "tina")
        for i in range(51):
            out = await client.chat.completions.create(model="dense", messages=MSG, max_tokens=500)
            assert out.usage is not None and out.usage.completion_tokens == 10, i
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="dense", messages=MSG, max_tokens=500)
        for scope, ident in zip(("principal", "org", "global"), ("tina", "acme", "*"), strict=True):
            if scope in scopes:
                spec = [b for b in _budgets(g, "tight") if b.label.startswith(scope)]
                st = (await g.gw.ledger.state(ScopeRef(scope, ident), spec))[0]
                assert (st.used, st.held) == (510, 0), scope


async def test_shadow_mode_never_blocks(gw):
    client = oai(gw, "sam")
    for _ in range(3):  # over the per-request cap and over the 1-request budget: served anyway
        await client.chat.completions.create(model="dense", messages=MSG, n=4, max_tokens=10)
    # ...and still metered: the ledger shows what enforcing would have meant
    st = await gw.gw.ledger.state(ScopeRef("principal", "sam"), _budgets(gw, "shadow"))
    assert st[0].used == 3 and st[0].held == 0
    assert (await sim_last(gw))["last_request"]["body"]["n"] == 4, "shadow mode never clamps"


async def test_models_endpoint_lists_callers_models(gw):
    models = await oai(gw, "carol").models.list()
    assert sorted(m.id for m in models.data) == ["dense", "reasoner"]


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("body,status", [
    (b"{not json", 400), (b"[]", 400), (b'{"model": 5, "messages": []}', 400),
    (b'{"model": "dense", "messages": [], "n": 0}', 400), (b'{"model": "dense", "messages": [], "n": -1}', 400),
    (b'{"model": "dense", "messages": [], "max_tokens": -3}', 400), (b'{"model": "ghost", "messages": []}', 404),
])
async def test_bad_input_is_a_clean_error_and_never_forwarded(gw, body, status):
    async with aiohttp.ClientSession() as s, s.post(
            gw.url + "/v1/chat/completions", data=body,
            headers={"Authorization": f"Bearer {KEYS['alice']}", "Content-Type": "application/json"}) as r:
        doc = await r.json()
        assert r.status == status, doc
        assert set(doc["error"]) >= {"message", "type", "code"}
    st = await sim_last(gw)
    assert st["requests"].get("/v1/chat/completions", 0) == 0


async def test_oversized_body_is_413(gw):
    big = orjson.dumps({"model": "dense", "messages": [{"role": "user", "content": "x" * 100_000}]})
    async with aiohttp.ClientSession() as s, s.post(
            gw.url + "/v1/chat/completions", data=big,
            headers={"Authorization": f"Bearer {KEYS['alice']}"}) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"]


async def test_unknown_path_is_404_in_shape(gw):
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/nothing", json={}) as r:
            assert r.status == 404 and "error" in await r.json()
        async with s.get(gw.url + "/healthz") as r:
            assert r.status == 200
        async with s.get(gw.url + "/readyz") as r:
            doc = await r.json()
            assert r.status == 200 and doc["store"] == "ok" and len(doc["policy_sha256"]) == 64


# -------------------------------------------------------------------------------- upstream failures
async def test_upstream_5xx_is_502_and_charges_nothing(gw):
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEYS["tina"], max_retries=0,
                                default_headers={"x-sim-fault": "status=500,rate=1"})
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="dense", messages=MSG, max_tokens=100)
    assert info.value.status_code == 502
    st = await gw.gw.ledger.state(ScopeRef("principal", "tina"), _budgets(gw, "tight"))
    assert st[0].used == 0 and st[0].held == 0


async def test_stream_cut_midway_without_usage_charges_its_bound(gw):
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEYS["tina"], max_retries=0,
                                default_headers={"x-sim-fault": "midstream,rate=1,after=5"})
    with pytest.raises(openai.APIError):
        stream = await client.chat.completions.create(model="dense", messages=MSG, max_tokens=100, stream=True)
        async for _ in stream:
            pass
    await asyncio.sleep(0.05)
    st = await gw.gw.ledger.state(ScopeRef("principal", "tina"), _budgets(gw, "tight"))
    # No usage came: the visible chunks say nothing of unseen generation; the bound (100) is charged.
    assert st[0].used == 100 and st[0].held == 0


async def test_client_disconnect_cancels_and_charges_generated(gw):
    async with aiohttp.ClientSession() as s:
        await s.post(gw.sim_url + "/_sim/config", json={"tokens_per_second": 200})
    client = oai(gw, "tina")
    stream = await client.chat.completions.create(model="dense", messages=MSG, max_tokens=400, stream=True)
    n = 0
    async for _ in stream:
        n += 1
        if n == 3:
            break
    await stream.close()
    for _ in range(100):
        st = await gw.gw.ledger.state(ScopeRef("principal", "tina"), _budgets(gw, "tight"))
        if st[0].held == 0:
            break
        await asyncio.sleep(0.05)
    assert st[0].held == 0
    assert 0 < st[0].used < 400


def _budgets(g, tier: str):
    from gateway.ledger.ledger import BudgetSpec

    return [BudgetSpec.from_config(b) for b in g.gw.config.tiers[tier].budgets]


# ----------------------------------------------------------------------------- trusted identity header
async def test_trusted_identity_header_behind_an_authenticating_proxy(redis_srv, tmp_path: Path):
    cfg = make_config(tmp_path, redis_srv.url, server={"trusted_identity_header": "X-Authenticated-User",
                                                       "trusted_identity_sources": ["127.0.0.1/32"]})
    async with running_gateway(cfg) as g, aiohttp.ClientSession() as s:
        body = {"model": "dense", "messages": MSG, "max_tokens": 5}
        async with s.post(g.url + "/v1/chat/completions", json=body,
                          headers={"X-Authenticated-User": "carol"}) as r:
            assert r.status == 200, await r.text()
        async with s.post(g.url + "/v1/chat/completions", json={**body, "model": "moe"},
                          headers={"X-Authenticated-User": "carol"}) as r:
            assert r.status == 403, "the header's principal gets its own tier"
        async with s.post(g.url + "/v1/chat/completions", json=body,
                          headers={"X-Authenticated-User": "mallory"}) as r:
            assert r.status == 401
        # without the header, API keys still work
        async with s.post(g.url + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEYS['alice']}"}) as r:
            assert r.status == 200
        last = (await (await s.get(g.sim_url + "/_sim/stats")).json())["last_request"]
        assert "x-authenticated-user" not in last["headers"], "identity headers are not forwarded"


@pytest.mark.slow
async def test_a_client_trickling_its_body_gets_408(redis_srv, tmp_path: Path):
    cfg = make_config(tmp_path, redis_srv.url, server={"body_timeout_seconds": 0.5})
    async with running_gateway(cfg) as g:
        host, port = g.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEYS["alice"].encode() + b"\r\nContent-Length: 100\r\n\r\n{\"mo")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 408"), head
        writer.close()


async def test_a_client_hanging_up_mid_body_is_recorded_not_an_internal_error(
        redis_srv, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    async with running_gateway(make_config(tmp_path, redis_srv.url)) as g:
        before = (await sim_last(g))["requests_total"]
        host, port = g.url.removeprefix("http://").split(":")
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEYS["alice"].encode() + b"\r\nContent-Length: 100\r\n\r\n{\"mo")
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler is waiting for the rest of the body
        writer.close()
        await writer.wait_closed()
        for _ in range(100):
            if g.gw.audit is not None and g.gw.audit.records_written:
                break
            await asyncio.sleep(0.02)
        assert (await sim_last(g))["requests_total"] == before, "nothing was forwarded"
    records = audit_records(tmp_path / "data" / "audit")
    assert [(r["status"], r["decision"], r["principal"]) for r in records] == [(499, "failed", "alice")]
    assert "closed the connection" in records[0]["reason"]
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "a hang-up is not an internal error"


async def test_audit_fsync_mode_serves_and_keeps_a_valid_chain(redis_srv, tmp_path: Path):
    """``audit.fsync: true``: records go through the group-commit thread; requests are served as usual."""
    import yaml
    from gatewayutil import policy_dict

    from gateway.audit.verify import verify
    from gateway.policy.config import load_config

    pol = policy_dict(redis_srv.url, tmp_path / "data")
    pol["audit"]["fsync"] = True
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(pol))
    async with running_gateway(load_config(path)) as g:
        assert g.gw.audit is not None and g.gw.audit._thread is not None
        results = await asyncio.gather(*(oai(g).chat.completions.create(model="dense", messages=MSG, max_tokens=8)
                                         for _ in range(5)))
        assert all(r.choices for r in results)
    result = verify([tmp_path / "data" / "audit"])
    assert result.ok and result.records == 5


async def test_record_ttl_from_the_policy_bounds_what_redis_keeps(redis_srv, tmp_path: Path):
    """``store.record_ttl_seconds`` reaches the ledger: the finished-request records of a scope expire after
    it (plus the lease, with 10% to spare), not after the default hour."""
    import redis.asyncio as aioredis
    import yaml
    from gatewayutil import write_policy

    from gateway.policy.config import load_config

    r = aioredis.from_url(redis_srv.url)
    await r.flushall()
    path = write_policy(tmp_path, redis_srv.url)
    pol = yaml.safe_load(path.read_text())
    pol["store"]["record_ttl_seconds"] = 120
    path.write_text(yaml.safe_dump(pol))
    try:
        async with running_gateway(load_config(path)) as g:
            out = await oai(g).chat.completions.create(model="dense", messages=MSG, max_tokens=8)
            assert out.usage is not None
            recs = [k async for k in r.scan_iter(match="*principal:alice*:rec")]
            assert recs, "the request left no record"
            ttl_ms = await r.pttl(recs[0])
            lease = 20 + 5  # the test policy: total_timeout_seconds + lease_grace_seconds
            assert 0 < ttl_ms <= (lease + 120) * 1.1 * 1000 + 1000
    finally:
        await r.aclose()
