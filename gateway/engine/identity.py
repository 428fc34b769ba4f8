"""Who is calling, and under which tier (docs/design.md §4 steps 1 and 4).

The caller is named by a trusted header (behind an authenticating proxy) or by an API key; its tier is its
own, or the tier of its active grant. A header sent from outside ``server.trusted_identity_sources`` is
refused, never ignored: a caller who sends it expects to be someone, and must learn it is not believed.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import replace
from types import EllipsisType

from gateway.engine.errors import Forbidden, StoreUnavailable, Unauthenticated
from gateway.engine.request import Call, Facts
from gateway.engine.state import Gateway
from gateway.ledger.errors import StoreError
from gateway.policy.config import Config, TierConfig
from gateway.policy.directory import Grant, Principal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def api_key(call: Call) -> str | None:
    auth = call.headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer":
            token = token.strip()
            if token:
                return token
    return call.headers.get("x-api-key") or call.headers.get("x-goog-api-key") or (
        call.query.get("key") if "/v1beta/" in call.path else None)


def identify_now(gw: Gateway, cfg: Config, call: Call) -> Principal | EllipsisType:
    """:func:`identify`'s answer from the directory's cache alone, without a coroutine: a known API key whose
    entries are cached and fresh — almost every request. ``...`` for everything else (a trusted identity
    header, no key, a key refused, an entry to read from the store): await :func:`identify`, which decides
    it, with its errors, as it always has."""
    assert gw.directory is not None
    header = cfg.server.trusted_identity_header
    if header and header in call.headers:
        return ...
    key = api_key(call)
    if not key:
        return ...
    principal = gw.directory.by_key_now(key)
    return ... if principal is None else principal


async def identify(gw: Gateway, cfg: Config, call: Call) -> Principal:
    """The caller: a trusted header (from a trusted peer), else an API key."""
    assert gw.directory is not None
    header = cfg.server.trusted_identity_header
    if header and header in call.headers:
        peer = untrusted(call.peer(), cfg.server.trusted_identity_sources)
        if peer is not None:
            raise Unauthenticated(f"the identity header {header!r} is accepted only from the gateway's trusted "
                                  f"proxies, not from {peer}", code="untrusted_identity_header")
    try:
        if header and call.headers.get(header):
            principal = await gw.directory.by_id(call.headers[header].strip())
            if principal is None or not principal.enabled:
                raise Unauthenticated("the identity in the trusted header is not a known principal")
            return replace(principal, source="header")
        key = api_key(call)
        if not key:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>', 'x-api-key' or "
                                  "'x-goog-api-key'", code="missing_api_key")
        principal = await gw.directory.by_key(key)
    except StoreError:
        gw.metrics.store_error("identify")
        raise StoreUnavailable("the key store is unreachable; try again shortly") from None
    if principal is None:
        raise Unauthenticated("invalid API key", code="invalid_api_key")
    return principal


async def effective_tier(gw: Gateway, cfg: Config, principal: Principal,
                         facts: Facts | None = None) -> tuple[str, TierConfig]:
    """The principal's tier, or the tier of its active grant (noted in ``facts``)."""
    assert gw.directory is not None
    try:
        grant = await gw.directory.active_grant(principal.id)
    except StoreError:
        grant = None  # a store outage must not elevate anyone; the principal's own tier applies
    return tier_under(cfg, principal, grant, facts)


def effective_tier_now(gw: Gateway, cfg: Config, principal: Principal,
                       facts: Facts | None = None) -> tuple[str, TierConfig] | EllipsisType:
    """:func:`effective_tier` from the directory's cache alone, without a coroutine; ``...`` when the
    principal's grants are not cached and fresh (await :func:`effective_tier`)."""
    assert gw.directory is not None
    grant = gw.directory.active_grant_now(principal.id)
    return ... if grant is ... else tier_under(cfg, principal, grant, facts)


def tier_under(cfg: Config, principal: Principal, grant: Grant | None,
               facts: Facts | None = None) -> tuple[str, TierConfig]:
    """The principal's tier, or ``grant``'s (its active grant, noted in ``facts``) when the policy has it."""
    name = principal.tier
    if grant is not None and grant.tier in cfg.tiers:
        name = grant.tier
        if facts is not None:
            facts.grant = grant.id
    tier = cfg.tiers.get(name)
    if tier is None:
        raise Forbidden(f"tier {name!r} is not defined in the policy in force", code="unknown_tier")
    return name, tier


async def evaluation_run(gw: Gateway, principal: Principal) -> str | None:
    """The evaluation run the caller's requests belong to: the one open for its principal, unless the run
    is for another of the principal's keys."""
    assert gw.directory is not None
    run = gw.directory.open_eval_now(principal.id)
    if run is ...:
        run = await gw.directory.open_eval(principal.id)
    return run_of(principal, run)


def evaluation_run_now(gw: Gateway, principal: Principal) -> str | EllipsisType | None:
    """:func:`evaluation_run` from the directory's cache alone, without a coroutine (almost every answer is
    "none"); ``...`` when the cache holds no fresh answer (await :func:`evaluation_run`)."""
    assert gw.directory is not None
    run = gw.directory.open_eval_now(principal.id)
    return ... if run is ... else run_of(principal, run)


def run_of(principal: Principal, run: tuple[str, str | None] | None) -> str | None:
    """The run of an open ``run`` entry that the principal's key belongs to (None: none)."""
    if run is None or (run[1] is not None and run[1] != principal.key_id):
        return None
    return run[0]


def authorize_model(tier: TierConfig, model: str) -> None:
    if tier.models != "*" and model not in tier.models:
        raise Forbidden(f"model {model!r} is not available to your tier", code="model_not_allowed",
                        detail={"rule": "model"})


# ------------------------------------------------------------------------------------- trusted peers
@functools.lru_cache(maxsize=8)
def _parse_sources(sources: tuple[str, ...]) -> tuple[tuple[Network, ...], bool]:
    """``server.trusted_identity_sources`` (validated by the config) as networks, and whether ``unix`` is one."""
    nets = tuple(ipaddress.ip_network(s, strict=False) for s in sources if s != "unix")
    return nets, "unix" in sources


def untrusted(peer: str, sources: tuple[str, ...]) -> str | None:
    """None when ``peer`` (a :attr:`Call.peer` answer) is inside one of ``sources``; otherwise the peer,
    named for the refusal and the audit record.

    The peer is the connection's own address, never a forwarded-for header (which the client writes). An
    IPv4 peer on a dual-stack socket (``::ffff:10.0.0.1``) is matched as IPv4. A Unix-socket peer is trusted
    only when ``sources`` holds ``unix``: whoever may connect to the socket, by its file permissions, may
    then name any principal.
    """
    nets, unix_ok = _parse_sources(sources)
    if peer == "closed":
        return "a closed connection"
    if peer == "unix":
        return None if unix_ok else "a Unix socket"
    if peer in ("unknown", ""):
        return "an unknown peer"
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return peer[:64]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return None if any(addr in net for net in nets) else str(addr)
