"""The aiohttp application: ``create_app(config)`` (docs/design.md §4, §8, §10).

The app owns its lifetimes through ``cleanup_ctx``, in order: the in-process simulator (when an upstream
says ``base_url: simulator``), the store (an embedded Redis when ``store.url: embedded``), the ledger and
the directory, the upstream HTTP session, the audit log and the spool. The app can run on its own
(``kgate serve``) or be mounted as a sub-application of another aiohttp app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
from aiohttp import web

from gateway.adapters import ROUTES, adapter_for_path
from gateway.background import cancelled, stop_task
from gateway.engine.errors import GatewayError, MethodNotAllowed, NotFound, render, shape_for_path
from gateway.engine.flow import Engine
from gateway.evals.receipts import load_signer
from gateway.evals.runs import EvalRuns
from gateway.evals.signing import SigningError
from gateway.ledger.leases import LeaseBook, slice_lease_seconds
from gateway.metrics.series import Metrics
from gateway.policy.config import Config, ConfigError
from gateway.policy.directory import Directory, sha256_hex
from gateway.proxy.context import ENGINE, GATEWAY, Gateway
from gateway.proxy.handler import api_handler, call_of
from gateway.proxy.upstream import Upstreams

log = logging.getLogger("kgate.app")

DEMO_KEY_SHA256 = sha256_hex("kgate-demo-key")


def create_app(config: Config, *, store_url: str | None = None, replica: str | None = None,
               metrics: Metrics | None = None, audit_dir: str | None = None,
               simulator_options: object | None = None) -> web.Application:
    """A gateway app for ``config``. ``store_url`` overrides ``store.url`` (``embedded`` or a Redis URL)."""
    gw = Gateway(config=config, metrics=metrics or Metrics())
    if replica or config.server.replica_id:
        gw.replica = replica or config.server.replica_id or gw.replica
    gw.store_url = store_url or os.environ.get("KGATE_STORE_URL") or config.store.url
    gw.metrics.set_policy(config)
    try:
        gw.signer = load_signer(config)
    except SigningError as exc:
        raise ConfigError([str(exc)]) from None
    # The idle keep-alive timeout here reaches any runner; the header timeout needs client_limits.GatewayRunner.
    app = web.Application(client_max_size=config.server.max_body_bytes,
                          handler_args={"keepalive_timeout": config.server.keepalive_timeout_seconds})
    app[GATEWAY] = gw
    app[ENGINE] = Engine(gw)
    app[_AUDIT_DIR] = audit_dir or config.audit.dir
    app[_SIM_OPTS] = simulator_options
    app.cleanup_ctx.extend([_simulator_ctx, _store_ctx, _session_ctx, _audit_ctx, _spool_ctx, _watch_ctx,
                             _gauges_ctx, _detached_ctx])
    for path, adapter in ROUTES.items():
        method = path.rsplit(":", 1)[1] if adapter.api == "gemini" else None
        app.router.add_post(path, api_handler(adapter, method))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_route("*", r"/{tail:[\s\S]*}", fallback)  # [\s\S], not '.': a path may hold a newline
    return app


_AUDIT_DIR: web.AppKey[str] = web.AppKey("kgate_audit_dir", str)
_SIM_OPTS: web.AppKey[object] = web.AppKey("kgate_sim_opts", object)


# --------------------------------------------------------------------------------------------- lifetimes
async def _detached_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleaned up first: settles still waiting for Redis (posted after an answer, or rerun after a
    cancellation) finish while the store, the spool and the audit log are open — including those that
    requests finishing meanwhile add, up to :data:`DETACHED_GRACE` in all."""
    yield
    gw = app[GATEWAY]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DETACHED_GRACE
    while gw.detached or gw.settling:
        left = deadline - loop.time()
        if left <= 0:
            log.error("%d settles did not finish before shutdown; their holds expire with their leases",
                      len(gw.detached) + gw.settling)
            break
        if gw.detached:
            await asyncio.wait(list(gw.detached), timeout=min(left, 0.05))
        else:
            await asyncio.sleep(0.01)  # replies of settles posted after answers (handler.post_usage)


DETACHED_GRACE = 5.0  # seconds


async def _simulator_ctx(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    runner = None
    if any(u.base_url == "simulator" for u in gw.config.upstreams.values()):
        from gateway.simulator.server import SimulatorOptions, start_simulator

        opts = app[_SIM_OPTS] or SimulatorOptions()
        runner, gw.simulator_url = await start_simulator(opts)  # type: ignore[arg-type]
    yield
    if runner is not None:
        await runner.cleanup()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    from gateway.ledger.ledger import Ledger
    from gateway.ledger.store import connect

    gw = app[GATEWAY]
    cfg = gw.config
    embedded = None
    url = gw.store_url or "embedded"
    if url == "embedded":
        from gateway.ledger.redis_server import RedisServer

        embedded = RedisServer(data_dir=Path(cfg.store.data_dir), port=None)
        await embedded.start()
        url = embedded.url
    gw.redis = await connect(url, timeout=cfg.store.timeout_seconds)
    from gateway.ledger.resp import hot_path_client

    ledger_client = hot_path_client(gw.redis, url, timeout=cfg.store.timeout_seconds)
    gw.ledger = Ledger(ledger_client, key_prefix=cfg.store.key_prefix, lease_expiry=cfg.store.lease_expiry,
                       record_ttl=cfg.store.record_ttl_seconds)
    gw.directory = Directory(cfg, gw.redis, key_prefix=cfg.store.key_prefix)
    gw.evals = EvalRuns(gw.directory, gw.redis)
    gw.leases = LeaseBook(gw.ledger, slice_lease_seconds(cfg))
    gw.leases.start()
    await gw.directory.start()
    if any(p.key_sha256 == DEMO_KEY_SHA256 and p.enabled for p in cfg.principals):
        log.warning("the demo API key 'kgate-demo-key' is enabled (principal 'demo'): remove it from the "
                    "policy before exposing this gateway to anyone")
    yield
    await gw.leases.close()  # unused slices back, last batches landed, before the store goes
    await gw.directory.stop()
    with contextlib.suppress(Exception):
        await ledger_client.aclose() if ledger_client is not gw.redis else None
    with contextlib.suppress(Exception):
        await gw.redis.aclose()
    if embedded is not None:
        await embedded.stop()


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    from gateway.proxy.upstream import UpstreamClients

    gw = app[GATEWAY]
    clients = UpstreamClients()  # one client per kind in use (upstreams.<name>.client), closed together
    gw.session = clients
    gw.upstreams = Upstreams(gw.config.upstreams, gw.simulator_url)
    yield
    await clients.close()


async def _audit_ctx(app: web.Application) -> AsyncIterator[None]:
    from gateway.audit.log import AuditLog

    gw = app[GATEWAY]
    key_env = gw.config.audit.hmac_key_env
    hmac_key = os.environ.get(key_env, "").encode() if key_env else b""
    gw.audit = AuditLog(app[_AUDIT_DIR], gw.replica, hmac_key=hmac_key or None,
                        redis=gw.redis if gw.config.audit.redis_stream else None,
                        stream=gw.config.audit.redis_stream, fsync=gw.config.audit.fsync)
    await gw.audit.start()
    yield
    await gw.audit.close()


async def _spool_ctx(app: web.Application) -> AsyncIterator[None]:
    """The spool: usage metered, and holds to void, while the store is away; replayed when it returns."""
    import time

    from gateway.ledger.spool import Spool

    gw = app[GATEWAY]

    async def replayed(rec: dict[str, object]) -> None:
        # Awaited: the spool marks the line done only once its record is in the audit file, so a crash in
        # between replays the line again (a repeat for the ledger) instead of losing the record.
        if gw.audit is not None:
            await gw.audit.write({"ts": time.time(), "request_id": rec["request_id"], "replica": gw.replica,
                                   "decision": "replayed", "reason": "spooled usage posted to the ledger",
                                   "usage": _usage_of(rec.get("actual")), "policy_sha256": gw.config.version,
                                   **{k: v for k, v in dict(rec.get("meta") or {}).items()  # type: ignore[call-overload]
                                      if k in ("principal", "org", "tier", "model")}})

    path = Path(gw.config.store.data_dir) / "spool" / f"{gw.replica}.jsonl"
    gw.spool = Spool(path, max_bytes=gw.config.store.spool_max_bytes, on_replayed=replayed)
    assert gw.ledger is not None
    gw.spool.start(gw.ledger, on_error=lambda exc: gw.metrics.observe_store("replay", 0.0, error=True))

    yield
    await gw.spool.close()


async def _watch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Reload the policy when one of its files changes (validated first; the old one kept on error)."""
    import asyncio

    from gateway.admin.api import reload_policy

    gw = app[GATEWAY]

    def stamp() -> tuple[tuple[str, float, int], ...]:
        out = []
        for f in gw.config.source_files:
            try:
                st = os.stat(f)
                out.append((f, st.st_mtime, st.st_size))
            except OSError:
                out.append((f, 0.0, -1))
        return tuple(out)

    async def watch() -> None:
        last = stamp()
        while not cancelled():
            await asyncio.sleep(WATCH_INTERVAL)
            now = stamp()
            if now != last:
                # Stamped before the files are read, never after: an edit made while this reload runs
                # changes the stamp again and is picked up on the next look instead of being lost.
                last = now
                await reload_policy(app, list(gw.config.source_files))

    task = asyncio.create_task(watch(), name="kgate-policy-watch") if gw.config.source_files else None
    yield
    await stop_task(task)


def _usage_of(actual: object) -> dict[str, object] | None:
    """A spooled ledger actual in the shape of an audit record's ``usage`` (``k_units`` is ``k`` there)."""
    if not isinstance(actual, dict):
        return None
    usage = {k: v for k, v in actual.items() if k not in ("requests", "k_units")}
    usage["k"] = actual.get("k_units", 0.0)
    return usage


WATCH_INTERVAL = 1.0  # seconds between looks at the policy files' mtime and size
GAUGE_INTERVAL = 2.0  # seconds between refreshes of readiness, holds outstanding, spool depth


async def _gauges_ctx(app: web.Application) -> AsyncIterator[None]:
    """Keep the gauges that are read from their owners fresh: readiness, holds, spool, audit totals."""
    import asyncio
    import time

    gw = app[GATEWAY]

    async def refresh() -> None:
        ok = False
        if gw.redis is not None:
            t0 = time.perf_counter()
            try:
                await gw.redis.ping()
                gw.metrics.observe_store("ping", time.perf_counter() - t0)
                ok = True
                if gw.ledger is not None:
                    gw.metrics.set_holds_outstanding(await gw.ledger.holds_outstanding())
            except Exception:
                gw.metrics.observe_store("ping", time.perf_counter() - t0, error=True)
        gw.store_ok = ok
        gw.metrics.set_ready(ok and not gw.draining)
        if gw.spool is not None:
            gw.metrics.set_spool_depth(*await asyncio.to_thread(gw.spool.depth))
        if gw.audit is not None:
            gw.metrics.set_audit_totals(gw.audit.records_written, gw.audit.write_errors)

    async def loop() -> None:
        while not cancelled():
            with contextlib.suppress(Exception):
                await refresh()
            await asyncio.sleep(GAUGE_INTERVAL)

    task = asyncio.create_task(loop(), name="kgate-gauges")
    yield
    await stop_task(task)


# ------------------------------------------------------------------------------------------- endpoints
async def list_models(request: web.Request) -> web.Response:
    """The models this caller's tier may use, in the OpenAI list shape."""
    gw = request.app[GATEWAY]
    cfg = gw.config
    try:
        _, _, tier = await request.app[ENGINE].caller(call_of(request, None, {}))
    except GatewayError as err:
        return _error(request, err)
    data = [{"id": name, "object": "model", "owned_by": "kgate", "created": 0,
             "reasoning": cfg.models[name].reasoning,
             "evaluated_max_k": cfg.models[name].evaluated_max_k}
            for name in cfg.allowed_models(tier)]
    return web.json_response({"object": "list", "data": data}, dumps=_dumps)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ok = gw.redis is not None and not gw.draining
    store = "unknown"
    if gw.redis is not None:
        try:
            await gw.redis.ping()
            store = "ok"
        except Exception:
            store = "unreachable"
            ok = False
    gw.metrics.set_ready(ok)
    body = {"ready": ok, "store": store, "policy_sha256": gw.config.version, "draining": gw.draining}
    return web.json_response(body, status=200 if ok else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``/metrics`` on the client listener, only with ``server.metrics_on_client_port: true``: its labels name
    the policy's tiers, budgets and models, which are the operator's business (the admin listener serves it)."""
    gw = request.app[GATEWAY]
    if not gw.config.server.metrics_on_client_port:
        return _error(request, NotFound(f"unknown path {request.path[:200]!r}"))
    return render_metrics(gw, request)


def render_metrics(gw: Gateway, request: web.Request) -> web.Response:
    """The Prometheus exposition of ``gw``'s metrics, in the format the request's Accept header asks for."""
    if gw.audit is not None:  # the audit counters as of this scrape, not of the last gauge refresh
        gw.metrics.set_audit_totals(gw.audit.records_written, gw.audit.write_errors)
    body, content_type = gw.metrics.render(request.headers.get("Accept"))
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = content_type
    return resp


def _dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()


def _error(request: web.Request, err: GatewayError) -> web.Response:
    """A gateway error outside the API handler, in the shape of the API the path belongs to."""
    request.app[GATEWAY].metrics.observe_error(err)
    return web.json_response(render(err, shape_for_path(request.path)), status=err.status, headers=err.headers,
                             dumps=_dumps)


async def fallback(request: web.Request) -> web.Response:
    """Every other path and method: 405 on a known path, else 404 — in the client's API shape.

    A catch-all route rather than a middleware: a middleware would cost every proxied request.
    """
    path = "/" + request.match_info.get("tail", "")  # relative to this app, also when mounted under a prefix
    # An encoded slash ('/v1/chat%2Fcompletions') is part of a segment, never a separator: that path is not a
    # route of ours whatever it decodes to, so it is a 404, not a 405 for the route it resembles.
    known = adapter_for_path(path) is not None or (path in _GET_PATHS and (
        path != "/metrics" or request.app[GATEWAY].config.server.metrics_on_client_port))
    if known and "%2f" not in request.rel_url.raw_path.lower():
        return _error(request, MethodNotAllowed(f"method {request.method} is not allowed on {request.path[:200]!r}"))
    return _error(request, NotFound(f"unknown path {request.path[:200]!r}"))


_GET_PATHS = ("/v1/models", "/healthz", "/readyz", "/metrics")


__all__ = ["create_app"]
