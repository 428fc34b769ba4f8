"""A compliance reviewer's view: after a mixed load, verify, report and reconcile agree with the ledger."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import openai
import pytest
from gatewayutil import KEYS, running_gateway, write_policy

from gateway.cli import main
from gateway.policy.config import load_config

MSG = [{"role": "user", "content": "hello there"}]


async def test_verify_report_reconcile_after_mixed_load(redis_srv, tmp_path: Path, capsys):
    policy = write_policy(tmp_path, redis_srv.url)
    cfg = load_config(policy)
    async with running_gateway(cfg) as g:
        alice = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=KEYS["alice"], max_retries=0)
        carol = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=KEYS["carol"], max_retries=0)
        tina = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=KEYS["tina"], max_retries=0)
        for _ in range(3):
            await alice.chat.completions.create(model="dense", messages=MSG, n=2, max_tokens=40)
        stream = await alice.chat.completions.create(model="reasoner", messages=MSG, stream=True,
                                                     reasoning_effort="low", max_completion_tokens=1500)
        async for _ in stream:
            pass
        await carol.chat.completions.create(model="reasoner", messages=MSG, n=4, max_completion_tokens=5000)
        with pytest.raises(openai.PermissionDeniedError):
            await alice.chat.completions.create(model="dense", messages=MSG, n=9)
        with pytest.raises(openai.RateLimitError):
            for _ in range(30):  # 64 tokens each against 1,000: refused once the 400-token hold no longer fits
                await tina.chat.completions.create(model="dense", messages=MSG, max_tokens=400)
    audit_dir = str(tmp_path / "data" / "audit")
    capsys.readouterr()

    assert main(["audit", "verify", audit_dir]) == 0
    assert "ok:" in capsys.readouterr().out

    assert main(["audit", "report", "--by", "principal,decision", "--format", "json", audit_dir]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {(r["principal"], r["decision"]): r for r in report["rows"]}
    assert rows[("alice", "allowed")]["requests"] == 4
    assert rows[("carol", "clamped")]["requests"] == 1
    assert rows[("alice", "denied")]["requests"] == 1

    assert main(["audit", "report", "--by", "tier", "--format", "csv", audit_dir]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["tier"] for r in table} >= {"basic", "clamp", "tight"}

    out_html = tmp_path / "report.html"
    assert main(["audit", "report", "--format", "html", "-o", str(out_html), audit_dir]) == 0
    assert "<svg" in out_html.read_text()

    code = await asyncio.to_thread(  # the CLI runs its own event loop
        main, ["audit", "reconcile", "--config", str(policy), "--format", "json", audit_dir])
    result = json.loads(capsys.readouterr().out)
    assert code == 0, result
    assert result["unexplained"] == 0
    compared = {(r["budget"], r["id"]) for r in result["rows"]}
    assert ("principal:generated_tokens:1d", "tina") in compared
    assert all(r["explanation"] == "match" for r in result["rows"]), result["rows"]
