"""What the ledger needs from a Redis connection: :class:`ScriptStore`.

Two implementations: the pipelined client of :mod:`gateway.ledger.resp` (``RespClient``, and
``HotPathStore``, which the gateway builds for ``redis://`` and ``unix://`` URLs), and :class:`RedisPyStore`
here, over a redis-py asyncio client (TLS, Sentinel, Cluster). :func:`as_script_store` picks the adapter for
a client of either kind. The ledger's contract tests run over both (tests/conftest.py ``store_target``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from gateway.ledger.codec import Arg

RedisPyClient = Redis | RedisCluster


class LedgerScript(Protocol):
    """A Lua script registered with a store."""

    def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Awaitable[Any]:
        """Run it (``EVALSHA``) and await the reply; a store that has lost the script loads it and runs it
        again. Errors are redis-py's exception classes (``NoScriptError`` aside)."""
        ...

    def send(self, keys: Sequence[str], args: Sequence[Arg]) -> asyncio.Future[Any] | None:
        """Queue it now, without a coroutine, and return the future of its reply; None (nothing sent) where
        the store cannot queue at once. No reload here: a lost script fails with ``NoScriptError``."""
        ...

    async def load(self) -> None:
        """``SCRIPT LOAD`` it now."""
        ...


class ScriptStore(Protocol):
    """A Redis connection as the ledger uses it: registered scripts, and ZCARD for counting leases."""

    @property
    def connected(self) -> bool:
        """A script called now is queued at once, ahead of every script called after it."""
        ...

    def register_script(self, script: str) -> LedgerScript: ...

    async def zcards(self, keys: Sequence[str]) -> list[int]:
        """``ZCARD`` of each key (in any slots: one command per key)."""
        ...


class _RedisPyScript:
    __slots__ = ("_script",)

    def __init__(self, script: AsyncScript):
        self._script = script

    def __call__(self, keys: Sequence[str], args: Sequence[Arg]) -> Awaitable[Any]:
        return self._script(keys=keys, args=args)

    def send(self, keys: Sequence[str], args: Sequence[Arg]) -> asyncio.Future[Any] | None:
        return None  # redis-py sends a command when it is awaited

    async def load(self) -> None:
        self._script.sha = await self._script.registered_client.script_load(self._script.script)


class RedisPyStore:
    """:class:`ScriptStore` over a redis-py asyncio client (standalone, Sentinel or Cluster). It never
    queues at once (``connected`` is False): redis-py checks a connection out of its pool when awaited."""

    connected = False

    def __init__(self, redis: RedisPyClient):
        self.redis = redis

    def register_script(self, script: str) -> LedgerScript:
        return _RedisPyScript(self.redis.register_script(script))

    async def zcards(self, keys: Sequence[str]) -> list[int]:
        pipe = self.redis.pipeline(transaction=False)  # one round trip (per node), not one per key
        for k in keys:
            pipe.zcard(k)
        return [int(n) for n in await pipe.execute()]


def as_script_store(client: ScriptStore | RedisPyClient) -> ScriptStore:
    """``client`` as a :class:`ScriptStore`: a redis-py client gets the adapter, a store is itself."""
    if isinstance(client, Redis | RedisCluster):
        return RedisPyStore(client)
    return client
