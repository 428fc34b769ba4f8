"""``kgate serve --workers N`` (issue 18 item 3): several gateway processes behind one port, one embedded
store, one audit chain each; budgets shared exactly; SIGTERM drains all, SIGHUP reloads all, a worker that
dies is started again."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from gatewayutil import KEYS, audit_records, policy_dict, wait_ready

from gateway.ledger.redis_binary import free_port

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


class Supervisor:
    def __init__(self, tmp_path: Path, workers: int = 2):
        self.data = tmp_path / "data"
        pol = policy_dict("embedded", self.data, tight={
            "budgets": [{"metric": "requests", "window": "1h", "limit": 20}]})
        pol["server"]["replica_id"] = "gw"
        self.policy = tmp_path / "policy.yaml"
        self.policy.write_text(yaml.safe_dump(pol))
        self.port, self.admin = free_port(), free_port()
        while any(_busy(self.admin + i) or self.admin + i == self.port for i in range(workers)):
            self.admin = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "supervisor.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.policy), "--workers", str(workers),
             "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"),
            env={**os.environ, "KGATE_LOG_LEVEL": "INFO"})

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        pids = [int(x) for x in out.split()]
        # the embedded redis-server is a child too: keep the python workers
        return [p for p in pids if "gateway" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]


def sockets_left(data: Path) -> list[Path]:
    return list(data.glob("**/*.sock"))


def _busy(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    sup = Supervisor(tmp_path)
    yield sup
    if sup.proc.poll() is None:
        sup.proc.kill()
        sup.proc.wait(10)
    for pid in sup.worker_pids() if sup.proc.poll() is None else []:
        os.kill(pid, signal.SIGKILL)


async def chat(url: str, who: str = "tina") -> int:
    body = {"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    # A connection per request: the kernel spreads new connections over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
            s.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEYS[who]}"}) as r:
        await r.read()
        return r.status


async def test_workers_share_the_port_the_store_and_the_budgets(supervisor: Supervisor) -> None:
    sup = supervisor
    await wait_ready(sup.url + "/readyz", sup.proc, timeout=60)
    for i in range(2):
        await wait_ready(f"http://127.0.0.1:{sup.admin + i}/metrics", sup.proc, timeout=60)
    assert len(sup.worker_pids()) == 2
    statuses = Counter(await asyncio.gather(*(chat(sup.url) for _ in range(40))))
    assert statuses == {200: 20, 429: 20}, statuses  # one budget across both workers, exactly

    # SIGHUP reloads both workers (each writes an admin record of the reload attempt only when something
    # changed: change the policy, then look for both replicas' records).
    doc = yaml.safe_load(sup.policy.read_text())
    doc["tiers"]["tight"]["description"] = "reloaded"
    sup.policy.write_text(yaml.safe_dump(doc))
    sup.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        reloads = {r["replica"] for r in audit_records(sup.data / "audit", torn_ok=True)
                   if r.get("decision") == "admin" and r.get("reason") == "policy.reload"}
        if reloads >= {"gw-w0", "gw-w1"}:
            break
        await asyncio.sleep(0.2)
    assert reloads >= {"gw-w0", "gw-w1"}, reloads

    # A worker that dies is started again; the port keeps answering meanwhile.
    victim = sup.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = sup.worker_pids()
        if len(pids) == 2 and victim not in pids:
            break
        await asyncio.sleep(0.2)
    assert len(sup.worker_pids()) == 2 and victim not in sup.worker_pids()
    for i in range(2):
        await wait_ready(f"http://127.0.0.1:{sup.admin + i}/metrics", sup.proc, timeout=30)
    assert await chat(sup.url, "alice") == 200

    records = [r for r in audit_records(sup.data / "audit", torn_ok=True) if r.get("request_id")]
    assert {r["replica"] for r in records} >= {"gw-w0", "gw-w1"}  # both served requests
    # SIGTERM: every worker drains, the embedded Redis stops with them, status 0.
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(60) == 0, sup.log.read_text()[-2000:]
    assert not sup.worker_pids()
    assert "worker 0" in sup.log.read_text() and "starting it again" in sup.log.read_text()
    assert not sockets_left(sup.data), "the embedded Redis left its socket"


def test_plugin_listeners_need_one_process(tmp_path: Path) -> None:
    pol = policy_dict("embedded", tmp_path / "data")
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(pol))
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path), "--workers", "2",
                           "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
                           "--decision-listen", f"unix:{tmp_path}/d.sock"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "--workers 1" in done.stderr, done.stderr
    bad = subprocess.run([sys.executable, "-m", "gateway", "serve", "--workers", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "at least 1" in bad.stderr
