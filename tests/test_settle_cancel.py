"""A shutdown that cancels a request while its settle is in flight: the settle still lands, exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from gatewayutil import KEYS, make_config, running_gateway

from gateway.adapters import adapter_for_path
from gateway.compute import measure
from gateway.handler import Outcome, budget_amounts, budget_holds, settle_to_the_end
from gateway.ledger import ScopeRef
from gateway.metering import parse_request


async def test_a_settle_cut_short_by_cancellation_still_posts_once(redis_srv, tmp_path: Path) -> None:
    r = aioredis.from_url(redis_srv.url)
    await r.flushall()
    async with running_gateway(make_config(tmp_path, redis_srv.url)) as g:
        gw, cfg = g.gw, g.gw.config
        assert gw.directory is not None and gw.ledger is not None
        principal = await gw.directory.by_key(KEYS["alice"])
        assert principal is not None
        tier = cfg.tiers[principal.tier]
        found = adapter_for_path("/v1/chat/completions")
        assert found is not None
        raw = orjson.dumps({"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        parsed = parse_request(cfg, found[0], found[1], raw)
        holds = budget_holds(tier, principal, {}, budget_amounts(parsed, tier, gw))
        reservation = await gw.ledger.reserve("req-cancelled", holds, 60)
        out = Outcome(request_id="req-cancelled", api="openai.chat", started=0.0, config=cfg,
                      principal=principal, tier=principal.tier, model="dense")
        usage = parsed.adapter.usage_from_json(
            {"choices": [{"message": {"content": "x"}}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}, parsed.request)
        measured = measure(usage, parsed.model, parsed.bound)
        out.measured = measured

        await r.execute_command("CLIENT", "PAUSE", "400", "ALL")  # the settle's script waits in Redis
        task = asyncio.create_task(settle_to_the_end(gw, parsed, reservation, out, measured))
        await asyncio.sleep(0.1)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        assert gw.detached, "the settle goes on in a task of its own"
        await asyncio.wait_for(asyncio.gather(*gw.detached), 5)

        budgets = [spec for spec in holds[0].budgets]
        (state,) = await gw.ledger.state(ScopeRef("principal", principal.id), budgets)
        assert (state.used, state.held) == (1, 0), "posted once, hold released"
    await r.aclose()
