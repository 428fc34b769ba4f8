"""The pipelined Redis client: handshake ordering, FIFO replies, timeouts and reconnection."""

from __future__ import annotations

import asyncio
import os
import signal

import hiredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.ledger.redis_server import RedisServer
from gateway.ledger.resp import RespClient


async def test_auth_and_select_precede_every_command_on_a_new_connection():
    seen: list[bytes] = []

    async def server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        reader = hiredis.Reader()
        while data := await r.read(4096):
            reader.feed(data)
            while (cmd := reader.gets()) is not False:
                seen.append(cmd[0])
                if cmd[0] == b"AUTH":
                    await asyncio.sleep(0.05)  # a slow AUTH: nothing may overtake it
                w.write(b"+OK\r\n")
                await w.drain()

    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    client = RespClient(host="127.0.0.1", port=port, password="pw", db=3, timeout=2)
    first = asyncio.create_task(client.execute_command("PING"))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(client.execute_command("SET", "k", "v"))
    await asyncio.gather(first, second)
    assert seen[:2] == [b"AUTH", b"SELECT"] and sorted(seen[2:]) == [b"PING", b"SET"]
    await client.aclose()
    srv.close()


async def test_replies_match_commands_and_a_stall_times_out_then_reconnects(redis_srv):
    client = RespClient.from_url(redis_srv.url, timeout=0.3)
    results = await asyncio.gather(*(client.execute_command("ECHO", str(i)) for i in range(200)))
    assert [r.decode() for r in results] == [str(i) for i in range(200)]
    with pytest.raises(RedisTimeoutError):
        await client.execute_command("BLPOP", "kgate-test-nothing", "1")  # blocks this connection 1 s
    await asyncio.sleep(0.8)  # the client dropped that connection; it reconnects on the next command
    assert await client.execute_command("ECHO", "after") == b"after"
    await client.aclose()


async def test_unreachable_redis_is_a_connection_error():
    client = RespClient(host="127.0.0.1", port=1, timeout=0.5)
    with pytest.raises(RedisConnectionError):
        await client.execute_command("PING")


async def test_a_script_is_queued_by_the_call_not_by_the_await(redis_srv):
    """Connected, a script call queues its command at once: scripts run in Redis in the order they were
    called, whatever order their results are awaited in (a settle sent before an answer, collected later).
    A script the server does not know yet is loaded and run all the same."""
    client = RespClient.from_url(redis_srv.url, timeout=2)
    await client.execute_command("DEL", "kgate-test-order")
    push = client.register_script("return redis.call('RPUSH', KEYS[1], ARGV[1])")
    await client.execute_command("SCRIPT", "FLUSH")
    assert await push(keys=["kgate-test-order"], args=["loaded"]) == 1  # NOSCRIPT → SCRIPT LOAD → again
    first = push(keys=["kgate-test-order"], args=["first"])
    second = push(keys=["kgate-test-order"], args=["second"])
    assert await second == 3
    assert await first == 2
    assert await client.execute_command("LRANGE", "kgate-test-order", 0, -1) == [b"loaded", b"first", b"second"]
    await client.aclose()


async def test_registered_scripts_are_loaded_on_every_new_connection(redis_srv):
    """A restarted (or flushed) Redis has no scripts: the client loads its registered ones while it opens a
    connection, so no call meets NOSCRIPT — whose retry would run it behind the scripts called after it."""
    client = RespClient.from_url(redis_srv.url, timeout=2)
    echo = client.register_script("return ARGV[1]")
    assert await echo(args=["one"]) == b"one"
    await client.execute_command("SCRIPT", "FLUSH")
    await client.execute_command("CONFIG", "RESETSTAT")
    await client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "no")  # our own
    await asyncio.sleep(0.1)  # the client sees its connection close
    assert not client.connected
    assert await echo(args=["two"]) == b"two"
    info = (await client.execute_command("INFO", "errorstats")).decode()
    assert "NOSCRIPT" not in info, info
    await client.aclose()


async def test_a_connection_closing_under_waiting_commands_fails_them_before_a_new_one_opens():
    """A connection that is closing but not yet lost (its transport still flushing) with a command waiting
    on it: opening the next connection fails that command first. Otherwise the old connection's
    connection_lost, arriving after the new one is in use, would no longer fail it, and the new
    connection's first reply would be matched to it."""
    server = RedisServer(port=0, appendonly=False)
    server.start_sync()
    assert server.pid is not None
    client = RespClient.from_url(server.url, timeout=2)
    try:
        assert await client.execute_command("PING") == b"PONG"
        os.kill(server.pid, signal.SIGSTOP)  # Redis reads nothing: the socket fills up
        big = asyncio.ensure_future(client.execute_command("ECHO", b"x" * (16 << 20)))
        await asyncio.sleep(0.1)
        proto = client._proto
        assert proto is not None and proto.transport is not None
        assert proto.transport.get_write_buffer_size() > 0, "the command should not fit in the socket"
        proto.transport.close()  # closing; connection_lost waits until the buffer is flushed
        new = asyncio.ensure_future(client.execute_command("ECHO", "new"))
        await asyncio.sleep(0.1)
        os.kill(server.pid, signal.SIGCONT)
        assert await new == b"new"
        with pytest.raises(RedisConnectionError):
            await big
    finally:
        os.kill(server.pid, signal.SIGCONT)
        await client.aclose()
        server.stop_sync()
        server.cleanup()
