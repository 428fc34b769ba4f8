"""The gateway's per-process state (docs/design.md §10: no mutable globals): everything the engine needs.

The aiohttp transport holds it in one ``web.AppKey`` (``gateway.proxy.context.GATEWAY``); another transport
holds it its own way. Nothing here imports aiohttp or a Redis client.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.audit.log import AuditLog
    from gateway.evals.runs import EvalRuns
    from gateway.evals.signing import SigningKey
    from gateway.ledger.leases import LeaseBook
    from gateway.ledger.ledger import Ledger
    from gateway.ledger.spool import Spool
    from gateway.metrics.series import Metrics
    from gateway.policy.config import Config
    from gateway.policy.directory import Directory
    from gateway.proxy.upstream import Upstreams
    from gateway.proxy.upstream_client import UpstreamClient


@dataclass
class Gateway:
    """Everything a request needs. ``config`` is swapped whole on reload; a request reads it once."""

    config: Config
    metrics: Metrics
    replica: str = field(default_factory=socket.gethostname)
    redis: Any = None
    directory: Directory | None = None
    evals: EvalRuns | None = None  # evaluation runs (over the directory's store)
    signer: SigningKey | None = None  # signs receipts (tiers with receipts: true)
    ledger: Ledger | None = None
    leases: LeaseBook | None = None  # this replica's slices of the budgets (tiers with leases: true)
    upstreams: Upstreams | None = None
    session: UpstreamClient | None = None  # the upstream clients (gateway.proxy.upstream.UpstreamClients)
    audit: AuditLog | None = None
    spool: Spool | None = None
    simulator_url: str | None = None
    store_url: str | None = None
    # Recent mean generated tokens per sample, per model: what `admission: expected` holds.
    model_means: dict[tuple[str, str], float] = field(default_factory=dict)  # (principal, model) → mean
    draining: bool = False
    inflight: int = 0
    # The tasks of the API requests in flight: a drain that runs out of time cancels what is left.
    handlers: set[asyncio.Task[Any]] = field(default_factory=set)
    # Work that outlives the request that started it (a settle finished after its handler was cancelled).
    detached: set[asyncio.Task[Any]] = field(default_factory=set)
    # Settles posted after their answers whose replies have not come yet (handler.post_usage).
    settling: int = 0
    store_ok: bool = True

    def detach(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` to its end in a task of its own (kept referenced until it is done)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.detached.add(task)
        task.add_done_callback(self.detached.discard)
