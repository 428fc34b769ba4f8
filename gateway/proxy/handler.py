"""The aiohttp transport of the engine: one API request in, one answer out (docs/design.md §4).

The flow — identify, bound, check, hold, charge, settle, audit — is :class:`gateway.engine.flow.Engine`'s.
What is left here is aiohttp's side of HTTP: turning its request into a :class:`~gateway.engine.request.Call`,
reading the body within its limits, and making aiohttp responses of what :func:`gateway.proxy.forward.serve`
answers (a stream is relayed by :func:`gateway.proxy.stream.relay` through :class:`WebStream`, aiohttp's
:class:`~gateway.proxy.stream.ClientStream`). Requests that the fast path (:mod:`gateway.proxy.fastpath`)
does not take come here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from types import MappingProxyType
from typing import cast

from aiohttp import web

from gateway.adapters import Adapter
from gateway.engine.errors import ClientClosed, PayloadTooLarge, RequestTimeout
from gateway.engine.flow import Engine
from gateway.engine.request import Admission, Call
from gateway.proxy.client_limits import peer_address
from gateway.proxy.context import ENGINE
from gateway.proxy.forward import BODY_CUT, Answer, serve
from gateway.proxy.stream import relay

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


async def proxy_stream(request: web.Request, engine: Engine, adm: Admission) -> web.StreamResponse:
    """An admitted stream, relayed through aiohttp's streamed response (or the upstream's error answer)."""
    out = WebStream(request)
    answer = await relay(engine, adm, request.headers, out)
    if answer is not None:
        return web_response(answer)
    assert out.response is not None
    return out.response


# Below this much unsent data a write cannot block on the client: no timer is needed (the common case).
_WRITE_BUFFER_SAFE = 1 << 16


class WebStream:
    """A :class:`~gateway.proxy.stream.ClientStream` over aiohttp's ``StreamResponse`` (chunked)."""

    __slots__ = ("request", "response", "transport")

    def __init__(self, request: web.Request):
        self.request = request
        self.response: web.StreamResponse | None = None
        self.transport: asyncio.WriteTransport | None = None

    async def start(self, status: int, headers: dict[str, str]) -> bool:
        response = self.response = web.StreamResponse(status=status, headers=headers)
        try:
            await response.prepare(self.request)
        except (ConnectionError, OSError):
            return False
        # Not an isinstance check: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.WriteTransport, self.request.transport)
        return self.transport is not None

    async def write(self, data: bytes, timeout: float) -> bool:
        response, transport = self.response, self.transport
        if response is None or transport is None:
            return False
        try:
            if transport.get_write_buffer_size() + len(data) <= _WRITE_BUFFER_SAFE:
                await response.write(data)
                return True
            try:
                async with asyncio.timeout(timeout):
                    await response.write(data)
            except TimeoutError:
                transport.abort()
                return False
            return True
        except (ConnectionError, OSError):  # reset, broken pipe, or a transport that is closing
            return False

    async def end(self, timeout: float) -> None:
        if self.response is None or self.transport is None:
            return
        try:
            async with asyncio.timeout(timeout):
                await self.response.write_eof()
        except (OSError, TimeoutError):
            self.transport.abort()


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
