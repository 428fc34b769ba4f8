"""The admin operations themselves: what ``/admin/...`` (:mod:`gateway.admin.api`) and ``kgate keys|grants|
principals|overrides|usage`` (:mod:`gateway.admin.cli`) both do, once.

Each operation validates what it is given (:class:`~gateway.engine.errors.BadRequest`, or
:class:`~gateway.engine.errors.NotFound` for an unknown key, principal or grant), changes the directory,
writes an audit record for the change (``decision: admin``, with the ``actor``: the API's
``X-Kgate-Actor`` or the CLI's ``cli:$USER``), and returns what the API answers and the CLI prints.
"""

from __future__ import annotations

import re
import time
from typing import Any

from gateway.engine.errors import BadRequest, NotFound
from gateway.policy.config import Config
from gateway.policy.directory import Directory, Grant
from gateway.proxy.context import Gateway

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ID = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


# ---------------------------------------------------------------------------------------- validation
def parse_duration(text: str) -> float:
    """``30m``, ``12h``, ``7d`` → seconds (BadRequest otherwise)."""
    m = _DURATION.match(str(text).strip())
    if not m or float(m.group(1)) <= 0:
        raise BadRequest(f"duration must look like 30m, 12h or 7d; got {str(text)[:32]!r}", param="duration")
    return float(m.group(1)) * _UNITS[m.group(2)]


def check_id(value: Any, what: str) -> str:
    """A principal, org, key or grant id: 1-128 characters of letters, digits and ``_.@:-``."""
    if not isinstance(value, str) or not _ID.match(value):
        raise BadRequest(f"'{what}' must be 1-128 characters of letters, digits and _.@:-", param=what)
    return value


def check_text(value: Any, what: str, limit: int) -> str:
    """A required free-text field (approver, reason), stripped and bounded."""
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"'{what}' is required", param=what)
    return value.strip()[:limit]


def check_budget_label(cfg: Config, label: str) -> str:
    """A label of a principal-scope budget of some tier: an override of anything else would never apply,
    and an override of an org or global budget would change a limit that other principals share."""
    scopes = {b.label: b.scope for t in cfg.tiers.values() for b in t.budgets}
    if scopes.get(label) == "principal":
        return label
    known = sorted(k for k, v in scopes.items() if v == "principal")
    if label in scopes:
        raise BadRequest(f"budget {label[:128]!r} has scope {scopes[label]}; overrides apply to principal-scope "
                         "budgets only", param="budget")
    raise BadRequest(f"unknown budget {label[:128]!r}; the policy's principal-scope budgets are "
                     f"{', '.join(known) or '(none)'}", param="budget")


def check_tier(cfg: Config, tier: Any) -> str:
    """The name of a tier the policy defines."""
    if not isinstance(tier, str) or tier not in cfg.tiers:
        raise BadRequest(f"unknown tier {str(tier)[:64]!r}; the policy defines {', '.join(sorted(cfg.tiers))}",
                         param="tier")
    return tier


async def admin_record(gw: Gateway, action: str, actor: str, **details: Any) -> None:
    """An audit record for an admin change (never a key in clear)."""
    if gw.audit is None:
        return
    await gw.audit.write({"ts": time.time(), "request_id": None, "replica": gw.replica, "decision": "admin",
                          "reason": action, "actor": actor, "policy_sha256": gw.config.version,
                          "admin": details})


def _directory(gw: Gateway) -> Directory:
    assert gw.directory is not None
    return gw.directory


# ---------------------------------------------------------------------------------------- operations
async def set_principal(gw: Gateway, actor: str, pid: str, *, tier: str | None, org: str | None = None,
                        enabled: bool | None = None) -> dict[str, Any]:
    """Create or change a principal (``pid``, ``org`` checked ids, ``tier`` a checked tier, or None to keep)."""
    p = await _directory(gw).set_principal(pid, tier=tier, org=org, enabled=enabled)
    await admin_record(gw, "principal.set", actor, principal=pid, tier=p.tier, org=p.org, enabled=p.enabled)
    return {"id": p.id, "org": p.org, "tier": p.tier, "enabled": p.enabled}


async def create_key(gw: Gateway, actor: str, principal: Any, org: Any, tier: Any) -> dict[str, Any]:
    """Issue a key for ``principal``; the answer holds the key in clear, the audit record its id only."""
    pid, org = check_id(principal, "principal"), check_id(org, "org")
    tier = check_tier(gw.config, tier)
    key, key_id = await _directory(gw).create_key(pid, org, tier)
    await admin_record(gw, "key.create", actor, principal=pid, org=org, tier=tier, key_id=key_id)
    return {"key": key, "key_id": key_id, "principal": pid, "org": org, "tier": tier}


async def revoke_key(gw: Gateway, actor: str, key_id: Any) -> dict[str, Any]:
    key_id = check_id(key_id, "key_id")
    principal = await _directory(gw).revoke_key(key_id)
    if principal is None:
        raise NotFound(f"unknown key id {key_id!r}")
    await admin_record(gw, "key.revoke", actor, principal=principal, key_id=key_id)
    return {"key_id": key_id, "revoked": True, "principal": principal}


async def add_grant(gw: Gateway, actor: str, principal: Any, tier: Any, duration: Any, approver: Any,
                    reason: Any) -> Grant:
    """A temporary tier for a known principal, for ``duration`` (``30m``, ``12h``, ``7d``)."""
    pid = check_id(principal, "principal")
    tier = check_tier(gw.config, tier)
    seconds = parse_duration(duration)
    approver, reason = check_text(approver, "approver", 256), check_text(reason, "reason", 1024)
    directory = _directory(gw)
    if await directory.by_id(pid) is None:
        raise NotFound(f"unknown principal {pid!r}")
    g = await directory.add_grant(pid, tier, seconds, approver, reason)
    await admin_record(gw, "grant.add", actor, **g.as_dict())
    return g


async def revoke_grant(gw: Gateway, actor: str, grant_id: Any) -> Grant | None:
    """End a grant now; None when there is no such grant (each caller names it its own way)."""
    g = await _directory(gw).revoke_grant(check_id(grant_id, "grant_id"))
    if g is not None:
        await admin_record(gw, "grant.revoke", actor, **g.as_dict())
    return g


async def set_override(gw: Gateway, actor: str, pid: str, label: str, limit: float) -> dict[str, Any]:
    """A per-principal limit (checked already) for one principal-scope budget, and whether it applies now."""
    await _directory(gw).set_override(pid, label, limit)
    await admin_record(gw, "override.set", actor, principal=pid, budget=label, limit=limit)
    return await override_set_result(gw, pid, label, limit)


async def delete_override(gw: Gateway, actor: str, principal: Any, label: str) -> dict[str, Any]:
    """Back to the tier's limit for one budget."""
    pid = check_id(principal, "principal")
    await _directory(gw).set_override(pid, label, None)
    await admin_record(gw, "override.delete", actor, principal=pid, budget=label)
    return {"principal": pid, "budget": label, "limit": None}


async def override_set_result(gw: Gateway, principal_id: str, label: str, limit: float) -> dict[str, Any]:
    """What setting an override did, and whether it applies now: an override is kept per principal and
    label, and applies while the principal's tier (or active grant's) has that budget. Setting one for a
    budget of another tier is allowed (ahead of a tier change, say), but it changes nothing yet: say so."""
    out: dict[str, Any] = {"principal": principal_id, "budget": label, "limit": limit}
    p = await _directory(gw).by_id(principal_id)
    if p is None:
        out["applies_now"] = False
        out["note"] = f"no principal {principal_id!r} is known yet: the override applies once it exists"
        return out
    tier_name, _ = await current_tier(gw, p)
    tier = gw.config.tiers.get(tier_name)
    out["applies_now"] = tier is not None and any(b.label == label for b in tier.budgets)
    if not out["applies_now"]:
        out["note"] = (f"{principal_id!r} is in tier {tier_name!r}, which has no budget {label!r}: the override "
                       f"applies while {principal_id!r} is in a tier that has it")
    return out


async def current_tier(gw: Gateway, p: Any) -> tuple[str, Any]:
    """The tier a principal's requests use now, and the active grant that gives it (or None)."""
    grant = await _directory(gw).active_grant(p.id)
    return (grant.tier if grant is not None and grant.tier in gw.config.tiers else p.tier), grant


async def principal_usage(gw: Gateway, principal_id: str) -> dict[str, Any]:
    """Usage and remaining budget for every budget that applies to a principal (used by API and CLI)."""
    from gateway.engine.budgets import budget_holds

    assert gw.directory is not None and gw.ledger is not None
    p = await gw.directory.by_id(principal_id)
    if p is None:
        raise NotFound(f"unknown principal {principal_id!r}")
    tier_name, grant = await current_tier(gw, p)
    tier = gw.config.tiers.get(tier_name)
    budgets = []
    if tier is not None:
        overrides = await gw.directory.overrides(p.id)
        for hold in budget_holds(tier, p, overrides, {}):
            for st in await gw.ledger.state(hold.scope, hold.budgets):
                budgets.append({"scope": st.scope.scope, "scope_id": st.scope.id, "budget": st.budget.label,
                                "metric": st.budget.metric, "window": st.budget.window,
                                "rolling": st.budget.rolling, "limit": st.limit, "used": st.used,
                                "held": st.held, "remaining": st.remaining, "reset_at": st.reset_at})
    return {"principal": p.id, "org": p.org, "tier": tier_name, "base_tier": p.tier,
            "grant": grant.as_dict() if grant else None, "budgets": budgets}
