"""kgate's nginx/OpenResty plugin (deploy/nginx/kgate.lua) in a real nginx with two workers.

The shipped example configuration (deploy/nginx/nginx.conf) runs with its addresses replaced
(tests/nginxutil.py): nginx calls kgate's decision API over a Unix socket — kgate in-process over a real Redis
— and proxies to kgate's simulator. Each test checks what the client got through nginx and what kgate
recorded: the audit record (by the answer's ``x-kgate-request-id``) and the ledger.
Skipped when nginx, lua-nginx-module or lua-cjson is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from gatewayutil import KEYS, RunningGateway, audit_records, make_config, record_of, running_decision, running_gateway
from nginxutil import Nginx, nginx_binary, running_nginx

from gateway.ledger.ledger import BudgetSpec, ScopeRef
from gateway.ledger.redis_binary import free_port

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Stack:
    g: RunningGateway
    nginx: Nginx
    sock: str  # kgate's decision API: unix:/path

    def headers(self, who: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[who]}", **extra}


@contextlib.asynccontextmanager
async def plugin_stack(tmp_path: Path, redis_url: str, *, decision: bool = True, reuseport: bool = False,
                       options: dict[str, Any] | None = None, chop: int | None = None,
                       **tier_overrides: Any) -> AsyncIterator[Stack]:
    """kgate in-process (its decision API on a Unix socket unless ``decision`` is False) and nginx in front of
    its simulator, with plugin ``options`` (small settle segments by default: every stream is settled in
    several). ``chop``: the simulator's answers reach nginx through :func:`chopping_relay`."""
    nginx_binary()  # skip early when nginx or its Lua module is missing
    sock = f"unix:{tmp_path}/kgate.sock"
    async with contextlib.AsyncExitStack() as es:  # left in reverse: nginx stops first, then kgate
        g = await es.enter_async_context(running_gateway(make_config(tmp_path, redis_url, **tier_overrides)))
        upstream = g.sim_url.removeprefix("http://")
        if chop is not None:
            upstream = await es.enter_async_context(chopping_relay(g.sim_url, chop))
        if decision:
            await es.enter_async_context(running_decision(g, (sock,)))
        n = await es.enter_async_context(running_nginx(
            tmp_path / "nginx", upstream=upstream, decision=sock, reuseport=reuseport,
            **{"segment_bytes": 2048, **(options or {})}))
        yield Stack(g, n, sock)
    assert not n.lua_errors(), "\n".join(n.lua_errors())


@contextlib.asynccontextmanager
async def chopping_relay(target: str, piece: int) -> AsyncIterator[str]:
    """An upstream in front of ``target`` that sends each answer in ``piece``-byte writes, a millisecond apart,
    with an SSE stream's line ends turned into CRLF: events reach nginx split anywhere. Yields HOST:PORT."""
    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        skip = {"host", "content-length", "connection", "transfer-encoding"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        async with aiohttp.ClientSession(auto_decompress=False) as s, \
                s.post(target + request.path_qs, data=body, headers=headers) as up:
            data = await up.read()
            ctype = up.headers.get("Content-Type", "application/json")
            if "event-stream" in ctype:
                data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": ctype})
            await resp.prepare(request)
            for i in range(0, len(data), piece):
                await resp.write(data[i:i + piece])
                await asyncio.sleep(0.001)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_post("/{tail:.*}", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@pytest.fixture
async def stack(tmp_path: Path, flushed_redis_url: str) -> AsyncIterator[Stack]:
    async with plugin_stack(tmp_path, flushed_redis_url) as s:
        yield s


async def sim_stats(g: RunningGateway) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(g.sim_url + "/_sim/stats") as r:
        return await r.json()  # type: ignore[no-any-return]


async def ledger_used(g: RunningGateway, who: str, tier: str) -> tuple[float, float]:
    """(used, held) of the tier's first budget for principal ``who``."""
    specs = [BudgetSpec.from_config(b) for b in g.gw.config.tiers[tier].budgets]
    st = await g.gw.ledger.state(ScopeRef("principal", who), specs)
    return st[0].used, st[0].held


async def _wait_for(found: Callable[[], list[dict[str, Any]]], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not (got := found()):
        assert time.monotonic() < deadline, f"nothing found within {timeout} s"
        await asyncio.sleep(0.05)
    return got


def sse_events(data: bytes) -> list[dict[str, Any]]:
    out = []
    for block in data.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: {"):
                out.append(orjson.loads(line[6:]))
    return out


# --------------------------------------------------------------------------------------------- unary answers
async def test_json_request_is_charged_exactly_and_renamed_back(stack: Stack) -> None:
    body = {"model": "dense", "messages": MSG, "max_tokens": 300}
    async with aiohttp.ClientSession() as s, s.post(stack.nginx.url + CHAT, json=body,
                                                    headers=stack.headers("tina")) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
        rid = r.headers["x-kgate-request-id"]
        assert r.headers["x-kgate-k-max"] and "RateLimit" in r.headers
    assert answer["model"] == "dense"  # the upstream's name put back
    usage = answer["usage"]
    rec = await record_of(stack.g, rid)
    assert rec["decision"] == "allowed" and rec["principal"] == "tina"
    assert rec["usage"]["source"] == "upstream"
    assert rec["usage"]["output_tokens"] == usage["completion_tokens"]
    assert rec["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    assert await ledger_used(stack.g, "tina", "tight") == (usage["completion_tokens"], 0)
    # kgate's body and headers went upstream, never the caller's key
    last = (await sim_stats(stack.g))["last_request"]
    assert last["body"]["model"] == "llama-sim-8b" and last["body"]["max_tokens"] == 300
    assert KEYS["tina"] not in str(last) and "authorization" not in last["headers"]
    assert last["headers"]["x-request-id"] == rid

    # Gemini: the model in the path, the key in x-goog-api-key; modelVersion renamed back
    gem = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
           "generationConfig": {"maxOutputTokens": 40}}
    async with aiohttp.ClientSession() as s, s.post(stack.nginx.url + "/v1beta/models/dense:generateContent",
                                                    json=gem, headers={"x-goog-api-key": KEYS["tina"]}) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
        rid = r.headers["x-kgate-request-id"]
    assert answer["modelVersion"] == "dense"
    rec = await record_of(stack.g, rid)
    assert rec["decision"] == "allowed"
    assert rec["usage"]["output_tokens"] == answer["usageMetadata"]["candidatesTokenCount"]
    last = (await sim_stats(stack.g))["last_request"]
    assert last["path"] == "/v1beta/models/llama-sim-8b:generateContent" and KEYS["tina"] not in str(last)


async def test_over_caps_is_rejected_and_never_reaches_the_model(stack: Stack) -> None:
    before = (await sim_stats(stack.g))["requests_total"]
    body = {"model": "dense", "messages": MSG, "n": 9}
    async with aiohttp.ClientSession() as s, s.post(stack.nginx.url + CHAT, json=body,
                                                    headers=stack.headers("alice")) as r:
        assert r.status == 403
        err = await r.json()
        rid = r.headers["x-kgate-request-id"]
    assert err["error"]["type"] == "permission_error" and err["error"]["code"] == "max_samples_exceeded"
    rec = await record_of(stack.g, rid)
    assert rec["decision"] == "denied" and rec["status"] == 403
    assert (await sim_stats(stack.g))["requests_total"] == before


async def test_clamp_tier_forwards_the_clamped_request(stack: Stack) -> None:
    body = {"model": "dense", "messages": MSG, "n": 4, "max_tokens": 100}
    async with aiohttp.ClientSession() as s, s.post(stack.nginx.url + CHAT, json=body,
                                                    headers=stack.headers("carol")) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
        rid = r.headers["x-kgate-request-id"]
        assert "n=2" in r.headers["x-kgate-clamped"]
    assert len(answer["choices"]) == 2
    assert (await sim_stats(stack.g))["last_request"]["body"]["n"] == 2
    rec = await record_of(stack.g, rid)
    assert rec["decision"] == "clamped" and rec["usage"]["samples"] == 2
    assert rec["usage"]["output_tokens"] == answer["usage"]["completion_tokens"]


async def test_invalid_json_is_a_400_in_the_api_shape_and_charges_nothing(stack: Stack) -> None:
    before = (await sim_stats(stack.g))["requests_total"]
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.nginx.url + CHAT, data=b'{"model": "dense", "messages": [',
                          headers=stack.headers("tina", **{"Content-Type": "application/json"})) as r:
            assert r.status == 400
            err = await r.json()
            rid = r.headers["x-kgate-request-id"]
        assert err["error"]["type"] == "invalid_request_error"
        async with s.post(stack.nginx.url + "/v1/messages", data=b"not json",
                          headers={"x-api-key": KEYS["tina"], "anthropic-version": "2023-06-01"}) as r:
            assert r.status == 400
            doc = await r.json()
        assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    rec = await record_of(stack.g, rid)
    assert rec["decision"] == "denied" and rec["status"] == 400 and not rec.get("usage")
    assert await ledger_used(stack.g, "tina", "tight") == (0, 0)
    assert (await sim_stats(stack.g))["requests_total"] == before


# ----------------------------------------------------------------------------------------------- budgets
async def test_a_budget_is_shared_by_both_nginx_workers(tmp_path: Path, flushed_redis_url: str) -> None:
    tight = {"budgets": [{"metric": "requests", "window": "1h", "limit": 5}]}
    async with plugin_stack(tmp_path, flushed_redis_url, reuseport=True, tight=tight) as st:
        connector = aiohttp.TCPConnector(force_close=True, limit=0)  # a connection per request
        async with aiohttp.ClientSession(connector=connector) as s:
            async def one(i: int) -> tuple[int, str, dict[str, Any]]:
                body = {"model": "dense", "messages": MSG, "max_tokens": 20}
                async with s.post(st.nginx.url + CHAT, json=body, headers=st.headers("tina")) as r:
                    return r.status, r.headers.get("x-kgate-request-id", ""), await r.json()

            results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(20))), 30)
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [200] * 5 + [429] * 15, statuses
        for status, _, doc in results:
            if status == 429:
                assert doc["error"]["type"] == "rate_limit_error"
        for _, rid, _ in results:
            await record_of(st.g, rid)
        recs = [r for r in audit_records(st.g) if r["principal"] == "tina"]
        assert sorted(r["decision"] for r in recs) == ["allowed"] * 5 + ["denied"] * 15
        assert sum(1 for r in recs if r["status"] == 429) == 15
        assert await ledger_used(st.g, "tina", "tight") == (5, 0)
        workers = {pid for pid, _, rid in st.nginx.access_log() if rid != "-"}
        assert len(workers) == 2, f"the requests were served by workers {workers}"


# ------------------------------------------------------------------------------------------------- streams
async def test_stream_usage_is_injected_stripped_and_charged_exactly(stack: Stack) -> None:
    sim = {"x-sim-output-tokens": "37"}
    # A client that did not ask for usage: kgate asked the upstream for it; the plugin drops that event.
    body = {"model": "dense", "messages": MSG, "stream": True, "max_tokens": 200}
    async with aiohttp.ClientSession() as s, s.post(stack.nginx.url + CHAT, json=body,
                                                    headers=stack.headers("tina", **sim)) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        data = await r.read()
        rid = r.headers["x-kgate-request-id"]
    events = sse_events(data)
    assert events and data.rstrip().endswith(b"data: [DONE]")
    assert all(e["choices"] for e in events), "the injected usage-only event reached the client"
    assert all(e.get("usage") is None for e in events)
    assert {e["model"] for e in events} == {"dense"}
    assert (await sim_stats(stack.g))["last_request"]["body"]["stream_options"] == {"include_usage": True}
    rec = await record_of(stack.g, rid)
    assert rec["decision"] == "allowed"
    assert rec["usage"]["source"] == "upstream" and rec["usage"]["output_tokens"] == 37
    assert await ledger_used(stack.g, "tina", "tight") == (37, 0)

    # The OpenAI SDK asking for usage itself: it gets the usage event, and the charge is the same.
    client = openai.AsyncOpenAI(base_url=stack.nginx.url + "/v1", api_key=KEYS["tina"], max_retries=0,
                                default_headers=sim)
    raw = await client.chat.completions.with_raw_response.create(
        model="dense", messages=MSG, stream=True, max_tokens=200, stream_options={"include_usage": True})
    rid = raw.headers["x-kgate-request-id"]
    chunks = [c async for c in raw.parse()]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 37
    assert all(c.model == "dense" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    rec = await record_of(stack.g, rid)
    assert rec["decision"] == "allowed" and rec["usage"]["output_tokens"] == 37
    assert await ledger_used(stack.g, "tina", "tight") == (74, 0)
    await client.close()


async def test_anthropic_stream_through_the_plugin(stack: Stack) -> None:
    client = anthropic.AsyncAnthropic(base_url=stack.nginx.url, api_key=KEYS["tina"], max_retries=0,
                                      default_headers={"x-sim-output-tokens": "29"})
    raw = await client.messages.with_raw_response.create(model="dense", max_tokens=300, messages=MSG,
                                                         stream=True)
    rid = raw.headers["x-kgate-request-id"]
    events = [e async for e in await raw.parse()]
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert events[0].message.model == "dense"  # type: ignore[union-attr]
    delta = next(e for e in events if e.type == "message_delta")
    assert delta.usage.output_tokens == 29  # type: ignore[union-attr]
    rec = await record_of(stack.g, rid)
    assert rec["decision"] == "allowed" and rec["api"] == "anthropic.messages"
    assert rec["usage"]["source"] == "upstream" and rec["usage"]["output_tokens"] == 29
    assert await ledger_used(stack.g, "tina", "tight") == (29, 0)
    last = (await sim_stats(stack.g))["last_request"]
    assert last["body"]["model"] == "llama-sim-8b" and KEYS["tina"] not in str(last)
    await client.close()


async def test_events_split_anywhere_with_crlf_are_filtered_and_metered(tmp_path: Path,
                                                                      flushed_redis_url: str) -> None:
    """Answers reaching nginx in 37-byte pieces (SSE with CRLF line ends): the usage event is still dropped,
    every model name put back, and the charge is the provider's usage."""
    async with plugin_stack(tmp_path, flushed_redis_url, chop=37) as st:
        sim = {"x-sim-output-tokens": "23"}
        async with aiohttp.ClientSession() as s:
            body = {"model": "dense", "messages": MSG, "stream": True, "max_tokens": 200}
            async with s.post(st.nginx.url + CHAT, json=body, headers=st.headers("tina", **sim)) as r:
                assert r.status == 200
                data = await r.read()
                rid = r.headers["x-kgate-request-id"]
            assert b"\r\n\r\n" in data and data.rstrip().endswith(b"data: [DONE]")
            events = sse_events(data)
            assert events and all(e["choices"] for e in events) and {e["model"] for e in events} == {"dense"}
            assert b"llama-sim-8b" not in data
            rec = await record_of(st.g, rid)
            assert rec["decision"] == "allowed" and rec["usage"]["output_tokens"] == 23

            unary = {"model": "dense", "messages": MSG, "max_tokens": 200}
            async with s.post(st.nginx.url + CHAT, json=unary, headers=st.headers("tina", **sim)) as r:
                answer = await r.json()
                rid = r.headers["x-kgate-request-id"]
            assert answer["model"] == "dense" and answer["usage"]["completion_tokens"] == 23
            assert (await record_of(st.g, rid))["usage"]["output_tokens"] == 23

            # Gemini streams: SSE (alt=sse), and the JSON array (renamed across the pieces)
            gem = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                   "generationConfig": {"maxOutputTokens": 200}}
            for query in ("?alt=sse", ""):
                async with s.post(st.nginx.url + "/v1beta/models/dense:streamGenerateContent" + query, json=gem,
                                  headers={"x-goog-api-key": KEYS["tina"], **sim}) as r:
                    assert r.status == 200, await r.text()
                    data = await r.read()
                    rid = r.headers["x-kgate-request-id"]
                chunks = sse_events(data) if query else orjson.loads(data)
                assert chunks and {c["modelVersion"] for c in chunks} == {"dense"}, data[:300]
                assert b"llama-sim-8b" not in data
                usage = chunks[-1]["usageMetadata"]
                rec = await record_of(st.g, rid)
                assert rec["decision"] == "allowed"
                assert rec["usage"]["output_tokens"] == usage["candidatesTokenCount"] == 23
        assert await ledger_used(st.g, "tina", "tight") == (4 * 23, 0)


async def test_upstream_errors_reach_the_client_and_charge_nothing(stack: Stack, tmp_path: Path) -> None:
    body = {"model": "dense", "messages": MSG, "max_tokens": 50}
    async with aiohttp.ClientSession() as s:
        # the upstream answers an error: passed on as the provider wrote it; the hold released
        async with s.post(stack.nginx.url + CHAT, json=body,
                          headers=stack.headers("tina", **{"x-sim-fault": "status=500"})) as r:
            assert r.status == 500
            assert "error" in await r.json()
            rid = r.headers["x-kgate-request-id"]
        rec = await record_of(stack.g, rid)
        assert rec["decision"] == "failed" and not rec.get("usage"), rec
        # the upstream cannot be reached: nginx's own 502, answered in the API's shape
        async with running_nginx(tmp_path / "dead", upstream=f"127.0.0.1:{free_port()}", decision=stack.sock) as n:
            async with s.post(n.url + "/v1/messages", json={"model": "dense", "max_tokens": 50, "messages": MSG},
                              headers={"x-api-key": KEYS["tina"]}) as r:
                assert r.status == 502
                doc = await r.json()
                rid = r.headers["x-kgate-request-id"]
            assert doc["type"] == "error" and doc["error"]["type"] == "api_error"
            assert not n.lua_errors()
        rec = await record_of(stack.g, rid)
        assert rec["decision"] == "failed" and "not reached" in rec["reason"], rec
    assert await ledger_used(stack.g, "tina", "tight") == (0, 0)


async def test_client_leaving_a_stream_is_charged_never_free(stack: Stack) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.g.sim_url + "/_sim/config", json={"tokens_per_second": 20}) as r:
            assert r.status == 200  # 64 tokens: a stream of about 3 s
        body = {"model": "dense", "messages": MSG, "stream": True, "max_tokens": 100}
        async with s.post(stack.nginx.url + CHAT, json=body, headers=stack.headers("tina")) as r:
            assert r.status == 200
            rid = r.headers["x-kgate-request-id"]
            got = b""
            while got.count(b"\n\n") < 3:
                got += await asyncio.wait_for(r.content.readany(), 5)
            r.close()  # the client leaves mid-stream
    rec = await record_of(stack.g, rid, timeout=10)
    assert rec["decision"] == "partial", rec
    assert "client disconnected" in rec["reason"]
    # no usage arrived: the tier's on_missing_usage (the bound: max_tokens) is charged
    assert rec["usage"]["generated_tokens"] == 100 and rec["usage"]["source"] == "bound"
    assert await ledger_used(stack.g, "tina", "tight") == (100, 0)

    # A client that leaves before the upstream's first byte (nginx's 499): charged as work the upstream had.
    async with aiohttp.ClientSession() as s:
        async with s.post(stack.g.sim_url + "/_sim/config", json={"tokens_per_second": 0, "latency_ms": 3000}):
            pass
        body = {"model": "dense", "messages": MSG, "max_tokens": 50}
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(stack.nginx.url + CHAT, json=body, headers=stack.headers("tina"),
                              timeout=aiohttp.ClientTimeout(total=0.5)):
                pass
    early = await _wait_for(lambda: [r for r in audit_records(stack.g) if "before the answer" in r["reason"]], 10)
    assert early[0]["decision"] == "partial" and early[0]["usage"]["generated_tokens"] == 50, early
    assert await ledger_used(stack.g, "tina", "tight") == (150, 0)


async def test_upstream_breaking_a_stream_is_recorded_as_such(stack: Stack) -> None:
    body = {"model": "dense", "messages": MSG, "stream": True, "max_tokens": 100}
    async with aiohttp.ClientSession() as s, s.post(
            stack.nginx.url + CHAT, json=body,
            headers=stack.headers("tina", **{"x-sim-fault": "midstream,after=3"})) as r:
        assert r.status == 200
        rid = r.headers["x-kgate-request-id"]
        with pytest.raises(aiohttp.ClientPayloadError):  # nginx ends the chunked answer without its last chunk
            await r.read()
    rec = await record_of(stack.g, rid, timeout=10)
    assert rec["decision"] == "partial" and "broke off the stream" in rec["reason"], rec
    assert await ledger_used(stack.g, "tina", "tight") == (100, 0)


# ------------------------------------------------------------------------------------------ kgate away
async def test_kgate_unreachable_denies_except_cached_fail_open_callers(tmp_path: Path,
                                                                       flushed_redis_url: str) -> None:
    async with plugin_stack(tmp_path, flushed_redis_url, decision=False) as st:
        url = st.nginx.url
        body = {"model": "dense", "messages": MSG, "max_tokens": 50}
        async with aiohttp.ClientSession() as s:
            async with running_decision(st.g, (st.sock,)):  # kgate up: olga's and alice's tiers are learned
                for who in ("olga", "alice"):
                    async with s.post(url + CHAT, json=body, headers=st.headers(who)) as r:
                        assert r.status == 200, await r.text()
                        await record_of(st.g, r.headers["x-kgate-request-id"])
            served = len(audit_records(st.g))
            before = (await sim_stats(st.g))["requests_total"]

            # kgate's decision API is gone
            async with s.post(url + CHAT, json=body, headers=st.headers("alice")) as r:
                assert r.status == 503
                err = await r.json()
            assert err["error"]["code"] == "kgate_unavailable" and err["error"]["type"] == "server_error"
            async with s.post(url + "/v1/messages", headers={"x-api-key": KEYS["alice"]},
                              json={"model": "dense", "max_tokens": 50, "messages": MSG}) as r:
                assert r.status == 503
                doc = await r.json()
            assert doc["type"] == "error" and doc["error"]["type"] == "overloaded_error"
            async with s.post(url + "/v1beta/models/dense:generateContent", headers={"x-goog-api-key": "unknown"},
                              json={"contents": [{"parts": [{"text": "hi"}]}]}) as r:
                assert r.status == 503  # a caller never seen: unknown_callers = "deny"
                doc = await r.json()
            assert doc["error"]["status"] == "UNAVAILABLE" and doc["error"]["code"] == 503
            assert (await sim_stats(st.g))["requests_total"] == before

            # olga's tier is fail-open (on_store_error: allow): served, unmetered, without her key
            async with s.post(url + CHAT, json=body, headers=st.headers("olga")) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-kgate-unmetered"] == "1"
                answer = await r.json()
            assert answer["model"] == "dense"
            last = (await sim_stats(st.g))["last_request"]
            assert last["body"]["model"] == "llama-sim-8b" and KEYS["olga"] not in str(last)
        assert len(audit_records(st.g)) == served  # nothing recorded: kgate never saw them
        log = st.nginx.error_log
        assert "UNMETERED" in log and "the caller's tier is fail-open" in log
        assert "decision API is unavailable" in log



async def test_decision_api_over_tcp_with_a_bearer_token(tmp_path: Path, flushed_redis_url: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """kgate's decision API on TCP with a token: the plugin sends it; a wrong one is refused by kgate, and the
    plugin answers 503 — never serves unmetered, even to callers it would serve when kgate is away."""
    nginx_binary()
    monkeypatch.setenv("KGATE_DECISION_TOKEN", "s3cret-token")
    body = {"model": "dense", "messages": MSG, "max_tokens": 50}
    async with running_gateway(make_config(tmp_path, flushed_redis_url)) as g, running_decision(g) as d:
        upstream = g.sim_url.removeprefix("http://")
        async with running_nginx(tmp_path / "good", upstream=upstream, decision=d.url, token="s3cret-token") as n:
            async with aiohttp.ClientSession() as s, s.post(n.url + CHAT, json=body,
                                                            headers={"x-api-key": KEYS["olga"]}) as r:
                assert r.status == 200, await r.text()
                rid = r.headers["x-kgate-request-id"]
            assert (await record_of(g, rid))["decision"] == "allowed"
        async with running_nginx(tmp_path / "bad", upstream=upstream, decision=d.url, token="wrong",
                           unknown_callers="allow") as n:
            async with aiohttp.ClientSession() as s, s.post(n.url + CHAT, json=body,
                                                            headers={"x-api-key": KEYS["olga"]}) as r:
                assert r.status == 503
                assert "x-kgate-unmetered" not in r.headers
                assert (await r.json())["error"]["code"] == "kgate_unavailable"
            assert "refused the admit call (401)" in n.error_log
