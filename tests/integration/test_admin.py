"""The admin API and grants (issue 5, docs/design.md §2, §7.3), against a real Redis and real gateways.

Two gateway apps on one Redis play two replicas: a change made through one replica's admin API must be
enforced by the other within about a second (pub/sub invalidation, the cache TTL as a backstop).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from gatewayutil import KEYS, RunningGateway, audit_records, make_config, running_gateway

from gateway.admin.api import create_admin_app
from gateway.admin.ops import parse_duration
from gateway.engine.errors import BadRequest
from gateway.policy.config import Config

TOKEN = "test-admin-token-3f9a"
TOKEN_ENV = "KGATE_ADMIN_TOKEN"
MSG = [{"role": "user", "content": "hi"}]


# ----------------------------------------------------------------------------------------- harness
@dataclass
class Replica:
    """A gateway app with its client listener (``url``) and its admin listener (``admin_url``)."""

    g: RunningGateway
    admin_url: str

    @property
    def url(self) -> str:
        return self.g.url

    async def admin(self, method: str, path: str, body: Any = None, *, token: str | None = TOKEN,
                    raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        async with aiohttp.ClientSession() as s, s.request(method, self.admin_url + path, data=data,
                                                          headers=headers) as r:
            return r.status, await r.json()

    async def chat(self, key: str, **body: Any) -> tuple[int, Any]:
        """One chat completion with ``key``; returns (status, JSON body)."""
        payload = {"model": "dense", "messages": MSG, "max_tokens": 10, **body}
        async with aiohttp.ClientSession() as s, s.post(self.url + "/v1/chat/completions", json=payload,
                                                       headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, await r.json()

    async def readyz(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/readyz") as r:
            doc: dict[str, Any] = await r.json()
            return doc


@contextlib.asynccontextmanager
async def replica(config: Config, name: str, config_path: object = None, **kw: Any) -> AsyncIterator[Replica]:
    """A gateway (``create_app``) plus its admin app on a second loopback port, like ``kgate serve``."""
    async with running_gateway(config, replica=name, **kw) as g:
        runner = web.AppRunner(create_admin_app(g.app, config_path), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield Replica(g, f"http://127.0.0.1:{port}")
        finally:
            await runner.cleanup()


async def until(predicate: Any, timeout: float = 3.0, step: float = 0.02) -> float:
    """Poll an async predicate until it is true; returns the seconds it took (fails on timeout)."""
    t0 = time.monotonic()
    while True:
        if await predicate():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return TOKEN


@pytest.fixture
async def two(flushed_redis_url: str, tmp_path: Path, token: str) -> AsyncIterator[tuple[Replica, Replica]]:
    """Two replicas of one policy on one Redis, writing audit files into one folder."""
    cfg = make_config(tmp_path, flushed_redis_url)
    async with replica(cfg, "r1") as a, replica(cfg, "r2") as b:
        yield a, b


@pytest.fixture
def audit_dir(tmp_path: Path) -> Path:
    return tmp_path / "data" / "audit"


# ------------------------------------------------------------------------------------------- token
async def test_admin_api_needs_its_token(two: tuple[Replica, Replica]) -> None:
    a, _ = two
    status, doc = await a.admin("GET", "/admin/policy", token=None)
    assert status == 401 and "admin token required" in doc["error"]["message"]
    assert (await a.admin("GET", "/admin/policy", token="wrong"))[0] == 401
    assert (await a.admin("GET", "/admin/policy", token=TOKEN + "x"))[0] == 401
    assert (await a.admin("GET", "/admin/policy", token=""))[0] == 401
    # the client API key of a principal is no admin token
    assert (await a.admin("GET", "/admin/policy", token=KEYS["alice"]))[0] == 401
    # an unknown path is refused before it is routed: nothing about the admin API leaks without the token
    assert (await a.admin("GET", "/admin/nothing", token=None))[0] == 401
    assert (await a.admin("GET", "/admin/policy"))[0] == 200


async def test_admin_api_is_disabled_without_the_environment_variable(
        flushed_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    async with replica(make_config(tmp_path, flushed_redis_url), "r1") as a:
        for token in (TOKEN, "", None):
            status, doc = await a.admin("GET", "/admin/policy", token=token)
            assert status == 403 and f"set {TOKEN_ENV}" in doc["error"]["message"]
        # an empty variable is no token either
        monkeypatch.setenv(TOKEN_ENV, "")
        assert (await a.admin("POST", "/admin/keys", {"principal": "x", "tier": "basic"}, token=""))[0] == 403


async def test_token_comes_from_the_variable_the_policy_names(
        flushed_redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config(tmp_path, flushed_redis_url)
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"admin_token_env": "MY_ADMIN_TOKEN"})})
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the default variable is ignored...
    monkeypatch.setenv("MY_ADMIN_TOKEN", "other-token")
    async with replica(cfg, "r1") as a:
        assert (await a.admin("GET", "/admin/policy"))[0] == 401
        assert (await a.admin("GET", "/admin/policy", token="other-token"))[0] == 200  # ...this one counts


# -------------------------------------------------------------------------------------------- keys
async def test_created_key_is_shown_once_works_and_is_never_stored_in_clear(
        two: tuple[Replica, Replica], flushed_redis_url: str, audit_dir: Path) -> None:
    a, b = two
    status, doc = await a.admin("POST", "/admin/keys", {"principal": "pat", "org": "acme", "tier": "basic"})
    assert status == 201, doc
    key, key_id = doc["key"], doc["key_id"]
    assert key.startswith("kgate_") and key_id.startswith("kg_") and "once" in doc["note"]

    # the key works on both replicas, through a real SDK
    for r in (a, b):
        client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key=key, max_retries=0)
        resp = await client.chat.completions.create(model="dense", messages=MSG, max_tokens=10)  # type: ignore[arg-type]
        assert resp.choices

    # listed by id, never shown again
    status, listed = await a.admin("GET", "/admin/keys?principal=pat")
    assert status == 200 and [k["key_id"] for k in listed["keys"]] == [key_id]
    assert key not in orjson.dumps(listed).decode()
    status, principals = await b.admin("GET", "/admin/principals")
    assert {"id": "pat", "org": "acme", "tier": "basic", "enabled": True, "source": "store"} in principals["principals"]
    assert {p["id"] for p in principals["principals"]} >= set(KEYS)  # static principals listed too

    # Redis holds a keyed hash of the key, never the key
    import redis.asyncio as aioredis

    store = aioredis.from_url(flushed_redis_url)
    try:
        readers = {b"hash": store.hgetall, b"string": store.get, b"set": store.smembers,
                   b"zset": lambda k: store.zrange(k, 0, -1)}
        for k in await store.keys("*"):
            assert key.encode() not in k
            kind = await store.type(k)
            assert kind in readers, (k, kind)
            assert key not in str(await readers[kind](k)), k
    finally:
        await store.aclose()

    # an audit record without the key
    await asyncio.sleep(0.1)
    records = audit_records(audit_dir)
    created = [x for x in records if x.get("reason") == "key.create"]
    assert len(created) == 1 and created[0]["decision"] == "admin"
    assert created[0]["admin"]["key_id"] == key_id and created[0]["admin"]["principal"] == "pat"
    assert all(key not in orjson.dumps(x).decode() for x in records)


async def test_revoke_on_one_replica_is_enforced_by_the_other_within_a_second(
        two: tuple[Replica, Replica], audit_dir: Path) -> None:
    a, b = two
    _, doc = await a.admin("POST", "/admin/keys", {"principal": "pat", "tier": "basic"})
    key, key_id = doc["key"], doc["key_id"]
    assert doc["org"] == "default"
    assert (await b.chat(key))[0] == 200  # replica b now has the key in its cache

    status, revoked = await a.admin("DELETE", f"/admin/keys/{key_id}")
    assert status == 200 and revoked == {"key_id": key_id, "revoked": True, "principal": "pat"}
    t0 = time.monotonic()
    assert (await a.chat(key))[0] == 401  # at once on the replica that revoked

    async def refused_by_b() -> bool:
        status, body = await b.chat(key)
        assert status in (200, 401), body
        return status == 401

    await until(refused_by_b, timeout=3.0)
    assert time.monotonic() - t0 < 1.2, "a revocation reaches every replica within about a second"
    status, body = await b.chat(key)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"

    _, listed = await b.admin("GET", "/admin/keys")
    assert {"key_id": key_id, "principal": "pat", "revoked": True}.items() <= listed["keys"][0].items()
    assert (await a.admin("DELETE", "/admin/keys/kg_nope"))[0] == 404
    await asyncio.sleep(0.05)
    assert [x["admin"]["key_id"] for x in audit_records(audit_dir) if x.get("reason") == "key.revoke"] == [key_id]


async def test_tier_assignment_on_one_replica_changes_enforcement_on_the_other(
        two: tuple[Replica, Replica]) -> None:
    a, b = two
    assert (await b.chat(KEYS["alice"], n=6))[0] == 403  # basic: max_samples 4
    status, doc = await a.admin("PUT", "/admin/principals/alice", {"tier": "vetted"})
    assert status == 200 and doc == {"id": "alice", "org": "acme", "tier": "vetted", "enabled": True}

    async def allowed() -> bool:
        return (await b.chat(KEYS["alice"], n=6))[0] == 200

    assert await until(allowed, timeout=3.0) < 1.2
    # disabling a principal locks out its keys everywhere
    assert (await a.admin("PUT", "/admin/principals/alice", {"enabled": False}))[0] == 200

    async def locked_out() -> bool:
        return (await b.chat(KEYS["alice"]))[0] == 401

    assert await until(locked_out, timeout=3.0) < 1.2
    _, principals = await a.admin("GET", "/admin/principals")
    assert {"id": "alice", "org": "acme", "tier": "vetted", "enabled": False, "source": "store"} \
        in principals["principals"]


async def test_budget_override_lowers_the_limit_and_usage_shows_it(two: tuple[Replica, Replica]) -> None:
    a, b = two
    label = "principal:requests:1m"  # the basic tier's budget: 10000 requests a minute
    assert (await a.chat(KEYS["alice"]))[0] == 200
    status, doc = await a.admin("PUT", f"/admin/overrides/alice/{label}", {"limit": 3})
    assert status == 200 and doc == {"principal": "alice", "budget": label, "limit": 3.0, "applies_now": True}

    async def refused() -> bool:
        status, body = await b.chat(KEYS["alice"])
        assert status in (200, 429), body
        return status == 429

    await until(refused, timeout=3.0)
    status, body = await b.chat(KEYS["alice"])
    assert status == 429 and label in body["error"]["message"]

    status, use = await b.admin("GET", "/admin/usage/alice")
    assert status == 200 and use["tier"] == "basic" and use["grant"] is None
    [budget] = use["budgets"]
    assert budget["scope"] == "principal" and budget["scope_id"] == "alice"
    assert budget["budget"] == label and budget["metric"] == "requests" and budget["window"] == "1m"
    assert budget["limit"] == 3 and budget["used"] == 3 and budget["held"] == 0 and budget["remaining"] == 0

    assert (await a.admin("DELETE", f"/admin/overrides/alice/{label}"))[0] == 200

    async def allowed_again() -> bool:
        return (await b.chat(KEYS["alice"]))[0] == 200

    await until(allowed_again, timeout=3.0)
    _, use = await a.admin("GET", "/admin/usage/alice")
    assert use["budgets"][0]["limit"] == 10000 and use["budgets"][0]["remaining"] == 10000 - 4


async def test_usage_shows_used_held_and_remaining_per_budget(two: tuple[Replica, Replica]) -> None:
    a, _ = two
    for _ in range(2):
        assert (await a.chat(KEYS["tina"], max_tokens=100))[0] == 200
    status, use = await a.admin("GET", "/admin/usage/tina")
    assert status == 200
    assert (use["principal"], use["org"], use["tier"], use["base_tier"]) == ("tina", "acme", "tight", "tight")
    by_metric = {b["metric"]: b for b in use["budgets"]}
    assert set(by_metric) == {"generated_tokens", "requests"}
    req, gen = by_metric["requests"], by_metric["generated_tokens"]
    assert (req["limit"], req["used"], req["held"], req["remaining"]) == (100, 2, 0, 98)
    assert gen["limit"] == 1000 and 0 < gen["used"] <= 200 and gen["held"] == 0
    assert gen["remaining"] == pytest.approx(1000 - gen["used"])
    assert all(b["reset_at"] > time.time() for b in use["budgets"])
    assert (await a.admin("GET", "/admin/usage/nobody"))[0] == 404


async def test_policy_endpoint_shows_the_version_in_force(two: tuple[Replica, Replica], tmp_path: Path) -> None:
    a, _ = two
    status, doc = await a.admin("GET", "/admin/policy")
    assert status == 200
    assert doc["policy_sha256"] == a.g.gw.config.version == (await a.readyz())["policy_sha256"]
    assert doc["files"] == [str(tmp_path / "policy.yaml")]
    assert doc["tiers"] == sorted(a.g.gw.config.tiers) and "dense" in doc["models"]


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method,path,body,status,words", [
    ("POST", "/admin/keys", b"{not json", 400, "not valid JSON"),
    ("POST", "/admin/keys", b"[1]", 400, "JSON object"),
    ("POST", "/admin/keys", {"tier": "basic"}, 400, "'principal'"),
    ("POST", "/admin/keys", {"principal": "a b", "tier": "basic"}, 400, "'principal'"),
    ("POST", "/admin/keys", {"principal": "x" * 129, "tier": "basic"}, 400, "'principal'"),
    ("POST", "/admin/keys", {"principal": "pat", "tier": "gold"}, 400, "unknown tier 'gold'"),
    ("POST", "/admin/keys", {"principal": "pat", "tier": "basic", "org": ""}, 400, "'org'"),
    ("PUT", "/admin/principals/alice", {"tier": "gold"}, 400, "unknown tier"),
    ("PUT", "/admin/principals/alice", {"enabled": "yes"}, 400, "'enabled'"),
    ("PUT", "/admin/principals/newbie", {"org": "acme"}, 400, "'tier'"),
    ("PUT", "/admin/overrides/alice/principal:requests:1m", {"limit": "10"}, 400, "'limit'"),
    ("PUT", "/admin/overrides/alice/principal:requests:1m", {"limit": -1}, 400, "'limit'"),
    ("PUT", "/admin/overrides/alice/principal:requests:1m", {"limit": True}, 400, "'limit'"),
    ("PUT", "/admin/overrides/alice/principal:requests:1m", b'{"limit": 1e400}', 400, "not valid JSON"),
    ("PUT", "/admin/overrides/alice/principal:requests:1x", {"limit": 5}, 400, "unknown budget"),
    ("POST", "/admin/grants", {"principal": "alice", "tier": "vetted", "duration": "soon",
                               "approver": "bob", "reason": "eval"}, 400, "duration"),
    ("POST", "/admin/grants", {"principal": "alice", "tier": "vetted", "duration": "0s",
                               "approver": "bob", "reason": "eval"}, 400, "duration"),
    ("POST", "/admin/grants", {"principal": "alice", "tier": "vetted", "duration": "1h",
                               "reason": "eval"}, 400, "'approver'"),
    ("POST", "/admin/grants", {"principal": "alice", "tier": "vetted", "duration": "1h",
                               "approver": "bob", "reason": "  "}, 400, "'reason'"),
    ("POST", "/admin/grants", {"principal": "alice", "tier": "gold", "duration": "1h",
                               "approver": "bob", "reason": "eval"}, 400, "unknown tier"),
    ("POST", "/admin/grants", {"principal": "ghost", "tier": "vetted", "duration": "1h",
                               "approver": "bob", "reason": "eval"}, 404, "unknown principal"),
    ("DELETE", "/admin/grants/gr_nope", None, 404, "unknown grant"),
    ("DELETE", "/admin/keys/kg_nope", None, 404, "unknown key"),
    ("GET", "/admin/nothing", None, 404, "unknown admin path"),
    ("DELETE", "/admin/policy", None, 405, "not allowed"),
])
async def test_bad_input_is_a_clear_4xx_and_changes_nothing(two: tuple[Replica, Replica], audit_dir: Path,
                                                            method: str, path: str, body: Any, status: int,
                                                            words: str) -> None:
    a, _ = two
    raw = body if isinstance(body, bytes) else None
    got, doc = await a.admin(method, path, None if raw is not None else body, raw=raw)
    assert got == status, doc
    assert words in doc["error"]["message"], doc
    assert set(doc["error"]) >= {"message", "type", "code"}
    await asyncio.sleep(0.05)
    assert not [x for x in audit_records(audit_dir) if x.get("decision") == "admin"], "nothing was changed"


def test_parse_duration() -> None:
    assert parse_duration("2s") == 2 and parse_duration("30m") == 1800 and parse_duration("12h") == 43200
    assert parse_duration("7d") == 7 * 86400 and parse_duration("1w") == 604800 and parse_duration("1.5h") == 5400
    for bad in ("", "5", "h", "-1h", "0m", "1y", "1 h x"):
        with pytest.raises(BadRequest):
            parse_duration(bad)


# ------------------------------------------------------------------------------------------- grants
GRANT = {"principal": "alice", "tier": "vetted", "approver": "dana@acme", "reason": "red-team eval #12"}


async def test_grant_elevates_on_every_replica_and_expires_on_time(two: tuple[Replica, Replica],
                                                                  audit_dir: Path) -> None:
    a, b = two
    status, body = await b.chat(KEYS["alice"], n=6)
    assert status == 403 and "max_samples" in body["error"]["message"]  # the base tier refuses

    status, g = await a.admin("POST", "/admin/grants", {**GRANT, "duration": "2s"})
    assert status == 201, g
    assert g["tier"] == "vetted" and g["approver"] == "dana@acme" and g["reason"] == "red-team eval #12"
    assert g["expires_at"] - g["starts_at"] == pytest.approx(2.0, abs=0.01)

    async def elevated_on_b() -> bool:
        return (await b.chat(KEYS["alice"], n=6))[0] == 200

    assert await until(elevated_on_b, timeout=1.5) < 1.2
    assert (await a.chat(KEYS["alice"], n=6))[0] == 200
    _, use = await a.admin("GET", "/admin/usage/alice")
    assert use["tier"] == "vetted" and use["base_tier"] == "basic" and use["grant"]["id"] == g["id"]
    _, listed = await b.admin("GET", "/admin/grants?principal=alice")
    assert [(x["id"], x["active"]) for x in listed["grants"]] == [(g["id"], True)]

    # still in force shortly before the end...
    await asyncio.sleep(max(g["expires_at"] - 0.5 - time.time(), 0))
    assert (await b.chat(KEYS["alice"], n=6))[0] == 200
    # ...and over on every replica the moment it ends, with no sweeper and no admin action
    await asyncio.sleep(max(g["expires_at"] + 0.02 - time.time(), 0))
    for r in (a, b):
        status, body = await r.chat(KEYS["alice"], n=6)
        assert status == 403 and "max_samples" in body["error"]["message"]
    assert (await b.chat(KEYS["alice"], n=2))[0] == 200  # the base tier applies again
    _, use = await b.admin("GET", "/admin/usage/alice")
    assert use["tier"] == "basic" and use["grant"] is None
    assert (await a.admin("GET", "/admin/grants"))[1]["grants"] == []
    _, everything = await a.admin("GET", "/admin/grants?all=1")
    assert [(x["id"], x["active"]) for x in everything["grants"]] == [(g["id"], False)]

    # requests served under the grant say so in their audit records
    await asyncio.sleep(0.1)
    records = audit_records(audit_dir)
    served = [x for x in records if x.get("principal") == "alice" and x.get("decision") == "allowed"]
    assert {x.get("grant") for x in served} == {g["id"], None}
    assert all(x["tier"] == "vetted" for x in served if x.get("grant"))
    [added] = [x for x in records if x.get("reason") == "grant.add"]
    assert added["decision"] == "admin"
    assert added["admin"]["approver"] == "dana@acme" and added["admin"]["reason"] == "red-team eval #12"
    assert added["admin"]["principal"] == "alice" and added["admin"]["tier"] == "vetted"
    assert added["admin"]["expires_at"] == pytest.approx(g["expires_at"])


async def test_revoking_a_grant_ends_it_at_once(two: tuple[Replica, Replica], audit_dir: Path) -> None:
    a, b = two
    _, g = await a.admin("POST", "/admin/grants", {**GRANT, "duration": "1h"})
    assert (await a.chat(KEYS["alice"], n=6))[0] == 200
    assert (await b.chat(KEYS["alice"], n=6))[0] == 200

    status, revoked = await a.admin("DELETE", f"/admin/grants/{g['id']}")
    assert status == 200 and revoked["revoked"] is True and revoked["id"] == g["id"]
    assert (await a.chat(KEYS["alice"], n=6))[0] == 403  # at once where it was revoked

    async def over_on_b() -> bool:
        return (await b.chat(KEYS["alice"], n=6))[0] == 403

    assert await until(over_on_b, timeout=3.0) < 1.2
    assert (await b.admin("GET", "/admin/grants?principal=alice"))[1]["grants"] == []
    _, everything = await b.admin("GET", "/admin/grants?principal=alice&all=1")
    assert [(x["id"], x["revoked"], x["active"]) for x in everything["grants"]] == [(g["id"], True, False)]

    await asyncio.sleep(0.05)
    [rec] = [x for x in audit_records(audit_dir) if x.get("reason") == "grant.revoke"]
    assert rec["admin"]["approver"] == "dana@acme" and rec["admin"]["reason"] == "red-team eval #12"
    assert rec["admin"]["id"] == g["id"] and rec["admin"]["revoked"] is True


async def test_overlapping_grants_the_latest_ending_applies(two: tuple[Replica, Replica]) -> None:
    a, _ = two
    _, short = await a.admin("POST", "/admin/grants", {**GRANT, "tier": "clamp", "duration": "1h"})
    _, long = await a.admin("POST", "/admin/grants", {**GRANT, "duration": "2h"})
    _, use = await a.admin("GET", "/admin/usage/alice")
    assert use["grant"]["id"] == long["id"] and use["tier"] == "vetted"
    await a.admin("DELETE", f"/admin/grants/{long['id']}")
    _, use = await a.admin("GET", "/admin/usage/alice")
    assert use["grant"]["id"] == short["id"] and use["tier"] == "clamp"


# ------------------------------------------------------------------------------------------ audit
async def test_every_admin_change_is_an_audit_record_in_a_verifiable_chain(
        two: tuple[Replica, Replica], audit_dir: Path) -> None:
    a, b = two
    actor = {"X-Kgate-Actor": "ops@acme"}
    _, k = await a.admin("POST", "/admin/keys", {"principal": "pat", "tier": "basic"})
    await b.admin("PUT", "/admin/principals/pat", {"tier": "clamp"})
    await a.admin("PUT", "/admin/overrides/pat/principal:requests:1m", {"limit": 5})
    await a.admin("DELETE", "/admin/overrides/pat/principal:requests:1m")
    _, g = await b.admin("POST", "/admin/grants", {**GRANT, "principal": "pat", "duration": "1h"})
    await a.admin("DELETE", f"/admin/grants/{g['id']}")
    await b.admin("DELETE", f"/admin/keys/{k['key_id']}")
    async with aiohttp.ClientSession() as s, s.post(a.admin_url + "/admin/reload",
                                                    headers={"Authorization": f"Bearer {TOKEN}", **actor}) as r:
        assert r.status == 200  # unchanged policy: nothing to record
    await asyncio.sleep(0.1)

    records = [x for x in audit_records(audit_dir) if x.get("decision") == "admin"]
    assert sorted(x["reason"] for x in records) == sorted(
        ["key.create", "principal.set", "override.set", "override.delete", "grant.add", "grant.revoke",
         "key.revoke"])
    version = a.g.gw.config.version
    assert all(x["policy_sha256"] == version and x["actor"] == "admin-api" and x["request_id"] is None
               for x in records)
    assert {x["replica"] for x in records} == {"r1", "r2"}
    assert k["key"] not in orjson.dumps(records).decode()

    from gateway.audit.verify import verify_main

    assert verify_main([str(audit_dir)]) == 0


async def test_overrides_apply_to_principal_scope_budgets_only(flushed_redis_url: str, tmp_path: Path,
                                                              token: str) -> None:
    """An org or global budget is shared: a per-principal override of its limit is refused."""
    budgets = [{"metric": "requests", "window": "1h", "limit": 100},
               {"metric": "requests", "window": "1h", "limit": 1000, "scope": "org"}]
    async with replica(make_config(tmp_path, flushed_redis_url, tight={"budgets": budgets}), "r1") as a:
        status, doc = await a.admin("PUT", "/admin/overrides/tina/org:requests:1h", {"limit": 5})
        assert status == 400 and "scope org" in doc["error"]["message"]
        status, doc = await a.admin("PUT", "/admin/overrides/tina/principal:requests:1h", {"limit": 1})
        assert status == 200
        assert (await a.chat(KEYS["tina"]))[0] == 200
        status, body = await a.chat(KEYS["tina"])
        assert status == 429 and "principal:requests:1h" in body["error"]["message"]
        _, use = await a.admin("GET", "/admin/usage/tina")
        assert [(b["scope"], b["scope_id"], b["limit"], b["used"]) for b in use["budgets"]] == [
            ("principal", "tina", 1, 1), ("org", "acme", 1000, 1)]


async def test_an_override_outside_the_principals_tier_is_kept_and_says_it_does_not_apply_yet(
        flushed_redis_url: str, tmp_path: Path, token: str) -> None:
    """alice is in tier basic; principal:requests:1h is a budget of tier tight only. The override is
    stored (it applies once alice is in a tier with that budget) and the answer says it changes nothing
    yet, instead of a silent success that an operator would take for a limit in force."""
    budgets = [{"metric": "requests", "window": "1h", "limit": 100}]
    async with replica(make_config(tmp_path, flushed_redis_url, tight={"budgets": budgets}), "r1") as a:
        status, doc = await a.admin("PUT", "/admin/overrides/alice/principal:requests:1h", {"limit": 1})
        assert status == 200 and doc["applies_now"] is False
        assert doc["note"] == ("'alice' is in tier 'basic', which has no budget 'principal:requests:1h': the "
                               "override applies while 'alice' is in a tier that has it")
        status, doc = await a.admin("PUT", "/admin/overrides/nobody/principal:requests:1h", {"limit": 1})
        assert status == 200 and doc["applies_now"] is False and "no principal 'nobody'" in doc["note"]
        # moved to tier tight, alice gets the override that was set earlier
        assert (await a.admin("PUT", "/admin/principals/alice", {"tier": "tight"}))[0] == 200

        async def limited() -> bool:
            return (await a.chat(KEYS["alice"]))[0] == 429

        await until(limited, timeout=3.0)
        status, doc = await a.admin("PUT", "/admin/overrides/alice/principal:requests:1h", {"limit": 1})
        assert status == 200 and doc["applies_now"] is True and "note" not in doc
