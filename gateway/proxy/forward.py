"""One API request through the engine, whatever HTTP server carries it: :func:`serve`, and the unary
answer it makes (:class:`Answer`: status, headers, body). Both client-side servers use it — aiohttp's
(:mod:`gateway.proxy.handler`) and the fast path (:mod:`gateway.proxy.fastpath`) — so an answer, an error
and what is charged are the same bytes and the same records on either.

A timeout after the request left is work the upstream may finish all the same: the engine charges it
(:meth:`~gateway.engine.flow.Engine.upstream_failed`); a connect failure is not. An upstream's error status
is passed on when it is about the request, never when it is about the gateway's own credentials.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import orjson

from gateway.adapters import Adapter
from gateway.engine.errors import GatewayError, InternalError, UpstreamTimeout, render
from gateway.engine.flow import Engine
from gateway.engine.model_names import renamer
from gateway.engine.request import Admission, Call, Denial, Ending, Facts
from gateway.evals.receipts import HEADER as RECEIPT_HEADER
from gateway.proxy import upstream as up

log = logging.getLogger("kgate.handler")
_now = time.perf_counter

R = TypeVar("R")
JSON_ERROR_TYPE = "application/json; charset=utf-8"  # what aiohttp's json_response said before
BODY_CUT = "the client closed the connection before its request body arrived"


class Answer:
    """A unary answer to write: status, headers (names as sent), body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body


BodyRead = Callable[[int, float], Awaitable[bytes]]  # (max_body_bytes, body_timeout_seconds) -> the body


async def serve(engine: Engine, adapter: Adapter, call: Call, read_body: BodyRead | None,
                unary: Callable[[Answer], R], stream: Callable[[Admission], Awaitable[R]],
                task: asyncio.Task[Any] | None = None) -> R:
    """Admit ``call``, then answer it: ``unary`` makes the server's response of an :class:`Answer` (a JSON
    answer, a denial, an error), ``stream`` serves an admitted stream itself. ``read_body`` is awaited once
    the caller is known (None: ``call.body`` holds it). Every way out is recorded (:meth:`Engine.done`).
    ``task``: the task running this, when the caller knows it (else looked up), for the drain to cancel."""
    gw = engine.gw
    gw.inflight += 1
    if task is None:
        task = asyncio.current_task()
    if task is not None:
        gw.handlers.add(task)
    facts = engine.begin(adapter.api)
    ending = Ending()
    try:
        if read_body is None:
            adm = await engine.admit(facts, call)
        else:
            server = facts.config.server
            adm = await engine.admit(facts, call,
                                     lambda: read_body(server.max_body_bytes, server.body_timeout_seconds))
        if isinstance(adm, Denial):
            ending = engine.denied(adm)
            return unary(await error_answer(engine, facts, ending, adm.error, adapter.shape))
        ending = adm.ending
        try:
            if facts.stream:
                return await stream(adm)
            return unary(await json_answer(engine, adm, call.headers))
        except GatewayError as err:
            await engine.abandon(adm, cancelled=False)  # nothing generated, unless the error charged it
            engine.failed(facts, err, ending)
            return unary(await error_answer(engine, facts, ending, err, adapter.shape))
        except asyncio.CancelledError:
            await engine.abandon(adm, cancelled=True)
            raise
        except BaseException:
            await engine.abandon(adm, cancelled=False)
            raise
    except Exception:
        log.exception("internal error in request %s", facts.request_id)
        bug = InternalError("internal error; the request was not charged")
        engine.failed(facts, bug, ending)
        return unary(await error_answer(engine, facts, ending, bug, adapter.shape))
    finally:
        gw.inflight -= 1
        if task is not None:
            gw.handlers.discard(task)
        engine.done(facts, ending)


async def error_answer(engine: Engine, facts: Facts, ending: Ending, err: GatewayError, shape: str) -> Answer:
    """``err`` in the client's API shape, after its audit record."""
    await engine.conclude(facts, ending)
    return Answer(err.status, {"Content-Type": JSON_ERROR_TYPE, **err.headers, "x-kgate-request-id": facts.request_id},
                  orjson.dumps(render(err, shape)))  # type: ignore[arg-type]


async def send(client_headers: Mapping[str, str], engine: Engine, adm: Admission
               ) -> tuple[up.Target, up.UpstreamResponse]:
    """Send the forwarded request; a timeout after it left is charged as work done (see
    :meth:`Engine.upstream_failed`), a connect failure is not."""
    gw = engine.gw
    assert gw.session is not None and gw.upstreams is not None
    target = gw.upstreams.get(adm.forward.upstream)
    headers = up.request_headers(target, adm.parsed.adapter.shape, client_headers, adm.facts.request_id)
    engine.sent(adm)
    try:
        return target, await up.send(gw.session, target, adm.forward.path, adm.forward.body, headers)
    except GatewayError as err:
        working = isinstance(err, UpstreamTimeout) and err.code != "upstream_connect_timeout"
        raise await engine.upstream_failed(adm, err, working=working) from None


async def json_answer(engine: Engine, adm: Admission, client_headers: Mapping[str, str]) -> Answer:
    """A unary exchange: send, read the answer whole, charge it, write its record; the answer to pass on."""
    target, resp = await send(client_headers, engine, adm)
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
        return await refused_answer(engine, adm, target, resp.status, data, resp.headers)
    headers = up.response_headers(resp.headers)
    headers.update(await engine.finish_json(adm, resp.status, data))
    written = await engine.conclude(adm.facts, adm.ending)
    if adm.tier.receipts:
        token = engine.receipt(adm, written)
        if token is not None:
            headers[RECEIPT_HEADER] = token
    named = renamer(adm.parsed.model_name, adm.parsed.model)
    return Answer(resp.status, headers, named.body(data) if named is not None else data)


async def refused_answer(engine: Engine, adm: Admission, target: up.Target, status: int, data: bytes,
                         headers: Mapping[str, str]) -> Answer:
    """An upstream's error answer: passed on when it is about the request (minus the gateway's key)."""
    err = await engine.upstream_refused(adm, status)
    if err is not None:
        raise err
    body = data[:1 << 20]
    if target.auth_value:
        body = body.replace(target.auth_value.encode(), b"[redacted]")
    await engine.conclude(adm.facts, adm.ending)
    return Answer(status, {**up.response_headers(headers), "x-kgate-request-id": adm.facts.request_id}, body)
