"""Envoy's external processor (gateway/decision/extproc.py) driven as Envoy drives it (tests/extproc_driver.py).

A real gateway in-process (kgate's simulator as the model server, a real Redis), its ext_proc on a free
port, and the driver playing Envoy's ext_proc filter with deploy/envoy/envoy.yaml's processing mode: each
test checks what the client receives, what reached the upstream, and the audit record's charge. No Envoy
binary exists here: deploy/envoy/envoy.yaml is checked against Envoy's protos (the last test).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
import yaml

from gateway.ledger.redis_binary import free_port
from gateway.proxy.server import StartupError
from tests.extproc_driver import EnvoyDriver
from tests.gatewayutil import KEYS, make_config, record_of, running_decision, running_gateway

CHAT = "/v1/chat/completions"
ENVOY_YAML = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml"


def chat(**extra: Any) -> bytes:
    return orjson.dumps({"model": "dense", "messages": [{"role": "user", "content": "hello"}], **extra})


def bearer(who: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[who]}", "content-type": "application/json"}


def sim_usage(data: bytes) -> dict[str, Any]:
    """The usage the simulator reported: a JSON answer's, or a stream's last usage (OpenAI or Anthropic)."""
    if data.lstrip().startswith(b"{"):
        return orjson.loads(data)["usage"]
    usage: dict[str, Any] = {}
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            event = orjson.loads(line[6:])
            found = event.get("usage") or (event.get("message") or {}).get("usage")
            usage.update(found or {})
    assert usage
    return usage


class Env:
    def __init__(self, g: Any, driver: EnvoyDriver, plugins: Any):
        self.g, self.driver, self.plugins = g, driver, plugins

    async def sim(self, path: str, doc: Any = None) -> Any:
        async with aiohttp.ClientSession() as s:
            if doc is None:
                async with s.get(self.g.sim_url + path) as r:
                    return await r.json()
            async with s.post(self.g.sim_url + path, json=doc) as r:
                assert r.status == 200, await r.text()


async def _env(config: Any, **decision: Any) -> AsyncIterator[Env]:
    port = free_port()
    async with running_gateway(config) as g, running_decision(g, (), extproc=f"127.0.0.1:{port}", **decision) as d:
        yield Env(g, EnvoyDriver(f"127.0.0.1:{port}", {"sim": g.sim_url}), d)


@pytest.fixture
async def env(tmp_path: Path, flushed_redis_url: str) -> AsyncIterator[Env]:
    async for e in _env(make_config(tmp_path, flushed_redis_url)):
        yield e


async def test_json_charged_exactly_and_renamed_buffered(env: Env) -> None:
    """A unary answer: kgate's body upstream (the upstream's model name, no client key), the answer whole
    (mode_override BUFFERED) with x-kgate-k and the public model name, charged the simulator's usage."""
    a = await env.driver.request("POST", CHAT, bearer("alice"), chat(max_tokens=50))
    assert a.status == 200 and not a.immediate and a.buffered, a
    up = a.upstream
    assert up is not None and up.path == CHAT and up.headers["x-kgate-upstream"] == "sim"
    sent = orjson.loads(up.body)
    assert sent["model"] == "llama-sim-8b" and sent["max_tokens"] == 50
    assert int(up.headers["content-length"]) == len(up.body)
    assert KEYS["alice"] not in str(up.headers) and "authorization" not in up.headers
    assert up.headers["accept-encoding"] == "identity"
    assert a.json()["model"] == "dense" and b"llama-sim-8b" not in a.body
    assert int(a.headers["content-length"]) == len(a.body)
    assert float(a.headers["x-kgate-k"]) > 0 and a.headers["x-kgate-flops"]
    rid = a.headers["x-kgate-request-id"]
    rec = await record_of(env.g, rid)
    usage = sim_usage(up.answer)
    assert rec["decision"] == "allowed" and rec["principal"] == "alice"
    assert rec["usage"]["output_tokens"] == usage["completion_tokens"]
    assert rec["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    assert env.plugins.service.pending == 0


async def test_json_without_mode_override_and_header_values(tmp_path: Path, flushed_redis_url: str) -> None:
    """An older Envoy: header values in ``value`` (not ``raw_value``), mode_override not allowed — the
    unary body comes in chunks, is held and released whole, renamed, with the last."""
    async for e in _env(make_config(tmp_path, flushed_redis_url)):
        e.driver.raw, e.driver.allow_mode_override = False, False
        a = await e.driver.request("POST", CHAT, bearer("alice"), chat())
        assert a.status == 200 and not a.buffered, a
        assert a.upstream is not None and a.upstream.headers["x-kgate-upstream"] == "sim"  # read from `value`
        assert "content-length" not in a.headers  # the renamed body's length differs: sent chunked
        assert a.json()["model"] == "dense"
        assert len(a.body) == len(a.upstream.answer) - len(b"llama-sim-8b") + len(b"dense")
        rec = await record_of(e.g, a.headers["x-kgate-request-id"])
        assert rec["decision"] == "allowed"
        assert rec["usage"]["output_tokens"] == sim_usage(a.upstream.answer)["completion_tokens"]


async def test_over_caps_is_an_immediate_response(env: Env) -> None:
    a = await env.driver.request("POST", CHAT, bearer("alice"), chat(n=9))
    assert a.immediate and a.status == 403 and a.upstream is None
    assert a.replies == ["request_headers", "immediate_response"]
    err = a.json()["error"]  # OpenAI's shape
    assert err["code"] == "max_samples_exceeded" and err["type"] == "permission_error"
    assert a.headers["content-type"] == "application/json" and a.details.startswith("kgate_")
    assert (await env.sim("/_sim/stats"))["requests_total"] == 0  # nothing went upstream
    rec = await record_of(env.g, a.headers["x-kgate-request-id"])
    assert rec["decision"] == "denied" and rec["status"] == 403


async def test_clamped_body_is_forwarded(env: Env) -> None:
    a = await env.driver.request("POST", CHAT, bearer("carol"), chat(n=4, max_tokens=100))
    assert a.status == 200 and a.upstream is not None
    assert orjson.loads(a.upstream.body)["n"] <= 2
    assert "n=2" in a.headers["x-kgate-clamped"]
    rec = await record_of(env.g, a.headers["x-kgate-request-id"])
    assert rec["decision"] == "clamped"


async def test_budget_admits_exactly_its_limit_of_concurrent_streams(tmp_path: Path, flushed_redis_url: str) -> None:
    cfg = make_config(tmp_path, flushed_redis_url,
                      tight={"budgets": [{"metric": "requests", "window": "1h", "limit": 3}]})
    async for e in _env(cfg):
        await e.sim("/_sim/config", {"tokens_per_second": 400})  # each stream takes a while: they overlap
        answers = await asyncio.gather(*(e.driver.request("POST", CHAT, bearer("tina"), chat(stream=True))
                                         for _ in range(6)))
        ok = [a for a in answers if a.status == 200]
        denied = [a for a in answers if a.immediate]
        assert len(ok) == 3 and len(denied) == 3
        assert all(a.status == 429 and "retry-after" in a.headers for a in denied)
        assert all(a.json()["error"]["type"] == "rate_limit_error" for a in denied)
        for a in ok:
            assert b"data: [DONE]" in a.body
            rec = await record_of(e.g, a.headers["x-kgate-request-id"])
            assert rec["decision"] == "allowed"
        assert (await e.sim("/_sim/stats"))["requests_total"] == 3


async def test_stream_usage_stripped_unless_asked(env: Env) -> None:
    plain = await env.driver.request("POST", CHAT, bearer("alice"), chat(stream=True))
    asked = await env.driver.request("POST", CHAT, bearer("alice"),
                                     chat(stream=True, stream_options={"include_usage": True}))
    for a in (plain, asked):
        assert a.status == 200 and not a.buffered and a.upstream is not None
        assert "content-length" not in a.headers and a.headers["x-kgate-k-max"]
        assert b"data: [DONE]" in a.body and b'"model":"dense"' in a.body and b"llama-sim-8b" not in a.body
        assert b'"usage":{' in a.upstream.answer  # kgate asked the upstream for usage either way
        usage = sim_usage(a.upstream.answer)
        rec = await record_of(env.g, a.headers["x-kgate-request-id"])
        assert rec["decision"] == "allowed" and rec["usage"]["output_tokens"] == usage["completion_tokens"]
    assert b'"usage":{' not in plain.body  # the usage-only event kgate added is stripped
    assert b'"usage":{' in asked.body and f'"completion_tokens":{sim_usage(asked.body)["completion_tokens"]}' \
        .encode() in asked.body


async def test_anthropic_stream(env: Env) -> None:
    headers = {"x-api-key": KEYS["alice"], "anthropic-version": "2023-06-01", "content-type": "application/json"}
    body = orjson.dumps({"model": "dense", "max_tokens": 200, "stream": True,
                         "messages": [{"role": "user", "content": "hello"}]})
    a = await env.driver.request("POST", "/v1/messages", headers, body)
    assert a.status == 200 and a.upstream is not None, a
    assert "x-api-key" not in a.upstream.headers and a.upstream.headers["anthropic-version"] == "2023-06-01"
    assert b"event: message_stop" in a.body and b'"model":"dense"' in a.body and b"llama-sim-8b" not in a.body
    rec = await record_of(env.g, a.headers["x-kgate-request-id"])
    assert rec["decision"] == "allowed"
    assert rec["usage"]["output_tokens"] == sim_usage(a.upstream.answer)["output_tokens"]


async def test_client_disconnect_mid_stream_is_charged(env: Env) -> None:
    await env.sim("/_sim/config", {"tokens_per_second": 100, "output_tokens": 400})  # 4 s unless cut
    a = await env.driver.request("POST", CHAT, bearer("alice"), chat(stream=True), disconnect_after=3)
    assert a.reset and a.status == 200 and a.body
    rec = await record_of(env.g, a.headers["x-kgate-request-id"])
    assert rec["decision"] == "partial" and "disconnect" in rec["reason"]
    assert rec["usage"]["generated_tokens"] > 0  # charged: by on_missing_usage (the bound), no usage came
    for _ in range(100):
        if env.plugins.service.pending == 0:
            break
        await asyncio.sleep(0.02)
    assert env.plugins.service.pending == 0


async def test_response_trailers_end_the_answer(env: Env) -> None:
    """An Envoy that sends response trailers: the last body chunk lacks end_of_stream, the trailers settle."""
    a = await env.driver.request("POST", CHAT, bearer("alice"), chat(stream=True), response_trailers={"x-t": "1"})
    assert a.status == 200 and a.upstream is not None and a.replies[-1] == "response_trailers"
    rec = await record_of(env.g, a.headers["x-kgate-request-id"])
    assert rec["decision"] == "allowed"
    assert rec["usage"]["output_tokens"] == sim_usage(a.upstream.answer)["completion_tokens"]


async def test_upstream_error_statuses(env: Env) -> None:
    """A 4xx about the request passes on as the upstream wrote it; a 5xx or an upstream refusing kgate's
    key becomes kgate's own 502, as the proxy answers. Nothing is charged (but for a 504)."""
    for fault, status, code in (("status=429", 429, None), ("status=500", 502, "upstream_500"),
                                ("status=401", 502, "upstream_auth")):
        a = await env.driver.request("POST", CHAT, {**bearer("alice"), "x-sim-fault": fault}, chat())
        assert a.status == status and a.upstream is not None and a.upstream.status == int(fault[7:]), (fault, a)
        rid = a.headers["x-kgate-request-id"]
        if code is None:
            assert not a.immediate and a.body == a.upstream.answer
        else:
            assert a.immediate and a.json()["error"]["code"] == code
        rec = await record_of(env.g, rid)
        assert rec["decision"] == "failed" and not (rec.get("usage") or {}).get("generated_tokens")
    # A 504: a gateway (Envoy's route timeout, most likely) gave up while the model may be working — charged
    # by on_missing_usage, as the proxy charges its own timeout.
    a = await env.driver.request("POST", CHAT, {**bearer("alice"), "x-sim-fault": "status=504"}, chat())
    assert a.immediate and a.status == 504 and a.json()["error"]["type"] == "server_error"
    rec = await record_of(env.g, a.headers["x-kgate-request-id"])
    assert rec["decision"] == "partial" and rec["usage"]["generated_tokens"] > 0


async def test_request_without_body_is_400(env: Env) -> None:
    a = await env.driver.request("POST", CHAT, bearer("alice"))
    assert a.immediate and a.status == 400 and a.replies == ["immediate_response"]
    assert a.json()["error"]["type"] == "invalid_request_error"
    assert (await env.sim("/_sim/stats"))["requests_total"] == 0


async def test_token_is_required(tmp_path: Path, flushed_redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KGATE_TEST_EXTPROC_TOKEN", "s3cret")
    async for e in _env(make_config(tmp_path, flushed_redis_url), token_env="KGATE_TEST_EXTPROC_TOKEN"):
        for token in (None, "wrong"):
            e.driver.token = token
            assert await e.driver.handshake() == grpc.StatusCode.UNAUTHENTICATED
            a = await e.driver.request("POST", CHAT, bearer("alice"), chat())
            # INTERNAL: grpc-python's client when its first write races the refusal (EnvoyDriver.handshake)
            assert a.grpc_code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL)
            assert a.status == 500 and a.upstream is None  # Envoy, failing closed, answers 500
        e.driver.token = "s3cret"
        assert await e.driver.handshake() == grpc.StatusCode.OK
        a = await e.driver.request("POST", CHAT, bearer("alice"), chat())
        assert a.status == 200 and a.grpc_code is None
        assert (await e.sim("/_sim/stats"))["requests_total"] == 1
        # Without a token, only loopback: the answers carry the upstreams' credentials.
        from gateway.decision.extproc import start_extproc

        with pytest.raises(StartupError, match="open to the network"):
            await start_extproc(e.plugins.service, f"0.0.0.0:{free_port()}", None)
        with pytest.raises(StartupError, match="cannot listen"):  # the port is taken: never shared
            await start_extproc(e.plugins.service, e.driver.target, "s3cret")


async def test_unix_socket(tmp_path: Path, flushed_redis_url: str) -> None:
    """``unix:/path`` (no token needed): a socket left by an earlier run is replaced; mode 0660."""
    import os
    import socket
    import stat

    path = tmp_path / "extproc.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))  # closed without unlinking, as a killed process leaves it
    async with running_gateway(make_config(tmp_path, flushed_redis_url)) as g, \
            running_decision(g, (), extproc=f"unix:{path}"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        a = await EnvoyDriver(f"unix:{path}", {"sim": g.sim_url}).request("POST", CHAT, bearer("alice"), chat())
        assert a.status == 200 and a.json()["model"] == "dense"


async def test_trusted_identity_header_by_the_clients_address(tmp_path: Path, flushed_redis_url: str) -> None:
    """The peer is Envoy's source.address attribute (the client's connection), never the stream's peer (Envoy
    itself) nor x-forwarded-for: an identity header is believed from a trusted source only."""
    server = {"trusted_identity_header": "x-kgate-principal", "trusted_identity_sources": ["203.0.113.0/24"]}
    async for e in _env(make_config(tmp_path, flushed_redis_url, server)):
        named = {"x-kgate-principal": "carol", "x-forwarded-for": "203.0.113.9", "content-type": "application/json"}
        for source, status in (("203.0.113.7:40000", 200), ("198.51.100.1:5555", 401), (None, 401)):
            e.driver.source = source
            a = await e.driver.request("POST", CHAT, named, chat())
            assert a.status == status, (source, a)
            rec = await record_of(e.g, a.headers["x-kgate-request-id"])
            assert rec["principal"] == ("carol" if status == 200 else None), rec
            if status == 401:
                assert a.json()["error"]["code"] == "untrusted_identity_header"


def test_without_the_envoy_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """grpc is imported only when the processor starts, with a StartupError naming the extra when missing."""
    import sys

    from gateway.decision import extproc_wire

    monkeypatch.setitem(sys.modules, "grpc", None)  # as if not installed
    with pytest.raises(StartupError, match=r"pip install 'kgate\[envoy\]'"):
        extproc_wire.load()


def test_envoy_yaml_is_valid_for_envoys_protos() -> None:
    """deploy/envoy/envoy.yaml parsed strictly into Envoy's Bootstrap (every field name and typed_config checked
    against the installed protos), and its ext_proc set up as the processor and the driver expect."""
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (registers the Any type)
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
    from google.protobuf import json_format

    doc = yaml.safe_load(ENVOY_YAML.read_text())
    boot = json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())  # unknown fields raise
    bad = yaml.safe_load(ENVOY_YAML.read_text())
    bad["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0][
        "typed_config"]["processing_mod"] = {}
    with pytest.raises(json_format.ParseError):  # the check sees into typed_config
        json_format.ParseDict(bad, bootstrap_pb2.Bootstrap())

    clusters = {c.name: c for c in boot.static_resources.clusters}
    M = processing_mode_pb2.ProcessingMode
    fail_modes = []
    for listener in boot.static_resources.listeners:
        hcm = hcm_pb2.HttpConnectionManager()
        assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
        names = [f.name for f in hcm.http_filters]
        assert names == ["envoy.filters.http.ext_proc", "envoy.filters.http.router"]
        ext = ext_proc_pb2.ExternalProcessor()
        assert hcm.http_filters[0].typed_config.Unpack(ext)
        mode = ext.processing_mode
        assert (mode.request_header_mode, mode.request_body_mode, mode.response_header_mode,
                mode.response_body_mode, mode.request_trailer_mode, mode.response_trailer_mode) == \
            (M.SEND, M.BUFFERED, M.SEND, M.STREAMED, M.SKIP, M.SKIP)
        assert ext.allow_mode_override and ext.message_timeout.seconds >= 1
        assert ext.grpc_service.envoy_grpc.cluster_name == "kgate_ext_proc"
        meta = {m.key: m.value for m in ext.grpc_service.initial_metadata}
        assert meta["authorization"].startswith("Bearer ")
        assert not ext.mutation_rules.disallow_system.value and not ext.mutation_rules.disallow_all.value
        fail_modes.append(ext.failure_mode_allow)
        for vhost in hcm.route_config.virtual_hosts:
            assert "x-kgate-upstream" in vhost.request_headers_to_remove
            for route in vhost.routes:
                if route.HasField("route"):
                    assert route.route.cluster in clusters
    assert fail_modes == [False, True]  # fail closed first; the fail-open listener second
    first = hcm_pb2.HttpConnectionManager()
    boot.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(first)
    by_header = {r.match.headers[0].string_match.exact: r.route.cluster
                 for r in first.route_config.virtual_hosts[0].routes if r.match.headers}
    assert by_header == {"simulator": "simulator"}
    assert first.route_config.virtual_hosts[0].routes[-1].direct_response.status == 502  # no upstream chosen
    ext_proc = clusters["kgate_ext_proc"]
    assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in ext_proc.typed_extension_protocol_options
    addr = ext_proc.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (addr.address, addr.port_value) == ("127.0.0.1", 9002)
    sim = clusters["simulator"].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sim.address, sim.port_value) == ("127.0.0.1", 9000)
