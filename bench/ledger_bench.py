"""Ledger micro-benchmark: reserve + settle pairs per second against a private Redis.

One client process (asyncio concurrency), one scope with three budgets (requests/1m, output tokens/1d
rolling, FLOPs/month), limits high enough that nothing is refused. Redis is started here on a unix socket
with append-only persistence, as ``kgate serve`` runs it. Prints each run and the median.

    python bench/ledger_bench.py [--runs 5] [--seconds 3] [--concurrency 64] [--client redis-py|resp]
                                 [--tcp] [--profile]

``--client resp`` sends the scripts through gateway.resp's pipelined client (the gateway's hot path);
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

from gateway import store
from gateway.ledger import BudgetSpec, HoldRequest, Ledger, ScopeRef
from gateway.redis_server import RedisServer

BUDGETS = (
    BudgetSpec("req-1m", "requests", "1m", False, 1e12),
    BudgetSpec("out-1d", "output_tokens", "1d", True, 1e15),
    BudgetSpec("flops-month", "flops", "month", False, 1e30),
)
HOLD = HoldRequest(ScopeRef("principal", "bench"), BUDGETS, {"output_tokens": 1024, "flops": 3.2e13})
ACTUAL = {"output_tokens": 700, "flops": 2.1e13}


async def one_run(ledger: Ledger, seconds: float, concurrency: int, run: int) -> float:
    ids = itertools.count()
    stop_at = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            res = await ledger.reserve(f"b{run}-{next(ids)}", (HOLD,), 60.0)
            await ledger.settle(res, ACTUAL)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def make_client(kind: str, url: str) -> Any:
    if kind == "resp":
        from gateway.resp import RespClient

        return RespClient.from_url(url, timeout=5.0)
    return await store.connect(url, timeout=5.0, decode_responses=False)


async def main(args: argparse.Namespace) -> None:
    async with RedisServer(prefer=args.redis, port=0 if args.tcp else None) as server:
        client = await make_client(args.client, server.url)
        ledger = Ledger(client, key_prefix="bench")
        await ledger.prepare()
        print(f"redis {server.version} at {server.url}; client {args.client}; "
              f"concurrency {args.concurrency}; {args.seconds:g} s per run")
        await one_run(ledger, 0.5, args.concurrency, -1)  # warm up: connections, scripts, caches
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            rate = await one_run(ledger, args.seconds, args.concurrency, 0)
            prof.disable()
            print(f"profiled run: {rate:,.0f} pairs/s")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        rates = []
        for run in range(1, args.runs + 1):
            rate = await one_run(ledger, args.seconds, args.concurrency, run)
            rates.append(rate)
            print(f"run {run}: {rate:,.0f} reserve+settle pairs/s")
        print(f"median: {statistics.median(rates):,.0f} pairs/s over {len(rates)} runs")
        await client.aclose()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--client", choices=("redis-py", "resp"), default="redis-py")
    p.add_argument("--redis", default=None, help="version prefix or path of redis-server (default: PATH)")
    p.add_argument("--tcp", action="store_true", help="TCP on 127.0.0.1 instead of a unix socket")
    p.add_argument("--profile", action="store_true")
    asyncio.run(main(p.parse_args()))
