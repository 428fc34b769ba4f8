"""Hostile clients and trusted identity (issue 13, items 8, 9, 10): slow request heads, unbounded upstream
JSON answers, an identity header sent by anyone, an encoded slash answered 405, /metrics on the client port.

Everything runs against the real gateway (in-process through ``running_gateway``, which uses
``GatewayRunner`` as ``kgate serve`` does, and once as a ``kgate serve`` process), a real Redis and the
recording upstream. Raw sockets play the slow clients; every wait is bounded and generous, and the
assertions are on outcomes (closed or not, status, code, charge), never on how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from gatewayutil import (
    KEYS,
    admin_listener,
    audit_records,
    make_config,
    running_gateway,
    wait_ready,
    write_policy,
)
from recording_upstream import config_with_upstream, huge_answer, recording, spend_cap
from yarl import URL

from gateway.ledger.ledger import BudgetSpec, ScopeRef
from gateway.ledger.redis_binary import free_port
from gateway.policy.config import ConfigError
from gateway.proxy.client_limits import GatewayRunner, untrusted_peer

CHAT = {"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
ALICE = {"Authorization": f"Bearer {KEYS['alice']}"}
CLOSE_LIMIT = 8.0  # seconds: far above every timeout configured here; only a hung connection reaches it


# ------------------------------------------------------------------------------------------- helpers
async def post(url: str, body: Any, headers: dict[str, str], *, encoded: bool = False) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(URL(url, encoded=encoded), data=orjson.dumps(body),
                                                    headers=headers) as r:
        raw = await r.read()
    try:
        return r.status, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return r.status, raw


async def get(url: str, headers: dict[str, str] | None = None, *, encoded: bool = False) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(URL(url, encoded=encoded), headers=headers or {}) as r:
        return r.status, await r.read()


def host_port(url: str) -> tuple[str, int]:
    u = URL(url)
    assert u.host is not None and u.port is not None
    return u.host, u.port


async def read_until_closed(reader: asyncio.StreamReader, limit: float = CLOSE_LIMIT) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took; fails when the
    connection is still open after ``limit`` seconds."""
    t0 = time.monotonic()
    data = b""
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(4096):
                data += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {limit:g} s (received {data[:120]!r})") \
            from None
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float = 0.2) -> None:
    """Send ``data`` a byte at a time: a client that never finishes its request head."""
    with contextlib.suppress(ConnectionError, OSError):
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            await writer.drain()
            await asyncio.sleep(every)


SLOW_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: kgate\r\n" + b"X-Padding: " + b"a" * 400


# ------------------------------------------------------------------------------ item 8: slow request heads
async def test_a_trickled_request_head_is_closed_after_the_header_timeout(redis_url: str, tmp_path: Path) -> None:
    """200 connections trickling header bytes were held for 90 s: each now gets a 408 and is closed once
    ``header_timeout_seconds`` has passed, however steadily it sends, while normal requests are served."""
    cfg = make_config(tmp_path, redis_url, server={"header_timeout_seconds": 1, "keepalive_timeout_seconds": 60})
    async with running_gateway(cfg) as g:
        host, port = host_port(g.url)
        conns = [await asyncio.open_connection(host, port) for _ in range(20)]
        senders = [asyncio.create_task(trickle(w, SLOW_HEAD)) for _, w in conns]
        try:
            status, _ = await post(g.url + "/v1/chat/completions", CHAT, ALICE)  # served meanwhile
            assert status == 200
            results = await asyncio.gather(*(read_until_closed(r) for r, _ in conns))
        finally:
            for t in senders:
                t.cancel()
            for _, w in conns:
                w.close()
        for data, _ in results:
            assert data.startswith(b"HTTP/1.1 408 "), data[:120]
        # the senders ended without an error of their own (a reset by the server is part of the test)
        ended = await asyncio.gather(*senders, return_exceptions=True)
        assert all(e is None or isinstance(e, asyncio.CancelledError) for e in ended), ended
        status, _ = await post(g.url + "/v1/chat/completions", CHAT, ALICE)
        assert status == 200
        assert g.gw.metrics.render(None)[0].count(b'kgate_errors_total{kind="header_timeout"} 20.0') == 1


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(redis_url: str,
                                                                                  tmp_path: Path) -> None:
    cfg = make_config(tmp_path, redis_url, server={"header_timeout_seconds": 1, "keepalive_timeout_seconds": 60})
    async with running_gateway(cfg) as g:
        reader, writer = await asyncio.open_connection(*host_port(g.url))
        try:
            data, _ = await read_until_closed(reader)
        finally:
            writer.close()
        assert data.startswith(b"HTTP/1.1 408 ")


async def test_kept_alive_connections_idle_for_the_keepalive_timeout_and_later_heads_are_timed(
        redis_url: str, tmp_path: Path) -> None:
    """Between requests the idle keep-alive timeout applies (longer than the header timeout: load balancers
    keep connections to their backends idle for a minute); a later head that starts and stalls is closed
    after the header timeout."""
    cfg = make_config(tmp_path, redis_url, server={"header_timeout_seconds": 1, "keepalive_timeout_seconds": 60})
    async with running_gateway(cfg) as g:
        reader, writer = await asyncio.open_connection(*host_port(g.url))
        try:
            request = b"GET /healthz HTTP/1.1\r\nHost: kgate\r\n\r\n"
            for _ in range(2):
                writer.write(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLOSE_LIMIT)
                assert head.startswith(b"HTTP/1.1 200 ")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                await asyncio.wait_for(reader.readexactly(length), CLOSE_LIMIT)
                await asyncio.sleep(1.6)  # idle past the header timeout: the connection stays
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: kg")  # a later head that stalls
            data, _ = await read_until_closed(reader)
        finally:
            writer.close()
        assert data.startswith(b"HTTP/1.1 408 ")


async def test_kgate_serve_times_out_slow_heads_and_serves_metrics_on_the_admin_port(redis_url: str,
                                                                                      tmp_path: Path) -> None:
    """The wiring of ``kgate serve`` itself: its client listener has the header timeout, and /metrics is on
    the admin listener (no admin token needed, none set here) and not on the client one."""
    policy = write_policy(tmp_path, redis_url, server={"header_timeout_seconds": 1})
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KGATE_")}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(policy),  # noqa: ASYNC220
                             "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                             "--store", redis_url], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url + "/readyz", proc)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sender = asyncio.create_task(trickle(writer, SLOW_HEAD))
        try:
            data, _ = await read_until_closed(reader)
        finally:
            sender.cancel()
            writer.close()
        assert data.startswith(b"HTTP/1.1 408 ")
        status, body = await get(f"http://127.0.0.1:{admin}/metrics")
        assert status == 200 and b"kgate_requests_total" in body
        status, body = await get(url + "/metrics")
        assert status == 404 and orjson.loads(body)["error"]["code"] == "not_found"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "Traceback" not in err.decode()


# ------------------------------------------------------------------------ item 8: buffered upstream JSON
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_upstream_answer_over_max_response_bytes_is_a_502_and_charged_its_hold(
        redis_url: str, tmp_path: Path, chunked: bool) -> None:
    """Six 200 MB answers took the gateway to 1.84 GB: an answer over the upstream's ``max_response_bytes``
    is now a 502 ``upstream_too_large`` in the client's shape, read no further than the limit (the upstream
    sees its answer cut), counted as kind ``too_large``, and charged its hold (the provider did the work)."""
    async with recording(huge_answer(16 * 1024 * 1024, chunked=chunked)) as up:
        cfg = config_with_upstream(tmp_path, redis_url, up.url, upstream={"max_response_bytes": 1024 * 1024})
        async with running_gateway(cfg) as g:
            tina = {"Authorization": f"Bearer {KEYS['tina']}"}
            status, body = await post(g.url + "/v1/chat/completions", CHAT, tina)
            assert status == 502, body
            assert body["error"]["code"] == "upstream_too_large"
            status, body = await post(g.url + "/v1/messages", {**CHAT, "max_tokens": 20}, tina)
            assert status == 502 and body["type"] == "error" and body["error"]["type"] == "api_error"
            if chunked:  # a Content-Length answer is refused from its head; it may sit in socket buffers
                async with asyncio.timeout(CLOSE_LIMIT):  # the upstream notices the cut at its next write
                    while len(up.cancelled) + len(up.finished) < 2:  # noqa: ASYNC110 (the upstream has no event)
                        await asyncio.sleep(0.02)
                assert len(up.cancelled) == 2, "the gateway read the whole answer"
            text = g.gw.metrics.render(None)[0].decode()
            assert 'kgate_upstream_errors_total{kind="too_large",upstream="sim"} 2.0' in text
            budgets = [BudgetSpec.from_config(b) for b in g.gw.config.tiers["tight"].budgets]
            state = (await g.gw.ledger.state(ScopeRef("principal", "tina"), budgets))[0]  # type: ignore[union-attr]
            records = [r for r in audit_records(g) if r["principal"] == "tina"]
    assert [r["status"] for r in records] == [502, 502]
    assert state.held == 0
    assert state.used == sum(r["bound"]["generated_tokens_max"] for r in records) == 70  # 50 + 20: the holds


async def test_answers_within_max_response_bytes_pass_whole(redis_url: str, tmp_path: Path) -> None:
    async with recording(spend_cap()) as up:
        cfg = config_with_upstream(tmp_path, redis_url, up.url, upstream={"max_response_bytes": 4096})
        async with running_gateway(cfg) as g:
            status, body = await post(g.url + "/v1/chat/completions", CHAT, ALICE)
    assert status == 200 and body["usage"]["completion_tokens"] == 50


# ---------------------------------------------------------------------------- item 9: trusted identity
def test_a_trusted_identity_header_needs_trusted_sources(redis_url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trusted_identity_sources"):
        make_config(tmp_path, redis_url, server={"trusted_identity_header": "X-Kgate-Principal"})
    with pytest.raises(ConfigError, match="neither a CIDR"):
        make_config(tmp_path, redis_url, server={"trusted_identity_header": "X-Kgate-Principal",
                                                 "trusted_identity_sources": ["10.0.0.0/33"]})
    cfg = make_config(tmp_path, redis_url, server={"trusted_identity_header": "X-Kgate-Principal",
                                                   "trusted_identity_sources": ["10.0.0.0/8", "fd00::/8", "unix"]})
    assert cfg.server.trusted_identity_sources == ("10.0.0.0/8", "fd00::/8", "unix")


async def test_the_identity_header_from_an_untrusted_peer_is_refused_and_audited(redis_url: str,
                                                                                  tmp_path: Path) -> None:
    """Before: the header named any principal whoever sent it (alice's key and 'X-Kgate-Principal: vera'
    was served as vera, and a client with no key at all got in). Now: 401 in the API's shape, audited;
    never ignored (the request is not served as the key's owner either)."""
    cfg = make_config(tmp_path, redis_url, server={"trusted_identity_header": "X-Kgate-Principal",
                                                   "trusted_identity_sources": ["10.0.0.0/8"]})
    async with running_gateway(cfg) as g:
        for headers in ({"X-Kgate-Principal": "vera"}, {**ALICE, "X-Kgate-Principal": "vera"},
                        {**ALICE, "X-Kgate-Principal": ""}):
            status, body = await post(g.url + "/v1/chat/completions", CHAT, headers)
            assert status == 401, body
            assert body["error"]["code"] == "untrusted_identity_header"
            assert "127.0.0.1" in body["error"]["message"]
        status, body = await post(g.url + "/v1/messages", CHAT, {"x-api-key": KEYS["alice"],
                                                                 "X-Kgate-Principal": "vera"})
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, _ = await get(g.url + "/v1/models", {"X-Kgate-Principal": "vera"})
        assert status == 401
        status, _ = await post(g.url + "/v1/chat/completions", CHAT, ALICE)  # without the header: the key
        assert status == 200
        records = audit_records(g)
    refused = [r for r in records if r["status"] == 401]
    assert len(refused) == 4 and all(r["decision"] == "denied" and r["principal"] is None for r in refused)
    assert all("trusted" in r["reason"] for r in refused)
    assert [r["principal"] for r in records if r["status"] == 200] == ["alice"]


async def test_the_identity_header_from_a_trusted_peer_names_the_principal(redis_url: str, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, redis_url, server={"trusted_identity_header": "X-Kgate-Principal",
                                                   "trusted_identity_sources": ["10.0.0.0/8", "127.0.0.0/8"]})
    async with running_gateway(cfg) as g:
        status, body = await post(g.url + "/v1/chat/completions", CHAT, {"X-Kgate-Principal": "vera"})
        assert status == 200, body
        status, _ = await post(g.url + "/v1/chat/completions", CHAT, {"X-Kgate-Principal": "nobody"})
        assert status == 401
        records = audit_records(g)
    assert records[0]["principal"] == "vera" and records[0]["tier"] == "vetted"


@pytest.mark.parametrize("sources,expected", [(["127.0.0.1"], 401), (["unix"], 200)])
async def test_a_unix_socket_peer_is_trusted_only_when_listed(redis_url: str, tmp_path: Path,
                                                              sources: list[str], expected: int) -> None:
    """A Unix-socket peer has no address: it is trusted only when the sources say ``unix``."""
    from gateway.proxy.app import create_app

    cfg = make_config(tmp_path, redis_url, server={"trusted_identity_header": "X-Kgate-Principal",
                                                   "trusted_identity_sources": sources})
    runner = GatewayRunner(create_app(cfg), access_log=None)
    await runner.setup()
    sock = str(tmp_path / "kgate.sock")
    await web.UnixSite(runner, sock).start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as s, \
                s.post("http://kgate/v1/chat/completions", json=CHAT, headers={"X-Kgate-Principal": "vera"}) as r:
            assert r.status == expected, await r.text()
    finally:
        await runner.cleanup()


class _Transport:
    def __init__(self, peer: Any):
        self.peer = peer

    def get_extra_info(self, name: str) -> Any:
        return self.peer if name == "peername" else None


class _Request:
    def __init__(self, peer: Any):
        self.transport = _Transport(peer)


@pytest.mark.parametrize("peer,trusted", [
    (("10.1.2.3", 5000), True), (("::ffff:10.1.2.3", 5000, 0, 0), True),  # IPv4 on a dual-stack socket
    (("fd00::1", 5000, 0, 0), True), (("11.0.0.1", 5000), False), (("::1", 5000, 0, 0), False),
    (None, False), ("", False)])
def test_untrusted_peer_matches_the_connection_address(peer: Any, trusted: bool) -> None:
    found = untrusted_peer(_Request(peer), ("10.0.0.0/8", "fd00::/8"))  # type: ignore[arg-type]
    assert (found is None) is trusted


# ------------------------------------------------------------------------------------- item 10: small
async def test_an_encoded_slash_is_an_unknown_path_not_a_wrong_method(redis_url: str, tmp_path: Path) -> None:
    """``POST /v1/chat%2Fcompletions`` was answered 405 (the fallback saw the decoded path)."""
    async with running_gateway(make_config(tmp_path, redis_url)) as g:
        status, body = await post(g.url + "/v1/chat%2Fcompletions", CHAT, ALICE, encoded=True)
        assert status == 404 and body["error"]["code"] == "not_found"
        status, body = await post(g.url + "/v1/messages%2f", CHAT, ALICE, encoded=True)
        assert status == 404 and body["type"] == "error"
        status, _ = await get(g.url + "/v1%2Fmodels", ALICE, encoded=True)
        assert status == 404
        status, _ = await get(g.url + "/v1/chat/completions", ALICE)  # a real route, wrong method: still 405
        assert status == 405


async def test_metrics_are_on_the_admin_listener_not_the_client_port(redis_url: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """/metrics names tiers, budgets and models: by default it is served on the admin listener only, to a
    scraper without the admin token (the admin API itself still wants it)."""
    monkeypatch.setenv("KGATE_ADMIN_TOKEN", "admin-secret")
    async with running_gateway(make_config(tmp_path, redis_url)) as g, admin_listener(g) as admin:
        assert (await post(g.url + "/v1/chat/completions", CHAT, ALICE))[0] == 200
        status, body = await get(g.url + "/metrics")
        assert status == 404 and b"tier" not in body
        status, _ = await post(g.url + "/metrics", {}, {})
        assert status == 404
        status, body = await get(admin + "/metrics")
        assert status == 200 and b'tier="basic"' in body
        status, _ = await get(admin + "/admin/policy")
        assert status == 401


async def test_metrics_on_client_port_keeps_the_old_place(redis_url: str, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, redis_url, server={"metrics_on_client_port": True})
    async with running_gateway(cfg) as g:
        status, body = await get(g.url + "/metrics")
    assert status == 200 and b"kgate_requests_total" in body
