"""The admin CLI (`kgate keys|principals|grants|usage`, docs/design.md §9) against a real Redis and a running gateway.

Most commands run through ``gateway.cli.main`` in a worker thread (it calls ``asyncio.run``), a few as a
real ``python -m gateway`` process to check exactly what a shell sees. The gateway runs in-process on the
same Redis, so every change made by the CLI is checked by its effect on real requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from gatewayutil import KEYS, RunningGateway, running_gateway, write_policy
from test_admin import MSG, audit_records, until

from gateway.admin import cli as admin_cli
from gateway.cli import main
from gateway.ledger.redis_binary import free_port
from gateway.policy.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def env(flushed_redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[RunningGateway, list[str], Path]]:
    """A running gateway, the CLI's common options for its policy and store, and the audit folder."""
    policy = write_policy(tmp_path, flushed_redis_url)
    async with running_gateway(load_config(policy), replica="gw") as g:
        yield g, ["--config", str(policy), "--store", flushed_redis_url], tmp_path / "data" / "audit"


async def kgate(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in a thread (its asyncio.run cannot nest in the test's loop): (exit code, stdout, stderr)."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_process(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "USER": "ops-tester"})


async def chat(g: RunningGateway, key: str, **body: Any) -> int:
    import aiohttp

    payload = {"model": "dense", "messages": MSG, "max_tokens": 10, **body}
    async with aiohttp.ClientSession() as s, s.post(g.url + "/v1/chat/completions", json=payload,
                                                   headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


# ------------------------------------------------------------------------------------------------ keys
async def test_keys_create_prints_the_key_once_and_the_gateway_accepts_it(
        env: tuple[RunningGateway, list[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    g, common, audit_dir = env
    proc = await asyncio.to_thread(run_process, "keys", "create", "--principal", "pat", "--org", "acme",
                                   "--tier", "basic", *common)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kgate_"), proc.stdout  # stdout is the key and only the key
    key = lines[0]
    assert "shown once" in proc.stderr and "key id kg_" in proc.stderr and key not in proc.stderr
    key_id = proc.stderr.split("key id ")[1].split()[0]
    assert await chat(g, key) == 200

    code, out, _ = await kgate(capsys, "keys", "list", "--principal", "pat", *common)
    assert code == 0 and key not in out
    [listed] = orjson.loads(out)
    assert listed["key_id"] == key_id and listed["principal"] == "pat" and listed["revoked"] is False
    code, out, _ = await kgate(capsys, "keys", "list", *common)
    assert code == 0 and [k["key_id"] for k in orjson.loads(out)] == [key_id]

    records = audit_records(audit_dir)
    [rec] = [x for x in records if x.get("reason") == "key.create"]
    assert rec["decision"] == "admin" and rec["actor"] == "cli:ops-tester" and rec["admin"]["key_id"] == key_id
    assert rec["policy_sha256"] == g.gw.config.version
    assert all(key not in orjson.dumps(x).decode() for x in records)


async def test_keys_revoke_reaches_a_running_gateway(env: tuple[RunningGateway, list[str], Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    g, common, audit_dir = env
    code, out, err = await kgate(capsys, "keys", "create", "--principal", "pat", "--org", "acme", "--tier",
                                 "basic", *common)
    assert code == 0
    key = out.strip()
    key_id = err.split("key id ")[1].split()[0]
    assert await chat(g, key) == 200  # cached by the gateway now

    code, out, _ = await kgate(capsys, "keys", "revoke", key_id, *common)
    assert code == 0 and orjson.loads(out) == {"key_id": key_id, "revoked": True, "principal": "pat"}
    t0 = time.monotonic()

    async def refused() -> bool:
        return await chat(g, key) == 401

    await until(refused, timeout=3.0)
    assert time.monotonic() - t0 < 1.2
    code, out, _ = await kgate(capsys, "keys", "list", "--principal", "pat", *common)
    assert orjson.loads(out)[0]["revoked"] is True
    assert [x["admin"]["key_id"] for x in audit_records(audit_dir) if x.get("reason") == "key.revoke"] == [key_id]


# ------------------------------------------------------------------------------------------ principals
async def test_principals_set_tier_changes_enforcement(env: tuple[RunningGateway, list[str], Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    g, common, audit_dir = env
    assert await chat(g, KEYS["alice"], n=6) == 403  # basic: at most 4 samples
    code, out, _ = await kgate(capsys, "principals", "set-tier", "alice", "vetted", *common)
    assert code == 0
    assert orjson.loads(out) == {"id": "alice", "org": "acme", "tier": "vetted", "enabled": True}

    async def allowed() -> bool:
        return await chat(g, KEYS["alice"], n=6) == 200

    assert await until(allowed, timeout=3.0) < 1.2

    code, out, _ = await kgate(capsys, "principals", "list", *common)
    assert code == 0
    listed = {p["id"]: p for p in orjson.loads(out)}
    assert set(listed) == set(KEYS)
    assert listed["alice"]["tier"] == "vetted" and listed["carol"] == {
        "id": "carol", "org": "acme", "tier": "clamp", "enabled": True, "source": "config"}
    [rec] = [x for x in audit_records(audit_dir) if x.get("reason") == "principal.set"]
    assert rec["admin"] == {"principal": "alice", "tier": "vetted", "org": "acme", "enabled": True}


# ---------------------------------------------------------------------------------------------- grants
async def test_grants_add_list_revoke(env: tuple[RunningGateway, list[str], Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    g, common, audit_dir = env
    code, out, _ = await kgate(capsys, "grants", "add", "--principal", "alice", "--tier", "vetted", "--duration",
                               "10m", "--approver", "dana@acme", "--reason", "eval run 7", *common)
    assert code == 0
    grant = orjson.loads(out)
    assert grant["id"].startswith("gr_") and grant["principal"] == "alice" and grant["tier"] == "vetted"
    assert grant["approver"] == "dana@acme" and grant["reason"] == "eval run 7" and grant["revoked"] is False
    assert grant["expires_at"] - grant["starts_at"] == pytest.approx(600, abs=0.01)

    async def elevated() -> bool:
        return await chat(g, KEYS["alice"], n=6) == 200

    assert await until(elevated, timeout=3.0) < 1.2

    code, out, _ = await kgate(capsys, "grants", "list", "--principal", "alice", *common)
    assert code == 0 and [(x["id"], x["active"]) for x in orjson.loads(out)] == [(grant["id"], True)]
    code, out, _ = await kgate(capsys, "grants", "list", *common)
    assert code == 0 and len(orjson.loads(out)) == 1

    code, out, _ = await kgate(capsys, "grants", "revoke", grant["id"], *common)
    assert code == 0 and orjson.loads(out)["revoked"] is True

    async def over() -> bool:
        return await chat(g, KEYS["alice"], n=6) == 403

    assert await until(over, timeout=3.0) < 1.2
    code, out, _ = await kgate(capsys, "grants", "list", *common)
    assert code == 0 and orjson.loads(out) == []

    records = audit_records(audit_dir)
    for action in ("grant.add", "grant.revoke"):
        [rec] = [x for x in records if x.get("reason") == action]
        assert rec["decision"] == "admin" and rec["admin"]["id"] == grant["id"]
        assert rec["admin"]["approver"] == "dana@acme" and rec["admin"]["reason"] == "eval run 7"


# ------------------------------------------------------------------------------------ usage, overrides
async def test_usage_shows_used_held_and_remaining(env: tuple[RunningGateway, list[str], Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    g, common, _ = env
    for _ in range(3):
        assert await chat(g, KEYS["tina"], max_tokens=50) == 200
    code, out, _ = await kgate(capsys, "usage", "tina", *common)
    assert code == 0
    use = orjson.loads(out)
    assert (use["principal"], use["tier"], use["grant"]) == ("tina", "tight", None)
    by_metric = {b["metric"]: b for b in use["budgets"]}
    assert (by_metric["requests"]["used"], by_metric["requests"]["remaining"]) == (3, 97)
    gen = by_metric["generated_tokens"]
    assert 0 < gen["used"] <= 150 and gen["held"] == 0 and gen["remaining"] == pytest.approx(1000 - gen["used"])


async def test_overrides_set_and_delete(env: tuple[RunningGateway, list[str], Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``admin_cli.overrides_set/delete`` (not yet wired into the parser: see the report for cli.py)."""
    g, common, audit_dir = env
    config, store = common[1], common[3]
    label = "principal:requests:1m"
    args = argparse.Namespace(config=config, store=store, principal="alice", budget=label, limit=1.0)
    assert await asyncio.to_thread(admin_cli.overrides_set, args) == 0
    out = capsys.readouterr()
    assert orjson.loads(out.out) == {"principal": "alice", "budget": label, "limit": 1.0, "applies_now": True}
    assert "warning" not in out.err

    async def limited() -> bool:
        return await chat(g, KEYS["alice"]) == 429

    await until(limited, timeout=3.0)
    assert await asyncio.to_thread(admin_cli.overrides_delete, args) == 0
    capsys.readouterr()

    async def free() -> bool:
        return await chat(g, KEYS["alice"]) == 200

    await until(free, timeout=3.0)
    # a budget of another tier (tight's): kept, with a warning that it changes nothing for alice yet
    other = argparse.Namespace(config=config, store=store, principal="alice", budget="principal:requests:1h",
                               limit=1.0)
    assert await asyncio.to_thread(admin_cli.overrides_set, other) == 0
    out = capsys.readouterr()
    assert orjson.loads(out.out)["applies_now"] is False
    assert out.err.startswith("kgate: warning: 'alice' is in tier 'basic', which has no budget")
    assert await asyncio.to_thread(admin_cli.overrides_delete, other) == 0
    capsys.readouterr()
    bad = argparse.Namespace(config=config, store=store, principal="alice", budget="org:requests:1m", limit=1.0)
    assert await asyncio.to_thread(main_exit_code, admin_cli.overrides_set, bad) == 2
    assert "unknown budget" in capsys.readouterr().err
    for limit in (float("nan"), float("inf"), -1.0):
        bad = argparse.Namespace(config=config, store=store, principal="alice", budget=label, limit=limit)
        assert await asyncio.to_thread(main_exit_code, admin_cli.overrides_set, bad) == 2
        assert "'limit'" in capsys.readouterr().err
    assert [x["reason"] for x in audit_records(audit_dir) if x.get("decision") == "admin"] == [
        "override.set", "override.delete", "override.set", "override.delete"]


def main_exit_code(func: Any, args: argparse.Namespace) -> int:
    """What ``cli.main`` does with a command's exception (one line, exit 2), for functions not in the parser."""
    from gateway.engine.errors import GatewayError

    try:
        return int(func(args))
    except GatewayError as exc:
        print(f"kgate: {exc.message}", file=sys.stderr)
        return 2


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv,words", [
    (["keys", "create", "--principal", "pat", "--org", "acme", "--tier", "gold"], "unknown tier 'gold'"),
    (["keys", "create", "--principal", "a b", "--org", "acme", "--tier", "basic"], "'principal'"),
    (["keys", "revoke", "kg_nope"], "unknown key id"),
    (["principals", "set-tier", "alice", "gold"], "unknown tier"),
    (["grants", "add", "--principal", "alice", "--tier", "vetted", "--duration", "forever", "--approver", "d",
      "--reason", "r"], "duration"),
    (["grants", "add", "--principal", "alice", "--tier", "vetted", "--duration", "1h", "--approver", " ",
      "--reason", "r"], "'approver'"),
    (["grants", "add", "--principal", "ghost", "--tier", "vetted", "--duration", "1h", "--approver", "d",
      "--reason", "r"], "unknown principal"),
    (["grants", "revoke", "gr_nope"], "unknown grant id"),
    (["usage", "ghost"], "unknown principal"),
])
async def test_bad_input_exits_2_with_one_line(env: tuple[RunningGateway, list[str], Path],
                                               capsys: pytest.CaptureFixture[str], argv: list[str],
                                               words: str) -> None:
    _, common, audit_dir = env
    code, out, err = await kgate(capsys, *argv, *common)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("kgate: ") and words in err, err
    assert not [x for x in audit_records(audit_dir) if x.get("decision") == "admin"]


async def test_store_problems_are_one_line(env: tuple[RunningGateway, list[str], Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _, common, _ = env
    code, out, err = await kgate(capsys, "keys", "list", "--config", common[1], "--store", "foo://x")
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "unsupported store URL" in err
    dead = f"redis://127.0.0.1:{free_port()}"
    code, out, err = await kgate(capsys, "keys", "list", "--config", common[1], "--store", dead)
    assert code == 1 and out == "" and len(err.splitlines()) == 1 and err.startswith("kgate: the store"), err


async def test_a_real_process_reports_bad_input_in_one_line(env: tuple[RunningGateway, list[str], Path]) -> None:
    _, common, _ = env
    proc = await asyncio.to_thread(run_process, "grants", "add", "--principal", "alice", "--tier", "nope",
                                   "--duration", "1h", "--approver", "d", "--reason", "r", *common)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"kgate: unknown tier 'nope'; the policy defines "
                                        f"{', '.join(sorted(load_config(common[1]).tiers))}"]
