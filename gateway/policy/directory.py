"""Who the callers are: principals, API keys, grants and budget overrides, kept in Redis (docs/design.md §2).

- API keys are stored only as a keyed hash: HMAC-SHA256 under a pepper (``KGATE_KEY_PEPPER`` from the
  environment, else one generated once and kept in the store), never in clear. A key is shown once, at
  creation; afterwards it is known by its id (``kg_…``), which is safe to log and audit.
- Grants are time-bound elevations to a tier, with approver and reason; an expired grant simply stops
  applying (no sweeper is needed for correctness).
- Every change publishes on an invalidation channel; each replica drops its cache on a message, and the
  cache's short TTL bounds staleness even if a message is lost, so a revocation is seen everywhere within
  a second.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass
from types import EllipsisType, MappingProxyType
from typing import Any, ParamSpec, TypeVar

from gateway.background import cancelled, stop_task
from gateway.ledger.errors import STORE_FAILURES, StoreError, store_error
from gateway.policy.config import Config, PrincipalConfig

log = logging.getLogger("kgate.directory")

KEY_PREFIX = "kgate_"  # issued API keys look like kgate_<43 url-safe chars>
CACHE_TTL = 1.0  # seconds; the upper bound on staleness when an invalidation message is lost
STORE_RETRY = 2.0  # seconds after a store error during which lookups answer from what was read before
# The cache is swept of expired entries whenever it doubles (from at least CACHE_SWEEP_MIN entries), so
# a flood of distinct unknown keys costs memory for about one TTL's worth of them, never more than
# CACHE_MAX entries.
CACHE_SWEEP_MIN = 1024
CACHE_MAX = 100_000
_NO_OVERRIDES: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True)
class Principal:
    id: str
    org: str
    tier: str
    key_id: str | None = None
    enabled: bool = True
    source: str = "config"  # config | store | header


@dataclass(frozen=True)
class Grant:
    id: str
    principal: str
    tier: str
    starts_at: float
    expires_at: float
    approver: str
    reason: str
    revoked: bool = False

    def active(self, now: float) -> bool:
        return not self.revoked and self.starts_at <= now < self.expires_at

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _open_run(rec: Any) -> tuple[str, str | None] | None:
    """An ``eval_open`` entry as (run id, key id or None); None when no run is open."""
    if not rec:
        return None
    r = {_s(k): _s(v) for k, v in rec.items()}
    return r["run"], r.get("key_id") or None


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _store_call(method: Callable[_P, Awaitable[_T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """A change or listing that raises :class:`StoreError` for a store failure. (Lookups, on the request path,
    convert where they meet the store, in ``_cached`` and ``_keyed_hash``: no wrapper to pay for.)"""
    @functools.wraps(method)
    async def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(*args, **kwargs)
        except STORE_FAILURES as exc:
            raise store_error(exc) from exc
    return call


class Directory:
    """Principals and keys from the configuration and from Redis, with a per-replica cache. A store that
    fails makes the public coroutines raise :class:`~gateway.ledger.errors.StoreError` (the client's
    exception as its cause), except where they answer from what was read before."""

    def __init__(self, config: Config, redis: Any | None, *, key_prefix: str = "kgate",
                 clock: Any = time.time):
        self._redis = redis
        self._p = f"{key_prefix}:dir"
        self._clock = clock
        self._pepper: bytes | None = None
        self._cache: dict[str, tuple[float, Any]] = {}
        self._sweep_at = CACHE_SWEEP_MIN
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        # The last value read per key, served only while the store is unreachable (stale-if-error): an
        # outage must not lock out callers whose tier says on_store_error: allow.
        self._last: dict[str, Any] = {}
        # After a store error, lookups do not wait for the store again for STORE_RETRY seconds: a request
        # then waits for its reserve's store timeout only, not for one more per lookup.
        self._store_down_until = 0.0
        self._listener: asyncio.Task[None] | None = None
        # What was decoded from a cached entry, per cache key: (the entry's value object, what it decodes to).
        # Used only while the cache answers with that very object (``is``): a refetch, an invalidation or an
        # expiry puts another object there and the entry is decoded afresh, so a change is seen exactly when
        # the cache sees it. (Holding the object keeps its identity from being reused.)
        self._decoded: dict[str, tuple[Any, Any]] = {}
        self.reload(config)

    # ------------------------------------------------------------------------------------- config side
    def reload(self, config: Config) -> None:
        """Take the static principals of a (re)loaded configuration."""
        self._static_by_hash: dict[str, PrincipalConfig] = {
            p.key_sha256: p for p in config.principals if p.key_sha256}
        self._static_by_id: dict[str, PrincipalConfig] = {p.id: p for p in config.principals}
        self._static_principals: dict[str, Principal] = {
            p.id: Principal(p.id, p.org, p.tier, enabled=p.enabled, source="config") for p in config.principals}
        # The Principal of each static key, by key hash: (its PrincipalConfig, the principal entry it was made
        # with, the answer); reused while both are the very same objects (see _static_key_principal).
        self._static_answers: dict[str, tuple[PrincipalConfig, Any, Principal | None]] = {}
        # The same for issued keys, by cache key: (the key's decoded entry, its principal, the answer).
        self._key_answers: dict[str, tuple[dict[str, str], Principal, Principal]] = {}
        self._cache.clear()
        self._decoded.clear()

    @property
    def channel(self) -> str:
        return f"{self._p}:invalidate"

    # ------------------------------------------------------------------------------------------ lookups
    async def by_key(self, api_key: str) -> Principal | None:
        """The principal an API key belongs to, or None for an unknown, revoked or disabled key."""
        digest = sha256_hex(api_key)
        static = self._static_by_hash.get(digest)
        if static is not None:
            if not static.enabled:
                return None
            entry = None
            if self._redis is not None:
                try:
                    entry = await self._principal_entry(static.id)
                except StoreError:
                    entry = None  # the store is away and nothing was read before: the configuration's word
            return self._static_key_principal(static, digest, entry)
        if self._redis is None or not api_key.startswith(KEY_PREFIX):
            return None
        keyed = await self._keyed_hash(api_key)
        key = f"key:{keyed}"
        record = await self._cached(key, lambda: self._redis.hgetall(f"{self._p}:key:{keyed}"))
        rec = self._key_record(key, record)
        if rec is None:
            return None
        principal = await self.by_id(rec["principal"])
        return self._store_key_principal(key, rec, principal)

    def by_key_now(self, api_key: str) -> Principal | EllipsisType | None:
        """:meth:`by_key` from the cache alone, without a coroutine (every request asks, and almost always
        the cache holds the answer): ``...`` when an entry it needs is not cached and fresh, or the pepper is
        not known yet — then await :meth:`by_key`. Both read the same cache entries with the same freshness
        rule and decode them with the same functions, so they answer alike."""
        digest = sha256_hex(api_key)
        static = self._static_by_hash.get(digest)
        if static is not None:
            if not static.enabled:
                return None
            entry = None
            if self._redis is not None:
                entry = self._fresh(f"principal:{static.id}")
                if entry is ...:
                    return ...
            return self._static_key_principal(static, digest, entry)
        if self._redis is None or not api_key.startswith(KEY_PREFIX):
            return None
        if self._pepper is None:
            return ...
        key = f"key:{self._hmac(api_key)}"
        record = self._fresh(key)
        if record is ...:
            return ...
        rec = self._key_record(key, record)
        if rec is None:
            return None
        principal = self.by_id_now(rec["principal"])
        if principal is ...:
            return ...
        return self._store_key_principal(key, rec, principal)

    async def by_id(self, principal_id: str) -> Principal | None:
        if self._redis is None:
            return self._static_principal(principal_id)
        return self._principal_by_id(principal_id, await self._principal_entry(principal_id))

    def by_id_now(self, principal_id: str) -> Principal | EllipsisType | None:
        """:meth:`by_id` from the cache alone; ``...`` when the principal's entry is not cached and fresh."""
        if self._redis is None:
            return self._static_principal(principal_id)
        entry = self._fresh(f"principal:{principal_id}")
        return ... if entry is ... else self._principal_by_id(principal_id, entry)

    def _principal_entry(self, principal_id: str) -> Awaitable[Any]:
        """The principal's cached store entry (a hash; empty when the store has none). Needs the store."""
        redis = self._redis
        assert redis is not None
        return self._cached(f"principal:{principal_id}", lambda: redis.hgetall(f"{self._p}:principal:{principal_id}"))

    def _principal_by_id(self, principal_id: str, entry: Any) -> Principal | None:
        """The principal whose store entry is ``entry``: the store's, else the configuration's, else None."""
        stored = self._stored_principal(principal_id, entry)
        return stored if stored is not None else self._static_principal(principal_id)

    def _static_principal(self, principal_id: str) -> Principal | None:
        """The configuration's principal (one object per principal and configuration: it is immutable)."""
        return self._static_principals.get(principal_id)

    def _stored_principal(self, principal_id: str, entry: Any) -> Principal | None:
        """The principal a store entry describes (None for none), decoded once per cached entry."""
        if not entry:
            return None
        key = f"principal:{principal_id}"
        memo = self._decoded.get(key)
        if memo is not None and memo[0] is entry:
            return memo[1]
        r = {_s(k): _s(v) for k, v in entry.items()}
        principal = Principal(principal_id, r.get("org", "default"), r.get("tier", ""),
                              enabled=r.get("enabled", "1") == "1", source="store")
        self._memo(key, entry, principal)
        return principal

    def _static_key_principal(self, static: PrincipalConfig, digest: str, entry: Any) -> Principal | None:
        """The answer for a key of the configuration, given its principal's store entry (``entry``: None
        without one), which may change its tier or disable it. Made once per configuration and entry: the
        answer is reused only while both are the very same objects, so a changed entry — read again after
        an invalidation or its TTL — or a reload is seen exactly when it would be without the reuse."""
        memo = self._static_answers.get(digest)
        if memo is not None and memo[0] is static and memo[1] is entry:
            return memo[2]
        override = self._stored_principal(static.id, entry)
        tier = override.tier if override else static.tier
        enabled = override.enabled if override else True
        answer = Principal(static.id, static.org, tier, key_id=f"sha256:{digest[:12]}", enabled=enabled,
                           source="config") if enabled else None
        self._static_answers[digest] = (static, entry, answer)  # one per key of the configuration: bounded
        return answer

    def _key_record(self, key: str, record: Any) -> dict[str, str] | None:
        """An issued key's store entry, decoded once per cached entry; None when it is unknown or revoked."""
        if not record:
            return None
        memo = self._decoded.get(key)
        if memo is not None and memo[0] is record:
            rec: dict[str, str] | None = memo[1]
            return rec
        rec = {_s(k): _s(v) for k, v in record.items()}
        if rec.get("revoked") == "1":
            rec = None
        self._memo(key, record, rec)
        return rec

    def _store_key_principal(self, key: str, rec: dict[str, str], principal: Principal | None) -> Principal | None:
        """The answer for an issued key whose (decoded, not revoked) entry is ``rec``, of ``principal``: made
        once per decoded entry and principal object, both reused only while their cache entries are the
        same objects (see ``_decoded``), so a revocation or a change of the principal is seen at once."""
        if principal is None or not principal.enabled:
            return None
        memo = self._key_answers.get(key)
        if memo is not None and memo[0] is rec and memo[1] is principal:
            return memo[2]
        answer = Principal(principal.id, principal.org, principal.tier, key_id=rec.get("key_id"), source="store")
        if len(self._key_answers) >= CACHE_MAX and key not in self._key_answers:
            self._key_answers.clear()
        self._key_answers[key] = (rec, principal, answer)
        return answer

    async def active_grant(self, principal_id: str) -> Grant | None:
        """The principal's active grant (the latest-expiring one when several overlap)."""
        if self._redis is None:
            return None
        now = self._clock()
        ids = await self._cached(
            f"grants:{principal_id}",
            lambda: self._redis.zrangebyscore(f"{self._p}:grants:{principal_id}", now, "+inf"))
        best: Grant | None = None
        for gid in ids or ():
            g = await self.grant(_s(gid))
            if g is not None and g.active(now) and (best is None or g.expires_at > best.expires_at):
                best = g
        return best

    def active_grant_now(self, principal_id: str) -> Grant | EllipsisType | None:
        """:meth:`active_grant` from the cache alone, without a coroutine (every request asks, and almost
        every answer is "none"); ``...`` when the principal's grant list, or one of its grants, is not
        cached and fresh. Whether a grant is active is decided now, on every call, as there."""
        if self._redis is None:
            return None
        ids = self._fresh(f"grants:{principal_id}")
        if ids is ...:
            return ...
        if not ids:
            return None
        now = self._clock()
        best: Grant | None = None
        for gid in ids:
            grant_id = _s(gid)
            rec = self._fresh(f"grant:{grant_id}")
            if rec is ...:
                return ...
            g = self._grant(grant_id, rec)
            if g is not None and g.active(now) and (best is None or g.expires_at > best.expires_at):
                best = g
        return best

    async def grant(self, grant_id: str) -> Grant | None:
        if self._redis is None:
            return None
        rec = await self._cached(f"grant:{grant_id}", lambda: self._redis.hgetall(f"{self._p}:grant:{grant_id}"))
        return self._grant(grant_id, rec)

    def _grant(self, grant_id: str, rec: Any) -> Grant | None:
        """The grant a store entry describes (None for none), decoded once per cached entry."""
        if not rec:
            return None
        key = f"grant:{grant_id}"
        memo = self._decoded.get(key)
        if memo is not None and memo[0] is rec:
            return memo[1]
        r = {_s(k): _s(v) for k, v in rec.items()}
        g = Grant(id=grant_id, principal=r["principal"], tier=r["tier"], starts_at=float(r["starts_at"]),
                  expires_at=float(r["expires_at"]), approver=r.get("approver", ""),
                  reason=r.get("reason", ""), revoked=r.get("revoked") == "1")
        self._memo(key, rec, g)
        return g

    async def overrides(self, principal_id: str) -> dict[str, float]:
        """Per-principal budget limits by budget label (empty: the tier's limits apply)."""
        if self._redis is None:
            return {}
        rec = await self._cached(f"override:{principal_id}",
                                 lambda: self._redis.hgetall(f"{self._p}:override:{principal_id}"))
        return {_s(k): float(_s(v)) for k, v in (rec or {}).items()}

    def overrides_now(self, principal_id: str) -> Mapping[str, float] | EllipsisType:
        """:meth:`overrides` from the cache alone, without a coroutine; ``...`` when the entry is not cached
        and fresh. The mapping is shared (decoded once per cached entry): read it, never change it."""
        if self._redis is None:
            return _NO_OVERRIDES
        key = f"override:{principal_id}"
        rec = self._fresh(key)
        if rec is ...:
            return ...
        if not rec:
            return _NO_OVERRIDES
        memo = self._decoded.get(key)
        if memo is not None and memo[0] is rec:
            return memo[1]
        limits = MappingProxyType({_s(k): float(_s(v)) for k, v in rec.items()})
        self._memo(key, rec, limits)
        return limits

    async def open_eval(self, principal_id: str) -> tuple[str, str | None] | None:
        """(run id, key id or None) of the evaluation run open for the principal (gateway/evals/runs.py
        opens and closes them), or None. Cached like the principal; a store that fails answers None."""
        if self._redis is None:
            return None
        try:
            rec = await self._cached(f"eval_open:{principal_id}",
                                     lambda: self._redis.hgetall(self.key(f"eval_open:{principal_id}")))
        except StoreError:
            return None  # the request is refused or spooled by its reserve; an outage must not break lookups
        return _open_run(rec)

    def open_eval_now(self, principal_id: str) -> tuple[str, str | None] | EllipsisType | None:
        """:meth:`open_eval` from the cache alone, without a coroutine (every request asks, and almost every
        answer is "none"); ``...`` when the cache holds no fresh answer."""
        if self._redis is None:
            return None
        hit = self._cache.get(f"eval_open:{principal_id}")
        if hit is None or hit[0] <= time.monotonic():
            return ...
        return _open_run(hit[1])

    def key(self, name: str) -> str:
        """The store key of one directory entry (for the modules that keep entries of their own)."""
        return f"{self._p}:{name}"

    async def publish(self, what: str) -> None:
        """Tell every replica that the entry cached as ``what`` changed."""
        await self._publish(what)

    # ---------------------------------------------------------------------------------------- changes
    @_store_call
    async def create_key(self, principal_id: str, org: str, tier: str) -> tuple[str, str]:
        """Issue a key for a principal (creating or updating the principal); returns (key, key_id)."""
        redis = self._need_redis()
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "kg_" + secrets.token_hex(8)
        keyed = await self._keyed_hash(key)
        await redis.hset(f"{self._p}:principal:{principal_id}", mapping={
            "org": org, "tier": tier, "enabled": "1"})
        await redis.hset(f"{self._p}:key:{keyed}", mapping={
            "principal": principal_id, "key_id": key_id, "created": f"{self._clock():.3f}", "revoked": "0"})
        await redis.set(f"{self._p}:keyid:{key_id}", keyed)
        await redis.sadd(f"{self._p}:keys:{principal_id}", key_id)
        await redis.sadd(f"{self._p}:principals", principal_id)
        await self._publish(f"principal:{principal_id}")
        return key, key_id

    @_store_call
    async def revoke_key(self, key_id: str) -> str | None:
        """Revoke a key by id; returns its principal, or None when the id is unknown."""
        redis = self._need_redis()
        keyed = await redis.get(f"{self._p}:keyid:{key_id}")
        if keyed is None:
            return None
        keyed_s = _s(keyed)
        principal = await redis.hget(f"{self._p}:key:{keyed_s}", "principal")
        await redis.hset(f"{self._p}:key:{keyed_s}", "revoked", "1")
        await self._publish(f"key:{keyed_s}")
        return _s(principal) if principal is not None else None

    @_store_call
    async def list_keys(self, principal_id: str | None = None) -> list[dict[str, Any]]:
        redis = self._need_redis()
        principals = [principal_id] if principal_id else sorted(await self.list_principal_ids())
        out = []
        for pid in principals:
            for kid in sorted(_s(k) for k in await redis.smembers(f"{self._p}:keys:{pid}")):
                keyed = await redis.get(f"{self._p}:keyid:{kid}")
                rec = await redis.hgetall(f"{self._p}:key:{_s(keyed)}") if keyed else {}
                r = {_s(k): _s(v) for k, v in rec.items()}
                out.append({"key_id": kid, "principal": pid, "created": float(r.get("created", 0)),
                            "revoked": r.get("revoked") == "1"})
        return out

    @_store_call
    async def list_principals(self) -> list[dict[str, Any]]:
        """Every principal (configuration and store), as the admin API and CLI show them."""
        out = []
        for pid in sorted(await self.list_principal_ids()):
            p = await self.by_id(pid)
            if p is not None:
                out.append({"id": p.id, "org": p.org, "tier": p.tier, "enabled": p.enabled, "source": p.source})
        return out

    @_store_call
    async def list_principal_ids(self) -> set[str]:
        ids = set(self._static_by_id)
        if self._redis is not None:
            ids |= {_s(x) for x in await self._redis.smembers(f"{self._p}:principals")}
        return ids

    @_store_call
    async def set_principal(self, principal_id: str, *, tier: str | None = None, org: str | None = None,
                            enabled: bool | None = None) -> Principal:
        redis = self._need_redis()
        current = await self.by_id(principal_id)
        mapping = {
            "org": org or (current.org if current else "default"),
            "tier": tier or (current.tier if current else ""),
            "enabled": "1" if (enabled if enabled is not None else (current.enabled if current else True)) else "0",
        }
        await redis.hset(f"{self._p}:principal:{principal_id}", mapping=mapping)
        await redis.sadd(f"{self._p}:principals", principal_id)
        await self._publish(f"principal:{principal_id}")
        return Principal(principal_id, mapping["org"], mapping["tier"], enabled=mapping["enabled"] == "1",
                         source="store")

    @_store_call
    async def add_grant(self, principal_id: str, tier: str, duration_s: float, approver: str,
                        reason: str) -> Grant:
        redis = self._need_redis()
        now = self._clock()
        g = Grant(id="gr_" + secrets.token_hex(8), principal=principal_id, tier=tier, starts_at=now,
                  expires_at=now + duration_s, approver=approver, reason=reason)
        await redis.hset(f"{self._p}:grant:{g.id}", mapping={
            "principal": g.principal, "tier": g.tier, "starts_at": f"{g.starts_at:.3f}",
            "expires_at": f"{g.expires_at:.3f}", "approver": approver, "reason": reason, "revoked": "0"})
        await redis.zadd(f"{self._p}:grants:{principal_id}", {g.id: g.expires_at})
        await redis.sadd(f"{self._p}:grant_principals", principal_id)
        await self._publish(f"grants:{principal_id}")
        return g

    @_store_call
    async def revoke_grant(self, grant_id: str) -> Grant | None:
        redis = self._need_redis()
        g = await self.grant(grant_id)
        if g is None:
            return None
        await redis.hset(f"{self._p}:grant:{grant_id}", "revoked", "1")
        await self._publish(f"grant:{grant_id}")
        await self._publish(f"grants:{g.principal}")
        return Grant(**{**g.as_dict(), "revoked": True})

    @_store_call
    async def list_grants(self, principal_id: str | None = None, *, include_expired: bool = False) -> list[Grant]:
        redis = self._need_redis()
        pids = [principal_id] if principal_id else sorted(
            _s(x) for x in await redis.smembers(f"{self._p}:grant_principals"))
        now = self._clock()
        out = []
        for pid in pids:
            lo = "-inf" if include_expired else now
            for gid in await redis.zrangebyscore(f"{self._p}:grants:{pid}", lo, "+inf"):
                g = await self.grant(_s(gid))
                if g is not None and (include_expired or not g.revoked):
                    out.append(g)
        return out

    @_store_call
    async def set_override(self, principal_id: str, budget_label: str, limit: float | None) -> None:
        redis = self._need_redis()
        if limit is None:
            await redis.hdel(f"{self._p}:override:{principal_id}", budget_label)
        else:
            await redis.hset(f"{self._p}:override:{principal_id}", budget_label, repr(float(limit)))
        await self._publish(f"override:{principal_id}")

    # --------------------------------------------------------------------------------- cache machinery
    def _fresh(self, key: str) -> Any:
        """The cached value of ``key`` while it is fresh, else ``...``: :meth:`_cached`'s hit (the same test),
        without a coroutine — for the ``*_now`` lookups, which fall back to the awaited ones on ``...``."""
        hit = self._cache.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return ...

    def _memo(self, key: str, value: Any, decoded: Any) -> None:
        """Remember what the cached ``value`` of ``key`` decodes to (bounded like the stale-if-error copies)."""
        if len(self._decoded) >= CACHE_MAX and key not in self._decoded:
            self._decoded.clear()
        self._decoded[key] = (value, decoded)

    async def _cached(self, key: str, fetch: Any) -> Any:
        """A cached read; concurrent misses of one key share a single fetch (no thundering herd)."""
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        if now < self._store_down_until:
            if key in self._last:
                return self._last[key]
            raise StoreError("the store failed moments ago; not asking it again yet")
        inflight = self._inflight.get(key)
        if inflight is not None:
            return await asyncio.shield(inflight)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            value = await fetch()
        except STORE_FAILURES as exc:
            self._store_down_until = time.monotonic() + STORE_RETRY
            if key in self._last:
                value = self._last[key]
                fut.set_result(value)
                return value
            error = store_error(exc)
            fut.set_exception(error)
            fut.exception()
            raise error from exc
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            self._inflight.pop(key, None)
        fut.set_result(value)
        if len(self._cache) >= self._sweep_at:
            self._sweep(now)
        self._cache[key] = (now + CACHE_TTL, value)
        if value or not key.startswith("key:"):  # per principal, or a key that exists: a flood of unknown
            if len(self._last) >= CACHE_MAX:      # API keys must not fill it
                self._last.clear()
            self._last[key] = value
        _resume_cancellation()
        return value

    def _sweep(self, now: float) -> None:
        """Drop expired entries (all of them if even the live ones are too many); amortised O(1)."""
        live = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache = live if len(live) < CACHE_MAX else {}
        self._sweep_at = max(CACHE_SWEEP_MIN, 2 * len(self._cache))

    async def _publish(self, what: str) -> None:
        self._cache.pop(what, None)
        if self._redis is not None:
            try:
                await self._redis.publish(self.channel, what)
            except Exception:
                log.warning("could not publish directory invalidation for %s", what)

    def invalidate(self, what: str | None = None) -> None:
        if what is None:
            self._cache.clear()
        else:
            self._cache.pop(what, None)

    async def start(self) -> None:
        """Listen for invalidations from other replicas (best effort; the cache TTL is the backstop)."""
        if self._redis is None or self._listener is not None:
            return
        self._listener = asyncio.create_task(self._listen(), name="kgate-directory-listener")

    async def stop(self) -> None:
        await stop_task(self._listener)
        self._listener = None

    async def _listen(self) -> None:
        backoff = 0.1
        while not cancelled():
            try:
                assert self._redis is not None
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self.channel)
                backoff = 0.1
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        self.invalidate(_s(msg["data"]))
            except asyncio.CancelledError:
                raise
            except Exception:
                self.invalidate()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _keyed_hash(self, key: str) -> str:
        if self._pepper is None:
            env = os.environ.get("KGATE_KEY_PEPPER")
            if env:
                self._pepper = env.encode()
            else:
                redis = self._need_redis()
                try:
                    await redis.set(f"{self._p}:pepper", secrets.token_hex(32), nx=True)
                    raw = await redis.get(f"{self._p}:pepper")
                except STORE_FAILURES as exc:
                    raise store_error(exc) from exc
                self._pepper = raw if isinstance(raw, bytes) else str(raw).encode()
                _resume_cancellation()
        return self._hmac(key)

    def _hmac(self, key: str) -> str:
        """The keyed hash of an API key, once the pepper is known."""
        assert self._pepper is not None
        return hmac.new(self._pepper, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def _need_redis(self) -> Any:
        if self._redis is None:
            raise RuntimeError("this operation needs the store")
        return self._redis


def _resume_cancellation() -> None:
    """Raise the cancellation the current task was asked for, if a store call swallowed it.

    redis-py's asyncio client can return a command's answer to a task cancelled while the reply was on its
    way, without the ``CancelledError`` (tests/integration/test_cancel_during_lookup.py). A request cancelled
    by a shutdown then ran on to wait for its body. The task remembers the request (``Task.cancelling()``),
    so a lookup that completes re-raises it: the value is cached all the same, for the next request."""
    if cancelled():
        raise asyncio.CancelledError()
