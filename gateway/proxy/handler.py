"""The aiohttp transport of the engine: one API request in, one answer out (docs/design.md §4).

The flow — identify, bound, check, hold, charge, settle, audit — is :class:`gateway.engine.flow.Engine`'s.
What is left here is aiohttp's side of HTTP: turning its request into a :class:`~gateway.engine.request.Call`,
reading the body within its limits, and making aiohttp responses of what :func:`gateway.proxy.forward.serve`
answers (streams are served by :mod:`gateway.proxy.stream`). Requests that the fast path
(:mod:`gateway.proxy.fastpath`) does not take come here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from types import MappingProxyType

from aiohttp import web

from gateway.adapters import Adapter
from gateway.engine.errors import ClientClosed, PayloadTooLarge, RequestTimeout
from gateway.engine.request import Call
from gateway.proxy.client_limits import peer_address
from gateway.proxy.context import ENGINE
from gateway.proxy.forward import BODY_CUT, Answer, serve
from gateway.proxy.stream import proxy_stream

log = logging.getLogger("kgate.handler")


def api_handler(adapter: Adapter, method: str | None = None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of one API route (``method``: Gemini's generateContent / streamGenerateContent).

    The adapter is bound to the route, not looked up from the path, so the app also works mounted under
    a prefix as a sub-application.
    """
    if method is None:
        # No wrapper coroutine: every await passes through each frame of the chain on every resumption.
        return partial(serve_api, adapter=adapter)

    async def handle(request: web.Request) -> web.StreamResponse:
        params = dict(request.match_info)
        params["method"] = method
        params["alt"] = request.query.get("alt", "")
        return await serve_api(request, adapter, params)

    return handle


def call_of(request: web.Request, adapter: Adapter | None, params: dict[str, str]) -> Call:
    qs = request.query_string
    return Call(adapter, params, request.path, request.headers, request.query if qs else _NO_QUERY, qs,
                lambda: peer_address(request))


_NO_QUERY: Mapping[str, str] = MappingProxyType({})  # most requests have none: nothing to parse


async def serve_api(request: web.Request, adapter: Adapter, params: dict[str, str] | None = None
                    ) -> web.StreamResponse:
    app = request.app
    if params is None:  # a route's own path parameters (most routes have none)
        info = request.match_info
        params = dict(info) if info else {}
    engine = app[ENGINE]
    return await serve(engine, adapter, call_of(request, adapter, params),
                       lambda limit, timeout: read_body(request, limit, timeout), web_response,
                       lambda adm: proxy_stream(request, engine, adm))


def web_response(answer: Answer) -> web.Response:
    """An :class:`~gateway.proxy.forward.Answer` as aiohttp's response."""
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


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
        raise ClientClosed(BODY_CUT) from None
    return b"".join(chunks)
