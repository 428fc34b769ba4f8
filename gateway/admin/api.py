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
import time
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.admin import ops
from gateway.admin.ops import check_budget_label, check_id, check_tier
from gateway.engine.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    Unauthenticated,
    render,
)
from gateway.evals.receipts import load_signer
from gateway.policy.config import ConfigError, load_config
from gateway.proxy.context import GATEWAY, Gateway

log = logging.getLogger("kgate.admin")

PARENT: web.AppKey[web.Application] = web.AppKey("kgate_parent_app", web.Application)
CONFIG_PATH: web.AppKey[object] = web.AppKey("kgate_config_path", object)

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
    from gateway.admin.evals_api import add_routes as add_eval_routes

    add_eval_routes(r)
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
    pid = check_id(request.match_info["principal"], "principal")
    body = await _body(request)
    tier = check_tier(gw.config, body["tier"]) if "tier" in body else None
    org = check_id(body["org"], "org") if "org" in body else None
    enabled = body.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise BadRequest("'enabled' must be a boolean", param="enabled")
    if tier is None and await gw.directory.by_id(pid) is None:
        # Without a tier a new principal could never be served (403 "tier '' is not defined").
        raise BadRequest(f"principal {pid!r} is new: 'tier' is required", param="tier")
    return _json(await ops.set_principal(gw, _actor(request), pid, tier=tier, org=org, enabled=enabled))


# ---------------------------------------------------------------------------------------------- keys
async def create_key(request: web.Request) -> web.Response:
    body = await _body(request)
    created = await ops.create_key(_gw(request), _actor(request), body.get("principal"), body.get("org", "default"),
                                   body.get("tier"))
    return _json({**created, "note": "the key is shown once; store it now"}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    return _json(await ops.revoke_key(_gw(request), _actor(request), request.match_info["key_id"]))


async def list_keys(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    principal = request.query.get("principal")
    return _json({"keys": await gw.directory.list_keys(principal and check_id(principal, "principal"))})


# -------------------------------------------------------------------------------------------- grants
async def add_grant(request: web.Request) -> web.Response:
    body = await _body(request)
    g = await ops.add_grant(_gw(request), _actor(request), body.get("principal"), body.get("tier"),
                            body.get("duration", ""), body.get("approver"), body.get("reason"))
    return _json(g.as_dict(), status=201)


async def revoke_grant(request: web.Request) -> web.Response:
    g = await ops.revoke_grant(_gw(request), _actor(request), request.match_info["grant_id"])
    if g is None:
        raise NotFound("unknown grant id")
    return _json(g.as_dict())


async def list_grants(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    principal = request.query.get("principal")
    grants = await gw.directory.list_grants(principal and check_id(principal, "principal"),
                                            include_expired=request.query.get("all") == "1")
    now = time.time()
    return _json({"grants": [{**g.as_dict(), "active": g.active(now)} for g in grants]})


# ------------------------------------------------------------------------------------ overrides & usage
async def put_override(request: web.Request) -> web.Response:
    gw = _gw(request)
    assert gw.directory is not None
    pid = check_id(request.match_info["principal"], "principal")
    label = check_budget_label(gw.config, request.match_info["label"])
    body = await _body(request)
    limit = body.get("limit")
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 <= limit < math.inf:
        raise BadRequest("'limit' must be a non-negative number", param="limit")
    return _json(await ops.set_override(gw, _actor(request), pid, label, float(limit)))


async def delete_override(request: web.Request) -> web.Response:
    return _json(await ops.delete_override(_gw(request), _actor(request), request.match_info["principal"],
                                           request.match_info["label"]))


async def usage(request: web.Request) -> web.Response:
    gw = _gw(request)
    return _json(await ops.principal_usage(gw, check_id(request.match_info["principal"], "principal")))


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
        signer = load_signer(new)  # a tier that asks for receipts needs the key before it applies
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
    gw.signer = signer
    if gw.leases is not None:  # budgets and limits may have changed: slices go back, new ones are sized anew
        from gateway.ledger.leases import slice_lease_seconds

        gw.leases.lease_seconds = slice_lease_seconds(new)
        gw.leases.retire_all()
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
        await ops.admin_record(gw, action, actor, **details)
    except Exception:
        log.exception("could not write the audit record for %s", action)
