"""The admin operations from the command line: the same calls as the admin API, against the store.

With ``store.url: embedded`` the CLI talks to the running gateway's embedded Redis through its socket,
which it learns from the lock file of the data folder (``<store.data_dir>/kgate.lock``); it never starts a
Redis of its own over a folder a live process owns. When no gateway runs, it takes that lock itself and
starts the embedded Redis for the duration of the command (its append-only file keeps the change for the
gateway's next start); a gateway starting meanwhile waits for nothing: it fails and names this command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from gateway.admin import ops
from gateway.admin.ops import check_budget_label, check_id, check_tier
from gateway.engine.errors import BadRequest, NotFound
from gateway.evals.runs import EvalRuns
from gateway.metrics.series import Metrics
from gateway.policy.config import default_config_path, load_config
from gateway.policy.directory import Directory
from gateway.proxy.context import Gateway


@contextlib.asynccontextmanager
async def open_gateway(args: argparse.Namespace) -> AsyncIterator[Gateway]:
    """A Gateway with the store, directory, ledger and audit log, for one CLI command."""
    from gateway.audit.log import AuditLog
    from gateway.ledger.ledger import Ledger
    from gateway.ledger.store import connect

    cfg = load_config(args.config or default_config_path())
    url = args.store or os.environ.get("KGATE_STORE_URL") or cfg.store.url
    embedded = None
    if url == "embedded":
        url, embedded = await _embedded_store(Path(cfg.store.data_dir))
    try:
        redis = await connect(url, timeout=cfg.store.timeout_seconds)
    except ValueError as exc:  # not a store URL: bad input, one line
        raise BadRequest(str(exc), param="store") from None
    gw = Gateway(config=cfg, metrics=Metrics(process_metrics=False), replica=f"cli-{socket.gethostname()}")
    gw.redis = redis
    gw.directory = Directory(cfg, redis, key_prefix=cfg.store.key_prefix)
    gw.evals = EvalRuns(gw.directory, redis)
    gw.ledger = Ledger(redis, key_prefix=cfg.store.key_prefix, lease_expiry=cfg.store.lease_expiry,
                       record_ttl=cfg.store.record_ttl_seconds)
    key_env = cfg.audit.hmac_key_env
    hmac_key = os.environ.get(key_env, "").encode() if key_env else b""
    gw.audit = AuditLog(cfg.audit.dir, gw.replica, hmac_key=hmac_key or None)
    await gw.audit.start(open_file=False)  # a read-only command writes nothing: no empty day file
    try:
        yield gw
    finally:
        await gw.audit.close()
        with contextlib.suppress(Exception):
            await redis.aclose()
        if embedded is not None:
            await embedded.stop()


async def _embedded_store(data_dir: Path) -> tuple[str, Any]:
    """(URL, the server this command started or None) for the embedded store in ``data_dir``: the socket of
    the process that owns the folder, else a Redis started here under the folder's lock."""
    from gateway.ledger.data_dir_lock import DataDirBusy, data_dir_owner
    from gateway.ledger.redis_server import RedisServer

    owner = data_dir_owner(data_dir)
    if owner is None:
        server = RedisServer(data_dir=data_dir, port=None, command="kgate (admin command)")
        try:
            await server.start()
            return server.url, server
        except DataDirBusy as exc:  # a gateway took the folder between the look and the start
            owner = exc.owner
    sock = owner.get("socket")
    if not sock:
        raise StoreOwnerError(f"{data_dir} is owned by {owner.get('command') or 'another process'} (pid "
                              f"{owner.get('pid', 'unknown')}) whose store is not up yet; try again in a moment")
    return f"unix://{sock}", None


class StoreOwnerError(OSError):
    """The data folder's owner has no store socket to talk to (yet)."""


def _run(args: argparse.Namespace, op: Callable[[Gateway], Awaitable[Any]]) -> int:
    from redis.exceptions import RedisError

    from gateway.ledger.errors import StoreError
    from gateway.ledger.redis_binary import RedisServerError
    from gateway.ledger.store import STORE_ERRORS

    async def main() -> Any:
        async with open_gateway(args) as gw:
            return await op(gw)

    try:
        result = asyncio.run(main())
    except (StoreOwnerError, RedisServerError) as exc:  # RedisServerError: e.g. no redis-server to start
        print(f"kgate: embedded store: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    except STORE_ERRORS as exc:
        # An unreachable store is no bad input (exit 1, not 2), but still one line, never a traceback.
        # StoreError: the directory's and the ledger's wrapping of a client's error.
        what = "the store" if isinstance(exc, (RedisError, StoreError)) else type(exc).__name__
        print(f"kgate: {what} failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 1
    if result is not None:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


ACTOR = f"cli:{os.environ.get('USER', 'unknown')}"


def keys_create(args: argparse.Namespace) -> int:
    async def op(gw: Gateway) -> Any:
        k = await ops.create_key(gw, ACTOR, args.principal, args.org, args.tier)
        print(f"key id {k['key_id']} for principal {k['principal']} (tier {k['tier']}); the key is shown once:",
              file=sys.stderr)
        print(k["key"])

    return _run(args, op)


def keys_revoke(args: argparse.Namespace) -> int:
    return _run(args, lambda gw: ops.revoke_key(gw, ACTOR, args.key_id))


def keys_list(args: argparse.Namespace) -> int:
    async def op(gw: Gateway) -> Any:
        assert gw.directory is not None
        return await gw.directory.list_keys(args.principal and check_id(args.principal, "principal"))

    return _run(args, op)


def principals_set_tier(args: argparse.Namespace) -> int:
    async def op(gw: Gateway) -> Any:
        pid = check_id(args.principal, "principal")
        return await ops.set_principal(gw, ACTOR, pid, tier=check_tier(gw.config, args.tier))

    return _run(args, op)


def principals_list(args: argparse.Namespace) -> int:
    async def op(gw: Gateway) -> Any:
        assert gw.directory is not None
        return await gw.directory.list_principals()

    return _run(args, op)


def grants_add(args: argparse.Namespace) -> int:
    async def op(gw: Gateway) -> Any:
        g = await ops.add_grant(gw, ACTOR, args.principal, args.tier, args.duration, args.approver, args.reason)
        return g.as_dict()

    return _run(args, op)


def grants_list(args: argparse.Namespace) -> int:
    async def op(gw: Gateway) -> Any:
        assert gw.directory is not None
        principal = args.principal and check_id(args.principal, "principal")
        now = time.time()
        return [{**g.as_dict(), "active": g.active(now)} for g in await gw.directory.list_grants(principal)]

    return _run(args, op)


def grants_revoke(args: argparse.Namespace) -> int:
    async def op(gw: Gateway) -> Any:
        g = await ops.revoke_grant(gw, ACTOR, args.grant_id)
        if g is None:
            raise NotFound(f"unknown grant id {args.grant_id!r}")
        return g.as_dict()

    return _run(args, op)


def usage(args: argparse.Namespace) -> int:
    async def op(gw: Gateway) -> Any:
        return await ops.principal_usage(gw, check_id(args.principal, "principal"))

    return _run(args, op)


def overrides_set(args: argparse.Namespace) -> int:
    """A per-principal limit for one of its tier's principal-scope budgets (by label)."""

    async def op(gw: Gateway) -> Any:
        pid = check_id(args.principal, "principal")
        label = check_budget_label(gw.config, args.budget)
        if not 0 <= args.limit < math.inf:  # argparse's float() also takes "nan" and "inf"
            raise BadRequest("'limit' must be a non-negative number", param="limit")
        result = await ops.set_override(gw, ACTOR, pid, label, float(args.limit))
        if not result["applies_now"]:
            print(f"kgate: warning: {result['note']}", file=sys.stderr)
        return result

    return _run(args, op)


def overrides_delete(args: argparse.Namespace) -> int:
    """Back to the tier's limit for one budget."""
    return _run(args, lambda gw: ops.delete_override(gw, ACTOR, args.principal, args.budget))
