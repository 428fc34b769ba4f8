"""The admin API, on its own listener with its own bearer token (docs/design.md §7.3).

Principals, keys (a created key is shown once), tier assignment, per-principal budget overrides, grants,
usage and remaining budget, the policy version and reload. Every change is an audit record
(``decision: admin``). The token comes from the environment variable named by ``server.admin_token_env``;
without it the admin API refuses everything. The listener also serves ``GET /metrics``, without the token.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.engine.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    Unauthenticated,
    render,
)
from gateway.policy.config import Config, ConfigError, load_config
from gateway.proxy.context import GATEWAY, Gateway

log = logging.getLogger("kgate.admin")

PARENT: web.AppKey[web.Application] = web.AppKey("kgate_parent_app", web.Application)
CONFIG_PATH: web.AppKey[object] = web.AppKey("kgate_config_path", object)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ID = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


def parse_duration(text: str) -> float:
    """``30m``, ``12h``, ``7d`` → seconds (BadRequest otherwise)."""
    m = _DURATION.match(str(text).strip())
    if not m or float(m.group(1)) <= 0:
        raise BadRequest(f"duration must look like 30m, 12h or 7d; got {str(text)[:32]!r}", param="duration")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise BadRequest(f"'{what}' must be 1-128 characters of letters, digits and _.@:-", param=what)
    return value


def _check_text(value: Any, what: str, limit: int) -> str:
    """A required free-text field (approver, reason), stripped and bounded."""
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"'{what}' is required", param=what)
    return value.strip()[:limit]


def _check_budget_label(cfg: Config, label: str) -> str:
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


def _check_tier(cfg: Config, tier: Any) -> str:
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


# ------------------------------------------------------------------------------------------------ app
def create_admin_app(parent: web.Application, config_path: object = None) -> web.Application:
    # The listener is private, so aiohttp's keep-alive timer is its bound on slow or idle connections (not the
    # hour aiohttp defaults to); the client listener's finer header timeout is client_limits.GatewayRunner's.
    keepalive = parent[GATEWAY].config.server.keepalive_timeout_seconds if GATEWAY in parent else 75.0
    app = web.Application(middlewares=[_auth_and_errors], client_max_size=1 << 20,
                          handler_args={"keepalive_timeout": keepalive})
    app[PARENT] = parent
    app[CONFIG_PATH] = config_path
    r = app.router
    r.add_get("/admin/principals", list_principals)
    r.add_put("/admin/principals/{principal}", put_principal)
    r.add_get("/admin/keys", list_keys)
    r.add_post("/admin/keys", create_key)
    r.add_delete("/admin/keys/{key_id}", revoke_key)
    r.add_get("/admin/grants", list_grants)
    r.add_post("/admin/grants", add_grant)
    r.add_delete("/admin/grants/{grant_id}", revoke_grant)
    r.add_put("/admin/overrides/{principal}/{label}", put_override)
    r.add_delete("/admin/overrides/{principal}/{label}", delete_override)
    r.add_get("/admin/usage/{principal}", usage)
    r.add_get("/admin/policy", policy)
    r.add_post("/admin/reload", reload)
    r.add_get("/metrics", metrics)
    return app


def _gw(request: web.Request) -> Gateway:
    return request.app[PARENT][GATEWAY]


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=lambda o: orjson.dumps(o).decode())


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


@web.middleware
async def _auth_and_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    gw = request.app[PARENT][GATEWAY]
    if request.path == "/metrics":  # for the scraper, without the admin token (see metrics)
        return await handler(request)
    try:
        token = os.environ.get(gw.config.server.admin_token_env, "")
        given = request.headers.get("Authorization", "")
        if not token:
            raise Forbidden(f"the admin API is disabled: set {gw.config.server.admin_token_env}")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise Unauthenticated("admin token required: 'Authorization: Bearer <token>'")
        return await handler(request)
    except web.HTTPNotFound:
        err: GatewayError = NotFound(f"unknown admin path {request.path[:200]!r}")
    except web.HTTPMethodNotAllowed:
        err = MethodNotAllowed(f"method {request.method} not allowed on {request.path[:200]!r}")
    except GatewayError as exc:
        err = exc
    except web.HTTPException:
        raise
    except Exception:
        log.exception("admin API error")
        err = GatewayError("internal error")
    gw.metrics.observe_error(err)
    return _json(render(err, "openai"), status=err.status)


def _actor(request: web.Request) -> str:
    return request.headers.get("X-Kgate-Actor", "admin-api")[:128]


# ---------------------------------------------------------------------------------------- principals
async def list_principals(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    return _json({"principals": await gw.directory.list_principals()})


async def put_principal(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    pid = _check_id(request.match_info["principal"], "principal")
    body = await _body(request)
    tier = _check_tier(gw.config, body["tier"]) if "tier" in body else None
    org = _check_id(body["org"], "org") if "org" in body else None
    enabled = body.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise BadRequest("'enabled' must be a boolean", param="enabled")
    if tier is None and await gw.directory.by_id(pid) is None:
        # Without a tier a new principal could never be served (403 "tier '' is not defined").
        raise BadRequest(f"principal {pid!r} is new: 'tier' is required", param="tier")
    p = await gw.directory.set_principal(pid, tier=tier, org=org, enabled=enabled)
    await admin_record(gw, "principal.set", _actor(request), principal=pid, tier=p.tier, org=p.org,
                       enabled=p.enabled)
    return _json({"id": p.id, "org": p.org, "tier": p.tier, "enabled": p.enabled})


# ---------------------------------------------------------------------------------------------- keys
async def create_key(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    body = await _body(request)
    pid = _check_id(body.get("principal"), "principal")
    org = _check_id(body.get("org", "default"), "org")
    tier = _check_tier(gw.config, body.get("tier"))
    key, key_id = await gw.directory.create_key(pid, org, tier)
    await admin_record(gw, "key.create", _actor(request), principal=pid, org=org, tier=tier, key_id=key_id)
    return _json({"key": key, "key_id": key_id, "principal": pid, "org": org, "tier": tier,
                  "note": "the key is shown once; store it now"}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    key_id = _check_id(request.match_info["key_id"], "key_id")
    principal = await gw.directory.revoke_key(key_id)
    if principal is None:
        raise NotFound(f"unknown key id {key_id!r}")
    await admin_record(gw, "key.revoke", _actor(request), principal=principal, key_id=key_id)
    return _json({"key_id": key_id, "revoked": True, "principal": principal})


async def list_keys(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    principal = request.query.get("principal")
    return _json({"keys": await gw.directory.list_keys(principal and _check_id(principal, "principal"))})


# -------------------------------------------------------------------------------------------- grants
async def add_grant(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    body = await _body(request)
    pid = _check_id(body.get("principal"), "principal")
    tier = _check_tier(gw.config, body.get("tier"))
    duration = parse_duration(body.get("duration", ""))
    approver = _check_text(body.get("approver"), "approver", 256)
    reason = _check_text(body.get("reason"), "reason", 1024)
    if await gw.directory.by_id(pid) is None:
        raise NotFound(f"unknown principal {pid!r}")
    g = await gw.directory.add_grant(pid, tier, duration, approver, reason)
    await admin_record(gw, "grant.add", _actor(request), **g.as_dict())
    return _json(g.as_dict(), status=201)


async def revoke_grant(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    g = await gw.directory.revoke_grant(_check_id(request.match_info["grant_id"], "grant_id"))
    if g is None:
        raise NotFound("unknown grant id")
    await admin_record(gw, "grant.revoke", _actor(request), **g.as_dict())
    return _json(g.as_dict())


async def list_grants(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    principal = request.query.get("principal")
    grants = await gw.directory.list_grants(principal and _check_id(principal, "principal"),
                                            include_expired=request.query.get("all") == "1")
    now = time.time()
    return _json({"grants": [{**g.as_dict(), "active": g.active(now)} for g in grants]})


# ------------------------------------------------------------------------------------ overrides & usage
async def put_override(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    pid = _check_id(request.match_info["principal"], "principal")
    label = _check_budget_label(gw.config, request.match_info["label"])
    body = await _body(request)
    limit = body.get("limit")
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit < math.inf:
        raise BadRequest("'limit' must be a non-negative number", param="limit")
    await gw.directory.set_override(pid, label, float(limit))
    await admin_record(gw, "override.set", _actor(request), principal=pid, budget=label, limit=float(limit))
    return _json(await override_set_result(gw, pid, label, float(limit)))


async def override_set_result(gw: Gateway, principal_id: str, label: str, limit: float) -> dict[str, Any]:
    """What setting an override did, and whether it applies now: an override is kept per principal and
    label, and applies while the principal's tier (or active grant's) has that budget. Setting one for a
    budget of another tier is allowed (ahead of a tier change, say), but it changes nothing yet: say so."""
    out: dict[str, Any] = {"principal": principal_id, "budget": label, "limit": limit}
    assert gw.directory is not None
    p = await gw.directory.by_id(principal_id)
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
    assert gw.directory is not None
    grant = await gw.directory.active_grant(p.id)
    return (grant.tier if grant is not None and grant.tier in gw.config.tiers else p.tier), grant


async def delete_override(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    pid = _check_id(request.match_info["principal"], "principal")
    label = request.match_info["label"]
    await gw.directory.set_override(pid, label, None)
    await admin_record(gw, "override.delete", _actor(request), principal=pid, budget=label)
    return _json({"principal": pid, "budget": label, "limit": None})


async def principal_usage(gw: Gateway, principal_id: str) -> dict[str, Any]:
    """Usage and remaining budget for every budget that applies to a principal (used by API and CLI)."""
    from gateway.proxy.handler import budget_holds

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


async def usage(request: web.Request) -> web.Response:
    gw = _gw(request)
    return _json(await principal_usage(gw, _check_id(request.match_info["principal"], "principal")))


# ------------------------------------------------------------------------------------------- metrics
async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus exposition, here by default rather than on the client listener (its
    labels name tiers, budgets and models). It needs no admin token: a scraper should not hold one, and
    the admin listener is reachable only from the operator's network (deploy/kubernetes/networkpolicy.yaml)."""
    from gateway.proxy.app import render_metrics

    return render_metrics(_gw(request), request)


# -------------------------------------------------------------------------------------------- policy
async def policy(request: web.Request) -> web.Response:
    cfg = _gw(request).config
    return _json({"policy_sha256": cfg.version, "files": list(cfg.source_files), "tiers": sorted(cfg.tiers),
                  "models": sorted(cfg.models)})


async def reload(request: web.Request) -> web.Response:
    ok, message = await reload_policy(request.app[PARENT], request.app[CONFIG_PATH], actor=_actor(request))
    if not ok:
        raise BadRequest(message, code="policy_invalid")
    return _json({"reloaded": True, "policy_sha256": _gw(request).config.version})


async def reload_policy(app: web.Application, config_path: object, *, actor: str = "file-watch") -> tuple[bool, str]:
    """Validate the policy files, then swap the config atomically; keep the old one on any error.

    Every attempt that changes something or fails is an audit record (``decision: admin``). Never raises:
    the file watcher and the SIGHUP handler call it in the background, and an exception there would end
    hot reload for the life of the process.
    """
    gw = app[GATEWAY]
    old = gw.config
    paths = config_path if config_path is not None else list(old.source_files)
    try:
        new = load_config(paths)  # type: ignore[arg-type]
        if not new.tiers:
            # Most likely a file caught half-written (an empty file is valid YAML): with no tiers every
            # request would be refused, so this is never what the operator meant.
            raise ConfigError([f"{', '.join(new.source_files)}: tiers: the policy defines no tiers"])
    except Exception as exc:  # ConfigError, or a file that vanished between two reads
        message = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        log.error("policy reload failed, keeping sha256 %s: %s", old.version[:12], message)
        gw.metrics.observe_policy_reload(False)
        await _record_quietly(gw, "policy.reload", actor, ok=False, message=message[:4000])
        return False, message
    if new.version == old.version:
        return True, "unchanged"
    from gateway.proxy.upstream import Upstreams

    # Requests admitted under the old policy may still be on their way upstream: keep its upstreams
    # reachable by name (the new policy's models only name upstreams it defines).
    gw.upstreams = Upstreams({**old.upstreams, **new.upstreams}, gw.simulator_url)
    gw.config = new
    if gw.directory is not None:
        gw.directory.reload(new)
    gw.metrics.observe_policy_reload(True, new)
    log.info("policy reloaded: sha256 %s", new.version[:12])
    await _record_quietly(gw, "policy.reload", actor, ok=True, previous_sha256=old.version,
                          policy_sha256_new=new.version)
    return True, "reloaded"


async def _record_quietly(gw: Gateway, action: str, actor: str, **details: Any) -> None:
    """An admin record whose failure is logged, never raised."""
    try:
        await admin_record(gw, action, actor, **details)
    except Exception:
        log.exception("could not write the audit record for %s", action)
