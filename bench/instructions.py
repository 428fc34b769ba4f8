"""Instructions per request: the simulator alone, kgate, and the Redis behind kgate, counted by valgrind
(callgrind), not timed.

    python bench/instructions.py [--requests 400] [--concurrency 8] [--stream] [--tree DIR ...] [--keep DIR]

Wall-clock figures on a shared VM move by ±20% from one minute to the next; an instruction count does
not (the same code and load give the same count to within half a percent). This script starts a Redis and
``kgate simulate`` as in ``gateway_bench.py``, then runs ``kgate serve`` — from this checkout, or from each
``--tree`` given (another checkout, to compare two versions side by side) — under
``valgrind --tool=callgrind`` with instrumentation off while it starts. It warms the gateway up, switches
counting on, sends ``--requests`` chat completions (JSON; streamed with ``--stream``) over ``--concurrency``
keep-alive connections, and reads the count. The simulator is measured the same way, and so is the Redis (also under
callgrind) while it serves the gateway's counted requests: on a 2-core machine the ledger's scripts
compete with the gateway for the same CPUs, so their cost matters as much as the gateway's own. Counted:
every instruction the process executes in user space, all threads. Not counted: the kernel (syscalls, the
loopback network), and time waiting. So this is the CPU work per request that code changes can move;
``gateway_bench.py`` gives the wall-clock figures.

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
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway_bench import BODY, KEY, ROOT, STREAM_BODY, free_port, policy, wait_ready

from gateway.ledger.redis_binary import find_redis_binary


def _request(body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(payload)).encode()
            + b"\r\n\r\n" + payload)


async def send(port: int, total: int, concurrency: int, stream: bool = False) -> None:
    """``total`` requests over ``concurrency`` keep-alive connections, each answer read whole (a stream:
    to its last chunk)."""
    request = _request(STREAM_BODY if stream else BODY)

    async def connection(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(count):
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"unexpected answer: {head[:200]!r}")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length is not None:
                    await reader.readexactly(int(length.group(1)))
                elif re.search(rb"(?i)\r\ntransfer-encoding: *chunked", head):
                    await reader.readuntil(b"\r\n0\r\n\r\n")  # SSE data never holds a CRLF
                else:
                    raise RuntimeError("answer without Content-Length or chunks")
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


def callgrind(out_prefix: str, command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``command`` under callgrind, counting nothing until told to."""
    return subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                             f"--callgrind-out-file={out_prefix}", *command],
                            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ask_redis(port: int, command: bytes) -> bytes:
    """One inline command to the Redis on ``port``; the start of its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(command + b"\r\n")
        return conn.recv(64)


def wait_redis(port: int, timeout: float = 120.0) -> None:
    """Until the Redis on ``port`` answers PING (under valgrind it takes a few seconds to start)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ask_redis(port, b"PING").startswith(b"+PONG"):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis on port {port} did not start")
        time.sleep(0.2)


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(command: list[str], cwd: Path, ready_url: str, port: int, out_prefix: str, requests: int,
            concurrency: int, env: dict[str, str], redis: tuple[int, str] | None = None,
            stream: bool = False) -> tuple[float, float]:
    """Instructions per request of the server that ``command`` starts, under callgrind, and of the Redis
    (pid, callgrind file prefix) behind it while it serves the counted requests (0 without one)."""
    proc = callgrind(out_prefix, command, cwd, env)
    try:
        asyncio.run(wait_ready(ready_url, timeout=300))
        asyncio.run(send(port, 50, 4, stream))  # imports, caches and connection pools: not part of the count
        pids = [str(proc.pid)] + ([str(redis[0])] if redis else [])
        for pid in pids:
            control("--instr=on", pid)
        asyncio.run(send(port, 50, 4, stream))  # the same again with instrumentation on, then start from zero
        for pid in pids:
            control("--zero", pid)
        asyncio.run(send(port, requests, concurrency, stream))
        for pid in pids:
            control("--dump", pid)
        if redis:
            control("--instr=off", str(redis[0]))
        return (callgrind_count(out_prefix) / requests,
                callgrind_count(redis[1]) / requests if redis else 0.0)
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="requests counted per server")
    ap.add_argument("--concurrency", type=int, default=8, help="keep-alive connections")
    ap.add_argument("--stream", action="store_true", help="streamed chat completions instead of JSON ones")
    ap.add_argument("--tree", action="append", default=[],
                    help="a kgate checkout whose gateway to measure (repeatable; default: this one)")
    ap.add_argument("--leases", action="store_true",
                    help="measure each gateway twice, with tiers.bench.leases false and true (trees that know it)")
    ap.add_argument("--keep", metavar="DIR",
                    help="keep the callgrind files here (read them with callgrind_annotate --inclusive=yes)")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not installed (apt-get install valgrind)")
    trees = [Path(t).resolve() for t in args.tree] or [ROOT]
    tmp = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="kgate-instr-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KGATE_LOG_LEVEL": "WARNING"}
    redis_port = free_port()
    redis_out = str(tmp / "redis.out")
    redis = callgrind(redis_out, [str(find_redis_binary()), "--port", str(redis_port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no", "--dir", str(tmp)], tmp, env)
    redis_url = f"redis://127.0.0.1:{redis_port}"
    sim_proc: subprocess.Popen[bytes] | None = None
    try:
        wait_redis(redis_port)
        sim_port = free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        simulate = [sys.executable, "-m", "gateway", "simulate", "--listen", f"127.0.0.1:{sim_port}",
                    "--output-tokens", "16"]
        sim_ir, _ = measure(simulate, ROOT, sim_url + "/_sim/health", sim_port, str(tmp / "sim.out"),
                            args.requests, args.concurrency, env, stream=args.stream)
        # The simulator again, uninstrumented, as the gateway's upstream.
        sim_proc = subprocess.Popen(simulate, cwd=ROOT, env=env)
        asyncio.run(wait_ready(sim_url + "/_sim/health"))
        print(f"{'server':<40}{'instructions/request':>22}{'vs simulator':>14}{'redis/request':>16}")
        print(f"{'kgate simulate':<40}{sim_ir:>22,.0f}{1:>14.2f}")
        runs = [(tree, leases) for tree in trees for leases in ((False, True) if args.leases else (None,))]
        for i, (tree, leases) in enumerate(runs):
            # Each gateway starts on an empty Redis: a checkout measured after another would otherwise find
            # the scope's keys grown (the finished-request set past its compact encoding) and do 2-3% less.
            if not ask_redis(redis_port, b"FLUSHALL").startswith(b"+OK"):
                raise RuntimeError("FLUSHALL failed")
            port, admin = free_port(), free_port()
            pol = tmp / f"policy-{i}.yaml"
            doc = policy(sim_url, redis_url, tmp / f"data-{i}")
            if leases is not None:
                doc["tiers"]["bench"]["leases"] = leases
            pol.write_text(yaml.safe_dump(doc))
            serve = [sys.executable, "-m", "gateway", "serve", "--config", str(pol), "--listen", f"127.0.0.1:{port}",
                     "--admin-listen", f"127.0.0.1:{admin}", "--store", redis_url]
            gw_ir, redis_ir = measure(serve, tree, f"http://127.0.0.1:{port}/readyz", port, str(tmp / f"gw-{i}.out"),
                                      args.requests, args.concurrency, env, (redis.pid, redis_out), args.stream)
            label = "kgate serve" + ("" if tree == ROOT else f" ({tree})") + {None: "", True: " leases",
                                                                                False: " per-request"}[leases]
            print(f"{label:<40}{gw_ir:>22,.0f}{gw_ir / sim_ir:>14.2f}{redis_ir:>16,.0f}")
    finally:
        if sim_proc is not None:
            sim_proc.terminate()
            sim_proc.wait(timeout=15)
        stop(redis)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
