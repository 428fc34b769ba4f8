"""`kgate meter --request-id` (issue 14, item 6): what the gateway charged for a stream, from its audit record.

A client's transcript of a stream cannot reproduce the charge: the gateway asked the upstream for its usage
chunk and stripped it (the client did not ask for one), and reasoning tokens are hidden. The audit record
carries the usage the gateway measured; `kgate meter --request-id` prints it in `kgate meter`'s shape.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp
from gatewayutil import KEYS, audit_records, make_config, running_gateway

METER_KEYS = {"samples", "prompt_tokens", "reasoning_tokens", "output_tokens", "generated_tokens", "k", "flops",
              "source", "model", "api"}


def kgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
                          check=False)


async def test_meter_by_request_id_gives_what_the_gateway_charged_for_a_stream(redis_srv, tmp_path: Path):
    cfg = make_config(tmp_path, redis_srv.url)
    body = {"model": "reasoner", "messages": [{"role": "user", "content": "why?"}], "stream": True,
            "reasoning_effort": "low", "max_completion_tokens": 1024}
    async with running_gateway(cfg) as g, aiohttp.ClientSession() as s:
        async with s.post(g.url + "/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEYS['alice']}"}) as r:
            assert r.status == 200, await r.text()
            request_id = r.headers["x-kgate-request-id"]
            transcript = await r.read()
    audit_dir = tmp_path / "data" / "audit"
    records = audit_records(audit_dir)
    charged = next(rec["usage"] for rec in records if rec["request_id"] == request_id)

    out = kgate("meter", "--request-id", request_id, "--audit", str(audit_dir))
    assert out.returncode == 0, out.stderr
    metered = json.loads(out.stdout)
    assert set(metered) == METER_KEYS
    assert metered == {**{k: charged[k] for k in METER_KEYS - {"model", "api"}}, "model": "reasoner",
                       "api": "openai.chat"}
    assert metered["source"] == "upstream" and metered["reasoning_tokens"] > 0
    assert metered["generated_tokens"] == metered["reasoning_tokens"] + metered["output_tokens"]

    # The client's transcript alone misses the stripped usage chunk and the hidden reasoning.
    (tmp_path / "req.json").write_text(json.dumps(body))
    (tmp_path / "resp.sse").write_bytes(transcript)
    policy = str(tmp_path / "policy.yaml")
    client_side = kgate("meter", "--config", policy, "--path", "/v1/chat/completions",
                        "--body", str(tmp_path / "req.json"), "--response", str(tmp_path / "resp.sse"))
    assert client_side.returncode == 0, client_side.stderr
    assert json.loads(client_side.stdout)["reasoning_tokens"] < metered["reasoning_tokens"]


def test_meter_by_request_id_says_when_there_is_no_such_request(tmp_path: Path):
    (tmp_path / "audit").mkdir()
    out = kgate("meter", "--request-id", "nope", "--audit", str(tmp_path / "audit"))
    assert out.returncode == 2 and "no audit record of request 'nope'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = kgate("meter", "--config", "policies/example.yaml")
    assert out.returncode == 2 and "--request-id" in out.stderr
