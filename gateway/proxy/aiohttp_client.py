"""The fallback upstream client (``upstreams.<name>.client: aiohttp``): aiohttp's ``ClientSession`` held to
the contract of :mod:`gateway.proxy.upstream_client`, so that it behaves like the native client.

What aiohttp would otherwise do on its own is turned off: no ``Accept``, ``Accept-Encoding``,
``User-Agent`` or ``Content-Type`` of its own (the request carries ``Host``, ``Content-Length`` and the
headers given, like the native one), no decompression (a body passes as the upstream sent it), no
cookie jar, no redirects, no proxy from the environment, no connection limit, the path sent as given
(not re-quoted).

Timeouts are kept here rather than left to aiohttp's ``sock_read``: aiohttp's read timer runs while no
one is reading and, when it fires, drops the bytes already buffered. Here, as in the native client, the
``read`` timeout is the longest wait for the next bytes, counted from when the reader asks for them (for
the head, from when the request's head was written: a trace hook says when), capped by the ``total``
deadline of the whole exchange; ``connect`` is aiohttp's (DNS, TCP and TLS of a new connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from types import SimpleNamespace

import aiohttp
from yarl import URL

from gateway.proxy.upstream_client import HttpBroken, HttpTimeout, HttpTooLarge, Timeouts, refuse_line_breaks

MAX_HEADER_LINE = 1 << 16  # aiohttp's default is 8190 bytes; the native client sets no limit of its own
TOTAL_EXCEEDED = "the upstream exchange exceeded its total timeout"


class AiohttpResponse:
    """An upstream response read through aiohttp."""

    __slots__ = ("_deadline", "_read_timeout", "_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, read_timeout: float, deadline: float):
        self._resp = resp
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.headers.items()}  # as the native client: last one wins
        self._read_timeout = read_timeout
        self._deadline = deadline  # on the event loop's clock

    async def _next(self) -> bytes:
        """The bytes that arrived (waiting for some), or ``b""`` at the body's end."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now > self._deadline:  # checked on every read: a fast upstream never makes us wait
            raise HttpTimeout(TOTAL_EXCEEDED)
        read_until = now + self._read_timeout
        try:
            async with asyncio.timeout_at(min(read_until, self._deadline)):
                return await self._resp.content.readany()
        except TimeoutError:
            raise HttpTimeout("the upstream did not send data in time" if read_until <= self._deadline
                              else TOTAL_EXCEEDED) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise HttpBroken(f"upstream connection lost: {exc}") from None

    async def iter_any(self) -> AsyncIterator[bytes]:
        while data := await self._next():
            yield data

    async def read(self, limit: int | None = None) -> bytes:
        if limit is not None and int(self.headers.get("content-length") or 0) > limit:
            raise HttpTooLarge(f"the answer is {self.headers['content-length']} bytes, over the limit of {limit}")
        parts: list[bytes] = []
        size = 0
        while data := await self._next():
            size += len(data)
            if limit is not None and size > limit:
                raise HttpTooLarge(f"the answer exceeds the limit of {limit} bytes")
            parts.append(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        content = self._resp.content
        if content.at_eof() and content.exception() is None:
            self._resp.release()  # aiohttp pooled the connection when the body ended
        else:
            self.close()  # an unread or failed body: its connection cannot carry another request

    def close(self) -> None:
        conn = self._resp.connection
        if conn is not None and conn.protocol is not None:
            conn.protocol.abort()  # not aiohttp's graceful close: the upstream must stop generating now
        self._resp.close()


class AiohttpClient:
    """POSTs to upstreams through one ``aiohttp.ClientSession`` (its connector pools per origin)."""

    def __init__(self) -> None:
        trace = aiohttp.TraceConfig(trace_config_ctx_factory=SimpleNamespace)
        trace.on_connection_reuseconn.append(_on_reused)
        trace.on_request_headers_sent.append(_on_head_sent)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, resolver=aiohttp.ThreadedResolver()),
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            auto_decompress=False, trust_env=False, timeout=aiohttp.ClientTimeout(total=None),
            max_line_size=MAX_HEADER_LINE, max_field_size=MAX_HEADER_LINE, trace_configs=[trace])

    async def post(self, base_url: str, path: str, body: bytes, headers: Mapping[str, str],
                   timeouts: Timeouts) -> AiohttpResponse:
        refuse_line_breaks(path, headers)
        url = URL(base_url + path, encoded=True)
        where = f"{url.host}:{url.port}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeouts.total
        for attempt in (1, 2):
            exchange = _Exchange(timeouts.read, deadline)
            try:
                async with exchange.timer:
                    resp = await self._session.post(
                        url, data=body, headers=headers, allow_redirects=False, trace_request_ctx=exchange,
                        timeout=aiohttp.ClientTimeout(total=None, connect=timeouts.connect))
            except aiohttp.ConnectionTimeoutError:
                raise HttpTimeout(f"connecting to {where} timed out", sent=False) from None
            except TimeoutError:
                if not exchange.sent:
                    raise HttpTimeout(f"connecting to {where} timed out", sent=False) from None
                raise HttpTimeout("the upstream did not answer in time") from None
            except aiohttp.ClientConnectorError as exc:
                reason = getattr(exc, "strerror", None) or exc  # a certificate error has no strerror
                raise HttpBroken(f"cannot connect to {where}: {reason}", connect=True) from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A kept-alive connection the server had closed while idle: no answer had begun (aiohttp
                # parsed nothing), so one retry is safe, as in the native client.
                if attempt == 1 and exchange.reused and not _partial(exc):
                    continue
                raise HttpBroken(f"upstream connection lost: {exc}") from None
            except (aiohttp.ClientError, OSError) as exc:  # malformed HTTP, a payload error, ...
                raise HttpBroken(f"the upstream exchange failed: {exc}") from None
            return AiohttpResponse(resp, timeouts.read, deadline)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self._session.close()


class _Exchange:
    """One attempt's state, which the trace hooks update: its deadline timer, reused, head sent."""

    __slots__ = ("deadline", "read", "reused", "sent", "timer")

    def __init__(self, read: float, deadline: float):
        self.read, self.deadline = read, deadline
        self.reused = self.sent = False
        self.timer = asyncio.timeout_at(deadline)  # connecting: the connect timeout, within the total


def _partial(exc: aiohttp.ClientError) -> bool:
    """Whether the upstream had begun an answer (a disconnect after part of a response head)."""
    return isinstance(exc, aiohttp.ServerDisconnectedError) and not isinstance(exc.message, str)


async def _on_reused(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
    if isinstance(ctx.trace_request_ctx, _Exchange):
        ctx.trace_request_ctx.reused = True


async def _on_head_sent(session: aiohttp.ClientSession, ctx: SimpleNamespace, params: object) -> None:
    ex = ctx.trace_request_ctx
    if isinstance(ex, _Exchange):
        ex.sent = True
        ex.timer.reschedule(min(asyncio.get_running_loop().time() + ex.read, ex.deadline))
