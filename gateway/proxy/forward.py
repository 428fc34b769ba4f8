"""The upstream leg of a request: sending what the engine admitted, and a unary (JSON) answer back.

A timeout after the request left is work the upstream may finish all the same: the engine charges it
(:meth:`~gateway.engine.flow.Engine.upstream_failed`); a connect failure is not. An upstream's error status
is passed on when it is about the request, never when it is about the gateway's own credentials.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from aiohttp import web

from gateway.engine.errors import GatewayError, UpstreamTimeout
from gateway.engine.flow import Engine
from gateway.engine.model_names import renamer
from gateway.engine.request import Admission
from gateway.evals.receipts import HEADER as RECEIPT_HEADER
from gateway.proxy import upstream as up

_now = time.perf_counter


async def send(request: web.Request, engine: Engine, adm: Admission) -> tuple[up.Target, up.Response]:
    """Send the forwarded request; a timeout after it left is charged as work done (see
    :meth:`Engine.upstream_failed`), a connect failure is not."""
    gw = engine.gw
    assert gw.session is not None and gw.upstreams is not None
    target = gw.upstreams.get(adm.forward.upstream)
    headers = up.request_headers(target, adm.parsed.adapter.shape, request.headers, adm.facts.request_id)
    engine.sent(adm)
    try:
        return target, await up.send(gw.session, target, adm.forward.path, adm.forward.body, headers)
    except GatewayError as err:
        working = isinstance(err, UpstreamTimeout) and err.code != "upstream_connect_timeout"
        raise await engine.upstream_failed(adm, err, working=working) from None


async def proxy_json(request: web.Request, engine: Engine, adm: Admission) -> web.Response:
    target, resp = await send(request, engine, adm)
    ex = adm.ending
    t0 = ex.sent_at or 0.0
    ex.first_byte_seconds = _now() - t0
    try:
        data = await up.read_body(target, resp)
    except GatewayError as err:  # working: the upstream was answering, its usage is lost with the body
        raise await engine.upstream_failed(adm, err, working=resp.status < 400) from None
    finally:
        resp.release()
    ex.upstream_seconds = _now() - t0
    if resp.status >= 400:
        return await upstream_refused(engine, adm, target, resp.status, data, resp.headers)
    headers = await engine.finish_json(adm, resp.status, data)
    written = await engine.conclude(adm.facts, adm.ending)
    if adm.tier.receipts:
        token = engine.receipt(adm, written)
        if token is not None:
            headers[RECEIPT_HEADER] = token
    named = renamer(adm.parsed.model_name, adm.parsed.model)
    return web.Response(status=resp.status, body=named.body(data) if named is not None else data,
                        headers={**up.response_headers(resp.headers), **headers})


async def upstream_refused(engine: Engine, adm: Admission, target: up.Target, status: int, data: bytes,
                            headers: Mapping[str, str]) -> web.Response:
    """An upstream's error answer: passed on when it is about the request (minus the gateway's key)."""
    err = await engine.upstream_refused(adm, status)
    if err is not None:
        raise err
    body = data[:1 << 20]
    if target.auth_value:
        body = body.replace(target.auth_value.encode(), b"[redacted]")
    await engine.conclude(adm.facts, adm.ending)
    return web.Response(status=status, body=body,
                        headers={**up.response_headers(headers), "x-kgate-request-id": adm.facts.request_id})
