"""The decision API (gateway/decision/): admit and settle over HTTP/JSON, as a gateway plugin calls them.

A real gateway (in-process, a real Redis, kgate's simulator as the model server): each test plays the
calling gateway — admit, send what kgate allowed to the simulator, settle with what came back — and checks
the client-facing decision, the ledger's charge and the audit record.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.decision.service import AdmitInput, DecisionService, SettleInput, UnknownRequest
from gateway.proxy.server import StartupError
from tests.gatewayutil import KEYS, audit_records, make_config, record_of, running_decision, running_gateway

CHAT = "/v1/chat/completions"


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "dense", "messages": [{"role": "user", "content": "hello"}], **extra}


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture
async def gw(tmp_path: Path, redis_url: str) -> AsyncIterator[Any]:
    async with running_gateway(make_config(tmp_path, redis_url)) as g:
        yield g


@pytest.fixture
async def api(gw: Any) -> AsyncIterator[tuple[Any, str, aiohttp.ClientSession]]:
    async with running_decision(gw) as d, aiohttp.ClientSession() as s:
        yield gw, d.url, s


async def admit(s: aiohttp.ClientSession, url: str, body: dict[str, Any] | bytes, who: str = "alice",
                path: str = CHAT, method: str = "POST", **extra: Any) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    doc = {"method": method, "path": path, "headers": bearer(who), "body_base64": base64.b64encode(raw).decode(),
           "peer": "127.0.0.1", **extra}
    async with s.post(url + "/v1/admit", json=doc) as r:
        assert r.status == 200, await r.text()
        return await r.json()  # type: ignore[no-any-return]


async def upstream(s: aiohttp.ClientSession, g: Any, allow: dict[str, Any],
                   extra: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with s.post(g.sim_url + allow["path"], data=allow["body"].encode(),
                      headers={**allow["upstream_headers"], **(extra or {})}) as r:
        return r.status, await r.read()


async def settle(s: aiohttp.ClientSession, url: str, rid: str, expect: int = 200, **doc: Any) -> dict[str, Any]:
    if "data" in doc and isinstance(doc["data"], bytes):
        doc["data_base64"] = base64.b64encode(doc.pop("data")).decode()
    async with s.post(url + "/v1/settle", json={"request_id": rid, **doc}) as r:
        assert r.status == expect, await r.text()
        return await r.json()  # type: ignore[no-any-return]


def sim_usage(data: bytes) -> dict[str, Any]:
    """The usage the simulator reported, from a JSON answer or the last usage event of a stream."""
    if data.lstrip().startswith(b"{"):
        return orjson.loads(data)["usage"]  # type: ignore[no-any-return]
    usage = None
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            event = orjson.loads(line[6:])
            usage = event.get("usage") or usage
    assert usage is not None
    return usage


async def test_unary_round_trip_is_charged_exactly(api: Any) -> None:
    g, url, s = api
    allow = await admit(s, url, chat(max_tokens=50))
    assert allow["decision"] == "allow" and allow["upstream"] == "sim" and not allow["stream"]
    sent = orjson.loads(allow["body"])
    assert sent["model"] == "llama-sim-8b" and sent["max_tokens"] == 50  # kgate's body, the upstream's name
    assert "authorization" in allow["remove_headers"]
    assert "authorization" not in allow["upstream_headers"]  # the caller's key never travels upstream
    assert allow["response_headers"]["x-kgate-request-id"] == allow["request_id"]
    status, data = await upstream(s, g, allow)
    assert status == 200
    done = await settle(s, url, allow["request_id"], status=200, data=data, final=True)
    assert done["state"] == "settled" and done["decision"] == "allowed"
    usage = sim_usage(data)
    assert done["charged"]["output_tokens"] == usage["completion_tokens"]
    assert done["headers"]["x-kgate-k"]
    rec = await record_of(g, allow["request_id"])
    assert rec["decision"] == "allowed" and rec["usage"]["output_tokens"] == usage["completion_tokens"]
    assert rec["principal"] == "alice"


async def test_stream_segments_in_any_order_and_twice(gw: Any) -> None:
    """Segments may arrive twice or ahead of their turn: the meter reads each byte once, in order."""
    async with running_decision(gw, ()) as d, aiohttp.ClientSession() as s:
        service: DecisionService = d.service
        body = orjson.dumps(chat(stream=True))
        allow = await service.admit(AdmitInput("POST", CHAT, bearer("alice"), body, "127.0.0.1"))
        assert allow.__class__.__name__ == "Allow"
        assert allow.stream and allow.strip_usage  # kgate asked for usage the client did not
        async with s.post(gw.sim_url + allow.path, data=allow.body, headers=allow.upstream_headers) as r:
            data = await r.read()
        a, b, c = data[:100], data[100:1000], data[1000:]
        passed = (await service.settle(allow.request_id, SettleInput(200, b, 100))).passed
        assert passed == b""  # ahead of its turn: waits
        passed += (await service.settle(allow.request_id, SettleInput(200, a, 0))).passed
        passed += (await service.settle(allow.request_id, SettleInput(200, a + b, 0))).passed  # a repeat
        done = await service.settle(allow.request_id, SettleInput(200, c, 1000, final=True))
        passed += done.passed
        assert done.received == len(data)
        assert done.decision == "allowed" and done.charged is not None
        assert done.charged["output_tokens"] == sim_usage(data)["completion_tokens"]
        assert b'"usage":{' not in passed and b"[DONE]" in passed  # the usage event kgate added is stripped
        assert b'"model":"dense"' in passed and b"llama-sim-8b" not in passed  # the public name
        again = await service.settle(allow.request_id, SettleInput(final=True))
        # a repeated final answers the same result (its bytes were passed on once already)
        assert again.as_json() == done.as_json() and again.passed == b""


async def test_usage_only_settle(api: Any) -> None:
    _g, url, s = api
    allow = await admit(s, url, chat())
    done = await settle(s, url, allow["request_id"], status=200, final=True,
                        usage={"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35})
    assert done["charged"]["output_tokens"] == 30 and done["charged"]["source"] == "upstream"


async def test_repeated_and_unknown_settles(api: Any) -> None:
    g, url, s = api
    allow = await admit(s, url, chat())
    _, data = await upstream(s, g, allow)
    first = await settle(s, url, allow["request_id"], status=200, data=data, final=True)
    second = await settle(s, url, allow["request_id"], status=200, data=data, final=True)
    assert first == second
    assert len([r for r in audit_records(g) if r["request_id"] == allow["request_id"]]) == 1
    gone = await settle(s, url, "0123456789abcdef", expect=404, final=True)
    assert gone["error"]["code"] == "unknown_request"


async def test_denials_in_the_clients_api_shape(api: Any) -> None:
    g, url, s = api
    over = await admit(s, url, chat(n=9))
    assert over["decision"] == "deny" and over["status"] == 403
    err = orjson.loads(over["body"])["error"]
    assert err["code"] == "max_samples_exceeded" and err["type"]
    ant = await admit(s, url, {"model": "dense", "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]},
                      path="/v1/messages")
    assert ant["status"] == 400 and orjson.loads(ant["body"])["type"] == "error"
    nokey = await admit(s, url, chat(), headers={})
    assert nokey["status"] == 401
    wrong = await admit(s, url, chat(), method="GET")
    assert wrong["status"] == 405
    unknown = await admit(s, url, chat(), path="/v1/nothing")
    assert unknown["status"] == 404
    bad = await admit(s, url, b"{not json")
    assert bad["status"] == 400 and bad["code"] == "bad_request"
    big = await admit(s, url, chat(pad="x" * 70000))
    assert big["status"] == 413
    for d in (over, nokey, bad, big):
        rec = await record_of(g, d["request_id"])
        assert rec["decision"] == "denied" and rec["status"] == d["status"]
    assert (await record_of(g, big["request_id"]))["principal"] == "alice"


async def test_clamped_request(api: Any) -> None:
    g, url, s = api
    allow = await admit(s, url, chat(n=4, max_tokens=100), who="carol")
    assert allow["decision"] == "allow" and allow["clamped"]
    assert orjson.loads(allow["body"])["n"] <= 2
    _, data = await upstream(s, g, allow)
    done = await settle(s, url, allow["request_id"], status=200, data=data, final=True)
    assert done["decision"] == "clamped"


async def test_budget_holds_count_before_settle(tmp_path: Path, redis_url: str) -> None:
    """Admitted and not yet settled is held: a budget of 3 admits exactly 3 of 6 concurrent requests."""
    cfg = make_config(tmp_path, redis_url, tight={"budgets": [{"metric": "requests", "window": "1h", "limit": 3}]})
    async with running_gateway(cfg) as g, running_decision(g) as d, aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(admit(s, d.url, chat(), who="tina") for _ in range(6)))
        allowed = [r for r in results if r["decision"] == "allow"]
        denied = [r for r in results if r["decision"] == "deny"]
        assert len(allowed) == 3 and len(denied) == 3
        assert all(r["status"] == 429 and "retry-after" in {k.lower() for k in r["headers"]} for r in denied)
        for a in allowed:
            _, data = await upstream(s, g, a)
            await settle(s, d.url, a["request_id"], status=200, data=data, final=True)
        assert (await admit(s, d.url, chat(), who="tina"))["decision"] == "deny"


async def test_upstream_errors_and_unsent_requests_are_not_charged(api: Any) -> None:
    _g, url, s = api
    refused = await admit(s, url, chat())
    done = await settle(s, url, refused["request_id"], status=400, data=b'{"error":{}}', final=True)
    assert done["charged"] is None and done["decision"] == "failed"
    unsent = await admit(s, url, chat())
    done = await settle(s, url, unsent["request_id"], final=True, outcome="upstream_unreachable")
    assert done["charged"] is None and done["status"] == 502
    timed_out = await admit(s, url, chat(max_tokens=40))
    done = await settle(s, url, timed_out["request_id"], final=True, outcome="upstream_timeout")
    assert done["decision"] == "partial" and done["charged"]["output_tokens"] == 40  # the bound: never free


async def test_a_stream_cut_by_the_client_is_charged(api: Any) -> None:
    g, url, s = api
    allow = await admit(s, url, chat(stream=True, max_tokens=64))
    _, data = await upstream(s, g, allow)
    done = await settle(s, url, allow["request_id"], status=200, data=data[:300], final=True,
                        outcome="client_disconnected")
    assert done["decision"] == "partial" and "client disconnected" in done["reason"]
    assert done["charged"]["generated_tokens"] == 64  # no usage came: charged the bound (on_missing_usage)


async def test_unsettled_requests_expire_charged(gw: Any) -> None:
    async with running_decision(gw, (), settle_timeout_seconds=0.2) as d:
        service: DecisionService = d.service
        allow = await service.admit(AdmitInput("POST", CHAT, bearer("alice"),
                                               orjson.dumps(chat(max_tokens=32)), "127.0.0.1"))
        assert service.pending == 1
        await asyncio.sleep(0.3)
        assert await service.expire() == 1 and service.pending == 0
        rec = await record_of(gw, allow.request_id)
        assert rec["decision"] == "partial" and "never settled" in rec["reason"]
        assert rec["usage"]["generated_tokens"] == 32
        with pytest.raises(UnknownRequest):
            await service.settle("ffff", SettleInput(final=True))


async def test_shutdown_settles_what_is_waiting(gw: Any) -> None:
    d_cm = running_decision(gw, ())
    d = await d_cm.__aenter__()
    allow = await d.service.admit(AdmitInput("POST", CHAT, bearer("alice"), orjson.dumps(chat(max_tokens=16))))
    await d_cm.__aexit__(None, None, None)
    rec = await record_of(gw, allow.request_id)
    assert rec["decision"] == "partial" and "shut down" in rec["reason"]


async def test_token_and_malformed_calls(gw: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KGATE_DECISION_TOKEN", "s3cret")
    async with running_decision(gw) as d, aiohttp.ClientSession() as s:
        doc = {"path": CHAT, "headers": bearer("alice"), "body": orjson.dumps(chat()).decode()}
        async with s.post(d.url + "/v1/admit", json=doc) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
        auth = {"Authorization": "Bearer s3cret"}
        async with s.post(d.url + "/v1/admit", json=doc, headers=auth) as r:
            assert r.status == 200 and (await r.json())["decision"] == "allow"
        for bad in (b"not json", b"[1]", orjson.dumps({"headers": {}}), orjson.dumps({"path": "v1"}),
                    orjson.dumps({"path": CHAT, "body_base64": "!!"}),
                    orjson.dumps({"path": CHAT, "headers": {"a": 1}})):
            async with s.post(d.url + "/v1/admit", data=bad, headers=auth) as r:
                assert r.status == 400, bad
                assert (await r.json())["error"]["message"]
        for bad_settle in ({"request_id": "x", "offset": -1}, {"request_id": "x", "outcome": "lost"},
                           {"request_id": "x", "status": "200"}, {"request_id": "x", "final": "yes"}, {}):
            async with s.post(d.url + "/v1/settle", json=bad_settle, headers=auth) as r:
                assert r.status in (400, 404), bad_settle
        async with s.get(d.url + "/healthz") as r:
            assert r.status == 200


async def test_unix_socket_listener(gw: Any, tmp_path: Path) -> None:
    sock = tmp_path / "decision.sock"
    async with running_decision(gw, (f"unix:{sock}",)):
        assert sock.stat().st_mode & 0o777 == 0o660
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
            allow = await admit(s, "http://kgate", chat())
            assert allow["decision"] == "allow"
            done = await settle(s, "http://kgate", allow["request_id"], final=True, status=200,
                                usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
            assert done["state"] == "settled"


async def test_open_tcp_listener_needs_a_token(gw: Any) -> None:
    with pytest.raises(StartupError, match="open to the network"):
        async with running_decision(gw, ("0.0.0.0:0",)):
            pass


async def test_fail_open_is_reported_per_tier(api: Any) -> None:
    _g, url, s = api
    assert (await admit(s, url, chat(), who="olga"))["fail_open"] is True
    assert (await admit(s, url, chat(), who="alice"))["fail_open"] is False
    assert (await admit(s, url, chat(n=9), who="olga"))["fail_open"] is True  # a denial says it too

