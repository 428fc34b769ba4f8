"""Budget leases through the gateway (issue 18): a tier with ``leases: true`` admits most requests from the
replica's slices, and what the ledger ends with is what the audit log says was served."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from gatewayutil import KEYS, audit_records, make_config, running_gateway

from gateway.engine.budgets import budget_holds

pytestmark = pytest.mark.timeout(60)


async def test_a_leasing_tier_admits_from_slices_and_the_ledger_matches_the_audit(tmp_path: Path,
                                                                                 redis_url: str) -> None:
    cfg = make_config(tmp_path, redis_url, tight={
        "leases": True, "budgets": [{"metric": "requests", "window": "1h", "limit": 1000},
                                    {"metric": "generated_tokens", "window": "1d", "limit": 1_000_000}]})
    body = {"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30}
    async with running_gateway(cfg) as g, aiohttp.ClientSession() as s:
        for stream in (False, True) * 40:
            async with s.post(g.url + "/v1/chat/completions", json={**body, "stream": stream},
                              headers={"Authorization": f"Bearer {KEYS['tina']}"}) as r:
                await r.read()
                assert r.status == 200
                assert "RateLimit" in r.headers
        gw = g.gw
        assert gw.leases is not None and gw.leases.admitted_locally >= 60
        assert gw.leases.batches_sent > 0
        principal = await gw.directory.by_key(KEYS["tina"])  # type: ignore[union-attr]
        assert principal is not None
        holds = budget_holds(cfg.tiers["tight"], principal, {}, {})
    # The app's shutdown gave the slices back: nothing held, and the ledger says what the audit log says.
    from gateway.ledger.ledger import Ledger
    from gateway.ledger.store import connect

    redis = await connect(redis_url, timeout=1.0)
    try:
        states = {st.budget.metric: st for st in await Ledger(redis).state(holds[0].scope, holds[0].budgets)}
    finally:
        await redis.aclose()
    records = [r for r in audit_records(tmp_path / "data" / "audit") if r.get("request_id")]
    assert len(records) == 80 and {r["decision"] for r in records} == {"allowed"}
    assert states["requests"].used == 80 and states["requests"].held == 0
    assert states["generated_tokens"].used == sum(r["usage"]["generated_tokens"] for r in records)
    assert states["generated_tokens"].held == 0
