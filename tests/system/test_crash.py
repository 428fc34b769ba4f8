"""Crash safety (docs/design.md §6.3, §6.4; issue 6 item 3): `kgate serve` processes killed and stopped under load.

- SIGKILL mid-load: the holds of the requests in flight are leases that expire (a small lease here:
  ``total_timeout_seconds`` + ``store.lease_grace_seconds``) and are reclaimed by the next script touching
  the scope; the audit log verifies, and every answer a client saw complete has its record.
- SIGTERM: the gateway stops accepting, lets the streams in flight finish, settles them, flushes the audit
  log and exits 0.

The process helpers here are shared with tests/system/test_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from gatewayutil import KEYS, audit_records, policy_dict

from gateway.ledger.ledger import BudgetSpec, Ledger, ScopeRef
from gateway.ledger.redis_binary import free_port
from gateway.ledger.redis_server import RedisServer
from gateway.ledger.store import connect
from gateway.simulator.server import SimulatorOptions, start_simulator

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "What is the capital of France?"}]
TOTAL_TIMEOUT = 2.0  # upstream total_timeout_seconds: the lease is this plus LEASE_GRACE
LEASE_GRACE = 0.5


# ------------------------------------------------------------------------------------------ processes
class GatewayProcess:
    """One ``kgate serve`` process on fixed ports: start, wait until ready, SIGKILL, SIGTERM, start again."""

    def __init__(self, config: Path, store_url: str, log_path: Path):
        self.config, self.store_url, self.log_path = config, store_url, log_path
        self.port, self.admin_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayProcess:
        env = {**os.environ, "KGATE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config), "--listen",
                 f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin_port}", "--store",
                 self.store_url], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait until /readyz answers 200 (the store reachable, the policy loaded)."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"kgate serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.get(self.url + "/readyz") as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError(f"{self.url} never became ready:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, no cleanup."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Cleanup for fixtures: SIGTERM, then SIGKILL if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def write_policy(path: Path, store_url: str, data_dir: Path, *, sim_url: str = "simulator",
                 replica: str = "replica-0", leases: bool = False, **changes: Any) -> Path:
    """The test policy (tests/gatewayutil.py) with a small lease, big budgets and its own replica id. The
    budgets are rolling: a test that compares the ledger with the audit log must not see a fixed window
    turn (at the top of an hour) between its requests and its reading."""
    pol = policy_dict(store_url, data_dir, tight={
        "budgets": [{"metric": "generated_tokens", "window": "1d", "limit": 10_000_000, "rolling": True},
                    {"metric": "requests", "window": "1h", "limit": 1_000_000, "rolling": True}]})
    pol["store"].update(lease_grace_seconds=LEASE_GRACE)
    pol["upstreams"]["sim"].update(base_url=sim_url, total_timeout_seconds=TOTAL_TIMEOUT,
                                   read_timeout_seconds=TOTAL_TIMEOUT)
    pol["server"].update(replica_id=replica, drain_seconds=10)
    for tier in ("tight", "open"):
        pol["tiers"][tier]["leases"] = leases
    for key, value in changes.items():
        section, _, name = key.partition("__")
        pol[section][name] = value
    path.write_text(yaml.safe_dump(pol))
    return path


def tight_budgets(config_path: Path) -> list[BudgetSpec]:
    from gateway.policy.config import load_config

    return [BudgetSpec.from_config(b) for b in load_config(config_path).tiers["tight"].budgets]


def run_cli(*args: str) -> tuple[int, str]:
    """``kgate <args>`` in a thread of this process (gateway.cli.main), with its stdout."""
    import io
    from contextlib import redirect_stdout

    from gateway.cli import main

    result: dict[str, Any] = {}

    def target() -> None:
        buf = io.StringIO()
        with redirect_stdout(buf):
            try:
                result["code"] = main(list(args))
            except SystemExit as exc:
                result["code"] = int(exc.code or 0)
        result["out"] = buf.getvalue()

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    return result.get("code", -1), result.get("out", "")


# ----------------------------------------------------------------------------------------- the client
@dataclass
class Seen:
    """What one client request saw."""

    kind: str  # ok (complete answer) | http_<status> | stream_error | refused (no connection) | broken (cut off)
    request_id: str | None = None
    generated: int = 0
    stream: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    target: str = ""  # the gateway's URL
    started_at: float = 0.0  # monotonic: when the request was sent
    done_at: float = field(default_factory=time.monotonic)  # when the client had the whole answer


async def send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], who: str = "tina",
               headers: dict[str, str] | None = None) -> Seen:
    """One request; a stream is read to its end, and classified by how it ended."""
    started = time.monotonic()
    seen = await _send(session, url, body, who, headers)
    seen.target, seen.started_at = url, started
    return seen


async def _send(session: aiohttp.ClientSession, url: str, body: dict[str, Any], who: str,
                headers: dict[str, str] | None) -> Seen:
    stream = bool(body.get("stream"))
    h = {"Authorization": f"Bearer {KEYS[who]}", **(headers or {})}
    try:
        async with session.post(url + CHAT, json=body, headers=h, timeout=aiohttp.ClientTimeout(total=20)) as r:
            rid = r.headers.get("x-kgate-request-id")
            raw = await r.read()
    except aiohttp.ClientConnectorError:
        return Seen("refused", stream=stream)  # the gateway never saw it
    except (aiohttp.ClientError, TimeoutError):
        return Seen("broken", stream=stream)
    if r.status != 200:
        return Seen(f"http_{r.status}", rid, stream=stream)
    if not stream:
        return Seen("ok", rid, orjson.loads(raw)["usage"]["completion_tokens"])
    usage, error = None, None
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            doc = orjson.loads(line[6:])
            if doc.get("usage"):
                usage = doc["usage"]
            if "error" in doc:
                error = doc["error"]
    if error is not None or usage is None or not raw.rstrip().endswith(b"data: [DONE]"):
        return Seen("stream_error", rid, stream=True, extra={"error": error})
    return Seen("ok", rid, usage["completion_tokens"], stream=True)


def chat(stream: bool, max_tokens: int = 30) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "dense", "messages": MSG, "max_tokens": max_tokens}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def redis_srv(durable_redis: RedisServer) -> RedisServer:
    return durable_redis


@pytest.fixture
async def slow_sim() -> AsyncIterator[str]:
    """A simulator whose tokens take time (40 per second per sample): requests stay in flight."""
    runner, url = await start_simulator(SimulatorOptions(tokens_per_second=40, output_tokens=200))
    yield url
    await runner.cleanup()


@pytest.fixture
def processes() -> Iterator[list[GatewayProcess]]:
    procs: list[GatewayProcess] = []
    yield procs
    for p in procs:
        p.stop()


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
async def test_sigkill_mid_load_leaves_leases_that_expire_and_loses_no_acknowledged_record(
        tmp_path: Path, redis_srv: RedisServer, slow_sim: str, processes: list[GatewayProcess]) -> None:
    cfg = write_policy(tmp_path / "policy.yaml", redis_srv.url, tmp_path / "data", sim_url=slow_sim)
    audit_dir = tmp_path / "data" / "audit"
    gw = GatewayProcess(cfg, redis_srv.url, tmp_path / "gateway.log").start()
    processes.append(gw)
    await gw.ready()

    seen: list[Seen] = []
    stop = asyncio.Event()

    async def worker(i: int, session: aiohttp.ClientSession) -> None:
        n = 0
        while not stop.is_set():
            s = await send(session, gw.url, chat(stream=(i + n) % 2 == 0))
            seen.append(s)
            n += 1
            if s.kind in ("broken", "refused"):
                return

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(worker(i, session)) for i in range(8)]
        await asyncio.sleep(1.6)  # each request takes ~0.75 s: some finished, some in flight
        gw.kill()
        stop.set()
        await asyncio.gather(*tasks)

    ok = [s for s in seen if s.kind == "ok"]
    broken = [s for s in seen if s.kind == "broken"]
    assert ok and broken, [s.kind for s in seen]
    assert all(s.kind in ("ok", "broken", "refused") for s in seen), [s.kind for s in seen]

    # The killed process's leases are still held...
    client = await connect(redis_srv.url, timeout=2)
    ledger = Ledger(client)
    specs = tight_budgets(cfg)
    scope = ScopeRef("principal", "tina")
    gen, reqs = await ledger.state(scope, specs)
    assert reqs.held > 0

    # ...the audit log verifies, and every answer a client saw complete has its record.
    code, out = run_cli("audit", "verify", str(audit_dir))
    assert code == 0, out
    records = {r["request_id"]: r for r in audit_records(audit_dir, torn_ok=True) if r.get("request_id")}
    for s in ok:
        assert s.request_id in records, s
        rec = records[s.request_id]
        assert rec["decision"] == "allowed" and rec["usage"]["generated_tokens"] == s.generated

    # The leases expire and the next script touching the scope reclaims them (charged: lease_expiry charge).
    await asyncio.sleep(TOTAL_TIMEOUT + LEASE_GRACE + 0.2)
    gen, reqs = await ledger.state(scope, specs)
    assert gen.held == 0 and reqs.held == 0
    metered = [r for r in records.values() if r["decision"] == "allowed"]
    audit_generated = sum(r["usage"]["generated_tokens"] for r in metered)
    killed = reqs.used - len(metered)  # requests whose gateway died holding their lease
    assert 1 <= killed <= len(broken)
    # Each expired lease was charged its hold: the admission bound (30 tokens, one sample). (One request
    # may have settled its actual just before the kill, ahead of its audit record: hence the range.)
    assert 30 * (killed - 1) < gen.used - audit_generated <= 30 * killed
    assert ok_total(ok) == pytest.approx(audit_generated)

    # A restarted replica resumes the audit chain after the crash; reconcile explains the difference.
    gw.start()
    await gw.ready()
    async with aiohttp.ClientSession() as session:
        assert (await send(session, gw.url, chat(stream=False))).kind == "ok"
    gw.terminate()
    assert gw.wait(20) == 0
    code, out = run_cli("audit", "verify", str(audit_dir))
    assert code == 0, out
    code, out = run_cli("audit", "reconcile", "--config", str(cfg), "--store", redis_srv.url, "--format", "json",
                        str(audit_dir))
    doc = orjson.loads(out)
    assert code == 0 and doc["unexplained"] == 0, out
    rows = [r for r in doc["rows"] if r["id"] == "tina"]
    assert rows and all(r["explanation"].startswith(("match", "lease-expiry")) for r in rows), rows
    await client.aclose()


def ok_total(ok: list[Seen]) -> float:
    return float(sum(s.generated for s in ok))


async def test_sigterm_drains_streams_in_flight_then_exits_0(
        tmp_path: Path, redis_srv: RedisServer, slow_sim: str, processes: list[GatewayProcess]) -> None:
    cfg = write_policy(tmp_path / "policy.yaml", redis_srv.url, tmp_path / "data", sim_url=slow_sim)
    audit_dir = tmp_path / "data" / "audit"
    gw = GatewayProcess(cfg, redis_srv.url, tmp_path / "gateway.log").start()
    processes.append(gw)
    await gw.ready()

    started = [asyncio.Event() for _ in range(5)]

    async def stream(i: int) -> dict[str, Any]:
        body = {**chat(stream=True, max_tokens=40)}
        async with aiohttp.ClientSession() as s, s.post(
                gw.url + CHAT, json=body, headers={"Authorization": f"Bearer {KEYS['tina']}"}) as r:
            rid = r.headers["x-kgate-request-id"]
            raw = b""
            async for chunk in r.content.iter_any():
                raw += chunk
                started[i].set()
        usage = next(orjson.loads(line[6:])["usage"] for line in raw.split(b"\n")
                     if line.startswith(b"data: {") and orjson.loads(line[6:]).get("usage"))
        assert raw.rstrip().endswith(b"data: [DONE]")
        return {"id": rid, "generated": usage["completion_tokens"]}

    tasks = [asyncio.create_task(stream(i)) for i in range(5)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 10)
    t0 = time.monotonic()
    gw.terminate()
    # No new work is accepted while the streams run on.
    await asyncio.sleep(0.2)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectionError):
            await s.post(gw.url + CHAT, json=chat(stream=False), headers={"Authorization": f"Bearer {KEYS['tina']}"})
    results = await asyncio.wait_for(asyncio.gather(*tasks), 15)  # every stream finished, complete
    assert gw.wait(15) == 0
    assert time.monotonic() - t0 < 10
    assert "Traceback" not in gw.log_tail(500), gw.log_tail(500)

    records = {r["request_id"]: r for r in audit_records(audit_dir) if r.get("request_id")}
    for res in results:
        rec = records[res["id"]]
        assert rec["decision"] == "allowed" and rec["usage"]["generated_tokens"] == res["generated"]
    code, out = run_cli("audit", "verify", str(audit_dir))
    assert code == 0, out
    client = await connect(redis_srv.url, timeout=2)
    gen, reqs = await Ledger(client).state(ScopeRef("principal", "tina"), tight_budgets(cfg))
    assert (gen.used, gen.held) == (sum(r["generated"] for r in results), 0)
    assert (reqs.used, reqs.held) == (5, 0)
    await client.aclose()


async def test_a_second_sigterm_ends_the_drain_and_settles_the_cut_stream(
        tmp_path: Path, redis_srv: RedisServer, slow_sim: str, processes: list[GatewayProcess]) -> None:
    cfg = write_policy(tmp_path / "policy.yaml", redis_srv.url, tmp_path / "data", sim_url=slow_sim,
                       upstreams__sim={"base_url": slow_sim, "total_timeout_seconds": 60})
    audit_dir = tmp_path / "data" / "audit"
    gw = GatewayProcess(cfg, redis_srv.url, tmp_path / "gateway.log").start()
    processes.append(gw)
    await gw.ready()
    first = asyncio.Event()

    async def long_stream() -> tuple[str, bytes]:  # 200 tokens at 40 per second: 5 s
        raw = b""
        async with aiohttp.ClientSession() as s, s.post(
                gw.url + CHAT, json=chat(stream=True, max_tokens=200),
                headers={"Authorization": f"Bearer {KEYS['tina']}"}) as r:
            rid = r.headers["x-kgate-request-id"]
            with contextlib.suppress(aiohttp.ClientError):
                async for chunk in r.content.iter_any():
                    raw += chunk
                    first.set()
        return rid, raw

    task = asyncio.create_task(long_stream())
    await asyncio.wait_for(first.wait(), 10)
    t0 = time.monotonic()
    gw.terminate()
    await asyncio.sleep(0.3)
    gw.terminate()  # not willing to wait for the drain: stop now
    assert await asyncio.to_thread(gw.wait, 10) == 0
    assert time.monotonic() - t0 < 3.5
    assert "Traceback" not in gw.log_tail(500), gw.log_tail(500)
    rid, raw = await task
    assert not raw.rstrip().endswith(b"data: [DONE]")  # cut off

    records = {r["request_id"]: r for r in audit_records(audit_dir) if r.get("request_id")}
    assert records[rid]["decision"] == "partial"
    generated = records[rid]["usage"]["generated_tokens"]
    # Cut before its usage came: charged its bound (on_missing_usage: bound, the default), not the chunks seen.
    assert generated == 200 and records[rid]["usage"]["source"] == "bound"
    code, out = run_cli("audit", "verify", str(audit_dir))
    assert code == 0, out
    client = await connect(redis_srv.url, timeout=2)
    gen, _ = await Ledger(client).state(ScopeRef("principal", "tina"), tight_budgets(cfg))
    assert (gen.used, gen.held) == (generated, 0)
    await client.aclose()
