"""A small pipelined Redis client for the ledger's hot path (reserve and settle scripts).

Why: every gateway request runs two Lua scripts. Through redis-py's asyncio client each call checks a
connection out of a pool, takes locks and builds several objects, which measured as the largest single
cost of a proxied request. This client keeps **one connection per replica** and pipelines: a command is
written at once, its reply future waits in a FIFO, and hiredis parses replies as they arrive. There is no
pool to exhaust, so a burst of concurrent requests queues on the socket instead of failing.

It speaks only what the hot path needs: the ledger's :class:`~gateway.ledger.scripts.ScriptStore`
(``EVALSHA`` through :meth:`register_script`; each registered script is loaded on every new connection, and
again on ``NOSCRIPT``) and plain commands. A script call queues its command at once when connected, so
scripts reach Redis in the order they were called. Errors are redis-py's exception classes, as redis-py's
own (the ledger turns both into :class:`~gateway.ledger.errors.StoreError`). A watchdog fails the
connection (and every command waiting on it) when the oldest command has waited longer than ``timeout``;
the next command reconnects. Standalone Redis over TCP or a unix socket, optional AUTH and database; TLS,
Sentinel and Cluster use redis-py (see :func:`hot_path_client`).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.ledger.codec import Arg
from gateway.ledger.scripts import RedisPyClient, RedisPyStore, ScriptStore


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RespClient):
        self.client = client
        self.reader = hiredis.Reader(notEnoughData=_NEED_MORE)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.client._pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.client._fail(RedisConnectionError(f"protocol error from Redis: {exc}"))
                return
            if reply is _NEED_MORE:
                return
            if not pending:
                continue
            fut, _ = pending.popleft()
            if not fut.done():
                if isinstance(reply, hiredis.ReplyError):
                    fut.set_exception(_response_error(str(reply)))
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        # Only the current connection (or one still in its handshake) may fail the waiting commands.
        if self.client._proto is self or self.client._proto is None:
            self.client._fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed'}"), lost=True)


_NEED_MORE = object()


def _consume(fut: asyncio.Future[Any]) -> None:
    """Done-callback of a reply nobody awaits (a failure shows up in the commands that follow it)."""
    if not fut.cancelled():
        fut.exception()


def _response_error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class RespClient:
    """One pipelined connection to a standalone Redis."""

    def __init__(self, *, host: str | None = None, port: int = 6379, path: str | None = None,
                 username: str | None = None, password: str | None = None, db: int = 0, timeout: float = 0.5):
        self.host, self.port, self.path = host, port, path
        self.username, self.password, self.db = username, password, db
        self.timeout = timeout
        self._proto: _Protocol | None = None
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._outbox: list[bytes] = []
        self._flush_scheduled = False
        self._scripts: dict[str, str] = {}  # sha -> text: loaded on every new connection

    @property
    def connected(self) -> bool:
        """A command issued now is queued at once (no connection to open first)."""
        return self._live() is not None

    def _live(self) -> _Protocol | None:
        """The connection, if it is up and not closing."""
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            return None
        return proto

    @classmethod
    def from_url(cls, url: str, *, timeout: float) -> RespClient:
        parts = urlsplit(url)
        q = parse_qs(parts.query)
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if parts.scheme == "unix":
            return cls(path=parts.path, username=user, password=password, db=int(q.get("db", ["0"])[0]),
                       timeout=timeout)
        if parts.scheme != "redis":
            raise ValueError(f"RespClient speaks redis:// and unix:// only, not {parts.scheme}://")
        db = int(parts.path.strip("/") or q.get("db", ["0"])[0])
        return cls(host=parts.hostname or "127.0.0.1", port=parts.port or 6379, username=user,
                   password=password, db=db, timeout=timeout)

    # ------------------------------------------------------------------------------------ connection
    async def _connect(self) -> _Protocol:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            live = self._live()
            if live is not None:
                return live
            if self._proto is not None:
                # Closing, its connection_lost not yet run: fail what waits on it now. Once another
                # connection is published, that connection_lost no longer would, and replies arriving on
                # the new connection would be matched to the old connection's commands.
                self._fail(RedisConnectionError("connection to Redis closed"))
            loop = asyncio.get_running_loop()
            try:
                if self.path:
                    coro = loop.create_unix_connection(lambda: _Protocol(self), self.path)
                else:
                    coro = loop.create_connection(lambda: _Protocol(self), self.host or "127.0.0.1", self.port)
                _, proto = await asyncio.wait_for(coro, self.timeout)
            except (TimeoutError, OSError) as exc:
                raise RedisConnectionError(f"cannot connect to Redis: {exc!r}") from None
            # AUTH and SELECT go first and are answered before the connection is published: until then no
            # other command can be written to it (it would run unauthenticated or in the wrong database).
            try:
                if self.password:
                    auth = [b"AUTH", *([self.username.encode()] if self.username else []), self.password.encode()]
                    await self._handshake(proto, auth)
                if self.db:
                    await self._handshake(proto, [b"SELECT", str(self.db).encode()])
            except BaseException:
                if proto.transport is not None:
                    proto.transport.abort()
                raise
            self._proto = proto
            # The registered scripts are loaded first thing (a restarted Redis has none), ahead of any
            # command on this connection and without waiting: a script then never meets NOSCRIPT, whose
            # retry would run it behind the scripts called after it.
            for text in self._scripts.values():
                self._queue(proto, ("SCRIPT", "LOAD", text)).add_done_callback(_consume)
            return proto

    async def _handshake(self, proto: _Protocol, args: Sequence[bytes]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((fut, time.monotonic()))
        assert proto.transport is not None
        proto.transport.write(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]
        self._arm(self.timeout)
        return await fut

    def _fail(self, exc: Exception, *, lost: bool = False) -> None:
        proto, self._proto = self._proto, None
        self._outbox.clear()  # commands of the futures failed below: never sent on a new connection
        if proto is not None and proto.transport is not None and not lost:
            proto.transport.abort()
        while self._pending:
            fut, _ = self._pending.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def _check_timeouts(self) -> None:
        self._watchdog = None
        if not self._pending:
            return
        oldest = self._pending[0][1]
        now = time.monotonic()
        if now - oldest > self.timeout:
            self._fail(RedisTimeoutError(f"Redis did not answer within {self.timeout} s"))
            return
        self._arm(oldest + self.timeout - now)

    def _arm(self, delay: float) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(max(delay, 0.001), self._check_timeouts)

    def _queue(self, proto: _Protocol, args: Sequence[Any]) -> asyncio.Future[Any]:
        """Queue one command; its reply arrives in the returned future. (A plain function, not a coroutine:
        the hot path awaits the future directly, one coroutine frame less to create and resume.)"""
        packed = hiredis.pack_command(tuple(args))  # first: a command that cannot be packed leaves no future
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((fut, time.monotonic()))
        # Commands issued in the same turn of the event loop leave in one write (one syscall): under
        # concurrency, many requests' scripts share a packet instead of each paying for its own.
        self._outbox.append(packed)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        self._arm(self.timeout)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._outbox = self._outbox, []
        proto = self._live()
        if not out or proto is None:
            return  # connection_lost has failed (or will fail) the waiting futures
        assert proto.transport is not None
        proto.transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def execute_command(self, *args: Any) -> Any:
        proto = self._live() or await self._connect()
        return await self._queue(proto, args)

    # -------------------------------------------------------------------- the ledger's ScriptStore
    def register_script(self, script: str) -> _Script:
        registered = _Script(self, script)
        self._scripts[registered.sha] = script
        return registered

    async def zcards(self, keys: Sequence[str]) -> list[int]:
        """``ZCARD`` of each key, pipelined like every command here."""
        return [int(n) for n in await asyncio.gather(*(self.execute_command("ZCARD", k) for k in keys))]

    async def script_load(self, script: str) -> str:
        sha = await self.execute_command("SCRIPT", "LOAD", script)
        return sha.decode() if isinstance(sha, bytes) else str(sha)

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._fail(RedisConnectionError("client closed"))


class _Script:
    """EVALSHA; an awaited call loads the script on NOSCRIPT (a flushed Redis, or one whose load at
    connect failed), :meth:`send` leaves that to its caller."""

    def __init__(self, client: RespClient, script: str):
        self.client = client
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()

    def __call__(self, keys: Sequence[str] = (), args: Sequence[Arg] = ()) -> Awaitable[Any]:
        """Run the script; await the result for its reply. Unlike redis-py's, the command is queued by this
        call itself when the connection is up, not when the result is first awaited: scripts leave in the
        order they were called, which lets a caller send one now and collect its reply later."""
        cmd = ("EVALSHA", self.sha, len(keys), *keys, *args)
        proto = self.client._live()
        # connected (the common case): queued now; else queued when awaited, once a connection is open
        return self._reply(self.client._queue(proto, cmd) if proto is not None else None, cmd)

    def send(self, keys: Sequence[str] = (), args: Sequence[Arg] = ()) -> asyncio.Future[Any] | None:
        """Queue the script now and return the future of its reply, without a coroutine around it; None
        (nothing sent) when the connection is not up. No NOSCRIPT retry here: the scripts are loaded with
        every new connection, but a ``SCRIPT FLUSH`` since then, or a load refused at connect (a Redis
        still loading its data), makes the reply ``NoScriptError``; an awaited call loads it again."""
        proto = self.client._live()
        if proto is None:
            return None
        return self.client._queue(proto, ("EVALSHA", self.sha, len(keys), *keys, *args))

    async def load(self) -> None:
        self.sha = await self.client.script_load(self.script)

    async def _reply(self, queued: asyncio.Future[Any] | None, cmd: tuple[Any, ...]) -> Any:
        try:
            return await (queued if queued is not None else self.client.execute_command(*cmd))
        except NoScriptError:
            await self.client.script_load(self.script)
            return await self.client.execute_command(*cmd)


class HotPathStore:
    """The gateway's ledger store for a plain ``redis://`` or ``unix://`` URL: the scripts through the pipelined
    :class:`RespClient`, lease counts through redis-py (one pipeline round trip). Closing it closes both."""

    def __init__(self, redis: RedisPyClient, fast: RespClient):
        self._redis = RedisPyStore(redis)
        self._fast = fast

    def register_script(self, script: str) -> _Script:
        return self._fast.register_script(script)

    @property
    def connected(self) -> bool:
        return self._fast.connected

    async def zcards(self, keys: Sequence[str]) -> list[int]:
        return await self._redis.zcards(keys)

    async def aclose(self) -> None:
        await self._fast.aclose()
        await self._redis.redis.aclose()


def hot_path_client(redis: RedisPyClient, url: str, *, timeout: float) -> HotPathStore | RedisPyClient:
    """The ledger's store for ``url``: a :class:`HotPathStore` where the pipelined client applies, else the
    redis-py client itself (the ledger adapts it: :func:`gateway.ledger.scripts.as_script_store`)."""
    if url.startswith(("redis://", "unix://")):
        return HotPathStore(redis, RespClient.from_url(url, timeout=timeout))
    return redis


if TYPE_CHECKING:  # mypy checks here that each client is a ScriptStore, as the ledger needs
    def _script_store(client: RespClient | HotPathStore | RedisPyStore) -> ScriptStore:
        return client
