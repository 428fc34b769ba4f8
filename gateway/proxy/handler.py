"""The aiohttp transport of the engine: one API request in, one answer out (docs/design.md §4).

The flow — identify, bound, check, hold, charge, settle, audit — is :class:`gateway.engine.flow.Engine`'s.
What is left here is HTTP: turning an aiohttp request into a :class:`~gateway.engine.request.Call`, reading
the body within its limits, handing the admitted request to :mod:`gateway.proxy.forward` (unary answers)
or :mod:`gateway.proxy.stream` (streams), and answering errors in the shape of the API the client spoke.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType

import orjson
from aiohttp import web

from gateway.adapters import Adapter
from gateway.engine.errors import (
    ClientClosed,
    GatewayError,
    InternalError,
    PayloadTooLarge,
    RequestTimeout,
    render,
)
from gateway.engine.flow import Engine
from gateway.engine.request import Call, Denial, Ending, Facts
from gateway.proxy.client_limits import peer_address
from gateway.proxy.context import ENGINE, GATEWAY
from gateway.proxy.forward import proxy_json
from gateway.proxy.stream import proxy_stream

log = logging.getLogger("kgate.handler")


def api_handler(adapter: Adapter, method: str | None = None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of one API route (``method``: Gemini's generateContent / streamGenerateContent).

    The adapter is bound to the route, not looked up from the path, so the app also works mounted under
    a prefix as a sub-application.
    """

    async def handle(request: web.Request) -> web.StreamResponse:
        params = dict(request.match_info)
        if method is not None:
            params["method"] = method
            params["alt"] = request.query.get("alt", "")
        return await serve_api(request, adapter, params)

    return handle


def call_of(request: web.Request, adapter: Adapter | None, params: dict[str, str]) -> Call:
    qs = request.query_string
    return Call(adapter, params, request.path, request.headers, request.query if qs else _NO_QUERY, qs,
                lambda: peer_address(request))


_NO_QUERY: Mapping[str, str] = MappingProxyType({})  # most requests have none: nothing to parse


async def serve_api(request: web.Request, adapter: Adapter, params: dict[str, str]) -> web.StreamResponse:
    gw, engine = request.app[GATEWAY], request.app[ENGINE]
    gw.inflight += 1
    task = asyncio.current_task()
    if task is not None:
        gw.handlers.add(task)
    facts = engine.begin(adapter.api)
    server = facts.config.server
    ending = Ending()
    try:
        adm = await engine.admit(facts, call_of(request, adapter, params),
                                 lambda: read_body(request, server.max_body_bytes, server.body_timeout_seconds))
        if isinstance(adm, Denial):
            ending = engine.denied(adm)
            return await _error_response(engine, facts, ending, adm.error, adapter.shape)
        ending = adm.ending
        try:
            if facts.stream:
                return await proxy_stream(request, engine, adm)
            return await proxy_json(request, engine, adm)
        except GatewayError as err:
            await engine.abandon(adm, cancelled=False)  # nothing generated, unless the error charged it
            engine.failed(facts, err, ending)
            return await _error_response(engine, facts, ending, err, adapter.shape)
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
        return await _error_response(engine, facts, ending, bug, adapter.shape)
    finally:
        gw.inflight -= 1
        if task is not None:
            gw.handlers.discard(task)
        engine.done(facts, ending)


async def read_body(request: web.Request, limit: int, timeout: float = 30.0) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading it whole, and a client that
    takes longer than ``timeout`` seconds to send it (a trickling client must not hold a slot for ever)."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {limit}")
    try:
        if request.content.is_eof():  # the whole body is already here: the common case, no timer needed
            data = request.content.read_nowait()
            if len(data) > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return data
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(65536):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from None
    except ConnectionError:
        raise ClientClosed("the client closed the connection before its request body arrived") from None
    return b"".join(chunks)


async def _error_response(engine: Engine, facts: Facts, ending: Ending, err: GatewayError,
                          shape: str) -> web.Response:
    """``err`` in the client's API shape, after its audit record."""
    await engine.conclude(facts, ending)
    headers = {**err.headers, "x-kgate-request-id": facts.request_id}
    return web.json_response(render(err, shape), status=err.status, headers=headers,  # type: ignore[arg-type]
                             dumps=_dumps)


def _dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()
