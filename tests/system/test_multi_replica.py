"""Two `kgate serve` processes sharing one Redis never overspend a shared budget (issue 4, docs/design.md §3)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import yaml
from gatewayutil import KEYS, audit_records, policy_dict, wait_ready

from gateway.ledger.redis_binary import free_port
from gateway.ledger.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[False, True], ids=["per-request", "leases"])
def cluster_of_two(tmp_path: Path, request: pytest.FixtureRequest):
    redis = RedisServer(port=0, appendonly=False)
    redis.start_sync()
    sim_port = free_port()
    env = {**os.environ, "KGATE_LOG_LEVEL": "WARNING"}
    procs = [subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "--listen", f"127.0.0.1:{sim_port}",
                               "--output-tokens", "20"], cwd=ROOT, env=env)]
    pol = policy_dict(redis.url, tmp_path / "data", tight={
        "budgets": [{"metric": "requests", "window": "1h", "limit": 37},
                    {"metric": "generated_tokens", "window": "1d", "limit": 100_000}],
        "leases": request.param})
    pol["upstreams"]["sim"]["base_url"] = f"http://127.0.0.1:{sim_port}"
    urls = []
    for i in range(2):
        cfg = tmp_path / f"policy{i}.yaml"
        pol["audit"]["dir"] = str(tmp_path / "audit")
        pol["server"]["replica_id"] = f"replica-{i}"
        cfg.write_text(yaml.safe_dump(pol))
        port, admin = free_port(), free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg),
                                       "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                                       "--store", redis.url], cwd=ROOT, env=env))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        yield urls, redis, tmp_path / "audit"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        redis.stop_sync()
        redis.cleanup()


async def test_two_gateways_never_overspend(cluster_of_two):
    urls, _redis, audit_dir = cluster_of_two
    for u in urls:
        await wait_ready(u + "/readyz")
    body = {"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30}
    headers = {"Authorization": f"Bearer {KEYS['tina']}"}
    statuses: Counter[int] = Counter()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as s:
        async def one(i: int) -> None:
            async with s.post(urls[i % 2] + "/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
                statuses[r.status] += 1

        # Each replica's first requests one by one: with leases, they see the room left and slices come.
        for i in range(4):
            await one(i)
        await asyncio.sleep(0.2)
        await asyncio.gather(*(one(i) for i in range(4, 300)))
    assert statuses[200] == 37, statuses
    assert statuses[429] == 300 - 37, statuses

    # Both replicas wrote audit chains that verify, and together they record exactly the admitted requests
    # (and each refused one, once). A record may land just after its answer: wait for the count, then check.
    for _ in range(200):  # up to 10 s
        if len([r for r in audit_records(audit_dir, torn_ok=True) if r.get("request_id")]) >= 300:
            break
        await asyncio.sleep(0.05)
    from gateway.audit.verify import verify_main

    assert verify_main([str(audit_dir)]) == 0
    records = [r for r in audit_records(audit_dir) if r.get("request_id")]
    assert len({r["request_id"] for r in records}) == len(records) == 300
    assert Counter(r["decision"] for r in records) == {"allowed": 37, "denied": 300 - 37}
    assert Counter(r["replica"] for r in records) == {"replica-0": 150, "replica-1": 150}
