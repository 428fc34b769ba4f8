"""`kgate serve` as a new user runs it, and the app mounted inside another aiohttp app (docs/design.md §8)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
from aiohttp import web
from gatewayutil import KEYS, audit_records, make_config, wait_ready

from gateway.ledger.data_dir_lock import data_dir_owner
from gateway.ledger.redis_binary import free_port
from gateway.proxy.app import create_app

ROOT = Path(__file__).resolve().parents[2]


async def test_kgate_serve_with_embedded_defaults_works_for_the_demo_key(tmp_path: Path):
    """No config, no Redis URL, no model server: the example policy, an embedded Redis, the simulator."""
    work = tmp_path / "fresh"
    work.mkdir()
    shutil.copytree(ROOT / "policies", work / "policies")
    port, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KGATE_")}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",  # noqa: ASYNC220
                             "--admin-listen", f"127.0.0.1:{admin}"], cwd=work, env=env,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url + "/readyz", proc)
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="kgate-demo-key", max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="reasoner-32b", messages=[{"role": "user", "content": "hi"}], n=4, reasoning_effort="high")
        # the README's example: the standard tier clamps this request and says how
        assert raw.headers["x-kgate-clamped"] == "n=2, max_completion_tokens=1024, reasoning_effort=medium"
        assert float(raw.headers["x-kgate-k-max"]) <= 4
        resp = raw.parse()
        assert len(resp.choices) == 2 and resp.usage.completion_tokens > 0
        request_id = raw.headers["x-kgate-request-id"]
        # the store is the embedded Redis: this process owns .kgate and its Redis listens on the unix socket
        # it recorded there (under .kgate, or a short temporary folder when that path is too long)
        owner = data_dir_owner(work / ".kgate")
        assert owner is not None and owner["pid"] == proc.pid and owner["command"] == "kgate serve", owner
        assert stat.S_ISSOCK(os.stat(owner["socket"]).st_mode), owner
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    log = err.decode()
    warnings = [line for line in log.splitlines() if " WARNING kgate.app: " in line]
    assert any("the demo API key 'kgate-demo-key' is enabled" in line for line in warnings), \
        "the demo key is announced at start-up, as a warning"
    assert "Traceback" not in log
    # uvloop is a dependency where it exists (the README's figures are measured on it)
    assert f"event loop {'asyncio' if sys.platform == 'win32' else 'uvloop'}" in log
    # the embedded Redis kept its data on disk for the next start: the demo principal's ledger keys are in its
    # append-only file (appendonly.aof on Redis 6; appendonlydir/appendonly.aof.* on 7)
    aof = b"".join(f.read_bytes() for f in (work / ".kgate").rglob("appendonly*") if f.is_file())
    assert b"kgate:{principal:demo}" in aof, sorted(p.name for p in (work / ".kgate").rglob("*"))
    # the request's audit record was written, as the demo principal's clamped request, and the chain verifies
    records = [r for r in audit_records(work / ".kgate" / "audit") if r.get("request_id")]
    assert [(r["request_id"], r["principal"], r["decision"]) for r in records] == [
        (request_id, "demo", "clamped")], records
    from gateway.audit.verify import verify_main

    assert verify_main([str(work / ".kgate" / "audit")]) == 0


async def test_app_mounts_as_a_sub_application(redis_srv, tmp_path: Path):
    parent = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="parent")

    parent.router.add_get("/", hello)
    parent.add_subapp("/llm", create_app(make_config(tmp_path, redis_srv.url)))
    runner = web.AppRunner(parent)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        base = f"http://127.0.0.1:{port}"
        client = openai.AsyncOpenAI(base_url=base + "/llm/v1", api_key=KEYS["alice"], max_retries=0)
        resp = await client.chat.completions.create(model="dense", messages=[{"role": "user", "content": "x"}])
        assert resp.choices
        async with aiohttp.ClientSession() as s:
            body = {"contents": [{"parts": [{"text": "hi"}]}]}
            async with s.post(base + "/llm/v1beta/models/dense:generateContent", json=body,
                              headers={"x-goog-api-key": KEYS["alice"]}) as r:
                assert r.status == 200, await r.text()
            async with s.get(base + "/") as r:
                assert await r.text() == "parent"
            async with s.get(base + "/llm/v1/chat/completions") as r:
                assert r.status == 405 and "error" in await r.json()
    finally:
        await runner.cleanup()
