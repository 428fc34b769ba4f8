"""Security (issue 6, item 5): secrets at rest, the admin listener, what is forwarded, where requests go.

- API keys are stored only as keyed hashes (HMAC under a pepper): after keys are issued, no Redis key or
  value holds a clear key, nor its plain sha256; lookups go by the keyed hash, the admin token is compared
  in constant time.
- The admin listener refuses every route without its token, with a wrong one, or when no token is set.
- Client credentials (Authorization, x-api-key, x-goog-api-key, ?key=) and hop-by-hop headers never travel
  upstream: the simulator's record of what it received is checked.
- The upstream's own key (``api_key_env``) never appears in responses, error bodies, /metrics, the admin
  API or the audit files.
- A client cannot make the gateway call anything but the configured upstream: URL-like model names,
  traversal, ``@host``, absolute-form request targets and Host/Forwarded headers are tried against a
  canary server that must never be called.
- No header value kgate sends holds CR, LF or NUL (issue 15, item 3): policy headers, base URLs and budget
  names (sent in RateLimit headers) are refused when the policy loads; an upstream key with a control
  character in its environment variable is not used; client provider headers and upstream response headers
  that carry one are dropped; the HTTP client refuses to write any that slips through.
- Store URLs with an ACL user and password (special characters percent-encoded), and ``rediss://`` against
  a TLS Redis started here, work for the store and for the gateway's ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web
from gatewayutil import KEYS, RunningGateway, admin_listener, policy_dict, running_gateway

from gateway.admin import api as admin_mod
from gateway.admin.api import create_admin_app
from gateway.ledger import store as store_mod
from gateway.ledger.ledger import BudgetSpec, ScopeRef
from gateway.ledger.redis_binary import find_redis_binary, free_port
from gateway.ledger.redis_server import RedisServer
from gateway.policy.config import Config, load_config
from gateway.policy.directory import KEY_PREFIX, Directory

UPSTREAM_KEY_ENV = "KGATE_TEST_UPSTREAM_KEY"
ADMIN_TOKEN_ENV = "KGATE_ADMIN_TOKEN"
MSG = [{"role": "user", "content": "hi"}]
CHAT = {"model": "dense", "messages": MSG, "max_tokens": 8}


@pytest.fixture
def redis_url(flushed_redis_url: str) -> str:
    """This module's tests share one Redis (``redis_srv``), emptied for each."""
    return flushed_redis_url


@pytest.fixture
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> str:
    """The upstream's own credential, in the environment as a deployment would have it."""
    key = "sk-upstream-" + secrets.token_hex(20)
    monkeypatch.setenv(UPSTREAM_KEY_ENV, key)
    return key


def make_config(tmp_path: Path, store_url: str, *, extra_upstreams: dict[str, str] | None = None) -> Config:
    """The e2e policy with the simulator upstream authenticated by ``api_key_env``; ``extra_upstreams``
    maps a model name to the base URL of an upstream of its own."""
    policy = policy_dict(store_url, tmp_path / "data")
    policy["upstreams"]["sim"]["api_key_env"] = UPSTREAM_KEY_ENV
    for name, url in (extra_upstreams or {}).items():
        policy["upstreams"][name] = {"base_url": url, "api_key_env": UPSTREAM_KEY_ENV, "total_timeout_seconds": 5}
        policy["models"][name] = {"upstream": name, "upstream_model": f"{name}-upstream", "active_params": 1e9,
                                  "reference_output_tokens": 64, "max_output_tokens": 256}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy))
    return load_config(path)


# ---------------------------------------------------------------------------------------- helpers
@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    """A small HTTP server that records every request (a canary that must stay silent, or an upstream)."""

    url: str
    seen: list[Seen] = field(default_factory=list)


Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _ok(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


@contextlib.asynccontextmanager
async def recorder(answer: Answer = _ok) -> AsyncIterator[Recorder]:
    rec = Recorder(url="")

    async def handler(request: web.Request) -> web.StreamResponse:
        rec.seen.append(Seen(request.method, request.path_qs, dict(request.headers), await request.read()))
        return await answer(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:[\\s\\S]*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        yield rec
    finally:
        await runner.cleanup()


async def fetch(method: str, url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
                encoded: bool = False) -> tuple[int, dict[str, str], bytes]:
    from yarl import URL

    async with aiohttp.ClientSession() as s, s.request(method, URL(url, encoded=encoded), data=body,
                                                       headers=headers or {}, allow_redirects=False) as r:
        return r.status, {str(k): v for k, v in r.headers.items()}, await r.read()


async def raw_exchange(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(1 << 20), 10)
    finally:
        writer.close()


async def sim_stats(g: RunningGateway) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(g.sim_url + "/_sim/stats") as r:
        doc: dict[str, Any] = await r.json()
        return doc


async def redis_dump(url: str) -> bytes:
    """Every key and every value in the store, as one blob to search."""
    r: Any = aioredis.from_url(url)
    out: list[bytes] = []
    try:
        async for key in r.scan_iter(count=1000):
            out.append(key)
            kind = (await r.type(key)).decode()
            if kind == "string":
                out.append(await r.get(key) or b"")
            elif kind == "hash":
                for k, v in (await r.hgetall(key)).items():
                    out += [k, v]
            elif kind == "set":
                out += list(await r.smembers(key))
            elif kind == "zset":
                out += [m for m, _ in await r.zrange(key, 0, -1, withscores=True)]
            elif kind == "list":
                out += list(await r.lrange(key, 0, -1))
            elif kind == "stream":
                for _, fields in await r.xrange(key):
                    for k, v in fields.items():
                        out += [k, v]
    finally:
        await r.aclose()
    return b"\n".join(out)


def audit_text(tmp_path: Path) -> str:
    files = sorted((tmp_path / "data" / "audit").rglob("*.jsonl"))
    assert files, "the gateway wrote no audit file"
    return "\n".join(f.read_text() for f in files)


# ------------------------------------------------------------------------------------ keys at rest
@pytest.mark.parametrize("pepper_from_env", [False, True], ids=["stored-pepper", "env-pepper"])
async def test_api_keys_are_stored_only_as_keyed_hashes(redis_url: str, tmp_path: Path, pepper_from_env: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pepper = "pepper-" + secrets.token_hex(16)
    if pepper_from_env:
        monkeypatch.setenv("KGATE_KEY_PEPPER", pepper)
    else:
        monkeypatch.delenv("KGATE_KEY_PEPPER", raising=False)
    config = make_config(tmp_path, redis_url)
    client = await store_mod.connect(redis_url, timeout=2)
    try:
        directory = Directory(config, client, key_prefix=config.store.key_prefix)
        issued = [await directory.create_key(f"p{i}", "acme", "basic") for i in range(3)]
        await directory.revoke_key(issued[2][1])
        await directory.add_grant("p0", "vetted", 60, "secops", "audit")
        blob = await redis_dump(redis_url)
        for key, key_id in issued:
            assert key.startswith(KEY_PREFIX)
            secret_part = key.removeprefix(KEY_PREFIX)
            assert key.encode() not in blob and secret_part.encode() not in blob, "a key is stored in clear"
            assert hashlib.sha256(key.encode()).hexdigest().encode() not in blob, "an unkeyed hash is stored"
            assert key_id.encode() in blob  # the id, safe to show, is what the store and the audit know
        stored_pepper = await client.get(f"{config.store.key_prefix}:dir:pepper")
        if pepper_from_env:
            assert stored_pepper is None and pepper.encode() not in blob, "the pepper from the env was stored"
        else:
            assert stored_pepper is not None
            pepper = str(stored_pepper)
        for key, _ in issued[:2]:  # the keyed hash, and only it, names the key's record
            keyed = hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()
            assert f"{config.store.key_prefix}:dir:key:{keyed}".encode() in blob

        # Lookups go by the keyed hash: the right key works, any other does not.
        key0 = issued[0][0]
        principal = await directory.by_key(key0)
        assert principal is not None and principal.id == "p0" and principal.key_id == issued[0][1]
        for wrong in (key0[:-1] + ("A" if key0[-1] != "A" else "B"), key0 + "x", key0[:-1], key0.upper(),
                      KEY_PREFIX, hashlib.sha256(key0.encode()).hexdigest()):
            assert await directory.by_key(wrong) is None
        assert await directory.by_key(issued[2][0]) is None  # revoked
    finally:
        await store_mod.close(client)


def test_secrets_are_compared_in_constant_time() -> None:
    """Timing cannot be measured reliably in a unit test, so the code paths are pinned instead: the admin
    token is compared with hmac.compare_digest; API keys are never compared at all, only hashed and looked
    up (a static key by its sha256, an issued key by its HMAC)."""
    middleware = inspect.getsource(admin_mod._auth_and_errors)
    assert "compare_digest" in middleware and "== f\"Bearer" not in middleware
    by_key = inspect.getsource(Directory.by_key)
    assert "api_key ==" not in by_key and "== api_key" not in by_key
    assert "sha256_hex(api_key)" in by_key and "_keyed_hash(api_key)" in by_key


async def test_keys_issued_through_the_admin_api_are_shown_once(redis_url: str, tmp_path: Path,
                                                                upstream_key: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    token = "admin-" + secrets.token_hex(12)
    monkeypatch.setenv(ADMIN_TOKEN_ENV, token)
    async with running_gateway(make_config(tmp_path, redis_url)) as g, admin_listener(g) as admin:
        auth = {"Authorization": f"Bearer {token}"}
        status, _, body = await fetch("POST", admin + "/admin/keys", headers=auth,
                                      body=orjson.dumps({"principal": "newbie", "org": "acme", "tier": "basic"}))
        assert status == 201
        key = orjson.loads(body)["key"]
        status, _, body = await fetch("POST", g.url + "/v1/chat/completions", body=orjson.dumps(CHAT),
                                      headers={"Authorization": f"Bearer {key}"})
        assert status == 200, body
        for path in ("/admin/keys", "/admin/principals", "/admin/usage/newbie", "/admin/policy"):
            status, _, body = await fetch("GET", admin + path, headers=auth)
            assert status == 200 and key.encode() not in body, path
        blob = await redis_dump(redis_url)
    assert key.encode() not in blob and key.removeprefix(KEY_PREFIX).encode() not in blob
    assert key not in audit_text(tmp_path), "an audit record holds a clear key"


# ----------------------------------------------------------------------------------- admin listener
def _admin_routes() -> list[tuple[str, str]]:
    app = create_admin_app(web.Application())
    out = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter", "")
        if path == "/metrics":
            continue  # open to the scraper by design (test_bypass_clients.py); it changes nothing
        out.append((route.method, path.replace("{", "").replace("}", "")))
    assert len(out) >= 10
    return out


async def test_admin_listener_refuses_without_its_token(redis_url: str, tmp_path: Path, upstream_key: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    token = "admin-" + secrets.token_hex(12)
    routes = _admin_routes()
    body = orjson.dumps({"principal": "mallory", "org": "evil", "tier": "vetted", "duration": "1d",
                         "approver": "mallory", "reason": "x", "limit": 1e12})
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    async with running_gateway(make_config(tmp_path, redis_url)) as g:
        async with admin_listener(g) as admin:
            # No token configured: the admin API is off, whatever the caller sends.
            for method, path in routes:
                for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer undefined"}):
                    status, _, _ = await fetch(method, admin + path, body=body, headers=headers)
                    assert status in (401, 403), (method, path, headers, status)
        monkeypatch.setenv(ADMIN_TOKEN_ENV, token)
        async with admin_listener(g) as admin:
            wrong = [{}, {"Authorization": token}, {"Authorization": f"Bearer {token}x"},
                     {"Authorization": f"Bearer {token[:-1]}"}, {"Authorization": f"bearer {token}"},
                     {"Authorization": f"Basic {token}"}, {"Authorization": f"Bearer  {token}"},
                     {"Authorization": f"Bearer {token.upper()}"}, {"x-api-key": token},
                     {"Authorization": f"Bearer {KEYS['vera']}"}, {"X-Admin-Token": token}]
            for method, path in routes:
                for headers in wrong:
                    status, _, reply = await fetch(method, admin + path, body=body, headers=headers)
                    assert status == 401, (method, path, headers, status)
                    assert token.encode() not in reply
                status, _, _ = await fetch(method, admin + path + f"?token={token}&access_token={token}",
                                           body=body)
                assert status == 401
            # ...and nothing was changed by all that
            status, _, reply = await fetch("GET", admin + "/admin/principals",
                                           headers={"Authorization": f"Bearer {token}"})
            assert status == 200 and b"mallory" not in reply
            status, _, reply = await fetch("GET", admin + "/admin/keys", headers={"Authorization": f"Bearer {token}"})
            assert status == 200 and orjson.loads(reply)["keys"] == []
        # The admin routes are not on the client listener, token or not.
        for method, path in routes:
            status, _, _ = await fetch(method, g.url + path, body=body, headers={"Authorization": f"Bearer {token}"})
            assert status in (404, 405), (method, path, status)


# ------------------------------------------------------------------------------- what goes upstream
HOP_BY_HOP = ("connection", "keep-alive", "proxy-authorization", "proxy-authenticate", "te", "trailer",
              "transfer-encoding", "upgrade", "proxy-connection")


def _requests_with_client_credentials() -> list[tuple[str, str, dict[str, Any], dict[str, str]]]:
    """(path, query, body, credential headers) for every client API, each credential style."""
    gemini = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 8}}
    alice = KEYS["alice"]
    return [
        ("/v1/chat/completions", "", CHAT, {"Authorization": f"Bearer {alice}"}),
        ("/v1/chat/completions", f"key={alice}&api-version=1", {**CHAT, "stream": True},
         {"Authorization": f"Bearer {alice}"}),
        ("/v1/completions", "", {"model": "dense", "prompt": "hi", "max_tokens": 8}, {"x-api-key": alice}),
        ("/v1/responses", "", {"model": "dense", "input": "hi", "max_output_tokens": 16},
         {"Authorization": f"Bearer {alice}"}),
        ("/v1/messages", "", {"model": "dense", "max_tokens": 8, "messages": MSG},
         {"x-api-key": alice, "anthropic-version": "2023-06-01"}),
        ("/v1/messages", "", {"model": "dense", "max_tokens": 8, "messages": MSG, "stream": True},
         {"Authorization": f"Bearer {alice}", "x-api-key": alice}),
        ("/v1beta/models/dense:generateContent", "", gemini, {"x-goog-api-key": alice}),
        ("/v1beta/models/dense:generateContent", f"key={alice}", gemini, {}),
        ("/v1beta/models/dense:streamGenerateContent", f"alt=sse&key={alice}", gemini, {}),
        ("/v1beta/models/dense:streamGenerateContent", f"key={alice}&alt=sse&KEY={alice}&key={alice}", gemini,
         {"x-goog-api-key": alice}),
    ]


async def test_client_credentials_and_hop_by_hop_headers_are_not_forwarded(redis_url: str, tmp_path: Path,
                                                                           upstream_key: str) -> None:
    hop = {"Connection": "keep-alive, X-Hop-Secret", "X-Hop-Secret": "hop-secret", "Keep-Alive": "timeout=5",
           "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0", "TE": "trailers", "Upgrade": "h2c",
           "Proxy-Connection": "keep-alive", "Cookie": "session=cookie-secret", "Trailer": "X-Checksum",
           "Forwarded": "for=10.0.0.1;secret=forwarded-secret", "X-Forwarded-For": "10.0.0.1"}
    async with running_gateway(make_config(tmp_path, redis_url)) as g:
        for path, query, body, creds in _requests_with_client_credentials():
            url = g.url + path + (f"?{query}" if query else "")
            status, _, reply = await fetch("POST", url, body=orjson.dumps(body), headers={**creds, **hop})
            assert status == 200, (path, reply[:300])
            last = (await sim_stats(g))["last_request"]
            sent = last["headers"]
            blob = orjson.dumps(last)
            assert KEYS["alice"].encode() not in blob, (path, query, "the client's key went upstream")
            for secret in (b"hop-secret", b"cHJveHk6c2VjcmV0", b"cookie-secret", b"forwarded-secret"):
                assert secret not in blob, (path, secret)
            for name in HOP_BY_HOP:
                # The gateway's own connection to the upstream may say keep-alive; nothing of the client's.
                assert name not in sent or (name == "connection" and sent[name].lower() in ("keep-alive", "close")), \
                    (path, name, sent.get(name))
            assert "key=" not in last["query"].lower()
            # The upstream authenticated with the gateway's own key, in the API's own header.
            if path.startswith("/v1/messages"):
                assert sent["x-api-key"] == upstream_key and "authorization" not in sent
            elif path.startswith("/v1beta/"):
                assert sent["x-goog-api-key"] == upstream_key and "authorization" not in sent
            else:
                assert sent["authorization"] == f"Bearer {upstream_key}" and "x-api-key" not in sent
        # A chunked request body arrives upstream as the gateway's own re-encoding, framing not passed on.
        payload = orjson.dumps(CHAT)
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 7]), payload[i:i + 7])
                           for i in range(0, len(payload), 7)) + b"0\r\n\r\n"
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['alice']}\r\n"
                "Transfer-Encoding: chunked\r\nTE: trailers\r\nConnection: close\r\n"
                "Content-Type: application/json\r\n\r\n").encode()
        answer = await raw_exchange(g.url, head + chunked)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        last = (await sim_stats(g))["last_request"]
        assert "te" not in last["headers"] and KEYS["alice"] not in str(last["headers"])
        # ... with the cap the bound assumed in max_completion_tokens too (issue 13, item 3)
        assert last["body"] == {**CHAT, "model": "llama-sim-8b", "max_completion_tokens": CHAT["max_tokens"]}


def test_credential_query_parameters_are_dropped_whatever_their_spelling() -> None:
    from gateway.adapters import ADAPTERS
    from gateway.adapters.base import upstream_query

    query = "alt=sse&key=a&KEY=b&Key=c&k%65y=d&api_key=e&access_token=f&x-goog-api-key=g&apikey=h&api-version=2"
    assert upstream_query(query) == "alt=sse&api-version=2"
    gemini = ADAPTERS["gemini"].upstream_url_path("m", {"method": "generateContent"}, query)
    assert gemini == "/v1beta/models/m:generateContent?alt=sse&api-version=2"
    assert ADAPTERS["openai.chat"].upstream_url_path("m", {}, query) == "/v1/chat/completions?alt=sse&api-version=2"


# ------------------------------------------------------------------------- upstream credentials
async def _answer_echoing_auth(request: web.Request) -> web.StreamResponse:
    """An upstream that quotes the credential it got in its 401, as some providers do (masked or not)."""
    got = request.headers.get("Authorization", "") + request.headers.get("x-api-key", "")
    return web.json_response({"error": {"message": f"Incorrect API key provided: {got}",
                                        "type": "invalid_request_error", "param": None,
                                        "code": "invalid_api_key"}}, status=401)


async def test_upstream_credentials_never_reach_clients_metrics_or_audit(redis_url: str, tmp_path: Path,
                                                                         upstream_key: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    token = "admin-" + secrets.token_hex(12)
    monkeypatch.setenv(ADMIN_TOKEN_ENV, token)
    seen: list[bytes] = []
    async with running_gateway(make_config(tmp_path, redis_url)) as g, admin_listener(g) as admin:
        alice = {"Authorization": f"Bearer {KEYS['alice']}"}
        calls: list[tuple[str, str, bytes | None, dict[str, str]]] = [
            ("POST", "/v1/chat/completions", orjson.dumps(CHAT), alice),
            ("POST", "/v1/chat/completions", orjson.dumps({**CHAT, "stream": True}), alice),
            ("POST", "/v1/chat/completions", b"{bad", alice),
            ("POST", "/v1/chat/completions", orjson.dumps({**CHAT, "model": "ghost"}), alice),
            ("POST", "/v1/chat/completions", orjson.dumps(CHAT), {"Authorization": f"Bearer {upstream_key}"}),
            ("POST", "/v1/chat/completions", orjson.dumps(CHAT), {**alice, "x-sim-fault": "status=500,rate=1"}),
            ("POST", "/v1/chat/completions", orjson.dumps(CHAT), {**alice, "x-sim-fault": "status=400,rate=1"}),
            ("POST", "/v1/chat/completions", orjson.dumps(CHAT), {**alice, "x-sim-fault": "status=401,rate=1"}),
            ("POST", "/v1/chat/completions", orjson.dumps(CHAT), {**alice, "x-sim-fault": "status=429,rate=1"}),
            ("POST", "/v1/chat/completions", orjson.dumps({**CHAT, "stream": True}),
             {**alice, "x-sim-fault": "midstream,rate=1,after=2"}),
            ("POST", "/v1/messages", orjson.dumps({"model": "dense", "max_tokens": 8, "messages": MSG}),
             {"x-api-key": KEYS["alice"], "x-sim-fault": "status=403,rate=1"}),
            ("POST", "/v1beta/models/dense:generateContent",
             orjson.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
             {"x-goog-api-key": KEYS["alice"], "x-sim-fault": "malformed,rate=1"}),
            ("GET", "/v1/models", None, alice), ("GET", "/metrics", None, {}), ("GET", "/readyz", None, {}),
            ("GET", "/healthz", None, {}),
        ]
        for method, path, body, headers in calls:
            status, reply_headers, reply = await fetch(method, g.url + path, body=body, headers=headers)
            assert status < 500 or status in (502, 504), (path, status, reply[:200])
            seen.append(orjson.dumps(reply_headers) + reply)
        admin_auth = {"Authorization": f"Bearer {token}"}
        for path in ("/admin/policy", "/admin/usage/alice", "/admin/principals", "/admin/keys"):
            status, reply_headers, reply = await fetch("GET", admin + path, headers=admin_auth)
            assert status == 200
            seen.append(orjson.dumps(reply_headers) + reply)
        status, _, reply = await fetch("GET", admin + "/metrics")  # after all the errors were counted
        seen.append(reply)
        got = [r["headers"].get("authorization") for r in (await sim_stats(g))["recent_requests"]]
        assert f"Bearer {upstream_key}" in got, "the test is void: the upstream never got the key"
    for i, blob in enumerate(seen):
        assert upstream_key.encode() not in blob, f"the upstream key leaked in answer {i}: {blob[:300]!r}"
        assert upstream_key[-12:].encode() not in blob, f"part of the upstream key leaked in answer {i}"
    audit = audit_text(tmp_path)
    assert upstream_key not in audit and upstream_key[-12:] not in audit


async def test_an_upstream_quoting_its_key_does_not_leak_it(redis_url: str, tmp_path: Path,
                                                            upstream_key: str) -> None:
    async with recorder(_answer_echoing_auth) as upstream:
        config = make_config(tmp_path, redis_url, extra_upstreams={"echoer": upstream.url})
        async with running_gateway(config) as g:
            status, _, reply = await fetch("POST", g.url + "/v1/chat/completions",
                                           body=orjson.dumps({**CHAT, "model": "echoer"}),
                                           headers={"Authorization": f"Bearer {KEYS['vera']}"})
        assert upstream.seen and upstream.seen[0].headers["Authorization"] == f"Bearer {upstream_key}"
    assert upstream_key.encode() not in reply and upstream_key[-12:].encode() not in reply
    assert status == 502, "the upstream refused the gateway's credentials: not the caller's fault"


# ------------------------------------------------------------------------------- where requests go
async def test_clients_cannot_route_to_arbitrary_urls(redis_url: str, tmp_path: Path, upstream_key: str) -> None:
    async with recorder() as canary, running_gateway(make_config(tmp_path, redis_url)) as g:
        host = canary.url.removeprefix("http://")
        alice = {"Authorization": f"Bearer {KEYS['alice']}", "x-goog-api-key": KEYS["alice"]}
        gemini = orjson.dumps({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
        before = (await sim_stats(g))["requests_total"]
        # Model names that look like places: refused (unknown model), nothing called.
        for model in (canary.url, canary.url + "/v1", f"//{host}/x", f"dense@{host}", f"{host}", f"http:{host}",
                      "../../../", "dense/../../x", f"dense?x=@{host}", f"dense#@{host}", "%2e%2e%2f", "dense\r\n"):
            status, _, reply = await fetch("POST", g.url + "/v1/chat/completions",
                                           body=orjson.dumps({**CHAT, "model": model}), headers=alice)
            assert status in (400, 404), (model, status, reply[:200])
        for target in (f"http:%2F%2F{host}%2Fx", f"%40{host}", f"@{host}", f"..%2F..%2F{quote(host)}",
                       quote(canary.url, safe=""), f"dense%40{host}", f"dense%2F..%2F..%2F{host}"):
            status, _, reply = await fetch("POST", g.url + f"/v1beta/models/{target}:generateContent",
                                           body=gemini, headers=alice, encoded=True)
            assert status in (400, 404, 405), (target, status, reply[:200])
        assert (await sim_stats(g))["requests_total"] == before
        # Headers that name another host, and an absolute-form request target: served by the configured
        # upstream, at the configured path, or refused.
        redirecting = {"Host": host, "X-Forwarded-Host": host, "Forwarded": f"host={host};proto=http",
                       "X-Original-URL": canary.url + "/x", "X-Rewrite-URL": canary.url + "/x",
                       "X-Forwarded-Proto": "http", "X-Forwarded-Port": host.split(":")[1]}
        status, _, reply = await fetch("POST", g.url + "/v1/chat/completions", body=orjson.dumps(CHAT),
                                       headers={**alice, **redirecting})
        assert status == 200, reply[:200]
        # (a known parameter carries the host: an unknown one is refused by the tier's field policy)
        status, _, reply = await fetch("POST", g.url + "/v1beta/models/dense:generateContent"
                                       f"?alt=json&prettyPrint=%2F%2F{host}",
                                       body=gemini, headers={**alice, **redirecting}, encoded=True)
        assert status == 200, reply[:200]
        last = (await sim_stats(g))["last_request"]
        assert last["path"] == "/v1beta/models/llama-sim-8b:generateContent", last["path"]
        body = orjson.dumps(CHAT)
        for target in (f"{canary.url}/v1/chat/completions", f"http://{host}@127.0.0.1/v1/chat/completions",
                       "/v1/chat/completions/../../../x", f"//{host}/v1/chat/completions"):
            request = (f"POST {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEYS['alice']}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                       ).encode() + body
            answer = await raw_exchange(g.url, request)
            assert not answer.startswith(b"HTTP/1.1 5"), (target, answer[:200])
        paths = {r["path"] for r in (await sim_stats(g))["recent_requests"]}
        assert paths <= {"/v1/chat/completions", "/v1beta/models/llama-sim-8b:generateContent"}, paths
    assert canary.seen == [], f"the gateway called an address a client chose: {canary.seen[0].path_qs}"


# ---------------------------------------------------------------------------------------- store URLs
ACL_USER = "kgate"
ACL_PASSWORD = "p:w@/x%?#s3cret"  # every URL-special character, percent-encoded in the URL


def _acl_args() -> list[str]:
    # The default user may only PING and INFO (the readiness probe); everything else needs the ACL user.
    return ["--user", "default", "on", "nopass", "resetchannels", "-@all", "+ping", "+info",
            "--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"]


def _acl_url(scheme: str, port: int, query: str = "") -> str:
    return f"{scheme}://{ACL_USER}:{quote(ACL_PASSWORD, safe='')}@127.0.0.1:{port}/0" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
def acl_redis() -> Iterator[RedisServer]:
    try:
        binary = find_redis_binary("7")
    except Exception as exc:
        pytest.skip(str(exc))
    server = RedisServer(binary=binary, port=0, appendonly=False, extra_args=_acl_args())
    server.start_sync()
    yield server
    server.stop_sync()
    server.cleanup()


async def test_store_url_with_acl_user_and_password(acl_redis: RedisServer, tmp_path: Path,
                                                    upstream_key: str) -> None:
    assert acl_redis.port is not None
    url = _acl_url("redis", acl_redis.port)
    client = await store_mod.connect(url, timeout=2)
    try:
        assert await client.ping()
        await client.set("acl-probe", "1")
        assert await client.get("acl-probe") == "1"
    finally:
        await store_mod.close(client)
    for bad in (f"redis://127.0.0.1:{acl_redis.port}/0", f"redis://{ACL_USER}:wrong@127.0.0.1:{acl_redis.port}/0",
                f"redis://{ACL_USER}:{ACL_PASSWORD.replace('%', '')}@127.0.0.1:{acl_redis.port}/0"):
        client = await store_mod.connect(bad, timeout=2)
        try:
            with pytest.raises(Exception) as info:
                await client.set("acl-probe", "2")
            assert ACL_PASSWORD not in str(info.value)
        finally:
            await store_mod.close(client)
    # The whole gateway on that URL: identity, the ledger's scripts (pipelined client) and the audit.
    async with running_gateway(make_config(tmp_path, url)) as g:
        status, _, reply = await fetch("POST", g.url + "/v1/chat/completions", body=orjson.dumps(CHAT),
                                       headers={"Authorization": f"Bearer {KEYS['alice']}"})
        assert status == 200, reply[:300]
        assert g.gw.ledger is not None
        tier = g.gw.config.tiers["basic"]
        states = await g.gw.ledger.state(ScopeRef("principal", "alice"),
                                         [BudgetSpec.from_config(b) for b in tier.budgets])
        assert states[0].used == 1 and states[0].held == 0
        async with admin_listener(g) as admin:  # /metrics is on the admin listener
            for url in (g.url + "/readyz", admin + "/metrics"):
                status, _, reply = await fetch("GET", url)
                assert status == 200 and ACL_PASSWORD.encode() not in reply and b"s3cret" not in reply
    assert "s3cret" not in audit_text(tmp_path)


def test_unsupported_store_urls_are_refused_without_showing_the_password() -> None:
    with pytest.raises(ValueError) as info:
        asyncio.run(store_mod.connect("memcached://user:hunter2@127.0.0.1:1", timeout=1))
    assert "hunter2" not in str(info.value)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, Path]]:
    """A Redis 7 with a TLS port (self-signed certificate made here) beside its plain port."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    try:
        binary = find_redis_binary("7")
    except Exception as exc:
        pytest.skip(str(exc))
    certs = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(certs / "key.pem"),
                    "-out", str(certs / "cert.pem"), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    tls_port = free_port()
    server = RedisServer(binary=binary, port=0, appendonly=False, extra_args=[
        "--tls-port", str(tls_port), "--tls-cert-file", str(certs / "cert.pem"),
        "--tls-key-file", str(certs / "key.pem"), "--tls-ca-cert-file", str(certs / "cert.pem"),
        "--tls-auth-clients", "no", *_acl_args()])
    try:
        server.start_sync()
    except Exception as exc:
        server.cleanup()
        pytest.skip(f"this redis-server cannot serve TLS: {exc}")
    yield server, tls_port, certs / "cert.pem"
    server.stop_sync()
    server.cleanup()


async def test_rediss_store_url_with_acl_user(tls_redis: tuple[RedisServer, int, Path], tmp_path: Path,
                                              upstream_key: str) -> None:
    _, tls_port, ca = tls_redis
    url = _acl_url("rediss", tls_port, f"ssl_cert_reqs=required&ssl_ca_certs={quote(str(ca))}")
    client: Any = await store_mod.connect(url, timeout=5)
    try:
        assert await client.ping()
        assert client.connection_pool.connection_kwargs["username"] == ACL_USER
        assert client.connection_pool.connection_kwargs["password"] == ACL_PASSWORD
    finally:
        await store_mod.close(client)
    # An unverifiable server certificate is refused when verification is asked for.
    client = await store_mod.connect(_acl_url("rediss", tls_port, "ssl_cert_reqs=required"), timeout=5)
    try:
        with pytest.raises(Exception):  # noqa: B017 - redis-py wraps the SSL error variously
            await client.ping()
    finally:
        await store_mod.close(client)
    # The gateway on rediss://: its requests are metered over TLS.
    async with running_gateway(make_config(tmp_path, url)) as g:
        status, _, reply = await fetch("POST", g.url + "/v1/chat/completions", body=orjson.dumps(CHAT),
                                       headers={"Authorization": f"Bearer {KEYS['alice']}"})
        assert status == 200, reply[:300]
        assert g.gw.ledger is not None
        states = await g.gw.ledger.state(ScopeRef("principal", "alice"),
                                         [BudgetSpec.from_config(b) for b in g.gw.config.tiers["basic"].budgets])
        assert states[0].used == 1


# ------------------------------------------------------------------------- header injection
BAD_VALUES = ("v\r\nX-Injected: 1", "v\nX-Injected: 1", "v\rX", "v\x00w", "v\x7f", "caf\u00e9")


@pytest.mark.parametrize("value", BAD_VALUES)
def test_policy_headers_base_urls_and_budget_names_with_control_characters_are_refused(value: str) -> None:
    from pydantic import ValidationError

    from gateway.policy.config import BudgetConfig, UpstreamConfig

    with pytest.raises(ValidationError, match="printable ASCII"):
        UpstreamConfig(base_url="http://up", headers={"x-tenant": value})
    with pytest.raises(ValidationError, match="printable ASCII"):
        BudgetConfig(metric="requests", window="1h", limit=1, name=value)
    with pytest.raises(ValidationError, match="http"):
        UpstreamConfig(base_url="http://up/v1" + value)


def test_policy_header_names_must_be_tokens_and_not_framing() -> None:
    from pydantic import ValidationError

    from gateway.policy.config import BudgetConfig, UpstreamConfig

    for name in ("x tenant", "x-a:b", "x-a\r\nx-b", "", "x-\u00e9"):
        with pytest.raises(ValidationError, match="token"):
            UpstreamConfig(base_url="http://up", headers={name: "v"})
    for name in ("Host", "content-length", "Transfer-Encoding"):
        with pytest.raises(ValidationError, match="framing"):
            UpstreamConfig(base_url="http://up", headers={name: "v"})
    for name in ('a"b', "a\\b"):
        with pytest.raises(ValidationError, match="double quotes"):
            BudgetConfig(metric="requests", window="1h", limit=1, name=name)
    ok = UpstreamConfig(base_url="https://up.example/v1/", headers={"X-Tenant": "acme; q=1 (test)"})
    assert ok.base_url == "https://up.example/v1" and ok.headers == {"X-Tenant": "acme; q=1 (test)"}
    assert BudgetConfig(metric="requests", window="1h", limit=1, name="team: req/h").label == "team: req/h"


@pytest.mark.parametrize("value", BAD_VALUES)
def test_values_from_outside_with_control_characters_never_go_out(value: str, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from gateway.policy.config import UpstreamConfig
    from gateway.proxy import upstream as up

    # the upstream's key, from the environment (a secret file's trailing newline): not used, not logged
    monkeypatch.setenv(UPSTREAM_KEY_ENV, "sk-" + value.replace("\x00", "\x01"))  # no NUL in an environment
    targets = up.Upstreams({"u": UpstreamConfig(base_url="http://up", api_key_env=UPSTREAM_KEY_ENV)}, None)
    target = targets.get("u")
    assert target.auth_value is None
    assert UPSTREAM_KEY_ENV in caplog.text and "sk-v" not in caplog.text
    # the client's provider headers: dropped, the clean ones kept
    sent = up.request_headers(target, "anthropic", {"anthropic-beta": value, "accept": "application/json"}, "r1")
    assert sent == {"content-type": "application/json", "x-request-id": "r1", "accept": "application/json",
                    "anthropic-version": "2023-06-01"}
    # the upstream's response headers (any client implementation): dropped, the clean ones kept
    back = up.response_headers({"content-type": "application/json", "x-request-id": value,
                                "request-id": "req_1", "set-cookie": "s=1"})
    assert back == {"content-type": "application/json", "request-id": "req_1"}
    monkeypatch.setenv(UPSTREAM_KEY_ENV, "sk-clean")
    assert up.Upstreams({"u": UpstreamConfig(base_url="http://up", api_key_env=UPSTREAM_KEY_ENV)},
                        None).get("u").auth_value == "sk-clean"
