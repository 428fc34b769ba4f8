"""The lean upstream HTTP client against small raw servers that misbehave in specific ways."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.proxy.http_client import HttpBroken, HttpClient, HttpTimeout, Timeouts

T = Timeouts(connect=1, read=1, total=3)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + await r.readexactly(length)


async def test_keep_alive_reuses_one_connection_and_sends_one_request_each():
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

    server, url = await serve(handler)
    client = HttpClient()
    for _ in range(5):
        resp = await client.post(url, "/v1/x", b"{}", {"content-type": "application/json"}, T)
        assert resp.status == 200 and await resp.read() == b"ok"
        resp.release()
    assert connections == 1
    await client.close()
    server.close()


async def test_interim_1xx_answers_are_skipped():
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

    server, url = await serve(handler)
    client = HttpClient()
    for _ in range(3):
        resp = await client.post(url, "/", b"{}", {}, T)
        assert (resp.status, await resp.read()) == (200, b"real")
        resp.release()
    await client.close()
    server.close()


async def test_chunked_body_cut_mid_way_is_an_error_whatever_the_header_case():
    async def handler(r, w):
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        w.close()

    server, url = await serve(handler)
    client = HttpClient()
    resp = await client.post(url, "/", b"{}", {}, T)
    with pytest.raises(HttpBroken):
        await resp.read()
    resp.close()
    await client.close()
    server.close()


async def test_close_delimited_body_ends_cleanly():
    async def handler(r, w):
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await w.drain()
        w.close()

    server, url = await serve(handler)
    client = HttpClient()
    resp = await client.post(url, "/", b"{}", {}, T)
    assert await resp.read() == b"all of it"
    resp.release()
    await client.close()
    server.close()


async def test_stale_keep_alive_connections_are_retried_on_a_fresh_one():
    async def handler(r, w):
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        w.close()  # closes after each answer although it did not say so: pooled connections go stale

    server, url = await serve(handler)
    client = HttpClient()
    responses = await asyncio.gather(*(client.post(url, "/", b"{}", {}, T) for _ in range(3)))
    for resp in responses:
        await resp.read()
        resp.release()
    await asyncio.sleep(0.05)
    resp = await client.post(url, "/", b"{}", {}, T)  # the pool holds three stale connections
    assert await resp.read() == b"ok"
    resp.release()
    await client.close()
    server.close()


async def test_read_timeout_and_refused_connection():
    async def silent(r, w):
        await read_request(r)
        await asyncio.sleep(5)

    server, url = await serve(silent)
    client = HttpClient()
    with pytest.raises(HttpTimeout):
        await client.post(url, "/", b"{}", {}, Timeouts(connect=1, read=0.2, total=3))
    server.close()
    await server.wait_closed()
    with pytest.raises(HttpBroken) as info:
        await client.post(url, "/", b"{}", {}, T)
    assert info.value.connect
    await client.close()


@pytest.mark.parametrize(("path", "headers"), [
    ("/v1/x", {"x-a": "v\r\nx-injected: 1"}), ("/v1/x", {"x-a": "v\nx"}), ("/v1/x", {"x-a": "v\rx"}),
    ("/v1/x", {"x-a": "v\x00"}), ("/v1/x", {"x-a\r\nx-injected": "1"}), ("/v1/x HTTP/1.1\r\nx: y\r\n", {}),
])
async def test_cr_lf_or_nul_in_a_header_or_the_path_is_refused_before_anything_is_sent(path, headers):
    """The last line of defence (every value's origin checks them first): nothing is written."""
    connections = 0

    async def handler(r, w):
        nonlocal connections
        connections += 1
        w.close()

    server, url = await serve(handler)
    client = HttpClient()
    try:
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            await client.post(url, path, b"{}", headers, T)
        await asyncio.sleep(0.05)
        assert connections == 0
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
