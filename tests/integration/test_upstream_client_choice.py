"""The upstream client chosen in the policy (``upstreams.<name>.client: native | aiohttp``): a gateway
proxies JSON answers and streams the same way through either, sends the upstream the same headers, and
a client that leaves a stream still ends the upstream's generation once the drain gives up."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web
from gatewayutil import KEYS, record_of, running_gateway
from recording_upstream import Recorded, RecordingUpstream, config_with_upstream, spend_cap, stream

KINDS = ["native", "aiohttp"]
CHAT = "/v1/chat/completions"
HEADERS = {"Authorization": f"Bearer {KEYS['tina']}"}
BIG = {"models": "*", "max_k": 64,
       "budgets": [{"metric": "generated_tokens", "window": "1d", "limit": 10_000_000}]}


def body(streamed: bool) -> dict[str, Any]:
    return {"model": "dense", "stream": streamed, "max_tokens": 100,
            "messages": [{"role": "user", "content": "hello"}]}


def json_or_stream(**stream_options: Any) -> Any:
    """A provider that spends the forwarded cap on a JSON answer, or streams ``stream_options``' events."""
    streaming, unary = stream(**stream_options), spend_cap()

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        return await (streaming if (rec.body or {}).get("stream") else unary)(request, rec)

    return answer




async def test_json_and_streams_pass_the_same_way_through_either_client(tmp_path, redis_url):
    sent_headers: dict[str, list[str]] = {}
    for kind in KINDS:
        async with RecordingUpstream(json_or_stream(reasoning=0, visible_chunks=5, delay=0.0)) as up:
            cfg = config_with_upstream(tmp_path, redis_url, up.url, upstream={"client": kind}, tight=BIG)
            assert cfg.upstreams["sim"].client == kind
            async with running_gateway(cfg) as g, aiohttp.ClientSession() as s:
                async with s.post(g.url + CHAT, json=body(False), headers=HEADERS) as r:
                    assert r.status == 200, await r.text()
                    doc = await r.json()
                    assert doc["usage"]["completion_tokens"] == 100 and doc["model"] == "dense"
                    assert "x-kgate-flops" in r.headers
                async with s.post(g.url + CHAT, json=body(True), headers=HEADERS) as r:
                    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
                    text = await r.read()
                    rid = r.headers["x-kgate-request-id"]
                assert text.count(b"tok ") == 5 and text.endswith(b"data: [DONE]\n\n")
                rec = await record_of(g, rid)
                assert rec["usage"]["source"] == "upstream" and rec["usage"]["generated_tokens"] == 5
                assert g.gw.session is not None and g.gw.session.built == (kind,)  # type: ignore[attr-defined]
        assert len(up.requests) == 2
        sent_headers[kind] = sorted(h.lower() for h in up.requests[0].headers)
    assert sent_headers["aiohttp"] == sent_headers["native"]
    assert not {"user-agent", "accept-encoding", "cookie"} & set(sent_headers["aiohttp"])


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_whose_client_left_is_cut_upstream_after_the_drain(tmp_path, redis_url, kind):
    behaviour = json_or_stream(reasoning=500, visible_chunks=5, delay=0.01, hold_before_usage=1.0)
    async with RecordingUpstream(behaviour) as up:
        cfg = config_with_upstream(tmp_path, redis_url, up.url, tight=BIG,
                                   upstream={"client": kind, "disconnect_drain_seconds": 0.2})
        async with running_gateway(cfg) as g, aiohttp.ClientSession() as s:
            r = await s.post(g.url + CHAT, json=body(True), headers=HEADERS)
            assert r.status == 200
            rid = r.headers["x-kgate-request-id"]
            assert await r.content.readany()
            r.close()  # the client leaves; the usage comes 1 s later, the drain waits 0.2 s
            rec = await record_of(g, rid)
            assert rec["usage"]["source"] == "bound" and "client disconnected" in rec["reason"]
            await up.wait_finished(1)
            assert up.cancelled == [CHAT]  # the gateway closed the connection: the generation ended
