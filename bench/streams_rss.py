"""Many slow streams through one kgate process: how much memory it takes to hold them.

    python bench/streams_rss.py [--streams 10000] [--tokens 16] [--tokens-per-second 1] [--leases]

Starts a Redis, ``kgate simulate`` answering slowly (``--tokens-per-second`` per stream, so every stream stays
open for tokens / rate seconds) and one ``kgate serve``; opens ``--streams`` streamed chat completions at once
(one connection each, opened in waves of 500), reads each to its end, and samples the gateway's resident
memory (VmRSS, /proc) and open descriptors every 0.25 s. Prints the peak RSS, RSS per open stream above the
idle process, the most streams open at once (answered and not yet ended, counted by the clients), how many
completed whole, and the errors. The file-descriptor limit is raised to its hard limit first (the gateway
holds two descriptors per stream, a client and an upstream connection: 10,000 streams need a limit above
20,000; where the hard limit is lower and cannot be raised, the last streams fail with EMFILE, answered 502).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_bench import KEY, ROOT, free_port, policy, wait_ready

from gateway.ledger.redis_server import RedisServer


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def nofile_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return 0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stream_body(tokens: int) -> bytes:
    return json.dumps({"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens,
                       "stream": True}).encode()


class Open:
    now = 0
    peak = 0


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes, outcome: Counter[str]) -> None:
    try:
        async with session.post(url, data=body, headers={"Authorization": f"Bearer {KEY}",
                                                         "Content-Type": "application/json"}) as r:
            Open.now += 1
            Open.peak = max(Open.peak, Open.now)
            try:
                text = await r.text()
            finally:
                Open.now -= 1
            if r.status != 200:
                outcome[f"http_{r.status}"] += 1
            elif text.rstrip().endswith("data: [DONE]"):
                outcome["whole"] += 1
            else:
                outcome["cut"] += 1
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        outcome[type(exc).__name__] += 1


async def drive(url: str, n: int, tokens: int, pid: int) -> tuple[Counter[str], float, float, float, int, int]:
    body = stream_body(tokens)
    outcome: Counter[str] = Counter()
    async with aiohttp.ClientSession() as s:  # one stream first: the process as it is after its first request
        await one_stream(s, url, stream_body(1), Counter())
    Open.peak = 0
    idle, idle_fds = rss_mb(pid), fds(pid)
    peak, peak_fds = idle, idle_fds
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak, peak_fds
        while not stop.is_set():
            peak, peak_fds = max(peak, rss_mb(pid)), max(peak_fds, fds(pid))
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as s:
        tasks = []
        for i in range(0, n, 500):  # in waves: a listen backlog of 1024 takes 500 at a time without drops
            tasks += [asyncio.create_task(one_stream(s, url, body, outcome)) for _ in range(min(500, n - i))]
            await asyncio.sleep(0.2)
        await asyncio.gather(*tasks)
    stop.set()
    await sampler
    return outcome, idle, peak, time.monotonic() - t0, idle_fds, peak_fds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=10_000)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--tokens-per-second", type=float, default=1.0)
    ap.add_argument("--leases", action="store_true", help="the tier takes budget leases (default: per-request holds)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The gateway holds two descriptors per stream: raise the limit (inherited by the processes started
    # below) to the hard limit, or above it where this process may (root, up to fs.nr_open).
    want = max(hard, 4 * args.streams + 1024)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        want = hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="kgate-streams-"))
    env = {**os.environ, "KGATE_LOG_LEVEL": "WARNING"}
    redis = RedisServer(port=0, appendonly=False)
    redis.start_sync()
    sim_port, port, admin = free_port(), free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "--listen", f"127.0.0.1:{sim_port}",
                               "--output-tokens", str(args.tokens), "--tokens-per-second",
                               str(args.tokens_per_second)], cwd=ROOT, env=env)]
    try:
        sim_url = f"http://127.0.0.1:{sim_port}"
        asyncio.run(wait_ready(sim_url + "/_sim/health", 30, procs[0]))
        doc = policy(sim_url, redis.url, tmp / "data")
        doc["tiers"]["bench"]["leases"] = args.leases
        pol = tmp / "bench.yaml"
        pol.write_text(yaml.safe_dump(doc))
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(pol), "--listen",
                                       f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}", "--store",
                                       redis.url], cwd=ROOT, env=env))
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_ready(url + "/readyz", 30, procs[1]))
        outcome, idle, peak, elapsed, idle_fds, peak_fds = asyncio.run(
            drive(url + "/v1/chat/completions", args.streams, args.tokens, procs[1].pid))
        held = args.tokens / args.tokens_per_second
        limit = nofile_limit(procs[1].pid)
        print(f"{args.streams} streams through one kgate process, each open ~{held:g} s "
              f"({args.tokens} tokens at {args.tokens_per_second:g}/s), {elapsed:.1f} s in all")
        print(f"  most streams open at once: {Open.peak}")
        print(f"  gateway RSS: idle {idle:.0f} MB, peak {peak:.0f} MB "
              f"({(peak - idle) * 1024 / max(Open.peak, 1):.1f} KB per open stream above idle)")
        need = 2 * args.streams + idle_fds
        print(f"  gateway descriptors: idle {idle_fds}, peak {peak_fds}, its limit {limit}"
              + (f" ({args.streams} streams open at once need {need})" if need > limit else ""))
        print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcome.items())))
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(60)
        redis.stop_sync()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
