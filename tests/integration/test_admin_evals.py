"""``/admin/evals`` (issue 17): evaluation runs over the admin API, with two replicas on one Redis — the
run tags the principal's requests on both, and its certificate has a chain segment from each."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from gatewayutil import KEYS, policy_dict, running_gateway

from gateway.admin.api import create_admin_app
from gateway.evals.certificate import verify_certificate
from gateway.evals.signing import generate
from gateway.policy.config import load_config

TOKEN = "test-admin-token-evals"
pytestmark = pytest.mark.timeout(120)


@contextlib.asynccontextmanager
async def admin_of(config_path: Path, name: str) -> AsyncIterator[tuple[str, str]]:
    """A gateway replica and its admin listener: (client URL, admin URL)."""
    async with running_gateway(load_config(config_path), replica=name) as g:
        runner = web.AppRunner(create_admin_app(g.app), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield g.url, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        finally:
            await runner.cleanup()


async def call(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(
            method, url + path, data=orjson.dumps(body) if body is not None else None,
            headers={"Authorization": f"Bearer {TOKEN}", "X-Kgate-Actor": "ops:alice"}) as r:
        return r.status, await r.json()


async def chat(url: str, who: str, **body: Any) -> int:
    payload = {"model": "dense", "messages": [{"role": "user", "content": "x"}], "max_tokens": 16, **body}
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=payload,
                                                   headers={"Authorization": f"Bearer {KEYS[who]}"}) as r:
        await r.read()
        return r.status


async def test_runs_over_the_admin_api_across_two_replicas(tmp_path: Path, redis_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KGATE_ADMIN_TOKEN", TOKEN)
    key = generate()
    pol = policy_dict(redis_url, tmp_path / "data")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(pol))
    async with admin_of(policy, "gw-a") as (url_a, admin_a), admin_of(policy, "gw-b") as (url_b, admin_b):
        status, body = await call(admin_a, "POST", "/admin/evals", {"principal": "vera", "label": "bio v2",
                                                                   "models": ["dense", "reasoner"]})
        assert status == 201, body
        run = body["id"]
        assert body["started_by"] == "ops:alice" and body["open"] is True
        # One open run per principal; bad input is a 400 naming the field; unknown things are 404s.
        assert (await call(admin_b, "POST", "/admin/evals", {"principal": "vera", "label": "x",
                                                             "models": ["dense"]}))[0] == 409
        status, body = await call(admin_a, "POST", "/admin/evals", {"principal": "vera", "label": "x",
                                                                    "models": ["nope"]})
        assert status == 400 and body["error"]["param"] == "models"
        assert (await call(admin_a, "POST", "/admin/evals", {"principal": "nobody", "label": "x",
                                                             "models": ["dense"]}))[0] == 404
        assert (await call(admin_a, "GET", "/admin/evals/ev_0000000000000000"))[0] == 404

        for url in (url_a, url_b, url_a):
            assert await chat(url, "vera", n=2) == 200
        assert await chat(url_b, "alice") == 200  # not under evaluation

        status, body = await call(admin_b, "GET", f"/admin/evals/{run}")
        assert status == 200 and body["in_flight"] == 0 and body["models"] == ["dense", "reasoner"]
        # Without a signing key the gateway cannot certify: a 409 that says so, and the run stays open.
        status, body = await call(admin_a, "POST", f"/admin/evals/{run}/finish", {})
        assert status == 409 and "sign" in body["error"]["message"]
        assert (await call(admin_a, "GET", f"/admin/evals/{run}"))[1]["open"] is True

    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(key.pem())
    pol["evaluations"] = {"signing_key_file": str(key_file)}
    policy.write_text(yaml.safe_dump(pol))
    async with admin_of(policy, "gw-a") as (url_a, admin_a):
        status, doc = await call(admin_a, "POST", f"/admin/evals/{run}/finish", {"wait_seconds": 5})
        assert status == 200, doc
        assert (await call(admin_a, "POST", f"/admin/evals/{run}/finish", {}))[0] == 409  # finished already
        status, runs = await call(admin_a, "GET", "/admin/evals")
        assert [r["id"] for r in runs["runs"]] == [run] and runs["runs"][0]["certificate_sha256"]
        assert await chat(url_a, "vera") == 200  # after the run: untagged

    cert = doc["certificate"]
    assert cert["run"]["finished_by"] == "ops:alice" and cert["figures"]["requests"]["metered"] == 3
    assert {s["replica"] for s in cert["audit"]["segments"]} == {"gw-a", "gw-b"}
    check = verify_certificate(doc, [key.public], [tmp_path / "data" / "audit"])
    assert check.ok, check.problems
