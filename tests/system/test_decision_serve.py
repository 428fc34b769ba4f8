"""`kgate serve --decision-listen`: the decision API of a real `kgate serve` process, over a Unix socket and
with a bearer token on TCP; a request admitted and never settled is settled and recorded when kgate stops."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import yaml
from gatewayutil import wait_ready

from gateway.ledger.redis_binary import free_port

ROOT = Path(__file__).resolve().parents[2]
DEMO = {"Authorization": "Bearer kgate-demo-key"}


async def test_kgate_serve_serves_the_decision_api(tmp_path: Path) -> None:
    work = tmp_path / "fresh"
    work.mkdir()
    shutil.copytree(ROOT / "policies", work / "policies")
    policy = yaml.safe_load((work / "policies" / "example.yaml").read_text())
    policy.setdefault("server", {})["drain_seconds"] = 1  # a request never settled waits this long at a stop
    (work / "policies" / "example.yaml").write_text(yaml.safe_dump(policy))
    port, admin, decision = free_port(), free_port(), free_port()
    sock = tmp_path / "d.sock"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KGATE_")}, "KGATE_DECISION_TOKEN": "tok"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",  # noqa: ASYNC220
                             "--admin-listen", f"127.0.0.1:{admin}", "--decision-listen", f"unix:{sock}",
                             "--decision-listen", f"127.0.0.1:{decision}"], cwd=work, env=env,
                            stderr=subprocess.PIPE)
    body = orjson.dumps({"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}]}).decode()
    admit = {"path": "/v1/chat/completions", "headers": DEMO, "body": body}
    try:
        await wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        auth = {"Authorization": "Bearer tok"}
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s:
            async with s.post("http://kgate/v1/admit", json=admit) as r:
                assert r.status == 401  # the token is required on the socket too, once it is set
            async with s.post("http://kgate/v1/admit", json=admit, headers=auth) as r:
                served = await r.json()
            assert served["decision"] == "allow", served
            async with s.post("http://kgate/v1/settle", headers=auth, json={
                    "request_id": served["request_id"], "status": 200, "final": True,
                    "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}}) as r:
                assert (await r.json())["charged"]["output_tokens"] == 7
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{decision}/v1/admit", json=admit, headers=auth) as r:
                waiting = await r.json()
            assert waiting["decision"] == "allow"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    log = err.decode()
    assert proc.returncode == 0, log[-2000:]
    assert "Traceback" not in log and "decision API on" in log
    records = {}
    for f in (work / ".kgate" / "audit").rglob("audit-*.jsonl"):
        for line in f.read_bytes().splitlines():
            rec = orjson.loads(line)
            records[rec.get("request_id")] = rec
    assert records[served["request_id"]]["decision"] == "allowed"
    assert records[served["request_id"]]["usage"]["output_tokens"] == 7
    # admitted, never settled: charged (the bound) and recorded at shutdown, never forgotten
    left = records[waiting["request_id"]]
    assert left["decision"] == "partial" and "shut down" in left["reason"], left
