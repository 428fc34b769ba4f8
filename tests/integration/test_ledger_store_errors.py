"""Store failures come out of the ledger and the directory as StoreError (ScriptMissing for NOSCRIPT), with the
client's exception as the cause, whichever client carried the call; refusals stay what they were."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.ledger import store as store_mod
from gateway.ledger.errors import ScriptMissing, StoreError
from gateway.ledger.ledger import BudgetRefused, BudgetSpec, HoldRequest, Ledger, Reservation, ScopeRef
from gateway.ledger.redis_server import RedisServer
from gateway.ledger.resp import HotPathStore, RespClient
from gateway.policy.directory import KEY_PREFIX, Directory

ALICE = ScopeRef("principal", "alice")
TOK = BudgetSpec("out-1d", "output_tokens", "1d", False, 1000)
HOLD = HoldRequest(ALICE, (TOK,), {"output_tokens": 100})
NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens on port 1: every connection is refused


def unreachable(kind: str) -> object:
    plain = aioredis.from_url(NOWHERE, socket_connect_timeout=0.5, socket_timeout=0.5)
    return plain if kind == "redispy" else HotPathStore(plain, RespClient.from_url(NOWHERE, timeout=0.5))


def assert_store_error(info: pytest.ExceptionInfo[StoreError]) -> None:
    assert type(info.value) is StoreError
    assert isinstance(info.value.__cause__, RedisError | OSError)


@pytest.mark.parametrize("kind", ["redispy", "resp"])
async def test_every_ledger_operation_raises_store_error_when_redis_is_away(kind: str) -> None:
    client = unreachable(kind)
    ledger = Ledger(client, key_prefix="gone")  # type: ignore[arg-type]
    try:
        with pytest.raises(StoreError) as info:
            await ledger.reserve("r1", [HOLD], 60)
        assert_store_error(info)
        replay = Reservation("r1", (HOLD,))
        with pytest.raises(StoreError) as info:
            await ledger.settle(replay, {"output_tokens": 5})
        assert_store_error(info)
        two_scopes = Reservation("r1", (HOLD, HoldRequest(ScopeRef("org", "acme"), (TOK,), {})))
        with pytest.raises(StoreError) as info:
            await ledger.settle(two_scopes, {"output_tokens": 5})
        assert_store_error(info)
        with pytest.raises(StoreError) as info:
            await ledger.release(replay)
        assert_store_error(info)
        with pytest.raises(StoreError) as info:
            await ledger.state(ALICE, [TOK])
        assert_store_error(info)
        with pytest.raises(StoreError) as info:
            await ledger.holds_outstanding([ALICE])
        assert_store_error(info)
        with pytest.raises(StoreError) as info:
            await ledger.prepare()
        assert_store_error(info)
        with pytest.raises(ValueError):  # bad amounts are still the caller's error, found before sending
            await ledger.settle(replay, {"output_tokens": -1})
    finally:
        await store_mod.close(client)  # type: ignore[arg-type]


async def test_refusals_are_not_store_errors(store_client, key_prefix) -> None:
    ledger = Ledger(store_client, key_prefix=key_prefix)
    await ledger.reserve("r1", [HoldRequest(ALICE, (TOK,), {"output_tokens": 901})], 60)
    with pytest.raises(BudgetRefused) as info:
        await ledger.reserve("r2", [HOLD], 60)
    assert not isinstance(info.value, StoreError)


@pytest.fixture
async def fast(redis_server: RedisServer):
    """The gateway's hot-path store on a Redis of the test's own (the test flushes its scripts)."""
    client = HotPathStore(aioredis.from_url(redis_server.url), RespClient.from_url(redis_server.url, timeout=2))
    yield client
    await client.aclose()


async def post(ledger: Ledger, res: Reservation, actual: dict[str, float]) -> BaseException | None:
    answered: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    assert ledger.post_settle(res, actual, answered.set_result)
    return await asyncio.wait_for(answered, 5)


async def test_a_posted_settle_that_meets_noscript_reports_script_missing(fast, redis_server) -> None:
    """What the gateway's post_settle callback receives when Redis lost the scripts: ScriptMissing, caused by
    redis-py's NoScriptError; an awaited settle then loads the script and settles."""
    ledger = Ledger(fast, key_prefix="ns")
    res = await ledger.reserve("r1", [HOLD], 60)
    admin = aioredis.from_url(redis_server.url)
    try:
        await admin.script_flush()
    finally:
        await admin.aclose()
    error = await post(ledger, res, {"output_tokens": 40})
    assert type(error) is ScriptMissing and isinstance(error, StoreError)
    assert isinstance(error.__cause__, NoScriptError)
    assert (await ledger.settle(res, {"output_tokens": 40})).outcomes == ((ALICE, "applied"),)
    (state,) = await ledger.state(ALICE, [TOK])
    assert (state.used, state.held) == (40, 0)


async def test_a_script_error_is_a_store_error_awaited_or_posted(fast, redis_server) -> None:
    ledger = Ledger(fast, key_prefix="wt")
    res = await ledger.reserve("r1", [HOLD], 60)
    admin = aioredis.from_url(redis_server.url)
    try:  # the records hash replaced by a string: every script of the scope fails (WRONGTYPE)
        await admin.delete(ledger.key_base(ALICE) + ":rec")
        await admin.set(ledger.key_base(ALICE) + ":rec", json.dumps("not a hash"))
        error = await post(ledger, res, {"output_tokens": 40})
        assert type(error) is StoreError and isinstance(error.__cause__, ResponseError)
        with pytest.raises(StoreError) as info:
            await ledger.settle(res, {"output_tokens": 40})
        assert isinstance(info.value.__cause__, ResponseError)
    finally:
        await admin.aclose()


async def test_the_directory_raises_store_error_when_redis_is_away(monkeypatch) -> None:
    monkeypatch.setenv("KGATE_KEY_PEPPER", "pepper")
    client = aioredis.from_url(NOWHERE, socket_connect_timeout=0.5, socket_timeout=0.5)
    directory = Directory(SimpleNamespace(principals=[]), client)  # type: ignore[arg-type]
    try:
        with pytest.raises(StoreError) as info:
            await directory.by_key(KEY_PREFIX + "x" * 43)
        assert_store_error(info)
        with pytest.raises(StoreError) as info:  # within STORE_RETRY of a failure: not asked again
            await directory.by_id("p1")
        assert info.value.__cause__ is None
        for call in (directory.create_key("p1", "acme", "basic"), directory.revoke_key("kg_1"),
                     directory.list_principal_ids(), directory.list_grants(), directory.set_override("p1", "b", 5),
                     directory.add_grant("p1", "basic", 60, "me", "why")):
            with pytest.raises(StoreError) as info:
                await call
            assert_store_error(info)
    finally:
        await client.aclose()
