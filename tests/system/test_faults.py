"""The fault-injection suite (issue 6 item 6): mixed load through two `kgate serve` replicas while Redis is
killed and restarted, replicas are SIGKILLed and restarted, and the simulator fails mid-stream — then the
ledger, the audit log and what the clients saw must agree: nothing lost, nothing counted twice.

Timeline (seconds from the start of the load):

- 1.5  Redis killed (SIGKILL). ``tina`` (on_store_error: deny) gets 503s; ``olga`` (allow) is served and
       its usage spooled; requests in flight whose settle fails are spooled too.
- 2.5  replica-1 SIGKILLed while its spool holds usage the ledger has not seen.
- 3.5  Redis restarted on the same port (AOF with ``appendfsync always``: nothing acknowledged is lost).
- 4.0  replica-1 restarted: it replays the spool it left behind and resumes its audit chain.
- 5.5  replica-0 SIGKILLed with requests in flight: their holds are leases that expire and are charged.
- 6.5  replica-0 restarted.
- 8.0  load stops; the leases expire; both replicas get SIGTERM and must exit 0.

Throughout, the simulator cuts about one answer in ten mid-stream (a JSON answer in half). The checks:
``kgate audit verify`` and ``kgate audit reconcile`` pass; every answer a client saw has the audit record
its outcome implies; per principal, the ledger equals the audit totals plus at most the holds of requests
whose replica died under them (charged by lease expiry), and never less.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from gatewayutil import audit_records, wait_ready
from test_crash import ROOT, GatewayProcess, Seen, chat, run_cli, send, write_policy

from gateway.ledger.ledger import BudgetSpec, Ledger, ScopeRef
from gateway.ledger.redis_binary import free_port
from gateway.ledger.redis_server import RedisServer
from gateway.ledger.store import connect
from gateway.policy.config import load_config
from gateway.policy.windows import fixed_window

pytestmark = [pytest.mark.faults, pytest.mark.slow]

LOAD_SECONDS = 8.0
WORKERS = 16
PRINCIPALS = ("tina", "olga")  # tiers tight (on_store_error: deny) and open (allow)
METERED = ("allowed", "clamped", "partial", "spooled", "replayed")


@pytest.fixture
def redis_srv(durable_redis: RedisServer) -> RedisServer:
    return durable_redis


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[str]:
    """`kgate simulate` in its own process: 150 tokens/s per sample, one answer in ten cut mid-way."""
    port = free_port()
    env = {**os.environ, "KGATE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "simulator.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "--listen", f"127.0.0.1:{port}",
                                 "--tokens-per-second", "150", "--output-tokens", "40",
                                 "--fault", "midstream,after=4,rate=0.1"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=[False, True], ids=["per-request", "leases"])
def replicas(tmp_path: Path, redis_srv: RedisServer, simulator: str,
             request: pytest.FixtureRequest) -> Iterator[list[GatewayProcess]]:
    procs = []
    for i in range(2):
        cfg = write_policy(tmp_path / f"policy{i}.yaml", redis_srv.url, tmp_path / "data", sim_url=simulator,
                           replica=f"replica-{i}", leases=request.param)
        procs.append(GatewayProcess(cfg, redis_srv.url, tmp_path / f"replica-{i}.log"))
    yield procs
    for p in procs:
        p.stop()


async def test_faults_ledger_audit_and_clients_agree(tmp_path: Path, redis_srv: RedisServer, simulator: str,
                                                    replicas: list[GatewayProcess],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    for p in replicas:
        p.start()
    await asyncio.gather(*(p.ready() for p in replicas), wait_ready(simulator + "/_sim/health"))
    rng = random.Random(6)
    seen: list[tuple[str, int, dict[str, Any], Seen]] = []  # (principal, max_tokens, body, what was seen)
    stop = asyncio.Event()

    async def worker(w: int, session: aiohttp.ClientSession) -> None:
        n = 0
        while not stop.is_set():
            who = PRINCIPALS[(w + n) % 2]
            body = chat(stream=rng.random() < 0.5, max_tokens=rng.randrange(8, 33))
            s = await send(session, replicas[(w + n // 2) % 2].url, body, who=who)  # each on both replicas
            seen.append((who, body["max_tokens"], body, s))
            n += 1
            if s.kind in ("refused", "http_503"):
                await asyncio.sleep(0.05)  # a dead replica or store answers at once: back off, do not spin

    killed: dict[str, list[float]] = defaultdict(list)  # replica URL -> when it was SIGKILLed
    cfg = load_config(replicas[0].config)
    specs = {who: [BudgetSpec.from_config(b) for b in cfg.tiers[tier].budgets]
             for who, tier in (("tina", "tight"), ("olga", "open"))}
    leasing = cfg.tiers["tight"].leases
    # With budget leases, a replica that dies leaves its slices (unused parts too) to their lease, charged
    # in full: what it can leave is at most what was held on the scope just before it died.
    slices: dict[tuple[str, str], float] = defaultdict(float)

    async def note_held() -> None:
        if not leasing:
            return
        client = await connect(redis_srv.url, timeout=2)
        try:
            for who in PRINCIPALS:
                for st in await Ledger(client).state(ScopeRef("principal", who), specs[who]):
                    slices[(who, st.budget.label)] += st.held
        finally:
            await client.aclose()

    async def kill(p: GatewayProcess) -> None:
        await asyncio.to_thread(p.kill)
        killed[p.url].append(time.monotonic())

    store_killing = (0.0, 0.0)  # monotonic: (kill sent, kill done)

    async def faults() -> None:
        nonlocal store_killing
        await asyncio.sleep(1.5)
        await note_held()  # replica-1 dies while Redis is away: what it holds now bounds what it leaves
        t = time.monotonic()
        await asyncio.to_thread(redis_srv.kill_sync)
        store_killing = (t, time.monotonic())
        await asyncio.sleep(1.0)
        await kill(replicas[1])
        await asyncio.sleep(1.0)
        await asyncio.to_thread(redis_srv.start_sync)
        await asyncio.sleep(0.5)
        replicas[1].start()
        await replicas[1].ready()
        await asyncio.sleep(1.0)
        await note_held()
        await kill(replicas[0])
        await asyncio.sleep(1.0)
        replicas[0].start()
        await replicas[0].ready()

    t0, wall_start = time.monotonic(), time.time()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(worker(w, session)) for w in range(WORKERS)]
        await faults()
        await asyncio.sleep(max(0.0, LOAD_SECONDS - (time.monotonic() - t0)))
        stop.set()
        await asyncio.gather(*tasks)

    # Quiesce: the spools drain into the ledger, the leases of the killed replica expire.
    client = await connect(redis_srv.url, timeout=2)
    ledger = Ledger(client)
    spool_dir = Path(cfg.store.data_dir) / "spool"
    deadline = time.monotonic() + 15
    while True:
        states = {who: await ledger.state(ScopeRef("principal", who), specs[who]) for who in PRINCIPALS}
        held = sum(st.held for sts in states.values() for st in sts)
        spooled = sum(f.stat().st_size for f in spool_dir.glob("*.jsonl")) if spool_dir.exists() else 0
        if held == 0 and spooled == 0:
            break
        assert time.monotonic() < deadline, f"still held {held}, spooled {spooled} bytes"
        await asyncio.sleep(0.2)

    for p in replicas:
        p.terminate()
    codes = [p.wait(30) for p in replicas]

    # ------------------------------------------------------------------------------------------ checks
    audit_dir = Path(cfg.audit.dir)
    discrepancies: list[str] = []
    if codes != [0, 0]:
        discrepancies.append(f"replica exit codes {codes} after SIGTERM")
    code, out = run_cli("audit", "verify", str(audit_dir))
    if code != 0:
        discrepancies.append(f"audit verify: {out.strip()}")
    code, out = run_cli("audit", "reconcile", "--config", str(replicas[0].config), "--store", redis_srv.url,
                        "--format", "json", str(audit_dir))
    report = orjson.loads(out) if out.strip().startswith("{") else {"unexplained": -1, "rows": []}
    if code != 0 or report["unexplained"]:
        discrepancies.append(f"audit reconcile (exit {code}): {out.strip()[:2000]}")

    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in audit_records(audit_dir, torn_ok=True):
        if r.get("request_id"):
            records[r["request_id"]].append(r)
    problems, lost_with_replica = _clients_against_audit(seen, records, killed)
    discrepancies += problems
    problems, margins = _ledger_against_audit(seen, records, states, store_killing, wall_start, killed, slices)
    discrepancies += problems

    outcomes = Counter(s.kind for _, _, _, s in seen)
    decisions = Counter(rs[0]["decision"] for rs in records.values())
    replayed = sum(1 for rs in records.values() if any(r["decision"] == "replayed" for r in rs))
    summary = [
        f"fault suite: {len(seen)} requests sent in {LOAD_SECONDS:.0f} s through 2 replicas",
        "  outcomes seen by clients: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        "  audit decisions: " + ", ".join(f"{k} {v}" for k, v in sorted(decisions.items()))
        + f"; replayed from spools {replayed}",
        f"  error answers whose record died with their replica (written after the answer): {lost_with_replica}",
        *("  " + line for line in margins),
        f"  discrepancies: {len(discrepancies)}",
        *("   - " + d for d in discrepancies),
    ]
    with capsys.disabled():  # the summary is the point of the suite: shown even when output is captured
        print("\n" + "\n".join(summary))
    assert not discrepancies
    # The faults happened: the suite is pointless if they did not.
    assert outcomes["ok"] and outcomes["broken"] and outcomes["http_503"], outcomes
    assert outcomes["stream_error"] or outcomes["http_502"], outcomes
    await client.aclose()


def _clients_against_audit(seen: list[tuple[str, int, dict[str, Any], Seen]],
                           records: dict[str, list[dict[str, Any]]],
                           killed: dict[str, list[float]]) -> tuple[list[str], int]:
    """Every complete answer a client saw has the record its outcome implies; so does every error answer,
    unless its replica was SIGKILLed right after it (a gateway that writes an error's record after the
    answer may lose it then). Returns (discrepancies, error answers excused that way)."""
    excused = 0
    expected = {"ok": ("allowed", "spooled"), "stream_error": ("partial",), "http_503": ("denied",),
                # a 502 after the answer began (a JSON body cut in half) is charged, so it is "partial"
                "http_502": ("failed", "partial")}
    out = []
    for who, _, _, s in seen:
        if s.kind == "refused":
            continue  # a dead replica: the gateway never saw it
        if s.kind == "broken":
            continue  # cut off by its replica's death: a record may or may not exist
        if s.kind not in expected:
            out.append(f"{who}: unexpected outcome {s.kind} (request {s.request_id})")
            continue
        first = records.get(s.request_id or "", [])
        if not first:
            if s.kind != "ok" and any(0 <= t - s.done_at < 1.0 for t in killed[s.target]):
                excused += 1
            else:
                out.append(f"{who}: {s.kind} request {s.request_id} has no audit record")
            continue
        rec = first[0]
        if rec["decision"] not in expected[s.kind]:
            out.append(f"{who}: {s.kind} request {s.request_id} recorded as {rec['decision']}")
        elif s.kind == "ok" and rec["usage"]["generated_tokens"] != s.generated:
            out.append(f"{who}: request {s.request_id} saw {s.generated} tokens, audit says "
                       f"{rec['usage']['generated_tokens']}")
        # usage went to the spool: at admission (the first record says so), or when a settle sent after the
        # answer failed (a second record of the request says so)
        spooled = any(r.get("store") == "spooled" and r["decision"] in METERED for r in first)
        if spooled and not any(r["decision"] == "replayed" for r in first):
            out.append(f"{who}: request {s.request_id} was spooled but never replayed")
    return out, excused


def _ledger_against_audit(seen: list[tuple[str, int, dict[str, Any], Seen]],
                          records: dict[str, list[dict[str, Any]]], states: dict[str, Any],
                          store_killing: tuple[float, float], wall_start: float,
                          killed: dict[str, list[float]],
                          slices: dict[tuple[str, str], float]) -> tuple[list[str], list[str]]:
    """Per principal: ledger = audit totals + at most the holds whose leases expired and were charged
    (``lease_expiry: charge``), never less. A lease can be left by a request cut off by its replica's death;
    by one answered just as its replica was killed (the settle leaves in the same turn of the event loop
    as the answer, not before it); and by one answered 5xx while Redis died under it (its reserve may have
    reached Redis and its rollback or release not — a gateway that spools voids leaves none). Returns
    (discrepancies, a line per budget)."""
    out, margins = [], []
    for who, sts in states.items():
        metered = []
        for rs in records.values():
            served = [r for r in rs if r.get("principal") == who and r["decision"] in METERED]
            if served:  # the request's own record, else its replay's (one request, counted once)
                metered.append(next((r for r in served if r["decision"] != "replayed"), served[0]))
        leases = [m for w, m, _, s in seen if w == who and (s.kind == "broken" or (
            s.kind in ("http_503", "http_502") and s.started_at <= store_killing[1]
            and s.done_at >= store_killing[0]) or (
            s.kind == "ok" and any(abs(t - s.done_at) < 0.1 for t in killed[s.target])))]
        for st in sts:
            if fixed_window(st.budget.window, wall_start) != fixed_window(st.budget.window, time.time()):
                margins.append(f"ledger {who} {st.budget.label}: not compared (its window turned during the run)")
                continue
            if st.budget.metric == "requests":
                audit, slack = float(len(metered)), float(len(leases))
            else:
                audit = float(sum(r["usage"][st.budget.metric] for r in metered))
                slack = float(sum(leases))  # each hold: the bound, max_tokens of one sample
            left = slices.get((who, st.budget.label), 0.0)
            slack += left
            diff = st.used - audit
            margins.append(f"ledger {who} {st.budget.label}: used {st.used:g} = audit {audit:g} + {diff:g} "
                           f"(allowed 0 to {slack:g}: leases of {len(leases)} requests a crash may have left"
                           + (f", and up to {left:g} held in slices when a replica died)" if left else ")"))
            if diff < -1e-6 or diff > slack + 1e-6:
                out.append(f"{who} {st.budget.label}: ledger {st.used:g}, audit {audit:g} "
                           f"(allowed excess up to {slack:g} from leases a crash may have left)")
    return out, margins
