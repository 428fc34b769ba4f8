"""Throughput per core of ``kgate serve --workers N``: N = 1 and N = 2 (or --workers), side by side.

    python bench/workers_bench.py [--duration 5] [--runs 3] [--workers 1,2] [--no-leases]

Starts a Redis and ``kgate simulate`` (as ``gateway_bench.py`` does), then, taking turns per run, ``kgate serve
--workers N`` for each N on the same Redis and upstream, and drives each with wrk (JSON chat completions, 32
connections). Prints, per N, the median req/s, p50, the gateway processes' CPU per request (all workers,
from /proc), the throughput per core of gateway CPU (req/s divided by the cores its workers used) and how
busy the whole host was (all processes, /proc/stat, in cores). On a 2-core machine the simulator, Redis
and wrk share the cores with the workers: the gain from a second worker is bounded by what they leave.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_bench import BODY, ROOT, cpu_seconds, free_port, policy, run_python_load, run_wrk, wait_ready, warm_up

from gateway.ledger.redis_binary import free_ports
from gateway.ledger.redis_server import RedisServer


def host_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def run_once(n: int, pol: Path, redis_url: str, duration: float, tmp: Path, env: dict[str, str],
             use_wrk: bool = True) -> dict:
    port, admin = free_port(), free_ports(n)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(pol), "--workers", str(n),
                             "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                             "--store", redis_url], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(url + "/readyz", 60, proc))
        for i in range(n):
            asyncio.run(wait_ready(f"http://127.0.0.1:{admin + i}/metrics", 60, proc))
        asyncio.run(warm_up(url + "/v1/chat/completions"))
        pids = children(proc.pid) if n > 1 else [proc.pid]
        cpu0 = sum(cpu_seconds(p) for p in pids)
        busy0, _ = host_busy()
        t0 = time.monotonic()
        result = (run_wrk(url + "/v1/chat/completions", BODY, 32, duration, tmp) if use_wrk
                  else asyncio.run(run_python_load(url + "/v1/chat/completions", BODY, 32, duration)))
        elapsed = time.monotonic() - t0
        cpu = sum(cpu_seconds(p) for p in pids) - cpu0
        result["host"] = (host_busy()[0] - busy0) / elapsed
        requests = result["rps"] * elapsed
        result["cpu_us"] = cpu / requests * 1e6 if requests else 0.0
        result["cores"] = cpu / elapsed
        result["per_core"] = result["rps"] / result["cores"] if result["cores"] else 0.0
        return result
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", default="1,2", help="the worker counts to compare")
    ap.add_argument("--no-leases", action="store_true", help="every request holds for itself (leases: false)")
    ap.add_argument("--load", choices=("auto", "wrk", "python"), default="auto",
                    help="load generator: wrk, the Python one (slower: a smoke run), or wrk where installed")
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    use_wrk = args.load != "python" and shutil.which("wrk") is not None
    if args.load == "wrk" and not use_wrk:
        ap.error("wrk is not installed (apt-get install wrk), or use --load python")
    tmp = Path(tempfile.mkdtemp(prefix="kgate-workers-bench-"))
    env = {**os.environ, "KGATE_LOG_LEVEL": "WARNING"}
    redis = RedisServer(port=0, appendonly=False)
    redis.start_sync()
    sim_port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "--listen", f"127.0.0.1:{sim_port}",
                            "--output-tokens", "16"], cwd=ROOT, env=env)
    try:
        sim_url = f"http://127.0.0.1:{sim_port}"
        asyncio.run(wait_ready(sim_url + "/_sim/health", 30, sim))
        doc = policy(sim_url, redis.url, tmp / "data")
        doc["tiers"]["bench"]["leases"] = not args.no_leases
        pol = tmp / "bench.yaml"
        pol.write_text(yaml.safe_dump(doc))
        results: dict[int, list[dict]] = {n: [] for n in counts}
        for r in range(args.runs):
            for n in counts if r % 2 == 0 else list(reversed(counts)):  # taking turns at running first
                results[n].append(run_once(n, pol, redis.url, args.duration, tmp, env, use_wrk))
        load = "wrk" if use_wrk else "Python load"
        print(f"{load}, JSON chat completions, 32 connections, {args.runs} runs of {args.duration:g} s; medians"
              + (" (leases off)" if args.no_leases else " (leases on)") + f"; {os.cpu_count()} cores on this host")
        print(f"{'workers':>8}{'req/s':>10}{'p50 ms':>10}{'CPU us/req':>12}{'cores used':>12}{'req/s per core':>16}"
              f"{'host busy':>11}")
        for n in counts:
            rs = results[n]
            med = {k: statistics.median(x[k] for x in rs)
                   for k in ("rps", "p50_ms", "cpu_us", "cores", "per_core", "host")}
            print(f"{n:>8}{med['rps']:>10.0f}{med['p50_ms']:>10.2f}{med['cpu_us']:>12.0f}{med['cores']:>12.2f}"
                  f"{med['per_core']:>16.0f}{med['host']:>11.2f}")
        print("cores used: the gateway workers' CPU over the wall time; host busy: every process's, in cores")
    finally:
        sim.terminate()
        sim.wait(15)
        redis.stop_sync()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
