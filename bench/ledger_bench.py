"""Ledger micro-benchmark: reserve + settle pairs per second against a private Redis.

One client process (asyncio concurrency), one scope with three budgets (requests/1m, output tokens/1d
rolling, FLOPs/month), limits high enough that nothing is refused. Redis is started here on a unix socket
with append-only persistence, as ``kgate serve`` runs it. Prints each run and the median.

    python bench/ledger_bench.py [--runs 5] [--seconds 3] [--concurrency 64] [--client resp|redis-py]
                                 [--tcp] [--no-aof] [--profile]

``--client resp`` sends the scripts through gateway.ledger.resp's pipelined client (the gateway's hot path);
``redis-py`` through redis.asyncio with its connection pool. ``--profile`` runs one run under cProfile and
prints where the client's time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.ledger.ledger import BudgetSpec, HoldRequest, Ledger, ScopeRef, store
from gateway.ledger.redis_server import RedisServer

BUDGETS = (
    BudgetSpec("req-1m", "requests", "1m", False, 1e12),
    BudgetSpec("out-1d", "output_tokens", "1d", True, 1e15),
    BudgetSpec("flops-month", "flops", "month", False, 1e30),
)
HOLD = HoldRequest(ScopeRef("principal", "bench"), BUDGETS, {"output_tokens": 1024, "flops": 3.2e13})
ACTUAL = {"output_tokens": 700, "flops": 2.1e13}


class Run:
    """One timed run: pairs per second, and CPU microseconds per pair spent by this client and by Redis
    (CPU time does not depend on what else the machine is doing, wall-clock rates do)."""

    def __init__(self, rate: float, client_us: float, redis_us: float):
        self.rate, self.client_us, self.redis_us = rate, client_us, redis_us


async def redis_cpu(admin: Any) -> float:
    info = await admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def one_run(ledger: Ledger, seconds: float, concurrency: int, run: int, admin: Any = None) -> Run:
    ids = itertools.count()
    stop_at = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            res = await ledger.reserve(f"b{run}-{next(ids)}", (HOLD,), 60.0)
            await ledger.settle(res, ACTUAL)
            done += 1

    r0 = await redis_cpu(admin) if admin is not None else 0.0
    c0 = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    client_cpu = time.process_time() - c0
    redis_used = (await redis_cpu(admin) - r0) if admin is not None else 0.0
    pairs = max(done, 1)
    return Run(done / elapsed, client_cpu / pairs * 1e6, redis_used / pairs * 1e6)


async def make_client(kind: str, url: str) -> Any:
    if kind == "resp":
        from gateway.ledger.resp import RespClient

        return RespClient.from_url(url, timeout=5.0)
    return await store.connect(url, timeout=5.0, decode_responses=False)


async def main(args: argparse.Namespace) -> None:
    async with RedisServer(prefer=args.redis, port=0 if args.tcp else None, appendonly=not args.no_aof) as server:
        client = await make_client(args.client, server.url)
        admin = await store.connect(server.url, timeout=5.0)
        ledger = Ledger(client, key_prefix="bench")
        await ledger.prepare()
        print(f"redis {server.version} at {server.url}; client {args.client}; "
              f"concurrency {args.concurrency}; {args.seconds:g} s per run")
        await one_run(ledger, 0.5, args.concurrency, -1)  # warm up: connections, scripts, caches
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            run0 = await one_run(ledger, args.seconds, args.concurrency, 0)
            prof.disable()
            print(f"profiled run: {run0.rate:,.0f} pairs/s")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        runs = []
        for n in range(1, args.runs + 1):
            r = await one_run(ledger, args.seconds, args.concurrency, n, admin)
            runs.append(r)
            print(f"run {n}: {r.rate:,.0f} reserve+settle pairs/s  (CPU per pair: client {r.client_us:.0f} us, "
                  f"redis {r.redis_us:.0f} us)")
        median = statistics.median(r.rate for r in runs)
        client_us = statistics.median(r.client_us for r in runs)
        redis_us = statistics.median(r.redis_us for r in runs)
        print(f"median: {median:,.0f} pairs/s over {len(runs)} runs; CPU per pair: client {client_us:.0f} us, "
              f"redis {redis_us:.0f} us (bound on 2 cores: {1e6 / max(client_us, redis_us):,.0f} pairs/s)")
        await client.aclose()
        await store.close(admin)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--client", choices=("resp", "redis-py"), default="resp")
    p.add_argument("--redis", default=None, help="version prefix or path of redis-server (default: PATH)")
    p.add_argument("--tcp", action="store_true", help="TCP on 127.0.0.1 instead of a unix socket")
    p.add_argument("--no-aof", action="store_true", help="without append-only persistence")
    p.add_argument("--profile", action="store_true")
    asyncio.run(main(p.parse_args()))
