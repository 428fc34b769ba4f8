"""Limits on client connections that aiohttp does not have: a header timeout (issue 13, item 8).

aiohttp times out neither a request head that trickles in nor (by default, for an hour) a connection
that says nothing: 200 connections sending a header byte now and then held their sockets for as long as
they liked. Here a connection must deliver a complete request head within ``server.header_timeout_seconds``
of its opening (its first request) or of the first byte of a later head; otherwise it gets a 408 and is
closed. Between requests an idle keep-alive connection is kept ``server.keepalive_timeout_seconds``
(aiohttp's own timer, which also closes a connection whose head is still incomplete by then).

How: :class:`GatewayRunner` is an ``AppRunner`` whose server makes :class:`GuardedRequestHandler`
protocols. A request whose head arrives in one read (nearly all of them) costs no timer: one is armed only
at a connection's start and when a read leaves a head incomplete, and is cancelled when the head is whole.
Its connections start on the fast path (:mod:`gateway.proxy.fastpath`), which keeps the same two deadlines.
A plain ``AppRunner`` still gets the keep-alive timeout (through the app's ``handler_args``), not this one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.engine.flow import Engine
from gateway.engine.identity import untrusted
from gateway.proxy.context import ENGINE, GATEWAY, Gateway
from gateway.proxy.fastpath import FastPath

log = logging.getLogger("kgate.client_limits")

TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol plus a deadline for each request head (see the module's docstring)."""

    __slots__ = ("_gw", "_head_timer", "_header_timeout")

    def __init__(self, manager: web.Server, *, header_timeout: float, gateway: Gateway, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._gw = gateway
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # the first head is due from the connection's start: saying nothing is no way to stay

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:  # a head is whole (its body, if any, has its own timeout)
            timer = self._head_timer  # inlined _disarm: this runs on every read
            if timer is not None:
                timer.cancel()
                self._head_timer = None
        elif data and self._head_timer is None and self._awaiting_head():
            self._arm()  # the first bytes of a later head on a kept-alive connection

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        """Idle between requests (not handling one, whose body bytes these would be)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._upgraded

    def _arm(self) -> None:
        self._head_timer = self._loop.call_later(self._header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        if self._force_close or self.transport is None:
            return
        log.debug("closing a connection whose request head did not arrive within %g s", self._header_timeout)
        self._gw.metrics.observe_error("header_timeout")
        self.transport.write(TIMEOUT_ANSWER)
        self.force_close()  # closes the transport once the 408 is flushed


class GuardedServer(web.Server):
    """An aiohttp ``Server`` whose connections start on the fast path (:mod:`gateway.proxy.fastpath`) and
    move to :class:`GuardedRequestHandler` at the first request it does not take (or start there with
    ``server.fast_path: false``); the limits are read from the gateway's policy in force when a connection
    opens (a reload applies to new connections)."""

    _kgate: Gateway
    engine: Engine
    fast_connections: set[FastPath]
    closing: bool

    def __call__(self) -> asyncio.BaseProtocol:  # type: ignore[override]
        if self._kgate.config.server.fast_path:
            return FastPath(self)
        return self.aiohttp_handler()

    def aiohttp_handler(self) -> RequestHandler:
        server = self._kgate.config.server
        kwargs = {**self._kwargs, "keepalive_timeout": server.keepalive_timeout_seconds}
        return GuardedRequestHandler(self, loop=self._loop, header_timeout=server.header_timeout_seconds,
                                     gateway=self._kgate, **kwargs)

    async def shutdown(self, timeout: float | None = None) -> None:
        self.closing = True
        for conn in list(self.fast_connections):
            conn.shutdown()
        await super().shutdown(timeout)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` for an app of :func:`gateway.proxy.app.create_app`, with the client limits above."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # Re-class the server the base class built rather than rebuild it: that keeps aiohttp's own
        # assembly of its arguments (handler_args, access log, debug) whatever its version does there.
        server.__class__ = GuardedServer
        assert isinstance(server, GuardedServer)
        server._kgate = self.app[GATEWAY]
        server.engine = self.app[ENGINE]
        server.fast_connections = set()
        server.closing = False
        return server


# ------------------------------------------------------------------------------------- trusted peers
def peer_address(request: web.Request) -> str:
    """The TCP peer of ``request``'s connection as :attr:`gateway.engine.request.Call.peer` names it: an IP
    address, ``unix`` for a Unix socket, ``closed`` or ``unknown``."""
    transport = request.transport
    return "closed" if transport is None else transport_peer(transport)


def transport_peer(transport: asyncio.BaseTransport) -> str:
    """The peer of a connection's transport, named as :func:`peer_address` names it."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == getattr(socket, "AF_UNIX", None):
        return "unix"
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return "unknown"
    return str(peer[0])


def untrusted_peer(request: web.Request, sources: tuple[str, ...]) -> str | None:
    """None when the peer of ``request``'s connection is inside ``sources``; else the peer, named."""
    return untrusted(peer_address(request), sources)
