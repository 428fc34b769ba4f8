"""The fast path: the client connection's protocol, serving the common request itself (docs/design.md §4.2).

Nearly every request a gateway sees is the same shape: ``POST /v1/chat/completions`` (or another API route
without path parameters), HTTP/1.1, a ``Content-Length`` body of JSON. For that request
aiohttp's server costs about 80 µs of CPU per request of this VM's (``bench/gateway_bench.py --floor
both``: its request and response objects, routing, the payload stream); the engine's work is the same
whatever carries it. This protocol parses such a request itself, runs it through
:func:`gateway.proxy.forward.serve` — the very flow aiohttp's handler runs — and writes a unary answer in
one ``write``; a stream is relayed by :func:`gateway.proxy.stream.relay`, as aiohttp's handler relays it,
through :class:`_Chunked` (chunked transfer coding on the connection's transport, with the transport's flow
control as the write timeout's measure: a client that stops reading is waited for ``write_timeout_seconds``,
then dropped).

Everything else goes to aiohttp, unchanged: as soon as a connection shows anything but that shape (a GET,
a query string, chunked or missing ``Content-Length``, ``Expect``, ``Upgrade``, HTTP/1.0, a
header line that is not plain ``name: value``, a path that is not exactly a route, a body over
``server.max_body_bytes``, a request not whole within :data:`WAIT_FOR_WHOLE` seconds), the connection is
handed to aiohttp's protocol with every byte it has received (nothing of that request was consumed), and
stays with aiohttp. So every error answer, limit and timeout of a request that is not the common shape is
exactly aiohttp's, and the fast path has no parsing leniency of its own to be smuggled through: it
takes a strict subset, and anything it does not understand is not its to judge.

Kept as aiohttp keeps them: a connection that sends nothing gets the 408 of ``server.header_timeout_seconds``
(:mod:`gateway.proxy.client_limits`), an idle kept-alive one is closed after ``keepalive_timeout_seconds``,
``Connection: close`` is honoured, pipelined requests are answered in order, and a drain closes idle
connections. A client that goes away during a unary request does not cancel it (as aiohttp's default):
its answer is charged and recorded, and the write goes nowhere. ``server.fast_path: false`` turns it off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.adapters import ROUTES, Adapter
from gateway.engine.errors import ClientClosed, GatewayError
from gateway.engine.metering import decode_body
from gateway.engine.request import Admission, Call
from gateway.proxy.forward import BODY_CUT, Answer, serve
from gateway.proxy.stream import relay

if TYPE_CHECKING:
    from gateway.proxy.client_limits import GuardedServer

log = logging.getLogger("kgate.fastpath")

# Routes the fast path serves: exactly these paths (Gemini's carry the model in the path: aiohttp's).
FAST_ROUTES: dict[bytes, Adapter] = {p.encode(): a for p, a in ROUTES.items() if "{" not in p}
WAIT_FOR_WHOLE = 1.0  # seconds a request may take to arrive whole before aiohttp takes the connection
MAX_LINE = 8190  # aiohttp's limits on a request line and a header line: longer is aiohttp's to refuse
MAX_HEAD = 64 * 1024
MAX_BUFFERED = 1 << 20  # stop reading a connection while it has this much unanswered (pipelining)
TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_NO_QUERY: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CTL = bytes(range(32)).replace(b"\t", b"") + b"\x7f"
_REASONS = {s.value: s.phrase for s in HTTPStatus}
_HANDOFF_HEADERS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


class _Date:
    """The Date header's value, formatted once a second."""

    second = -1
    value = b""


def _http_date() -> bytes:
    now = int(time.time())
    if now != _Date.second:
        _Date.second, _Date.value = now, formatdate(now, usegmt=True).encode()
    return _Date.value


def _peer(transport: asyncio.BaseTransport) -> str:
    from gateway.proxy.client_limits import transport_peer

    return transport_peer(transport)


class _Head:
    """A request head the fast path takes; its body starts at ``start`` in the buffer."""

    __slots__ = ("adapter", "close", "headers", "length", "path", "start")

    def __init__(self, adapter: Adapter, path: str, headers: CIMultiDictProxy[str], close: bool, start: int,
                 length: int):
        self.adapter, self.path, self.headers, self.close, self.start, self.length = \
            adapter, path, headers, close, start, length


class _Request:
    """A request the fast path takes: parsed, whole."""

    __slots__ = ("adapter", "body", "close", "doc", "headers", "path")

    def __init__(self, adapter: Adapter, path: str, headers: CIMultiDictProxy[str], body: bytes, close: bool,
                 doc: dict[str, Any] | None):
        self.adapter, self.path, self.headers, self.body, self.close, self.doc = \
            adapter, path, headers, body, close, doc


class FastPath(asyncio.Protocol):
    """One client connection: serves requests of the common shape, hands the connection to aiohttp at the
    first that is not (see the module's docstring)."""

    __slots__ = ("_buf", "_busy", "_closing", "_drain_waiter", "_idle_since", "_paused", "_server", "_streaming",
                 "_task", "_timer", "_timer_kind", "transport")

    def __init__(self, server: GuardedServer):
        self._server = server
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._busy = False  # a request is being answered
        self._closing = False  # close once the answer in flight is written
        self._task: asyncio.Task[None] | None = None  # the request being answered (the loop holds weak ones)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        self._idle_since = 0.0  # loop time of the last answer
        self._paused = False  # the transport's write buffer is over its high-water mark (a stream waits)
        self._drain_waiter: asyncio.Future[None] | None = None
        self._streaming = False  # the request being answered has started a stream (its head is on its way)

    # ------------------------------------------------------------------------------- connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._server.fast_connections.add(self)
        # The first head is due from the connection's start (as client_limits does for aiohttp's).
        self._arm(self._server._kgate.config.server.header_timeout_seconds, self._head_expired)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        self._wake_writer()
        self._server.fast_connections.discard(self)
        if not self._busy and self._buf:
            head = self._head()
            if isinstance(head, _Head):
                # The client hung up in the middle of a body: recorded as aiohttp's server records it (the
                # caller identified, then 499 failed), not lost without a trace.
                self._busy = True
                self._task = asyncio.get_running_loop().create_task(self._hung_up(head))
        self.transport = None
        self._buf = b""

    def data_received(self, data: bytes) -> None:
        self._buf = self._buf + data if self._buf else data
        if self._busy:
            if len(self._buf) > MAX_BUFFERED and self.transport is not None:
                self.transport.pause_reading()  # resumed when the answer in flight is written
            return
        self._next()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drained(self, timeout: float) -> bool:
        """Wait until the client has taken enough of what was written (the transport resumed writing);
        False when it has gone, or has taken nothing for ``timeout`` seconds (then it is dropped)."""
        transport = self.transport
        while self._paused and transport is not None and not transport.is_closing():
            waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            except TimeoutError:
                transport.abort()
                return False
            finally:
                self._drain_waiter = None
            transport = self.transport
        return transport is not None and not transport.is_closing()

    def eof_received(self) -> bool | None:
        if self._busy:
            self._closing = True  # the client has sent all it will: answer, then close
        elif self.transport is not None:
            self.transport.close()
        return True  # keep the write side open until the answer in flight is written

    def shutdown(self) -> None:
        """Close now if idle, else once the answer in flight is written (the server's shutdown)."""
        if self._busy:
            self._closing = True
        elif self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------------------- requests
    def _next(self) -> None:
        """Take the request at the front of the buffer: serve it, wait for the rest of it, or hand off."""
        if not self._buf:
            return
        head = self._head()
        if head is None:  # not the fast path's to serve
            self._hand_off()
            return
        req = head if head is _INCOMPLETE else self._whole(head)  # type: ignore[arg-type]
        if req is None:
            self._hand_off()
            return
        if not isinstance(req, _Request):  # the head or the body is still on its way
            if self._timer is None or self._timer_kind != "whole":
                self._arm(WAIT_FOR_WHOLE, self._hand_off, kind="whole")
            return
        if self._timer_kind != "idle":  # the idle timer stays: it looks again when it fires (no timer per request)
            self._disarm()
        self._busy = True
        self._task = asyncio.get_running_loop().create_task(self._answer(req))

    def _head(self) -> _Head | object | None:
        """The head at the front of the buffer, :data:`_INCOMPLETE`, or None for a request aiohttp must take."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return _INCOMPLETE if len(buf) <= MAX_HEAD else None
        lines = buf[:end].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1" or len(lines[0]) > MAX_LINE:
            return None
        adapter = FAST_ROUTES.get(parts[1])  # exactly a route: no query, no escapes, no other spelling
        if adapter is None:
            return None
        pairs: list[tuple[str, str]] = []
        length = -1
        close = False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or len(line) > MAX_LINE or not _TOKEN.issuperset(name):
                return None  # also an obs-fold line (it starts with a space): aiohttp refuses those
            value = value.strip(b" \t")
            if value.translate(None, _CTL) != value:
                return None
            lower = name.lower()
            if lower == b"content-length":
                if length >= 0 or not value.isdigit() or len(value) > 18:
                    return None
                length = int(value)
            elif lower in _HANDOFF_HEADERS:
                return None
            elif lower == b"connection":
                tokens = {t.strip() for t in value.lower().split(b",")}
                if b"upgrade" in tokens:
                    return None
                close = close or b"close" in tokens
            pairs.append((name.decode("ascii"), value.decode("utf-8", "surrogateescape")))
        if length < 0 or length > self._server._kgate.config.server.max_body_bytes:
            return None
        return _Head(adapter, parts[1].decode("ascii"), CIMultiDictProxy(CIMultiDict(pairs)), close, end + 4,
                     length)

    def _whole(self, head: _Head) -> _Request | _Head | None:
        """The request of ``head``, taken from the buffer once its body is whole; ``head`` while the body is
        incomplete."""
        buf = self._buf
        stop = head.start + head.length
        if len(buf) < stop:
            return head
        body = buf[head.start:stop]
        doc: dict[str, Any] | None = None
        try:
            doc = decode_body(body)
        except GatewayError:
            doc = None  # the engine refuses it, in the API's shape, as for any transport
        self._buf = buf[stop:]
        return _Request(head.adapter, head.path, head.headers, body, head.close, doc)

    async def _answer(self, req: _Request) -> None:
        transport = self.transport
        engine = self._server.engine
        call = Call(req.adapter, {}, req.path, req.headers, _NO_QUERY, "",
                    lambda: _peer(transport) if transport is not None else "closed", req.body, req.doc)
        self._streaming = False
        try:
            answer: Answer | None = await serve(engine, req.adapter, call, None, _same,
                                                lambda adm: self._stream(adm, req), self._task)
        except asyncio.CancelledError:  # a drain that ended: the engine settled what was generated
            self._closing = True
            answer = None
        except Exception:  # serve answers every error itself; this is a bug in writing it
            log.exception("fast path: internal error")
            self._closing = True
            answer = None
        finally:
            self._busy = False
            self._task = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        close = req.close or self._closing or self._server.closing
        if self._streaming and answer is not _STREAMED:
            # A stream was started and something after it failed (serve answered an error): no other answer
            # can follow its head on this connection, so it is cut off (the client sees a stream without its
            # end), as aiohttp does with a response it cannot send after a prepared one.
            answer = None
        if answer is _STREAMED:
            pass  # written as it came
        elif answer is not None:
            transport.write(_head(answer.status, answer.headers, close, len(answer.body)) + answer.body)
        if close or answer is None:
            transport.close()
            return
        if not transport.is_reading():  # paused while a pipelining client sent more than MAX_BUFFERED
            transport.resume_reading()
        self._idle_since = asyncio.get_running_loop().time()
        if self._buf:
            self._next()
        elif self._timer is None:
            self._arm(self._server._kgate.config.server.keepalive_timeout_seconds, self._idle_expired, "idle")

    async def _stream(self, adm: Admission, req: _Request) -> Answer:
        answer = await relay(self._server.engine, adm, req.headers, _Chunked(self, req.close))
        return _STREAMED if answer is None else answer

    async def _hung_up(self, head: _Head) -> None:
        call = Call(head.adapter, {}, head.path, head.headers, _NO_QUERY, "", lambda: "closed")
        try:
            await serve(self._server.engine, head.adapter, call, _body_cut, _same, _no_stream)
        finally:
            self._busy = False
            self._task = None

    # ------------------------------------------------------------------------------- hand-off, timers
    def _hand_off(self) -> None:
        """Give the connection, and every byte received and not yet answered, to aiohttp's protocol."""
        self._disarm()
        transport, data = self.transport, self._buf
        self._server.fast_connections.discard(self)
        self.transport, self._buf = None, b""
        if transport is None or transport.is_closing():
            return
        handler = self._server.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if not transport.is_reading():
            transport.resume_reading()
        if data:
            handler.data_received(data)

    def _arm(self, seconds: float, callback: Any, kind: str = "") -> None:
        self._disarm()
        self._timer_kind = kind
        self._timer = asyncio.get_running_loop().call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_kind = ""

    def _head_expired(self) -> None:
        self._timer = None
        if self._busy or self.transport is None:
            return
        if self._buf:  # bytes of a request: aiohttp takes them, with its own header deadline from now
            self._hand_off()
            return
        self._server._kgate.metrics.observe_error("header_timeout")
        self.transport.write(TIMEOUT_ANSWER)
        self.transport.close()

    def _idle_expired(self) -> None:
        """Close a connection idle for ``keepalive_timeout_seconds``; else look again when it could be."""
        self._timer = None
        self._timer_kind = ""
        if self.transport is None or self._buf:  # a partial request has its own timer
            return
        keepalive = self._server._kgate.config.server.keepalive_timeout_seconds
        left = keepalive if self._busy else self._idle_since + keepalive - asyncio.get_running_loop().time()
        if left > 0:
            self._arm(left, self._idle_expired, "idle")
        else:
            self.transport.close()


_INCOMPLETE = object()


async def _body_cut(limit: int, timeout: float) -> bytes:
    raise ClientClosed(BODY_CUT)


def _same(answer: Answer) -> Answer:
    return answer


async def _no_stream(adm: Admission) -> Answer:
    raise AssertionError("a request whose body was cut is refused before it is admitted")


_STREAMED = Answer(0, {}, b"")  # what the fast path's stream callback answers once it wrote the stream


class _Chunked:
    """The fast path's :class:`~gateway.proxy.stream.ClientStream`: a chunked answer on the connection's
    transport, each write one chunk; past the transport's high-water mark a write waits for the client to
    take it (:meth:`FastPath.drained`).

    The head goes out with the first chunk when that chunk is already here (the upstream's head and first
    events usually arrive in one read): one write, one wake-up of the client, instead of two. It is never
    held longer than the current turn of the event loop, so a stream whose first event is slow to come (a
    model reasoning before it answers) still shows its head at once."""

    __slots__ = ("_close", "_conn", "_head")

    def __init__(self, conn: FastPath, close: bool):
        self._conn, self._close = conn, close
        self._head = b""

    async def start(self, status: int, headers: dict[str, str]) -> bool:
        conn = self._conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            return False
        self._head = _head(status, headers, self._close or conn._closing or conn._server.closing, None)
        conn._streaming = True
        asyncio.get_running_loop().call_soon(self._send_head)
        return True

    def _send_head(self) -> None:
        head, self._head = self._head, b""
        transport = self._conn.transport
        if head and transport is not None and not transport.is_closing():
            transport.write(head)

    async def write(self, data: bytes, timeout: float) -> bool:
        conn = self._conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            return False
        if not data:
            return True  # an empty chunk would be the stream's end
        chunk = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head:
            chunk, self._head = self._head + chunk, b""
        transport.write(chunk)
        return await conn.drained(timeout) if conn._paused else True

    async def end(self, timeout: float) -> None:
        conn = self._conn
        transport = conn.transport
        if transport is not None and not transport.is_closing():
            last, self._head = self._head + b"0\r\n\r\n", b""
            transport.write(last)
            if conn._paused:
                await conn.drained(timeout)


def _head(status: int, headers: dict[str, str], close: bool, length: int | None) -> bytes:
    """A response head as aiohttp writes it: ``length`` None for a chunked body."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    if "Content-Type" not in headers and "content-type" not in headers:
        lines.append("Content-Type: application/octet-stream\r\n")  # as aiohttp said for a bare body
    for k, v in headers.items():
        lines.append(f"{k}: {v}\r\n")
    lines.append("Transfer-Encoding: chunked\r\n" if length is None else f"Content-Length: {length}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape") + b"Date: " + _http_date() + b"\r\n\r\n"
