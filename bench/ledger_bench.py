"""Ledger micro-benchmark: reserve + settle pairs per second against a private Redis.

One client process (asyncio concurrency), one scope with three budgets (requests/1m, output tokens/1d
rolling, FLOPs/month), limits high enough that nothing is refused. Redis is started here on a unix socket
with append-only persistence, as ``kgate serve`` runs it. Prints each run and the median.

    python bench/ledger_bench.py [--runs 5] [--seconds 3] [--concurrency 64] [--client resp|redis-py]
                                 [--tcp] [--no-aof] [--no-report] [--profile] [--count [PAIRS]]

``--client resp`` sends the scripts through gateway.ledger.resp's pipelined client (the gateway's hot path);
``redis-py`` through redis.asyncio with its connection pool. ``--no-report`` settles as the gateway's request
path does (``report=False``: Redis reads nothing back). ``--profile`` runs one run under cProfile and prints
where the client's time goes.

``--count`` counts instructions instead of timing (needs valgrind): this client and the Redis, each under
callgrind, over PAIRS pairs (default 1280) after a warm-up, on TCP without persistence. On a shared machine
a timed rate moves by ±20% from one minute to the next; an instruction count repeats to within 0.3%, so it
is the figure to compare two versions by (run each checkout's bench in turn).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import glob
import itertools
import os
import pstats
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.ledger import store
from gateway.ledger.ledger import BudgetSpec, HoldRequest, Ledger, ScopeRef
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


async def one_run(ledger: Ledger, seconds: float, concurrency: int, run: int, admin: Any = None,
                  report: bool = True) -> Run:
    ids = itertools.count()
    stop_at = time.perf_counter() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            res = await ledger.reserve(f"b{run}-{next(ids)}", (HOLD,), 60.0)
            await ledger.settle(res, ACTUAL, report=report)
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
        await one_run(ledger, 0.5, args.concurrency, -1, report=args.report)  # warm up: connections, scripts
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            run0 = await one_run(ledger, args.seconds, args.concurrency, 0, report=args.report)
            prof.disable()
            print(f"profiled run: {run0.rate:,.0f} pairs/s")
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        runs = []
        for n in range(1, args.runs + 1):
            r = await one_run(ledger, args.seconds, args.concurrency, n, admin, report=args.report)
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


# ------------------------------------------------------------------------------------ --count
def callgrind(out: str, command: list[str]) -> list[str]:
    """``command`` under callgrind, counting nothing until told to (callgrind_control)."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *command]


def callgrind_total(out: str) -> int:
    """The instruction total of the dump that callgrind_control --dump wrote (``<out>.1``)."""
    text = Path(max(glob.glob(out + ".*"), key=os.path.getmtime)).read_text()
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    if match is None:
        raise RuntimeError(f"no totals in the callgrind output {out}")
    return int(match.group(1))


def count(args: argparse.Namespace) -> None:
    """Redis under callgrind; this script again, under callgrind too, as the client (``--count-client``)."""
    from gateway.ledger.redis_binary import find_redis_binary, free_port

    with tempfile.TemporaryDirectory(prefix="kgate-count-") as tmp:
        port = free_port()
        redis = subprocess.Popen(callgrind(f"{tmp}/redis.cg", [
            str(find_redis_binary(args.redis)), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", tmp]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120  # valgrind takes seconds to start a program
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                        conn.sendall(b"PING\r\n")
                        if conn.recv(16).startswith(b"+PONG"):
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("redis did not start under valgrind") from None
                    time.sleep(0.2)
            done = subprocess.run(callgrind(f"{tmp}/client.cg", [
                sys.executable, __file__, "--count-client", str(redis.pid), "--count", str(args.count),
                "--redis-url", f"redis://127.0.0.1:{port}", "--client", args.client,
                "--concurrency", str(args.concurrency), *([] if args.report else ["--no-report"])]),
                capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"the counted client failed:\n{done.stderr[-3000:]}")
            client, server = callgrind_total(f"{tmp}/client.cg"), callgrind_total(f"{tmp}/redis.cg")
        finally:
            redis.terminate()
            redis.wait()
    print(f"client {args.client}, concurrency {args.concurrency}, settle {'with' if args.report else 'without'} "
          f"report: {client / args.count:,.0f} client and {server / args.count:,.0f} redis instructions per "
          f"reserve+settle pair ({args.count} pairs)")


async def count_client(args: argparse.Namespace) -> None:
    """The client of ``--count``: warm up, switch counting on (here and in Redis), count ``args.count`` pairs."""
    client = await make_client(args.client, args.redis_url)
    ledger = Ledger(client, key_prefix="bench")
    await ledger.prepare()
    pids = [str(os.getpid()), str(args.count_client)]

    async def pairs(tag: str, n: int) -> None:
        async def worker(k: int) -> None:
            for i in range(n // args.concurrency):
                res = await ledger.reserve(f"{tag}{k}-{i}", (HOLD,), 60.0)
                await ledger.settle(res, ACTUAL, report=args.report)
        await asyncio.gather(*(worker(k) for k in range(args.concurrency)))

    await pairs("w", 10 * args.concurrency)  # imports, connections, caches: not counted
    control("--instr=on", pids)  # blocking on purpose: nothing else may run meanwhile
    await pairs("v", 10 * args.concurrency)  # the same again, counted, then counting from zero
    control("--zero", pids)
    await pairs("x", args.count)
    control("--dump", pids)
    await client.aclose()


def control(action: str, pids: list[str]) -> None:
    for pid in pids:
        subprocess.run(["callgrind_control", action, pid], check=True, capture_output=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--client", choices=("resp", "redis-py"), default="resp")
    p.add_argument("--redis", default=None, help="version prefix or path of redis-server (default: PATH)")
    p.add_argument("--tcp", action="store_true", help="TCP on 127.0.0.1 instead of a unix socket")
    p.add_argument("--no-aof", action="store_true", help="without append-only persistence")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="settle without reading the budgets back, as the gateway's request path does")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--count", type=int, nargs="?", const=1280, default=0, metavar="PAIRS",
                   help="count instructions per pair under valgrind instead of timing (see above)")
    p.add_argument("--count-client", type=int, default=0, help=argparse.SUPPRESS)  # the Redis pid, in --count
    p.add_argument("--redis-url", default="", help=argparse.SUPPRESS)
    parsed = p.parse_args()
    if parsed.count_client:
        asyncio.run(count_client(parsed))
    elif parsed.count:
        count(parsed)
    else:
        asyncio.run(main(parsed))
