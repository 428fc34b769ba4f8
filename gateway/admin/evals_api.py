"""``/admin/evals``: evaluation runs over the admin API (docs/design.md §14), the same operations as
``kgate eval`` (gateway.evals.ops). The certificate is signed with the gateway's own key
(``evaluations.signing_key_file`` or its environment variable) from the gateway's audit directory."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.engine.errors import BadRequest, Conflict
from gateway.evals import ops
from gateway.evals.certificate import CertificateError
from gateway.evals.signing import SigningError, SigningKey, load_signing_key
from gateway.proxy.context import Gateway


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/admin/evals", list_runs)
    router.add_post("/admin/evals", start_run)
    router.add_get("/admin/evals/{run}", show_run)
    router.add_post("/admin/evals/{run}/finish", finish_run)
    router.add_post("/admin/evals/{run}/certify", certify_run)


def _api() -> Any:
    from gateway.admin import api  # the admin app's helpers (imported late: api imports this module)

    return api


async def list_runs(request: web.Request) -> web.Response:
    return _api()._json({"runs": await ops.every(_api()._gw(request))})


async def start_run(request: web.Request) -> web.Response:
    api = _api()
    body = await api._body(request)
    run = await ops.start(api._gw(request), api._actor(request), body.get("principal"), body.get("label"),
                          body.get("models"), body.get("key_id"))
    return api._json(run, status=201)


async def show_run(request: web.Request) -> web.Response:
    return _api()._json(await ops.describe(_api()._gw(request), request.match_info["run"]))


def _signer(gw: Gateway) -> SigningKey:
    ev = gw.config.evaluations
    try:
        return load_signing_key(ev.signing_key_file, ev.signing_key_env)
    except SigningError as exc:
        raise Conflict(f"this gateway cannot sign certificates: {exc}") from None


async def _certify(request: web.Request, close: bool) -> web.Response:
    api = _api()
    gw, actor = api._gw(request), api._actor(request)
    body = await api._body(request) if request.can_read_body else {}
    wait = body.get("wait_seconds", gw.config.evaluations.finish_wait_seconds)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 3600:
        raise BadRequest("'wait_seconds' must be a number of seconds from 0 to 3600", param="wait_seconds")
    ignore = body.get("ignore_in_flight", False)
    if not isinstance(ignore, bool):
        raise BadRequest("'ignore_in_flight' must be a boolean", param="ignore_in_flight")
    key = _signer(gw)
    run_id = request.match_info["run"]
    if close:
        await ops.finish(gw, actor, run_id)
    audit_dir = str(gw.audit.dir) if gw.audit is not None else gw.config.audit.dir
    try:
        doc = await ops.certify(gw, actor, run_id, key, [audit_dir], wait_seconds=float(wait),
                                ignore_in_flight=ignore)
    except CertificateError as exc:  # nothing of the run in the log, or a chain broken inside it
        raise Conflict(f"cannot certify run {run_id}: {exc}") from None
    return api._json(doc)


async def finish_run(request: web.Request) -> web.Response:
    return await _certify(request, close=True)


async def certify_run(request: web.Request) -> web.Response:
    return await _certify(request, close=False)
