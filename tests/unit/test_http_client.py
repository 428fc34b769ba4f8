"""The upstream clients' contract (gateway/proxy/upstream_client.py), run over both implementations — the
native httptools client and the aiohttp fallback — against small raw servers that behave, or misbehave, in
specific ways."""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.proxy.aiohttp_client import AiohttpClient
from gateway.proxy.http_client import HttpClient
from gateway.proxy.upstream_client import HttpBroken, HttpTimeout, HttpTooLarge, Timeouts, UpstreamClient

T = Timeouts(connect=1, read=1, total=3)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Serve = Callable[[Handler], Awaitable[str]]


@pytest.fixture(params=["native", "aiohttp"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[UpstreamClient]:
    c: UpstreamClient = HttpClient() if request.param == "native" else AiohttpClient()
    yield c
    await c.close()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a loopback server running ``handler`` per connection; yields its URL. Everything it started
    (servers, handlers still running) is stopped after the test."""
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(handler: Handler) -> str:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                tasks.discard(task)
                w.close()

        server = await asyncio.start_server(run, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await r.readexactly(length)


async def answer_each(r: asyncio.StreamReader, w: asyncio.StreamWriter, answer: bytes) -> None:
    """Answer every request on the connection with ``answer`` (keep-alive)."""
    while True:
        try:
            await read_request(r)
        except asyncio.IncompleteReadError:
            return
        w.write(answer)
        await w.drain()


def rst(w: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer sees a TCP reset, not a clean end."""
    w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


# ------------------------------------------------------------------------------------------ answers
async def test_a_json_answer_with_its_status_and_headers(client, serve):
    body = b'{"id":"x","usage":{}}'
    answer = (b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nX-Request-Id: abc\r\nX-Dup: 1\r\n"
              b"x-dup: 2\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    url = await serve(lambda r, w: answer_each(r, w, answer))
    resp = await client.post(url, "/v1/x", b"{}", {"content-type": "application/json"}, T)
    assert resp.status == 201
    assert resp.headers["content-type"] == "application/json" and resp.headers["x-request-id"] == "abc"
    assert resp.headers["x-dup"] == "2"  # names lower-cased, a repeated header's last value
    assert await resp.read() == body
    resp.release()


async def test_a_stream_arrives_chunk_by_chunk_and_its_connection_is_reused(client, serve):
    go = asyncio.Event()
    connections = 0

    async def handler(r, w):
        nonlocal connections
        connections += 1
        while True:
            try:
                await read_request(r)
            except asyncio.IncompleteReadError:
                return
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"9\r\ndata: 1\n\n\r\n")
            await w.drain()
            await go.wait()  # the second event only once the client has the first
            w.write(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
            await w.drain()

    url = await serve(handler)
    for _ in range(2):
        go.clear()
        resp = await client.post(url, "/v1/x", b"{}", {}, T)
        chunks = resp.iter_any()
        assert await anext(chunks) == b"data: 1\n\n"
        go.set()
        assert b"".join([c async for c in chunks]) == b"data: 2\n\n"
        resp.release()
    assert connections == 1


async def test_exactly_the_given_headers_go_out_and_the_answer_comes_back_as_sent(client, serve):
    """No compression negotiation, user agent, content type or cookies of the client's own; the body is not
    decompressed; a redirect is not followed; the base URL's path prefixes the request's (sent as given)."""
    heads: list[bytes] = []
    packed = gzip.compress(b'{"ok":true}')

    async def handler(r, w):
        while True:
            try:
                req = await read_request(r)
            except asyncio.IncompleteReadError:
                return
            heads.append(req)
            if len(heads) == 1:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nSet-Cookie: s=1; Path=/\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(packed), packed))
            else:
                w.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n")
            await w.drain()

    url = await serve(handler)
    path = "/v1beta/models/m%2Fx:streamGenerateContent?alt=sse"
    resp = await client.post(url + "/base", path, b'{"a":1}', {"content-type": "application/json",
                                                                 "x-request-id": "r1"}, T)
    assert (resp.status, await resp.read()) == (200, packed)
    resp.release()
    resp = await client.post(url + "/base", path, b'{"a":1}', {"x-request-id": "r2"}, T)
    assert resp.status == 307 and resp.headers["location"] == "/elsewhere"
    resp.release()
    port = url.rsplit(":", 1)[1]
    for req, names in zip(heads, [{"host", "content-length", "content-type", "x-request-id"},
                                  {"host", "content-length", "x-request-id"}], strict=True):
        head, body = req.split(b"\r\n\r\n")
        line, *fields = head.decode().split("\r\n")
        assert line == f"POST /base{path} HTTP/1.1"
        sent = {k.lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
        assert set(sent) == names  # no accept-encoding, user-agent, cookie, connection
        assert sent["host"] == f"127.0.0.1:{port}" and sent["content-length"] == "7" and body == b'{"a":1}'
    assert len(heads) == 2


async def test_keep_alive_reuses_one_connection_and_sends_one_request_each(client, serve):
    connections = 0

    async def handler(r, w):
        nonlocal connections
        connections += 1
        while True:
            try:
                req = await read_request(r)
            except asyncio.IncompleteReadError:
                return
            assert req.startswith(b"POST /v1/x HTTP/1.1\r\n") and b"\r\nhost: " in req.lower()
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    url = await serve(handler)
    for _ in range(5):
        resp = await client.post(url, "/v1/x", b"{}", {"content-type": "application/json"}, T)
        assert resp.status == 200 and await resp.read() == b"ok"
        resp.release()
    assert connections == 1


async def test_interim_1xx_answers_are_skipped(client, serve):
    async def handler(r, w):
        while True:
            try:
                await read_request(r)
            except asyncio.IncompleteReadError:
                return
            w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.01)  # the real answer in a later packet
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")

    url = await serve(handler)
    for _ in range(3):
        resp = await client.post(url, "/", b"{}", {}, T)
        assert (resp.status, await resp.read()) == (200, b"real")
        resp.release()


async def test_close_delimited_body_ends_cleanly(client, serve):
    async def handler(r, w):
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await w.drain()
        w.close()

    url = await serve(handler)
    resp = await client.post(url, "/", b"{}", {}, T)
    assert await resp.read() == b"all of it"
    resp.release()


async def test_stale_keep_alive_connections_are_retried_on_a_fresh_one(client, serve):
    async def handler(r, w):
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        w.close()  # closes after each answer although it did not say so: pooled connections go stale

    url = await serve(handler)
    responses = await asyncio.gather(*(client.post(url, "/", b"{}", {}, T) for _ in range(3)))
    for resp in responses:
        await resp.read()
        resp.release()
    await asyncio.sleep(0.05)
    resp = await client.post(url, "/", b"{}", {}, T)  # the pool holds three stale connections
    assert await resp.read() == b"ok"
    resp.release()


async def test_only_a_reused_connection_that_closes_unanswered_is_retried(client, serve):
    """Each connection answers its first request and hangs up on the second: the second request, on a
    kept-alive connection, goes again on a fresh one; a fresh connection that hangs up is an error."""
    requests = 0

    async def handler(r, w):
        nonlocal requests
        await read_request(r)
        requests += 1
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await read_request(r)
        requests += 1
        w.close()

    url = await serve(handler)
    for _ in range(2):
        resp = await client.post(url, "/", b"{}", {}, T)
        assert await resp.read() == b"ok"
        resp.release()
    assert requests == 3  # one, then two (the retry) on a fresh connection

    async def hangs_up(r, w):
        nonlocal requests
        await read_request(r)
        requests += 1

    url = await serve(hangs_up)
    with pytest.raises(HttpBroken):
        await client.post(url, "/", b"{}", {}, T)
    assert requests == 4


async def test_release_of_an_unread_body_drops_its_connection(client, serve):
    connections = 0

    async def handler(r, w):
        nonlocal connections
        connections += 1
        while True:
            try:
                await read_request(r)
            except asyncio.IncompleteReadError:
                return
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
            await w.drain()
            await asyncio.sleep(0.1)
            w.write(b"world")
            await w.drain()

    url = await serve(handler)
    resp = await client.post(url, "/", b"{}", {}, T)
    resp.release()  # the rest of its body is still coming: that connection cannot carry another request
    resp = await client.post(url, "/", b"{}", {}, T)
    assert await resp.read() == b"helloworld"
    resp.release()
    assert connections == 2


# ------------------------------------------------------------------------------------------- failures
async def test_chunked_body_cut_mid_way_is_an_error_whatever_the_header_case(client, serve):
    async def handler(r, w):
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        w.close()

    url = await serve(handler)
    resp = await client.post(url, "/", b"{}", {}, T)
    with pytest.raises(HttpBroken):
        await resp.read()
    resp.close()


async def test_a_reset_mid_body_is_broken(client, serve):
    async def handler(r, w):
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await w.drain()
        await asyncio.sleep(0.05)
        rst(w)

    url = await serve(handler)
    resp = await client.post(url, "/", b"{}", {}, T)
    with pytest.raises(HttpBroken):
        await resp.read()
    resp.close()


async def test_malformed_http_is_broken(client, serve):
    async def handler(r, w):
        await read_request(r)
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        await w.drain()
        await asyncio.sleep(1)

    url = await serve(handler)
    with pytest.raises(HttpBroken):
        await client.post(url, "/", b"{}", {}, T)


async def test_a_refused_connection(client):
    sock = socket.socket()  # a free port, closed again: nothing listens there
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    with pytest.raises(HttpBroken) as info:
        await client.post(url, "/", b"{}", {}, T)
    assert info.value.connect


async def test_connect_timeout_says_nothing_was_sent(client):
    """A listener whose accept queue is full: the kernel drops further SYNs, connecting hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        held.append(s)
    await asyncio.sleep(0.05)
    try:
        t0 = time.monotonic()
        with pytest.raises(HttpTimeout) as info:
            await client.post(f"http://127.0.0.1:{port}", "/", b"{}", {}, Timeouts(connect=0.3, read=5, total=5))
        assert not info.value.sent and time.monotonic() - t0 < 2
    finally:
        for s in [*held, listener]:
            s.close()


async def test_read_timeout_waiting_for_the_head(client, serve):
    async def silent(r, w):
        await read_request(r)
        await asyncio.sleep(5)

    url = await serve(silent)
    t0 = time.monotonic()
    with pytest.raises(HttpTimeout) as info:
        await client.post(url, "/", b"{}", {}, Timeouts(connect=1, read=0.2, total=3))
    assert info.value.sent and time.monotonic() - t0 < 1.5


async def test_read_timeout_between_body_chunks(client, serve):
    async def stalls(r, w):
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        await asyncio.sleep(5)

    url = await serve(stalls)
    resp = await client.post(url, "/", b"{}", {}, Timeouts(connect=1, read=0.2, total=3))
    chunks = resp.iter_any()
    assert await anext(chunks) == b"first"
    t0 = time.monotonic()
    with pytest.raises(HttpTimeout):
        await anext(chunks)
    assert time.monotonic() - t0 < 1.5
    resp.close()


async def test_total_timeout_bounds_an_upstream_that_never_stops_trickling(client, serve):
    async def trickles(r, w):
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            w.write(b"1\r\nx\r\n")
            await w.drain()
            await asyncio.sleep(0.02)

    url = await serve(trickles)
    t0 = time.monotonic()
    resp = await client.post(url, "/", b"{}", {}, Timeouts(connect=1, read=1, total=0.4))
    with pytest.raises(HttpTimeout):
        await resp.read()
    assert 0.3 < time.monotonic() - t0 < 1.5
    resp.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_limit_is_refused_before_the_rest_is_read(client, serve, chunked):
    async def big(r, w):
        await read_request(r)
        if chunked:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(3):
                w.write(b"40\r\n" + b"x" * 64 + b"\r\n")
                await w.drain()
                await asyncio.sleep(0.01)
        else:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100)
        await w.drain()
        await asyncio.sleep(5)  # the rest never comes: only the limit can end the read

    url = await serve(big)
    resp = await client.post(url, "/", b"{}", {}, T)
    with pytest.raises(HttpTooLarge):
        await resp.read(100)
    resp.release()


async def test_close_aborts_the_connection_so_the_upstream_stops(client, serve):
    gone = asyncio.Event()

    async def generates(r, w):
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                w.write(b"6\r\ntoken \r\n")
                await w.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            gone.set()
            raise

    url = await serve(generates)
    resp = await client.post(url, "/", b"{}", {}, T)
    assert await anext(resp.iter_any())
    resp.close()
    await asyncio.wait_for(gone.wait(), 2)


@pytest.mark.parametrize(("path", "headers"), [
    ("/v1/x", {"x-a": "v\r\nx-injected: 1"}), ("/v1/x", {"x-a": "v\nx"}), ("/v1/x", {"x-a": "v\rx"}),
    ("/v1/x", {"x-a": "v\x00"}), ("/v1/x", {"x-a\r\nx-injected": "1"}), ("/v1/x HTTP/1.1\r\nx: y\r\n", {}),
])
async def test_cr_lf_or_nul_in_a_header_or_the_path_is_refused_before_anything_is_sent(client, serve, path,
                                                                                       headers):
    """The last line of defence (every value's origin checks them first): nothing is written."""
    connections = 0

    async def handler(r, w):
        nonlocal connections
        connections += 1

    url = await serve(handler)
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        await client.post(url, path, b"{}", headers, T)
    await asyncio.sleep(0.05)
    assert connections == 0
