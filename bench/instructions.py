"""Instructions per request: the simulator alone and kgate, counted by valgrind (callgrind), not timed.

    python bench/instructions.py [--requests 400] [--concurrency 8] [--tree DIR ...]

Wall-clock figures on a shared VM move by ±20% from one minute to the next; an instruction count does
not (the same code and load give the same count to within half a percent). This script starts a Redis and
``kgate simulate`` as in ``gateway_bench.py``, then runs ``kgate serve`` — from this checkout, or from each
``--tree`` given (another checkout, to compare two versions side by side) — under
``valgrind --tool=callgrind`` with instrumentation off while it starts. It warms the gateway up, switches
counting on, sends ``--requests`` non-streaming chat completions over ``--concurrency`` keep-alive
connections, and reads the count. The simulator is measured the same way. Counted: every instruction the
process executes in user space, all threads. Not counted: the kernel (syscalls, the loopback network), and
time waiting. So this is the CPU work per request that code changes can move; ``gateway_bench.py`` gives
the wall-clock figures.

Needs valgrind (``apt-get install valgrind``). A run takes about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import BODY, KEY, ROOT, free_port, policy, wait_ready

from gateway.redis_server import RedisServer

_PAYLOAD = json.dumps(BODY).encode()
_REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(_PAYLOAD)).encode()
            + b"\r\n\r\n" + _PAYLOAD)


async def send(port: int, total: int, concurrency: int) -> None:
    """``total`` requests over ``concurrency`` keep-alive connections, each answer read whole."""

    async def connection(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(count):
                writer.write(_REQUEST)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"unexpected answer: {head[:200]!r}")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length is None:
                    raise RuntimeError("answer without Content-Length")
                await reader.readexactly(int(length.group(1)))
        finally:
            writer.close()

    share, extra = divmod(total, concurrency)
    await asyncio.gather(*(connection(share + (i < extra)) for i in range(concurrency)))


def callgrind_count(out_prefix: str) -> int:
    """The instruction total of the newest callgrind dump."""
    newest = max(glob.glob(out_prefix + ".*"), key=os.path.getmtime)
    match = re.search(r"^(?:summary|totals): (\d+)", Path(newest).read_text(), re.M)
    if match is None:
        raise RuntimeError(f"no totals in {newest}")
    return int(match.group(1))


def measure(command: list[str], cwd: Path, ready_url: str, port: int, out_prefix: str, requests: int,
            concurrency: int, env: dict[str, str]) -> float:
    """Instructions per request of the server that ``command`` starts, under callgrind."""
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                             f"--callgrind-out-file={out_prefix}", *command],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(wait_ready(ready_url, timeout=300))
        asyncio.run(send(port, 50, 4))  # imports, caches and connection pools: not part of the count
        control = ["callgrind_control"]
        subprocess.run([*control, "--instr=on", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(send(port, 50, 4))  # the same again with instrumentation on, then start from zero
        subprocess.run([*control, "--zero", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(send(port, requests, concurrency))
        subprocess.run([*control, "--dump", str(proc.pid)], check=True, capture_output=True)
        return callgrind_count(out_prefix) / requests
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="requests counted per server")
    ap.add_argument("--concurrency", type=int, default=8, help="keep-alive connections")
    ap.add_argument("--tree", action="append", default=[],
                    help="a kgate checkout whose gateway to measure (repeatable; default: this one)")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed (apt-get install valgrind)")
    trees = [Path(t).resolve() for t in args.tree] or [ROOT]
    tmp = Path(tempfile.mkdtemp(prefix="kgate-instr-"))
    env = {**os.environ, "KGATE_LOG_LEVEL": "WARNING"}
    redis = RedisServer(port=0, appendonly=False)
    redis.start_sync()
    sim_proc: subprocess.Popen[bytes] | None = None
    try:
        sim_port = free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        simulate = [sys.executable, "-m", "gateway", "simulate", "--listen", f"127.0.0.1:{sim_port}",
                    "--output-tokens", "16"]
        sim_ir = measure(simulate, ROOT, sim_url + "/_sim/health", sim_port, str(tmp / "sim.out"),
                         args.requests, args.concurrency, env)
        # The simulator again, uninstrumented, as the gateway's upstream.
        sim_proc = subprocess.Popen(simulate, cwd=ROOT, env=env)
        asyncio.run(wait_ready(sim_url + "/_sim/health"))
        print(f"{'server':<40}{'instructions/request':>22}{'vs simulator':>14}")
        print(f"{'kgate simulate':<40}{sim_ir:>22,.0f}{1:>14.2f}")
        for i, tree in enumerate(trees):
            port, admin = free_port(), free_port()
            pol = tmp / f"policy-{i}.yaml"
            pol.write_text(yaml.safe_dump(policy(sim_url, redis.url, tmp / f"data-{i}")))
            serve = [sys.executable, "-m", "gateway", "serve", "--config", str(pol), "--listen", f"127.0.0.1:{port}",
                     "--admin-listen", f"127.0.0.1:{admin}", "--store", redis.url]
            gw_ir = measure(serve, tree, f"http://127.0.0.1:{port}/readyz", port, str(tmp / f"gw-{i}.out"),
                            args.requests, args.concurrency, env)
            label = "kgate serve" + ("" if tree == ROOT else f" ({tree})")
            print(f"{label:<40}{gw_ir:>22,.0f}{gw_ir / sim_ir:>14.2f}")
    finally:
        if sim_proc is not None:
            sim_proc.terminate()
            sim_proc.wait(timeout=15)
        redis.stop_sync()
        redis.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
