"""Evaluation compute certificates end to end (issue 17): a run is opened for an evaluation principal, a mix
of requests goes through the gateway (the real openai SDK as the client, the simulator upstream), the run is
finished and its signed certificate verified against the audit log; then one audit record and the
certificate are tampered with (both detected), and a policy bound to the certificate refuses a request
above the evaluated K for a normal tier while a ``beyond_evaluated`` tier is served. Receipts: a tier with
``receipts: true`` gets a signed ``x-kgate-receipt`` that ``kgate receipt verify`` checks against the log.

The ``kgate`` commands run as subprocesses, as an operator runs them, against the test's own Redis.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml
from gatewayutil import KEYS, audit_records, policy_dict, running_gateway

from gateway.adapters import adapter_for_path
from gateway.engine.metering import parse_request
from gateway.policy.config import load_config

pytestmark = pytest.mark.timeout(180)

EVAL_KEY = "key-eve-evaluator"
CHAT = "/v1/chat/completions"


async def kgate(*args: str, cwd: Path | None = None, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, cwd=cwd, stdin=asyncio.subprocess.PIPE if stdin else None,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def eval_policy(redis_url: str, data: Path, **extra: Any) -> dict[str, Any]:
    """The test policy plus an evaluation principal ``eve`` (tier ``evaluator``: beyond evaluated compute,
    as an evaluation must be) and no typed-in evaluated K on the models the run evaluates."""
    pol = policy_dict(redis_url, data)
    pol["tiers"]["evaluator"] = {"models": "*", "max_k": 1024, "beyond_evaluated": True,
                                 "budgets": [{"metric": "requests", "window": "1d", "limit": 1000}]}
    pol["tiers"]["basic"]["max_k"] = 512  # the tier allows more than the evaluation covered: the certificate binds
    pol["tiers"]["basic"]["max_samples"] = 16
    for m in pol["models"].values():
        m.pop("evaluated_max_k", None)
    pol["principals"].append({"id": "eve", "org": "evals", "tier": "evaluator",
                              "key_sha256": hashlib.sha256(EVAL_KEY.encode()).hexdigest()})
    for k, v in extra.items():
        pol[k] = v
    return pol


def chat(model: str, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "solve the task"}], **kw}


async def post(url: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, json=body,
                                                    headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, orjson.loads(await r.read())


def bound_k(config_path: Path, body: dict[str, Any]) -> float:
    cfg = load_config(config_path)
    adapter, params = adapter_for_path(CHAT)
    return parse_request(cfg, adapter, params, orjson.dumps(body)).bound.k_max


def rewrite(audit_dir: Path, request_id: str, old: bytes, new: bytes) -> None:
    """Edit the audit line of ``request_id`` in place (as someone with write access to the log would)."""
    f = next(p for p in audit_dir.rglob("audit-*.jsonl") if request_id.encode() in p.read_bytes())
    lines = f.read_bytes().splitlines(keepends=True)
    i = next(n for n, ln in enumerate(lines) if request_id.encode() in ln)
    assert old in lines[i]
    lines[i] = lines[i].replace(old, new, 1)
    f.write_bytes(b"".join(lines))


@pytest.fixture
def signing(tmp_path: Path) -> tuple[Path, str]:
    """A signing key made by ``kgate eval keygen`` and its public key."""
    import subprocess

    key = tmp_path / "eval-signing.pem"
    done = subprocess.run([sys.executable, "-m", "gateway", "eval", "keygen", "--out", str(key)],
                          capture_output=True, text=True, timeout=60, check=True)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    return key, done.stdout.strip()


async def test_a_run_certified_verified_tamper_detected_and_bound_into_policy(
        tmp_path: Path, redis_url: str, signing: tuple[Path, str]) -> None:
    key_file, pub = signing
    data = tmp_path / "data"
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(eval_policy(redis_url, data)))
    audit_dir = data / "audit"
    base = ["--config", str(policy), "--store", redis_url]

    async with running_gateway(load_config(policy)) as g:
        client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=EVAL_KEY, max_retries=0)
        alice = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=KEYS["alice"], max_retries=0)
        await alice.chat.completions.create(**chat("dense", max_tokens=50))  # before the run: not tagged

        rc, out, err = await kgate("eval", "start", "--principal", "eve", "--model", "reasoner", "--model", "dense",
                                   "--label", "cyber-uplift v3", *base)
        assert rc == 0, err
        run = orjson.loads(out)["id"]
        assert run.startswith("ev_")
        rc, _, err = await kgate("eval", "start", "--principal", "eve", "--model", "dense", "--label", "again", *base)
        assert rc != 0 and run in err  # one open run per principal

        # The mix: plain, best-of-4, high reasoning effort, a stream, one refused; alice interleaved.
        await client.chat.completions.create(**chat("dense", max_tokens=64))
        await client.chat.completions.create(**chat("dense", max_tokens=64, n=4))
        await alice.chat.completions.create(**chat("dense", max_tokens=40))
        await client.chat.completions.create(**chat("reasoner", max_completion_tokens=2000, reasoning_effort="high"))
        await client.chat.completions.create(**chat("reasoner", max_completion_tokens=600, n=2,
                                                    reasoning_effort="low"))
        stream = await client.chat.completions.create(**chat("reasoner", max_completion_tokens=300, stream=True))
        async for _ in stream:
            pass
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(**chat("no-such-model"))
        await alice.chat.completions.create(**chat("reasoner", max_completion_tokens=100))

        out_file = tmp_path / "cert.json"
        rc, out, err = await kgate("eval", "finish", run, "--out", str(out_file), "--signing-key", str(key_file),
                                   "--wait", "10", *base)
        assert rc == 0, err
        await alice.chat.completions.create(**chat("dense", max_tokens=30))  # after the run: not tagged again
        records = audit_records(audit_dir)

    cert_doc = orjson.loads(out_file.read_bytes())
    cert = cert_doc["certificate"]
    tagged = [r for r in records if r.get("eval") == run and r.get("request_id")]
    metered = [r for r in tagged if r["decision"] in ("allowed", "clamped", "partial")]
    assert len(tagged) == 6 and len(metered) == 5  # the refused request is tagged, not metered
    assert not [r for r in records if r.get("principal") == "alice" and r.get("eval")]
    assert {r["principal"] for r in tagged} == {"eve"}
    # The figures are the audit log's.
    figs = cert["figures"]
    assert figs["requests"]["total"] == 6 and figs["requests"]["metered"] == 5
    assert figs["k"]["max"] == max(r["usage"]["k"] for r in metered)
    assert figs["flops"]["total"] == pytest.approx(sum(r["usage"]["flops"] for r in metered))
    assert figs["samples"]["max"] == 4
    reasoner = cert["models"]["reasoner"]
    assert reasoner["upstream_models"] == ["qwq-reasoner"] and reasoner["requests"] == 3
    assert reasoner["k_bound_max"] == max(r["bound"]["k_max"] for r in metered if r["model"] == "reasoner")
    assert cert["run"]["label"] == "cyber-uplift v3" and cert["run"]["principal"] == "eve"
    assert cert["issuer"]["public_key"] == pub
    assert {s["replica"] for s in cert["audit"]["segments"]} >= {g.gw.replica}

    # Verified against the log with the trusted key.
    rc, out, err = await kgate("eval", "verify", str(out_file), "--audit", str(audit_dir), "--public-key", pub)
    assert rc == 0, out + err
    assert run in out

    # One tagged audit record edited (a copy of the log): detected.
    forged = tmp_path / "forged-audit"
    shutil.copytree(audit_dir, forged)
    victim = next(r for r in metered if r["model"] == "reasoner")
    f = next(p for p in forged.rglob("audit-*.jsonl") if victim["request_id"].encode() in p.read_bytes())
    lines = f.read_bytes().splitlines(keepends=True)
    i = next(n for n, ln in enumerate(lines) if victim["request_id"].encode() in ln)
    rec = orjson.loads(lines[i])
    rec["usage"]["k"] = rec["usage"]["k"] / 10
    lines[i] = orjson.dumps(rec) + b"\n"
    f.write_bytes(b"".join(lines))
    rc, out, err = await kgate("eval", "verify", str(out_file), "--audit", str(forged), "--public-key", pub)
    assert rc == 1, out + err

    # The certificate edited: the signature no longer holds.
    edited = copy.deepcopy(cert_doc)
    edited["certificate"]["models"]["reasoner"]["k_bound_max"] *= 4
    bad_cert = tmp_path / "cert-edited.json"
    bad_cert.write_bytes(orjson.dumps(edited))
    rc, out, err = await kgate("eval", "verify", str(bad_cert), "--public-key", pub)
    assert rc == 1, out + err

    # A policy bound to the certificate: the reasoner's evaluated K comes from it.
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    shutil.copy(out_file, cert_dir / "reasoner-eval.json")
    bound_pol = eval_policy(redis_url, tmp_path / "data2", evaluations={"public_keys": [pub]})
    bound_pol["models"]["reasoner"]["evaluated"] = {"certificate": "certs/reasoner-eval.json"}
    policy2 = tmp_path / "policy2.yaml"
    policy2.write_text(yaml.safe_dump(bound_pol))
    cfg2 = load_config(policy2)
    evaluated = cfg2.models["reasoner"].evaluated_max_k
    assert evaluated == reasoner["k_bound_max"]
    assert run in (cfg2.models["reasoner"].evaluated_source or "")
    rc, _, err = await kgate("policy", "check", str(policy2))
    assert rc == 0 and "reasoner-eval.json" in err and "dense: no evaluated compute" in err

    big = chat("reasoner", max_completion_tokens=8000, reasoning_effort="high")
    assert evaluated < bound_k(policy2, big) <= 512  # above the evaluation, within the tier's own max_k
    async with running_gateway(cfg2) as g2:
        status, _, body = await post(g2.url, KEYS["alice"], big)
        assert status == 403, body
        assert body["error"]["code"] == "evaluated_max_k_exceeded"
        assert "reasoner-eval.json" in body["error"]["message"] and run in body["error"]["message"]
        status, _, body = await post(g2.url, KEYS["vera"], big)  # vetted: beyond_evaluated
        assert status == 200, body
        status, _, body = await post(g2.url, KEYS["alice"], chat("reasoner", max_completion_tokens=300))
        assert status == 200, body

    # A policy that names a certificate it cannot verify does not load.
    other_pub = (await kgate("eval", "keygen", "--out", str(tmp_path / "other.pem")))[1].strip()
    bound_pol["evaluations"] = {"public_keys": [other_pub]}
    policy2.write_text(yaml.safe_dump(bound_pol))
    rc, out, err = await kgate("policy", "check", str(policy2))
    assert rc == 1 and "models.reasoner.evaluated.certificate" in out + err


async def test_receipts_are_signed_and_checked_against_the_audit_log(
        tmp_path: Path, redis_url: str, signing: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    key_file, pub = signing
    data = tmp_path / "data"
    pol = eval_policy(redis_url, data, evaluations={"signing_key_file": str(key_file), "public_keys": [pub]})
    pol["tiers"]["vetted"]["receipts"] = True
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(pol))
    async with running_gateway(load_config(policy)) as g:
        status, headers, body = await post(g.url, KEYS["vera"], chat("reasoner", max_completion_tokens=200, n=2))
        assert status == 200, body
        token = headers["x-kgate-receipt"]
        status, headers_alice, _ = await post(g.url, KEYS["alice"], chat("dense", max_tokens=20))
        assert status == 200 and "x-kgate-receipt" not in headers_alice  # basic: no receipts
        # A stream carries its receipt as an SSE comment after the last event.
        async with aiohttp.ClientSession() as s, s.post(
                g.url + CHAT, json=chat("dense", max_tokens=20, stream=True),
                headers={"Authorization": f"Bearer {KEYS['vera']}"}) as r:
            raw = await r.read()
        comment = [ln for ln in raw.split(b"\n") if ln.startswith(b": x-kgate-receipt ")]
        assert len(comment) == 1 and raw.rstrip().endswith(comment[0])
        stream_token = comment[0].split(b" ", 2)[2].decode()
        # The SDK reads that stream as if the comment were not there.
        client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=KEYS["vera"], max_retries=0)
        chunks = [c async for c in await client.chat.completions.create(**chat("dense", max_tokens=20, stream=True))]
        assert chunks and chunks[-1].choices[0].finish_reason is not None
        rid = headers["x-kgate-request-id"]
        audit_dir = Path(g.gw.config.audit.dir)

    rc, out, err = await kgate("receipt", "verify", token, "--public-key", pub, "--audit", str(audit_dir))
    assert rc == 0, err
    claims = orjson.loads(out)
    assert claims["rid"] == rid and claims["model"] == "reasoner" and claims["samples"] == 2
    rec = next(r for r in audit_records(audit_dir) if r.get("request_id") == rid)
    assert claims["k"] == rec["usage"]["k"] and claims["audit"]["hash"] == rec["hash"]
    rc, out, err = await kgate("receipt", "verify", stream_token, "--public-key", pub, "--audit", str(audit_dir))
    assert rc == 0, err

    # Reissued from the log by an operator: the same claims.
    rc, out, err = await kgate("receipt", "issue", rid, "--audit", str(audit_dir), "--signing-key", str(key_file))
    assert rc == 0, err
    rc, out2, _ = await kgate("receipt", "verify", "-", "--public-key", pub, stdin=out.encode())
    assert rc == 0 and orjson.loads(out2) == claims

    # A forged receipt (claims edited, signature kept) and an untrusted key: refused.
    head, payload, sig = token.split(".")
    from gateway.evals.signing import b64url, unb64url

    forged_claims = orjson.loads(unb64url(payload))
    forged_claims["k"] = forged_claims["k"] / 100
    forged = f"{head}.{b64url(orjson.dumps(forged_claims))}.{sig}"
    rc, _, err = await kgate("receipt", "verify", forged, "--public-key", pub)
    assert rc == 1 and "signature" in err
    other_pub = (await kgate("eval", "keygen", "--out", str(tmp_path / "other.pem")))[1].strip()
    rc, _, err = await kgate("receipt", "verify", token, "--public-key", other_pub)
    assert rc == 1

    # The record the receipt names, edited in the log: the receipt no longer matches it.
    rewrite(audit_dir, rid, f'"k":{rec["usage"]["k"]}'.encode(), b'"k":0.5')
    rc, _, err = await kgate("receipt", "verify", token, "--public-key", pub, "--audit", str(audit_dir))
    assert rc == 1 and "audit" in err


async def test_finish_waits_for_the_runs_requests_still_in_flight(tmp_path: Path, redis_url: str,
                                                                  signing: tuple[Path, str]) -> None:
    """A certificate written while a request of the run is still running would not cover it: finish waits
    for it (here: one answer that takes 5 s), and says so when it cannot wait long enough."""
    from gateway.simulator.app import SimulatorOptions

    key_file, pub = signing
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(eval_policy(redis_url, tmp_path / "data")))
    base = ["--config", str(policy), "--store", redis_url]
    audit_dir = tmp_path / "data" / "audit"
    async with running_gateway(load_config(policy), simulator_options=SimulatorOptions(latency_ms=5000)) as g:
        rc, out, err = await kgate("eval", "start", "--principal", "eve", "--model", "dense", "--label", "slow",
                                   *base)
        assert rc == 0, err
        run = orjson.loads(out)["id"]
        slow = asyncio.create_task(post(g.url, EVAL_KEY, chat("dense", max_tokens=20)))
        await asyncio.sleep(0.5)  # admitted, waiting for its answer
        cert = tmp_path / "cert.json"
        rc, _, err = await kgate("eval", "finish", run, "--out", str(cert), "--signing-key", str(key_file),
                                 "--wait", "0", *base)
        assert rc != 0 and "still in flight" in err and not cert.exists()
        rc, out, err = await kgate("eval", "show", run, *base)
        assert rc == 0 and orjson.loads(out)["open"] is False
        rc, _, err = await kgate("eval", "certify", run, "--out", str(cert), "--signing-key", str(key_file),
                                 "--wait", "20", *base)
        assert rc == 0, err
        status, _, _ = slow.result() if slow.done() else await slow
        assert status == 200
    figures = orjson.loads(cert.read_bytes())["certificate"]["figures"]
    assert figures["requests"]["metered"] == 1  # the slow answer is in it
    rc, out, err = await kgate("eval", "verify", str(cert), "--audit", str(audit_dir), "--public-key", pub)
    assert rc == 0, out + err
