"""Holding budgets: what a request holds on which budgets, and the reserve itself (docs/design.md §3, §4).

``admission: strict`` holds the request's upper bound; ``expected`` holds what it will likely spend (learnt
per principal and model, never below a floor, never above the bound). The holds go to the ledger in one
script over every scope (principal → org → global); a refusal is a 429 with ``RateLimit`` headers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from gateway.engine.compute import expected_generated, flops
from gateway.engine.errors import BudgetExceeded, StoreUnavailable
from gateway.engine.metering import ParsedRequest
from gateway.engine.request import Facts
from gateway.engine.state import Gateway
from gateway.ledger.errors import StoreError
from gateway.ledger.ledger import BudgetRefused, BudgetSpec, HoldRequest, Reservation, ScopeRef
from gateway.policy.config import Config, TierConfig
from gateway.policy.directory import Principal

log = logging.getLogger("kgate.engine")


def budget_amounts(parsed: ParsedRequest, tier: TierConfig, gw: Gateway, principal_id: str = "") -> dict[str, float]:
    """What to hold: the upper bound (strict) or the expected spend, never above the bound (expected).

    The expected spend is learnt per principal and model (:func:`gateway.engine.settlement.learn`): learnt
    across principals, one tenant's small requests would lower the holds of another's large ones."""
    b, m = parsed.bound, parsed.model
    if tier.admission == "strict":
        return {"requests": 1, "prompt_tokens": b.prompt_tokens, "output_tokens": b.output_tokens_max,
                "reasoning_tokens": b.reasoning_tokens_max, "generated_tokens": b.generated_tokens_max,
                "flops": b.flops_max, "k_units": b.k_max}
    mean = gw.model_means.get((principal_id, parsed.model_name))
    # Never below a floor: a reference answer per sample (within the cap). A caller who sent many tiny
    # requests must not get its holds driven to nothing before sending large ones.
    floor = b.samples * min(b.output_cap, m.reference_output_tokens)
    g = expected_generated(parsed.request, m, b, max(mean * b.samples, floor) if mean else None)
    return {"requests": 1, "prompt_tokens": b.prompt_tokens, "output_tokens": min(g, b.output_tokens_max),
            "reasoning_tokens": min(g, b.reasoning_tokens_max), "generated_tokens": g,
            "flops": flops(m, b.prompt_tokens, g, b.samples),
            "k_units": min(b.k_max, g / m.reference_output_tokens)}


def budget_holds(tier: TierConfig, principal: Principal, overrides: Mapping[str, float],
                 amounts: Mapping[str, float]) -> list[HoldRequest]:
    """One hold request per scope, in the order principal → org → global."""
    ids = {"principal": principal.id, "org": principal.org, "global": "*"}
    return [HoldRequest(_scope_ref(scope, ids[scope]), specs, amounts)
            for scope, specs in _scoped_specs(tier, tuple(sorted(overrides.items())) if overrides else ())]


_SCOPE_REFS: dict[tuple[str, str], ScopeRef] = {}


def _scope_ref(scope: str, ident: str) -> ScopeRef:
    """One ScopeRef object per scope: the ledger keys its caches by them, and a lookup by the very same
    object skips the dataclass's field-by-field comparison."""
    ref = _SCOPE_REFS.get((scope, ident))
    if ref is None:
        if len(_SCOPE_REFS) > 65536:
            _SCOPE_REFS.clear()
        ref = _SCOPE_REFS[(scope, ident)] = ScopeRef(scope, ident)
    return ref


_SPEC_CACHE: dict[tuple[int, tuple[tuple[str, float], ...]],
                  tuple[TierConfig, list[tuple[str, tuple[BudgetSpec, ...]]]]] = {}


def _scoped_specs(tier: TierConfig, overrides: tuple[tuple[str, float], ...]
                  ) -> list[tuple[str, tuple[BudgetSpec, ...]]]:
    """A tier's budgets as ledger specs grouped by scope, built once per tier and override set.

    Specs are immutable and validated on creation; building them per request was a measurable cost.
    """
    key = (id(tier), overrides)
    hit = _SPEC_CACHE.get(key)
    if hit is not None and hit[0] is tier:  # identity check: an id can be reused after a reload
        return hit[1]
    limits = dict(overrides)
    by_scope: dict[str, list[BudgetSpec]] = {}
    for b in tier.budgets:
        by_scope.setdefault(b.scope, []).append(BudgetSpec.from_config(b, limits.get(b.label)))
    out: list[tuple[str, tuple[BudgetSpec, ...]]] = [
        (scope, tuple(by_scope[scope])) for scope in ("principal", "org", "global") if scope in by_scope]
    if len(_SPEC_CACHE) > 4096:  # tiers are replaced on reload; keep the cache from growing for ever
        _SPEC_CACHE.clear()
    _SPEC_CACHE[key] = (tier, out)
    return out


def lease_seconds(cfg: Config, parsed: ParsedRequest) -> float:
    """How long a hold lives unsettled: the upstream's total timeout and a grace."""
    return float(cfg.upstreams[parsed.model.upstream].total_timeout_seconds) + cfg.store.lease_grace_seconds


async def reserve(gw: Gateway, facts: Facts, tier: TierConfig, parsed: ParsedRequest) -> Reservation | None:
    """Hold the admission amount on every budget; 429 on refusal, the tier's on_store_error on outage."""
    if not tier.budgets:
        return None
    assert gw.ledger is not None and gw.directory is not None and facts.principal is not None
    cfg, principal = facts.config, facts.principal
    t0 = time.perf_counter()
    holds: list[HoldRequest] = []
    try:
        overrides = gw.directory.overrides_now(principal.id)  # from the cache, without a coroutine, or:
        if overrides is ...:
            overrides = await gw.directory.overrides(principal.id)
        holds = budget_holds(tier, principal, overrides, budget_amounts(parsed, tier, gw, principal.id))
        leases = gw.leases if tier.leases else None
        if leases is not None:
            local = leases.admit(facts.request_id, holds)
            if local is not None:
                return local
        reservation = await gw.ledger.reserve(facts.request_id, holds, lease_seconds(cfg, parsed))
        gw.metrics.store_latency("reserve", time.perf_counter() - t0)
        gw.store_ok = True
        if leases is not None:
            leases.observe(reservation)
        return reservation
    except BudgetRefused as refused:
        r = refused.refusal
        if gw.leases is not None and tier.leases:
            local = await gw.leases.retry(facts.request_id, holds)
            if local is not None:
                return local
            gw.leases.refused(holds)
        if tier.mode == "shadow":
            # Served anyway; the actual usage is still posted (a settle without a hold), so the ledger
            # shows what enforcing this policy would have meant.
            facts.would_deny, facts.rule = True, r.label
            facts.reason = f"budget {r.label} would refuse"
            return Reservation(facts.request_id, tuple(holds))
        raise BudgetExceeded(
            f"budget {r.label} exhausted: {r.remaining:.6g} of {r.limit:.6g} {r.metric} remain in this window; "
            f"retry after {r.retry_after} s",
            code="budget_exceeded",
            headers={"Retry-After": str(r.retry_after),
                     **ratelimit_headers(r.label, r.limit, max(r.remaining, 0), r.retry_after)},
            detail={"rule": r.label}) from None
    except StoreError as exc:
        gw.metrics.store_error("reserve")
        gw.store_ok = False
        if tier.on_store_error == "allow" and gw.spool is not None:
            facts.store = "spooled"
            log.warning("store unreachable (%s); request %s admitted unmetered into the spool",
                        type(exc).__name__, facts.request_id)
            return None
        if tier.on_store_error == "allow":
            facts.store = "unmetered"
            return None
        if holds and gw.spool is not None:
            # The reserve may have reached Redis before the error, and its rollback may not have: void it
            # when the store is back, or its lease would be charged for a request that was refused.
            await asyncio.to_thread(gw.spool.append_release, facts.request_id, holds)
        raise StoreUnavailable("the budget store is unreachable; request refused by policy "
                               "(on_store_error: deny)") from None


def ratelimit_headers(label: str, limit: float, remaining: float, reset: int) -> dict[str, str]:
    """The IETF draft's ``RateLimit-Policy`` and ``RateLimit`` fields for one budget."""
    return {"RateLimit-Policy": _policy_value(label, limit), "RateLimit": f'"{label}";r={_q(remaining)};t={reset}'}


_POLICY_VALUES: dict[tuple[str, float], str] = {}


def _policy_value(label: str, limit: float) -> str:
    """``"label";q=limit``: the same text on every answer under one budget, so formatted once per (label,
    limit). Numbers that compare equal format alike here (``_q`` of 5, 5.0, True and -0.0 vs 0.0 agree),
    so the dict's equality is exact enough for a key."""
    key = (label, limit)
    value = _POLICY_VALUES.get(key)
    if value is None:
        if len(_POLICY_VALUES) > 4096:  # budgets come from the policy; a reload may bring new ones
            _POLICY_VALUES.clear()
        value = _POLICY_VALUES[key] = f'"{label}";q={_q(limit)}'
    return value


def _q(x: float) -> str:
    f = x if type(x) is float else float(x)  # float() of a float is a type call: skipped on answers
    return str(int(x)) if f.is_integer() else f"{x:.6g}"


_G6: dict[float, str] = {}


def _g6(x: float) -> str:
    """``f"{x:.6g}"``, remembered per value: the bound's K is one of a few values, formatted on every
    answer. Zero is never kept (0.0 and -0.0 are equal keys but format as "0" and "-0"); any other equal
    numbers (1, 1.0, True) format alike."""
    text = _G6.get(x)
    if text is None:
        text = f"{x:.6g}"
        if x:
            if len(_G6) > 4096:
                _G6.clear()
            _G6[x] = text
    return text


def answer_headers(facts: Facts, reservation: Reservation | None) -> dict[str, str]:
    """kgate's own response headers: the request id, the bound's K, real clamps, the tightest budget.
    (The two RateLimit fields are set one by one rather than through :func:`ratelimit_headers`: no
    intermediate dict on every answer; tests/unit/test_perf_finish.py holds them to the same text.)"""
    h = {"x-kgate-request-id": facts.request_id}
    bound = facts.bound
    if bound is not None:
        h["x-kgate-k-max"] = _g6(bound.k_max)
    if facts.clamped:
        h["x-kgate-clamped"] = ", ".join(facts.clamped)
    if reservation is not None:
        tight = reservation.tightest()
        if tight is not None:
            label = tight.budget.label
            h["RateLimit-Policy"] = _policy_value(label, tight.limit)
            reset = int(tight.reset_at - time.time() + 0.999)
            if reset < 0:  # not max(0, ...): a builtin's call costs more than the test
                reset = 0
            h["RateLimit"] = f'"{label}";r={_q(tight.remaining)};t={reset}'
    return h
