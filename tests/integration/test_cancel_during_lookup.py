"""A request cancelled while its caller is being looked up in the store stops there.

redis-py's asyncio client (8.x) can swallow a task's cancellation: cancelled while a command's reply is on
its way, the command returns its answer and the task runs on as if nothing had been asked (seen: 115 of 300
cancellations landing mid-command). A shutdown that cancels requests past their drain then waited for such
a request to go on to read its body (up to its body timeout). The directory's lookups re-raise a
cancellation the task was asked for (``Task.cancelling()``: a task remembers it even when the library
swallowed the ``CancelledError``). A real Redis: the swallowing is the client's, on a real socket.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import redis.asyncio as aredis
from gatewayutil import KEYS, make_config

from gateway.policy.directory import Directory


async def test_a_lookup_cancelled_mid_command_ends_cancelled(redis_url: str, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, redis_url)
    client = aredis.from_url(redis_url)
    directory = Directory(cfg, client)
    rng = random.Random(18)
    landed = 0  # cancellations that came while the lookup was still running
    try:
        for _ in range(300):
            directory.reload(cfg)  # an empty cache: every lookup asks the store
            after: list[bool] = []

            async def lookup(after: list[bool] = after) -> None:
                await directory.by_key(KEYS["alice"])
                after.append(True)
                await asyncio.sleep(30)  # a request that was not stopped would go on to wait for its body

            task = asyncio.create_task(lookup())
            for _ in range(rng.randint(0, 6)):
                await asyncio.sleep(0)
            if after:  # the lookup was over before the cancel: nothing to test this round
                task.cancel()
                continue
            landed += 1
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5)
            assert done, "the cancelled lookup went on (its cancellation was swallowed)"
            assert task.cancelled() and not after
    finally:
        await client.aclose()
    assert landed >= 30  # most rounds cancel mid-lookup: the test exercises what it says
