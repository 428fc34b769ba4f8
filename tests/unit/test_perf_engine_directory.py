"""The directory's cache-only lookups (``by_key_now``, ``by_id_now``, ``active_grant_now``, ``overrides_now``),
which the engine asks before it awaits the ordinary ones, and the answers reused per cached entry: they must
answer exactly as the awaited lookups would, and see a revocation, a disabled principal, a changed tier, a
grant or an override exactly when those do — at once on the replica that made the change, after an
invalidation message or the cache's TTL on another (docs/design.md §2)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
from gatewayutil import KEYS, TIERS, make_config

from gateway.policy import directory as directory_module
from gateway.policy.directory import CACHE_TTL, Directory


class Clocks:
    """The directory's clocks under the test's control: ``monotonic`` (the cache's TTL) and wall time (grants)."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clocks(monkeypatch: pytest.MonkeyPatch) -> Clocks:
    c = Clocks()
    # Only the directory module's view of ``time``: the event loop keeps the real clock.
    monkeypatch.setattr(directory_module, "time", SimpleNamespace(monotonic=lambda: c.mono, time=lambda: c.wall))
    return c


@pytest.fixture
async def replicas(tmp_path: Path, clocks: Clocks) -> AsyncIterator[tuple[Directory, Directory]]:
    """Two replicas' directories over one in-memory store (no invalidation listener: messages are delivered
    by hand, or lost)."""
    cfg = make_config(tmp_path, "redis://in-memory.invalid")
    redis = fakeredis.FakeAsyncRedis()
    a = Directory(cfg, redis, clock=lambda: clocks.wall)
    b = Directory(cfg, redis, clock=lambda: clocks.wall)
    try:
        yield a, b
    finally:
        await redis.aclose()


async def answers(d: Directory, key: str) -> Any:
    """``by_key``'s answer, after checking that ``by_key_now`` gives the same one whenever it answers."""
    now = d.by_key_now(key)
    awaited = await d.by_key(key)
    if now is not ...:
        assert now == awaited
    again = d.by_key_now(key)
    assert again is not ..., "the awaited lookup leaves a fresh cache behind"
    assert again == awaited
    return awaited


async def test_a_revoked_key_is_refused_at_once_here_and_after_the_message_or_the_ttl_elsewhere(
        replicas: tuple[Directory, Directory], clocks: Clocks) -> None:
    a, b = replicas
    key, key_id = await a.create_key("pat", "acme", "basic")
    pa, pb = await answers(a, key), await answers(b, key)
    assert pa is not None and (pa.id, pa.tier, pa.key_id, pa.source) == ("pat", "basic", key_id, "store")
    assert a.by_key_now(key) is a.by_key_now(key), "the answer is made once per cached entry"

    await a.revoke_key(key_id)
    assert a.by_key_now(key) is ..., "the replica that revoked dropped the entry: the store is asked"
    assert await answers(a, key) is None
    # The other replica has not heard: it answers from its cache, exactly as its awaited lookup does ...
    assert b.by_key_now(key) == await b.by_key(key) == pb
    # ... until the message comes,
    keyed = next(k for k in b._cache if k.startswith("key:"))
    b.invalidate(keyed)
    assert b.by_key_now(key) is ...
    assert await answers(b, key) is None

    # or, when the message is lost, until the cache's TTL runs out.
    key2, key_id2 = await a.create_key("pam", "acme", "basic")
    assert (await answers(b, key2)) is not None
    await a.revoke_key(key_id2)
    clocks.advance(CACHE_TTL / 2)
    assert b.by_key_now(key2) is not None and b.by_key_now(key2) is not ..., "still fresh: the cached answer"
    clocks.advance(CACHE_TTL / 2)
    assert b.by_key_now(key2) is ..., "expired: never answered from a stale entry"
    assert await answers(b, key2) is None


async def test_a_changed_or_disabled_principal_is_seen_through_the_reused_answers(
        replicas: tuple[Directory, Directory], clocks: Clocks) -> None:
    a, b = replicas
    # A key of the configuration, whose principal the store may override.
    alice = KEYS["alice"]
    first = await answers(b, alice)
    assert first is not None and (first.tier, first.source) == (TIERS["alice"], "config")
    assert b.by_key_now(alice) is first, "the configuration's key: one answer while nothing changes"

    await a.set_principal("alice", tier="vetted")
    assert a.by_key_now(alice) is ...
    assert (await answers(a, alice)).tier == "vetted"
    assert b.by_key_now(alice) is first, "not heard yet: the cached answer"
    b.invalidate("principal:alice")
    assert (await answers(b, alice)).tier == "vetted"

    await a.set_principal("alice", enabled=False)
    assert await answers(a, alice) is None
    clocks.advance(CACHE_TTL)
    assert b.by_key_now(alice) is ...
    assert await answers(b, alice) is None

    # An issued key whose principal is disabled, then enabled again.
    key, _ = await a.create_key("pat", "acme", "basic")
    assert (await answers(a, key)) is not None
    await a.set_principal("pat", enabled=False)
    assert await answers(a, key) is None
    await a.set_principal("pat", enabled=True, tier="clamp")
    p = await answers(a, key)
    assert p is not None and p.tier == "clamp"


async def test_grants_and_overrides_from_the_cache_apply_and_end_on_time(
        replicas: tuple[Directory, Directory], clocks: Clocks) -> None:
    a, b = replicas
    assert a.active_grant_now("alice") is ... and await a.active_grant("alice") is None
    assert a.active_grant_now("alice") is None
    g = await a.add_grant("alice", "vetted", 0.8 * CACHE_TTL, "secops", "audit")
    assert a.active_grant_now("alice") is ...
    assert await a.active_grant("alice") == g == a.active_grant_now("alice")
    assert a.active_grant_now("alice") is a.active_grant_now("alice")
    clocks.advance(0.1 * CACHE_TTL)
    assert await b.active_grant("alice") == g
    # A grant that expires while its entries are cached ends on time: activity is decided on every call.
    clocks.advance(0.65 * CACHE_TTL)
    assert b.active_grant_now("alice") == g
    clocks.advance(0.1 * CACHE_TTL)
    assert b._fresh("grants:alice") is not ..., "still cached"
    assert b.active_grant_now("alice") is None and await b.active_grant("alice") is None

    g2 = await a.add_grant("alice", "vetted", 3600, "secops", "audit")
    assert await a.active_grant("alice") == g2 == a.active_grant_now("alice")
    await a.revoke_grant(g2.id)
    assert a.active_grant_now("alice") is ...
    assert await a.active_grant("alice") is None and a.active_grant_now("alice") is None

    assert a.overrides_now("alice") is ... and await a.overrides("alice") == {} == a.overrides_now("alice")
    await a.set_override("alice", "principal:generated_tokens:1d", 5)
    assert a.overrides_now("alice") is ...
    assert await a.overrides("alice") == {"principal:generated_tokens:1d": 5.0} == a.overrides_now("alice")
    with pytest.raises(TypeError):
        a.overrides_now("alice")["x"] = 1  # type: ignore[index]  # shared: not to be changed by a caller


async def test_a_reload_is_seen_at_once(replicas: tuple[Directory, Directory], tmp_path: Path) -> None:
    a, _ = replicas
    before = await answers(a, KEYS["tina"])
    assert before is not None and before.tier == TIERS["tina"]
    (tmp_path / "again").mkdir()
    a.reload(make_config(tmp_path / "again", "redis://in-memory.invalid", tight={"max_k": 3}))
    assert a.by_key_now(KEYS["tina"]) is ..., "a reload empties the cache"
    after = await answers(a, KEYS["tina"])
    assert after == before and after is not before


async def test_without_a_store_the_configuration_answers_without_a_coroutine(tmp_path: Path) -> None:
    d = Directory(make_config(tmp_path, "redis://in-memory.invalid"), None)
    p = d.by_key_now(KEYS["alice"])
    assert p is not ... and p == await d.by_key(KEYS["alice"])
    assert d.by_key_now("kgate_unknown") is None and d.by_key_now("nope") is None
    assert d.active_grant_now("alice") is None and d.overrides_now("alice") == {}
    assert d.by_id_now("alice") == await d.by_id("alice")


async def test_cache_only_lookups_agree_with_the_awaited_ones_through_random_changes(
        replicas: tuple[Directory, Directory], clocks: Clocks) -> None:
    """Whatever happens — keys issued and revoked, principals changed, grants added and revoked, overrides,
    messages delivered or lost, time passing — a cache-only answer, when there is one, is the awaited one."""
    a, b = replicas
    rng = random.Random(7)
    keys: list[tuple[str, str]] = []
    grants: list[str] = []
    pids = ["pat", "pam", "alice", "tina"]
    for _ in range(300):
        op = rng.randrange(9)
        pid = rng.choice(pids)
        if op == 0 or not keys:
            keys.append(await a.create_key(rng.choice(pids[:2]), "acme", rng.choice(["basic", "clamp"])))
        elif op == 1:
            await a.revoke_key(rng.choice(keys)[1])
        elif op == 2:
            await a.set_principal(pid, tier=rng.choice(["basic", "clamp", "vetted"]), enabled=rng.random() < 0.7)
        elif op == 3:
            grants.append((await a.add_grant(pid, rng.choice(["vetted", "clamp"]), rng.uniform(0.5, 5), "x",
                                             "y")).id)
        elif op == 4 and grants:
            await a.revoke_grant(rng.choice(grants))
        elif op == 5:
            await a.set_override(pid, "principal:generated_tokens:1d", rng.choice([None, 5.0, 7.0]))
        elif op == 6:
            b.invalidate(rng.choice([None, f"principal:{pid}", f"grants:{pid}", f"override:{pid}"]))
        elif op == 7:
            clocks.advance(rng.uniform(0, 1.5))
        for d in (a, b):
            for key in [k for k, _ in keys[-4:]] + [KEYS["alice"], KEYS["tina"]]:
                now = d.by_key_now(key)
                awaited = await d.by_key(key)
                if now is not ...:
                    assert now == awaited
            for p in pids:
                for now_fn, awaited_fn in ((d.by_id_now, d.by_id), (d.active_grant_now, d.active_grant),
                                           (d.overrides_now, d.overrides)):
                    now = now_fn(p)
                    awaited = await awaited_fn(p)
                    if now is not ...:
                        assert now == awaited, (now_fn.__name__, p)
