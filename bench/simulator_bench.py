"""Self-benchmark of the upstream simulator alone: non-streamed chat requests per second.

    python bench/simulator_bench.py [--connections 32] [--duration 10] [--workers 1] [--stream]

Starts ``run_simulator`` in a child process on a free port, then drives it with ``wrk`` (a Lua script
for the POST body) when it is on PATH, else with an aiohttp client (which, on a small machine, measures
the client more than the server). Prints one JSON object: requests/s, latency, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BODY: dict[str, object] = {
    "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello to the benchmark, please."}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(port: int, workers: int) -> subprocess.Popen[bytes]:
    code = ("import sys; from gateway.simulator.server import run_simulator, SimulatorOptions; "
            f"sys.exit(run_simulator('127.0.0.1:{port}', SimulatorOptions(), workers={workers}))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    for _ in range(200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("simulator did not start")


def _wrk(url: str, body: dict[str, object], connections: int, duration: int,
         threads: int) -> dict[str, object]:
    lua = ('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
           f"wrk.body = {json.dumps(json.dumps(body))}\n")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
    try:
        out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "-s", f.name,
                              "--latency", url], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    p50 = re.search(r"50%\s+(\S+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    return {"client": "wrk", "requests_per_second": rps, "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "latency_p50": p50.group(1) if p50 else None, "latency_p99": p99.group(1) if p99 else None}


async def _python_client(url: str, body: dict[str, object], connections: int,
                         duration: int) -> dict[str, object]:
    import aiohttp

    payload = json.dumps(body).encode()
    done = errors = 0
    deadline = time.monotonic() + duration
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < deadline:
                async with s.post(url, data=payload, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    done += 1
                    errors += r.status != 200
        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - t0
    return {"client": "aiohttp", "requests_per_second": round(done / elapsed, 1), "non_2xx": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1, help="simulator processes (SO_REUSEPORT)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--stream", action="store_true", help="streamed requests (64 chunks each)")
    args = ap.parse_args()
    port = _free_port()
    proc = _start(port, args.workers)
    body = {**BODY, "stream": True} if args.stream else BODY
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        if shutil.which("wrk"):
            result = _wrk(url, body, args.connections, args.duration, args.threads)
        else:
            result = asyncio.run(_python_client(url, body, args.connections, args.duration))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    result.update(connections=args.connections, duration_s=args.duration, workers=args.workers,
                  stream=args.stream, cpus=os.cpu_count())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
