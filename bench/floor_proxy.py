"""The transport floor: a pass-through proxy with kgate's transport and none of its policy work.

    python bench/floor_proxy.py --listen 127.0.0.1:9100 --upstream http://127.0.0.1:9000 [--server raw]

What a request costs kgate is its transport (the aiohttp server on the client side, the native HTTP client
on the upstream side, the event loop and the sockets) plus its own work (identify, parse, bound, hold,
settle, audit, metrics). This proxy is the first part alone: every POST is read whole, sent unchanged to
the same path on ``--upstream`` with kgate's :class:`~gateway.proxy.http_client.HttpClient`, and the answer
is passed back with its status and content type. No key is checked, nothing is counted or written.

``--server aiohttp`` (the default) serves it as ``kgate serve`` does (an aiohttp application, uvloop);
``--server raw`` on a bare ``asyncio.Protocol`` with the httptools parser — what a hand-written server
might reach (keep-alive only; no chunked request bodies, no limits: a measuring stick, not a server).

``bench/gateway_bench.py --floor`` runs it beside the simulator and kgate, in the same alternation: the gap
between the floor and kgate is kgate's own work; the gap between the floor and the simulator is the
transport's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httptools
from aiohttp import web

from gateway.proxy.http_client import HttpClient
from gateway.proxy.upstream_client import Timeouts

TIMEOUTS = Timeouts(connect=5.0, read=60.0, total=120.0)
MAX_BODY = 16 << 20


class Forwarder:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.client = HttpClient()

    async def exchange(self, path: str, body: bytes, content_type: str) -> tuple[int, str, bytes]:
        resp = await self.client.post(self.upstream, path, body, {"content-type": content_type}, TIMEOUTS)
        try:
            data = await resp.read(MAX_BODY)
        finally:
            resp.release()
        return resp.status, resp.headers.get("content-type", "application/json"), data


def aiohttp_app(fwd: Forwarder) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        status, ctype, data = await fwd.exchange(request.path_qs, body,
                                                 request.headers.get("content-type", "application/json"))
        return web.Response(status=status, body=data, headers={"content-type": ctype})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_get("/readyz", health)
    app.router.add_post("/{tail:.*}", handle)
    return app


class RawProtocol(asyncio.Protocol):
    """One connection: requests parsed by httptools, answered in order (no pipelining of answers)."""

    def __init__(self, fwd: Forwarder):
        self.fwd = fwd
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.ctype = "application/json"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport) or hasattr(transport, "write")
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.ctype = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        method = self.parser.get_method()
        asyncio.get_running_loop().create_task(self.answer(method, self.url.decode("latin-1"), body))

    async def answer(self, method: bytes, path: str, body: bytes) -> None:
        if method == b"GET":
            status, ctype, data = 200, "text/plain", b"ok"
        else:
            status, ctype, data = await self.fwd.exchange(path, body, self.ctype)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                                 % (status, ctype.encode("latin-1"), len(data), data))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True, help="host:port")
    ap.add_argument("--upstream", required=True, help="base URL of the upstream (e.g. the simulator)")
    ap.add_argument("--server", choices=("aiohttp", "raw"), default="aiohttp")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    fwd = Forwarder(args.upstream)
    if args.server == "aiohttp":
        web.run_app(aiohttp_app(fwd), host=host, port=int(port), access_log=None, print=None,
                    handle_signals=True)
        return 0

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: RawProtocol(fwd), host, int(port), backlog=1024)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
