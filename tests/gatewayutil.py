"""Shared test helpers: a test policy and a gateway app running on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web

from gateway.audit.files import file_order
from gateway.policy.config import Config, load_config
from gateway.proxy.app import create_app
from gateway.proxy.client_limits import GatewayRunner
from gateway.proxy.context import GATEWAY, Gateway

KEYS = {
    "alice": "key-alice-basic",      # tier basic: reject over caps
    "carol": "key-carol-clamp",      # tier clamp: clamp over caps
    "tina": "key-tina-tight",        # tier tight: small budgets, for 429s; observed per request (no leases)
    "sam": "key-sam-shadow",         # tier shadow: decisions recorded, never enforced
    "olga": "key-olga-open",         # tier open: on_store_error allow, budgets
    "vera": "key-vera-vetted",       # tier vetted: beyond evaluated K
}
TIERS = {"alice": "basic", "carol": "clamp", "tina": "tight", "sam": "shadow", "olga": "open", "vera": "vetted"}


def policy_dict(store_url: str, data_dir: Path, server: dict[str, Any] | None = None,
                **tier_overrides: Any) -> dict[str, Any]:
    tiers: dict[str, Any] = {
        "basic": {"models": ["dense", "reasoner", "moe"], "max_k": 8, "max_samples": 4,
                  "efforts": ["none", "minimal", "low", "medium", "high"], "on_exceed": "reject",
                  "budgets": [{"metric": "requests", "window": "1m", "limit": 10000}]},
        "clamp": {"models": ["dense", "reasoner"], "max_k": 4, "max_samples": 2, "on_exceed": "clamp",
                  "efforts": ["none", "minimal", "low", "medium"],
                  "budgets": [{"metric": "requests", "window": "1m", "limit": 10000}]},
        # Its ledger is read request by request (held 0 after each, charged nothing after an error): per-request
        # holds, as `leases: false` keeps them; the other tiers take the default (budget leases).
        "tight": {"models": "*", "max_k": 64, "leases": False,
                  "budgets": [{"metric": "generated_tokens", "window": "1d", "limit": 1000},
                              {"metric": "requests", "window": "1h", "limit": 100}]},
        "shadow": {"models": "*", "max_k": 2, "mode": "shadow",
                   "budgets": [{"metric": "requests", "window": "1d", "limit": 1}]},
        "open": {"models": "*", "on_store_error": "allow",
                 "budgets": [{"metric": "generated_tokens", "window": "1d", "limit": 10_000_000}]},
        "vetted": {"models": "*", "beyond_evaluated": True, "max_k": 1024,
                   "budgets": [{"metric": "k_units", "window": "30d", "limit": 1_000_000}]},
    }
    for name, over in tier_overrides.items():
        tiers[name] = {**tiers.get(name, {}), **over}
    return {
        "server": {"max_body_bytes": 65536, **(server or {})},
        "store": {"url": store_url, "data_dir": str(data_dir), "timeout_seconds": 0.5,
                  "lease_grace_seconds": 5},
        "audit": {"dir": str(data_dir / "audit")},
        "upstreams": {"sim": {"base_url": "simulator", "read_timeout_seconds": 10, "total_timeout_seconds": 20}},
        "models": {
            "dense": {"upstream": "sim", "upstream_model": "llama-sim-8b", "active_params": 8e9,
                      "reference_output_tokens": 64, "max_output_tokens": 1024, "evaluated_max_k": 16},
            "reasoner": {"upstream": "sim", "upstream_model": "qwq-reasoner", "active_params": 32e9,
                         "reasoning": True, "reference_output_tokens": 256, "max_output_tokens": 8192,
                         "n_layers": 64, "d_attn": 5120,
                         "reasoning_effort_tokens": {"low": 256, "medium": 1024, "high": 4096},
                         "evaluated_max_k": 32},
            "moe": {"upstream": "sim", "upstream_model": "deepseek-r1-sim", "active_params": 37e9,
                    "total_params": 671e9, "reasoning": True, "reference_output_tokens": 256,
                    "max_output_tokens": 8192},
        },
        "tiers": tiers,
        "principals": [
            {"id": pid, "org": "acme" if pid != "vera" else "evals", "tier": TIERS[pid],
             "key_sha256": hashlib.sha256(key.encode()).hexdigest()}
            for pid, key in KEYS.items()
        ],
    }


def write_policy(tmp_path: Path, store_url: str, server: dict[str, Any] | None = None,
                 **tier_overrides: Any) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy_dict(store_url, tmp_path / "data", server, **tier_overrides)))
    return path


def make_config(tmp_path: Path, store_url: str, server: dict[str, Any] | None = None,
                **tier_overrides: Any) -> Config:
    return load_config(write_policy(tmp_path, store_url, server, **tier_overrides))


class RunningGateway:
    def __init__(self, app: web.Application, runner: web.AppRunner, url: str):
        self.app, self.runner, self.url = app, runner, url

    @property
    def gw(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def sim_url(self) -> str:
        assert self.gw.simulator_url
        return self.gw.simulator_url


@contextlib.asynccontextmanager
async def running_gateway(config: Config, **kw: Any) -> AsyncIterator[RunningGateway]:
    app = create_app(config, **kw)
    runner = GatewayRunner(app, access_log=None)  # as `kgate serve` runs it (header timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield RunningGateway(app, runner, f"http://127.0.0.1:{port}")
    finally:
        await _cleanup(runner)


def audit_records(where: Path | RunningGateway, *, torn_ok: bool = False) -> list[dict[str, Any]]:
    """The records of the audit files (``audit-*.jsonl``) under a folder (every replica's), or of one running
    gateway's replica, each replica's in write order. ``torn_ok``: skip a line that does not parse (the
    last line of a process killed while writing it) instead of failing."""
    root = Path(where.gw.config.audit.dir) / where.gw.replica if isinstance(where, RunningGateway) else where
    out: list[dict[str, Any]] = []
    for f in sorted(root.rglob("audit-*.jsonl"), key=lambda p: (str(p.parent), file_order(p))):
        for line in f.read_bytes().splitlines():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                if not torn_ok:
                    raise
    return out


CLEANUP_LIMIT = 60.0  # seconds: the app's shutdown is bounded well below this (drain, settles, store close)


async def _cleanup(runner: web.AppRunner) -> None:
    """``runner.cleanup()``; if it has not finished within :data:`CLEANUP_LIMIT`, print every task's stack
    (which await hangs) and fail, instead of leaving only the event loop's frame to pytest-timeout."""
    task = asyncio.ensure_future(runner.cleanup())
    done, _ = await asyncio.wait({task}, timeout=CLEANUP_LIMIT)
    if task in done:
        task.result()
        return
    for t in asyncio.all_tasks():
        if t is not asyncio.current_task():
            print(f"--- task {t.get_name()} ---", file=sys.stderr)
            t.print_stack(limit=20, file=sys.stderr)
    raise AssertionError(f"the gateway app did not shut down within {CLEANUP_LIMIT:g} s (task stacks above)")


async def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200 (failing early if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc is None or proc.poll() is None, f"the process serving {url} exited early"
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never became ready")


@contextlib.asynccontextmanager
async def admin_listener(g: RunningGateway) -> AsyncIterator[str]:
    """The admin app of ``g`` on its own loopback port, as ``kgate serve`` runs it; yields its URL."""
    from gateway.admin.api import create_admin_app

    runner = web.AppRunner(create_admin_app(g.app), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def scrape(g: RunningGateway) -> str:
    """``GET /metrics`` where kgate serves it by default: the admin listener (started for the call)."""
    async with admin_listener(g) as url, aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200, r.status
        return await r.text()


async def record_of(g: RunningGateway, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The audit record of ``request_id`` once it is written (bounded wait; the last, if there are two)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in audit_records(g) if r["request_id"] == request_id]
        if found:
            return found[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id} within {timeout} s")



@contextlib.asynccontextmanager
async def running_decision(g: RunningGateway, listen: tuple[str, ...] = ("127.0.0.1:0",), *,
                           extproc: str | None = None, **decision: Any) -> AsyncIterator[Any]:
    """The decision API (and Envoy's ext_proc when ``extproc`` is given) over a running gateway's engine,
    as ``kgate serve --decision-listen`` serves it; yields the :class:`PluginListeners` (``.addresses`` holds
    what was bound; ``127.0.0.1:0`` is resolved to its port in ``.url``)."""
    from gateway.decision.listeners import start_plugins
    from gateway.policy.config import DecisionConfig
    from gateway.proxy.context import ENGINE

    cfg = DecisionConfig(**decision)
    plugins = await start_plugins(g.app[ENGINE], cfg, listen, extproc)
    plugins.url = plugins.bound_url()  # type: ignore[attr-defined]
    try:
        yield plugins
    finally:
        await plugins.close()
