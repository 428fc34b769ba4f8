"""Policy hot reload (issue 5, docs/design.md §2): on file change, on SIGHUP and through the admin API.

Validated first, swapped atomically, the old policy kept on error (logged, counted, audited); the version
in force on /readyz and in every audit record; and no request dropped while the policy is rewritten.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from gatewayutil import KEYS, audit_records, policy_dict, write_policy
from test_admin import TOKEN, TOKEN_ENV, Replica, replica, until

from gateway.ledger.redis_binary import free_port
from gateway.policy.config import load_config
from gateway.simulator.server import SimulatorOptions

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_url(flushed_redis_url: str) -> str:
    """This module's tests share one Redis (``redis_srv``), emptied for each."""
    return flushed_redis_url


def rewrite(path: Path, tmp_path: Path, redis_url: str, **tiers: Any) -> str:
    """Replace the policy file atomically (write aside, rename over), as an operator's tooling should;
    returns the sha256 of the new policy."""
    text = yaml.safe_dump(policy_dict(redis_url, tmp_path / "data", **tiers))
    aside = path.with_name(path.name + ".new")
    aside.write_text(text)
    os.replace(aside, path)
    return load_config(path).version


async def metric(url: str, name: str, **labels: str) -> float:
    """One sample of ``name{labels}`` from /metrics (0 when absent)."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.M) if labels else \
        re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def sha_on_readyz(r: Replica) -> str:
    return str((await r.readyz())["policy_sha256"])


@pytest.fixture
async def gw(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Replica]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    path = write_policy(tmp_path, redis_url)
    async with replica(load_config(path), "r1") as r:
        yield r


# --------------------------------------------------------------------------------------- file change
async def test_a_changed_file_is_enforced_within_two_seconds(gw: Replica, tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "policy.yaml"
    old = await sha_on_readyz(gw)
    assert old == load_config(path).version
    assert (await gw.chat(KEYS["alice"], n=3))[0] == 200  # basic: max_samples 4

    new = rewrite(path, tmp_path, redis_url, basic={"max_samples": 2})
    t0 = time.monotonic()

    async def swapped() -> bool:
        return await sha_on_readyz(gw) == new

    await until(swapped, timeout=3.0)
    assert time.monotonic() - t0 < 2.2, "the watcher looks once a second"
    status, body = await gw.chat(KEYS["alice"], n=3)
    assert status == 403 and "limit 2" in body["error"]["message"]
    _, policy = await gw.admin("GET", "/admin/policy")
    assert policy["policy_sha256"] == new
    assert await metric(gw.admin_url, "kgate_policy_reloads_total", result="success") == 1
    assert await metric(gw.admin_url, "kgate_policy_info", sha256=new) == 1
    assert await metric(gw.admin_url, "kgate_policy_info", sha256=old) == 0

    # every record carries the version in force: the reload itself, and the requests on either side
    await asyncio.sleep(0.1)
    records = audit_records(tmp_path / "data" / "audit")
    [reload] = [x for x in records if x.get("reason") == "policy.reload"]
    assert reload["decision"] == "admin" and reload["actor"] == "file-watch"
    assert reload["admin"] == {"ok": True, "previous_sha256": old, "policy_sha256_new": new}
    served = [(x["status"], x["policy_sha256"]) for x in records if x.get("principal") == "alice"]
    assert served == [(200, old), (403, new)]


async def test_an_invalid_edit_keeps_the_old_policy(gw: Replica, tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "policy.yaml"
    old = await sha_on_readyz(gw)
    good = path.read_text()

    async def failures(n: int) -> None:
        async def reached() -> bool:
            return await metric(gw.admin_url, "kgate_policy_reloads_total", result="failure") >= n

        await until(reached, timeout=3.0)
        # The counter moves before the reload's audit record is written; let that finish before the next
        # edit, which the watcher would otherwise miss (see test_an_edit_during_a_reload_is_not_lost).
        await asyncio.sleep(0.3)

    # a misspelled key: refused, named in the log, the metric and the audit record
    path.write_text(good.replace("max_samples: 4", "max_sampels: 2"))
    await failures(1)
    # an empty file (what a reader sees between truncate and write): valid YAML, but no policy at all
    path.write_text("")
    await failures(2)
    # not YAML
    path.write_text("tiers: [unclosed\n")
    await failures(3)

    assert await sha_on_readyz(gw) == old
    assert (await gw.chat(KEYS["alice"], n=3))[0] == 200  # the old policy is still enforced
    assert await metric(gw.admin_url, "kgate_policy_reloads_total", result="success") == 0
    assert await metric(gw.admin_url, "kgate_policy_info", sha256=old) == 1
    records = [x for x in audit_records(tmp_path / "data" / "audit") if x.get("reason") == "policy.reload"]
    assert [x["admin"]["ok"] for x in records] == [False, False, False]
    assert "max_sampels" in records[0]["admin"]["message"] and str(path) in records[0]["admin"]["message"]
    assert "no tiers" in records[1]["admin"]["message"]
    assert "invalid YAML" in records[2]["admin"]["message"]
    assert all(x["policy_sha256"] == old for x in records)

    # put right, it is taken
    new = rewrite(path, tmp_path, redis_url, basic={"max_samples": 2})

    async def swapped() -> bool:
        return await sha_on_readyz(gw) == new

    await until(swapped, timeout=3.0)
    assert (await gw.chat(KEYS["alice"], n=3))[0] == 403


# ----------------------------------------------------------------------------------------- admin API
async def test_reload_through_the_admin_api(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    import gateway.proxy.app

    monkeypatch.setattr(gateway.proxy.app, "WATCH_INTERVAL", 3600.0)  # the watcher must not get there first
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    path = write_policy(tmp_path, redis_url)
    async with replica(load_config(path), "r1", config_path=str(path)) as r:
        old = await sha_on_readyz(r)
        status, doc = await r.admin("POST", "/admin/reload")
        assert status == 200 and doc == {"reloaded": True, "policy_sha256": old}

        path.write_text(path.read_text().replace("max_samples: 4", "max_samples: 9x"))
        status, doc = await r.admin("POST", "/admin/reload")
        assert status == 400 and doc["error"]["code"] == "policy_invalid"
        assert str(path) in doc["error"]["message"] and "tiers.basic.max_samples" in doc["error"]["message"]
        assert await sha_on_readyz(r) == old

        new = rewrite(path, tmp_path, redis_url, basic={"max_samples": 2})
        status, doc = await r.admin("POST", "/admin/reload")
        assert status == 200 and doc == {"reloaded": True, "policy_sha256": new}
        assert await sha_on_readyz(r) == new  # at once: no waiting for a watcher
        assert (await r.chat(KEYS["alice"], n=3))[0] == 403

        await asyncio.sleep(0.1)
        records = [x for x in audit_records(tmp_path / "data" / "audit") if x.get("reason") == "policy.reload"]
        assert [(x["admin"]["ok"], x["actor"], x["policy_sha256"]) for x in records] == [
            (False, "admin-api", old), (True, "admin-api", new)]


async def test_a_tier_removed_by_a_reload_refuses_cleanly(gw: Replica, tmp_path: Path, redis_url: str) -> None:
    """A store principal whose tier the new policy no longer defines gets a 403 naming it, never a 5xx."""
    _, key = await gw.admin("POST", "/admin/keys", {"principal": "pat", "tier": "shadow"})
    assert (await gw.chat(key["key"]))[0] == 200
    pol = policy_dict(redis_url, tmp_path / "data")
    del pol["tiers"]["shadow"]
    pol["principals"] = [p for p in pol["principals"] if p["tier"] != "shadow"]
    path = tmp_path / "policy.yaml"
    aside = tmp_path / "policy.new"
    aside.write_text(yaml.safe_dump(pol))
    os.replace(aside, path)
    new = load_config(path).version

    async def swapped() -> bool:
        return await sha_on_readyz(gw) == new

    await until(swapped, timeout=3.0)
    status, body = await gw.chat(key["key"])
    assert status == 403 and "'shadow' is not defined" in body["error"]["message"]
    assert (await gw.chat(KEYS["sam"]))[0] == 401  # a static principal removed with its tier


async def test_a_request_admitted_before_a_reload_keeps_its_upstream(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new policy renames the upstream; a request that arrived under the old one still reaches it."""
    import gateway.proxy.app

    monkeypatch.setattr(gateway.proxy.app, "WATCH_INTERVAL", 3600.0)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    path = write_policy(tmp_path, redis_url)
    async with replica(load_config(path), "r1", config_path=str(path)) as r:
        old = await sha_on_readyz(r)
        pol = policy_dict(redis_url, tmp_path / "data")
        pol["upstreams"] = {"sim2": pol["upstreams"]["sim"]}
        for model in pol["models"].values():
            model["upstream"] = "sim2"
        body = b'{"model": "dense", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}'
        half = asyncio.Event()
        go_on = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield body[:20]
            half.set()
            await go_on.wait()
            yield body[20:]

        async def request() -> tuple[int, str]:
            async with aiohttp.ClientSession() as s, s.post(
                    r.url + "/v1/chat/completions", data=slow_body(),
                    headers={"Authorization": f"Bearer {KEYS['alice']}", "Content-Type": "application/json"}
            ) as resp:
                return resp.status, resp.headers["x-kgate-request-id"]

        task = asyncio.create_task(request())
        await half.wait()
        await asyncio.sleep(0.2)  # the handler has taken its snapshot of the policy and waits for the body
        path.write_text(yaml.safe_dump(pol))
        status, doc = await r.admin("POST", "/admin/reload")
        assert status == 200 and doc["policy_sha256"] != old
        go_on.set()
        status, request_id = await task
        assert status == 200
        assert (await r.chat(KEYS["alice"]))[0] == 200  # and the new policy's requests use the new name
        await asyncio.sleep(0.1)
        [rec] = [x for x in audit_records(tmp_path / "data" / "audit") if x.get("request_id") == request_id]
        assert rec["policy_sha256"] == old and rec["upstream"] == "sim"


# ------------------------------------------------------------------------------------ reload under load
@pytest.mark.slow
async def test_reload_under_load_drops_no_request(redis_url: str, tmp_path: Path) -> None:
    path = write_policy(tmp_path, redis_url)
    limits = {load_config(path).version: 4}
    async with replica(load_config(path), "r1", simulator_options=SimulatorOptions(latency_ms=15)) as gw:
        statuses: Counter[int] = Counter()
        by_request: dict[str, int] = {}
        problems: list[str] = []
        stop = asyncio.Event()

        async def worker(i: int, s: aiohttp.ClientSession) -> None:
            stream = i % 3 == 0  # some streams too: long-lived responses across a swap
            body = {"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                    "n": 3, "stream": stream}
            headers = {"Authorization": f"Bearer {KEYS['alice']}"}
            while not stop.is_set():
                try:
                    async with s.post(gw.url + "/v1/chat/completions", json=body, headers=headers) as r:
                        text = await r.text()
                        statuses[r.status] += 1
                        by_request[r.headers["x-kgate-request-id"]] = r.status
                        if r.status not in (200, 403):
                            problems.append(f"{r.status}: {text[:200]}")
                        elif r.status == 200 and stream and "[DONE]" not in text:
                            problems.append(f"stream cut: {text[-200:]}")
                except aiohttp.ClientError as exc:
                    problems.append(f"connection error: {exc!r}")

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            workers = [asyncio.create_task(worker(i, s)) for i in range(24)]
            # Five rewrites, alternating 2 and 4 samples, some closer together than the watcher looks.
            # Each version distinct (its description), so each one that is loaded counts as a reload.
            for i, (limit, pause) in enumerate(((2, 1.3), (4, 1.3), (2, 0.4), (4, 1.3), (2, 1.3))):
                sha = rewrite(path, tmp_path, redis_url, basic={"max_samples": limit, "description": f"v{i}"})
                limits[sha] = limit
                await asyncio.sleep(pause)
            stop.set()
            await asyncio.gather(*workers)

        final = load_config(path).version
        assert await sha_on_readyz(gw) == final
        assert not problems, problems[:5]
        assert statuses[200] > 50 and statuses[403] > 50, statuses
        reloads = await metric(gw.admin_url, "kgate_policy_reloads_total", result="success")
        assert 4 <= reloads <= 5 and await metric(gw.admin_url, "kgate_policy_reloads_total", result="failure") == 0

        # each answer is the one the policy in force when it arrived prescribes (its audit record says which)
        await asyncio.sleep(0.2)
        records = {x["request_id"]: x for x in audit_records(tmp_path / "data" / "audit") if x.get("request_id")}
        assert set(records) == set(by_request), "every request has its audit record"
        for rid, status in by_request.items():
            sha = records[rid]["policy_sha256"]
            assert sha in limits, "only versions that were written are ever in force"
            assert status == (200 if limits[sha] >= 3 else 403), (status, limits[sha])


# -------------------------------------------------------------------------- the watcher's lost update
async def test_an_edit_during_a_reload_is_not_lost(gw: Replica, tmp_path: Path, redis_url: str) -> None:
    audit = gw.g.gw.audit
    assert audit is not None
    write = audit.write
    second: list[str] = []

    async def write_then_edit(record: Any) -> Any:
        if record.get("reason") == "policy.reload" and not second:
            # The operator saves again while the first reload is still being recorded.
            second.append(rewrite(tmp_path / "policy.yaml", tmp_path, redis_url, basic={"max_samples": 3}))
        return await write(record)

    audit.write = write_then_edit  # type: ignore[method-assign]
    rewrite(tmp_path / "policy.yaml", tmp_path, redis_url, basic={"max_samples": 2})

    async def second_in_force() -> bool:
        return bool(second) and await sha_on_readyz(gw) == second[0]

    await until(second_in_force, timeout=3.5)


# ---------------------------------------------------------------------------------- SIGHUP on serve
async def _ready(url: str, timeout: float = 30.0) -> None:
    async def up() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await until(up, timeout=timeout, step=0.1)


async def test_sighup_reloads_a_running_kgate_serve(redis_url: str, tmp_path: Path) -> None:
    path = write_policy(tmp_path, redis_url)
    port, admin = free_port(), free_port()
    env = {**os.environ, "KGATE_LOG_LEVEL": "WARNING"}
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--listen", f"127.0.0.1:{port}",
            "--admin-listen", f"127.0.0.1:{admin}", "--store", redis_url]
    proc = await asyncio.to_thread(subprocess.Popen, argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    async def sha() -> str:
        async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
            return str((await r.json())["policy_sha256"])

    async def chat(n: int) -> int:
        async with aiohttp.ClientSession() as s, s.post(
                url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEYS['alice']}"},
                json={"model": "dense", "messages": [{"role": "user", "content": "hi"}], "n": n,
                      "max_tokens": 10}) as r:
            await r.read()
            return r.status

    def edit_unseen_by_the_watcher(old: str, new: str) -> None:
        # Same size and the old mtime: the file watcher (which compares mtime and size) cannot notice,
        # so only the signal can have caused the reload.
        assert len(old) == len(new)
        st = path.stat()
        path.write_text(path.read_text().replace(old, new))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    try:
        await _ready(url)
        old = await sha()
        assert await chat(4) == 200
        edit_unseen_by_the_watcher("max_samples: 4", "max_samples: 3")
        new = load_config(path).version
        await asyncio.sleep(1.5)  # the watcher has looked at least once, and saw nothing
        assert await sha() == old and await chat(4) == 200

        proc.send_signal(signal.SIGHUP)

        async def swapped() -> bool:
            return await sha() == new

        assert await until(swapped, timeout=3.0) < 1.0
        assert await chat(4) == 403

        # an invalid file and a SIGHUP: logged, counted, the process keeps serving the last good policy
        edit_unseen_by_the_watcher("max_samples: 3", "max_samples: x")
        proc.send_signal(signal.SIGHUP)

        async def failed() -> bool:
            return await metric(f"http://127.0.0.1:{admin}", "kgate_policy_reloads_total", result="failure") == 1

        await until(failed, timeout=3.0)
        assert proc.poll() is None and await sha() == new and await chat(3) == 200 and await chat(4) == 403
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.to_thread(proc.communicate, timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "policy reload failed" in err.decode() and "max_samples" in err.decode()
    records = [x for x in audit_records(tmp_path / "data" / "audit") if x.get("reason") == "policy.reload"]
    assert [(x["actor"], x["admin"]["ok"]) for x in records] == [("sighup", True), ("sighup", False)]
    assert records[0]["admin"]["policy_sha256_new"] == new and records[1]["policy_sha256"] == new
