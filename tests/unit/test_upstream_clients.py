"""Choosing an upstream's client (``upstreams.<name>.client``): the config option, the gateway's set of
clients, and ``send``/``read_body`` mapping either client's failures to the same gateway errors."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import yaml

from gateway.engine.errors import UpstreamError, UpstreamTimeout
from gateway.policy.config import ConfigError, UpstreamConfig, load_config
from gateway.proxy import upstream as up
from gateway.proxy.aiohttp_client import AiohttpClient, AiohttpResponse
from gateway.proxy.http_client import HttpClient, Response

KINDS = ["native", "aiohttp"]


def test_the_client_option_defaults_to_native_and_takes_only_known_kinds(tmp_path):
    assert UpstreamConfig(base_url="http://u").client == "native"
    assert UpstreamConfig(base_url="http://u", client="aiohttp").client == "aiohttp"
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"upstreams": {"u": {"base_url": "http://u", "client": "curl"}}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}: upstreams.u.client: Input should be 'native' or 'aiohttp'" in str(info.value)


async def test_one_client_per_kind_built_when_first_used_and_closed_together():
    clients = up.UpstreamClients()
    assert clients.built == ()
    native, fallback = clients.get("native"), clients.get("aiohttp")
    assert isinstance(native, HttpClient) and isinstance(fallback, AiohttpClient)
    assert clients.get("aiohttp") is fallback and clients.built == ("native", "aiohttp")
    with pytest.raises(ValueError, match="no upstream client of kind 'curl'"):
        clients.get("curl")
    await clients.close()
    assert clients.built == ()


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    """``/json`` answers, ``/slow`` never does, ``/big`` sends more than 64 bytes."""
    tasks: set[asyncio.Task[None]] = set()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await r.readexactly(length)
                path = head.split(b" ")[1]
                if path.endswith(b"/slow"):
                    await asyncio.sleep(5)
                body = b"x" * 100 if path.endswith(b"/big") else b'{"ok":true}'
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            tasks.discard(task)
            w.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def target(base_url: str, kind: str) -> up.Target:
    cfg = UpstreamConfig(base_url=base_url, client=kind, read_timeout_seconds=0.3,  # type: ignore[arg-type]
                         max_response_bytes=64)
    return up.Upstreams({"u": cfg}, None).get("u")


@pytest.mark.parametrize("kind", KINDS)
async def test_send_goes_through_the_targets_own_client(upstream_url, kind):
    clients = up.UpstreamClients()
    try:
        resp = await up.send(clients, target(upstream_url, kind), "/json", b"{}", {})
        assert isinstance(resp, Response if kind == "native" else AiohttpResponse)
        assert await up.read_body(target(upstream_url, kind), resp) == b'{"ok":true}'
        resp.release()
        assert clients.built == (kind,)
    finally:
        await clients.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_either_clients_failures_become_the_same_gateway_errors(upstream_url, kind):
    clients = up.UpstreamClients()
    t = target(upstream_url, kind)
    try:
        with pytest.raises(UpstreamTimeout) as timeout:
            await up.send(clients, t, "/slow", b"{}", {})
        assert timeout.value.code != "upstream_connect_timeout"
        resp = await up.send(clients, t, "/big", b"{}", {})
        with pytest.raises(UpstreamError) as large:
            await up.read_body(t, resp)
        resp.release()
        assert large.value.code == "upstream_too_large"
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
        sock.close()
        with pytest.raises(UpstreamError) as refused:
            await up.send(clients, target(closed, kind), "/json", b"{}", {})
        assert refused.value.code == "upstream_unreachable"
    finally:
        await clients.close()


async def test_a_plain_client_is_used_as_given(upstream_url):
    """``send`` with one client (not the gateway's set) uses it whatever the target names."""
    client = AiohttpClient()
    try:
        resp = await up.send(client, target(upstream_url, "native"), "/json", b"{}", {})
        assert isinstance(resp, AiohttpResponse)
        resp.release()
    finally:
        await client.close()
