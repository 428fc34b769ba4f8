"""The connection to Redis (docs/design.md §3.5): one URL in, one asyncio client out.

Accepted URLs (ACL ``username:password@`` works in each; percent-encode special characters):

- ``redis://[user:pass@]host:port[/db]`` and ``rediss://...`` (TLS; ``?ssl_ca_certs=...&ssl_certfile=...
  &ssl_keyfile=...&ssl_cert_reqs=required|optional|none`` as query arguments);
- ``unix:///path/to/redis.sock[?db=N]``;
- ``redis+sentinel://[user:pass@]host:port,host:port/service_name[/db]`` — the credentials are the
  master's; sentinels are asked without (``?sentinel_password=...`` if yours require one);
- ``redis+cluster://[user:pass@]host:port[,host:port...]`` and ``rediss+cluster://...`` (TLS) — Redis
  Cluster, discovered from these startup nodes.

Every command has a socket timeout of ``timeout`` seconds (connecting too), so a stalled Redis turns into
a ``redis.exceptions.TimeoutError`` that the caller maps to its ``on_store_error`` policy.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisClusterException, RedisError

from gateway.ledger.errors import StoreError

__all__ = ["STORE_ERRORS", "StoreClient", "close", "connect"]

log = logging.getLogger(__name__)

StoreClient = Redis | RedisCluster
# What a store call raises when Redis is unreachable, timed out or answered with an error (redis-py's and
# resp.py's errors are all RedisError); callers map it to ``on_store_error``. OSError covers TimeoutError
# (= asyncio.TimeoutError). Not RedisClusterException: once connected, redis-py raises it for a command it
# cannot route (keys in different slots, bad arguments), i.e. a bug in kgate, not a store failure.
STORE_ERRORS: tuple[type[Exception], ...] = (StoreError, RedisError, OSError)

_PLAIN = ("redis://", "rediss://", "unix://")
_BOOL_ARGS = ("ssl_check_hostname",)
_TLS_ARGS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")


async def connect(url: str, *, timeout: float, decode_responses: bool = True,
                  max_connections: int | None = None) -> StoreClient:
    """A client for ``url`` (see the module docstring). Nothing is sent yet (the first command connects),
    except for a cluster, whose slot map is fetched now if the cluster is reachable.

    ``decode_responses`` defaults to True (replies as ``str``). Close with :func:`close`.
    """
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              "decode_responses": decode_responses}
    if url.startswith(_PLAIN):
        if max_connections:
            common["max_connections"] = max_connections
        return Redis.from_url(url, **common)
    scheme, _, rest = url.partition("://")
    if not rest:
        raise ValueError(f"not a store URL: {_redact(url)}")
    if scheme in ("redis+cluster", "rediss+cluster"):
        tls = scheme == "rediss+cluster"
        cluster = _cluster(rest, tls=tls, common=common, max_connections=max_connections)
        try:
            # Fetch the slot map now: when many first commands race to build it, redis-py can route
            # them to the wrong node (MOVED) and tear down connections that are in use.
            await cluster.initialize()
        except (RedisError, RedisClusterException) as exc:
            log.warning("store: cluster %s not reachable yet (%r); retrying on first use", _redact(url), exc)
        return cluster
    if scheme == "redis+sentinel":
        return _sentinel(rest, common=common, max_connections=max_connections)
    raise ValueError(f"unsupported store URL scheme {scheme!r} in {_redact(url)}; expected redis://, "
                     "rediss://, unix://, redis+sentinel:// or redis+cluster://")


async def close(client: StoreClient) -> None:
    """Close a client from :func:`connect`, including a Sentinel client's connections to the sentinels."""
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    await client.aclose()
    if manager is not None:
        for sentinel in manager.sentinels:
            await sentinel.aclose()


# ------------------------------------------------------------------------------------------ parsing
def _split(rest: str) -> tuple[dict[str, str], list[tuple[str, int]], str, dict[str, str]]:
    """``[user:pass@]h:p,h:p[/path][?query]`` → (credentials, hosts, path, query)."""
    parts = urlsplit("//" + rest)
    netloc = parts.netloc
    creds: dict[str, str] = {}
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, sep, password = userinfo.partition(":")
        if user:
            creds["username"] = unquote(user)
        if sep:
            creds["password"] = unquote(password)
    hosts = []
    for item in netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {item!r}")
        hosts.append((host.strip("[]"), int(port)))
    return creds, hosts, parts.path.strip("/"), dict(parse_qsl(parts.query))


def _tls_kwargs(query: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in _TLS_ARGS:
        if k in query:
            out[k] = query[k].lower() in ("1", "true", "yes") if k in _BOOL_ARGS else query[k]
    return out


def _cluster(rest: str, *, tls: bool, common: dict[str, Any], max_connections: int | None) -> RedisCluster:
    creds, hosts, path, query = _split(rest)
    if path:
        raise ValueError("a cluster URL takes no database or path (Redis Cluster has only db 0)")
    kwargs: dict[str, Any] = {**common, **creds}
    if max_connections:
        kwargs["max_connections"] = max_connections
    if tls:
        kwargs.update(ssl=True, **_tls_kwargs(query))
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], **kwargs)


def _sentinel(rest: str, *, common: dict[str, Any], max_connections: int | None) -> Redis:
    creds, hosts, path, query = _split(rest)
    service, _, db = path.partition("/")
    if not service:
        raise ValueError("a sentinel URL needs the service name: redis+sentinel://host:port/service_name")
    sentinel_kwargs: dict[str, Any] = {k: v for k, v in common.items() if k.startswith("socket_")}
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"]
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **common)
    kwargs: dict[str, Any] = dict(creds)
    if db:
        kwargs["db"] = int(db)
    if max_connections:
        kwargs["max_connections"] = max_connections
    client: Redis = sentinel.master_for(service, **kwargs)
    return client


def _redact(url: str) -> str:
    """The URL without its password, for error messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest.split("/", 1)[0]:
        userinfo, _, tail = rest.partition("@")
        user = userinfo.partition(":")[0]
        return f"{scheme}{sep}{user}:***@{tail}"
    return url
