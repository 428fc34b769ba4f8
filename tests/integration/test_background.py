"""Background loops stop when asked, even when something they await swallows the cancellation.

In CI the app's shutdown once waited for ever: the gauges loop was cancelled inside a Redis call, the
``CancelledError`` never reached the loop, and it went back to sleep. These tests swallow cancellations on
purpose and check that the loops end and that the app shuts down in bounded time.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from gatewayutil import make_config, running_gateway

from gateway import background


async def test_a_loop_that_checks_cancelled_ends_after_a_swallowed_cancellation() -> None:
    entered = asyncio.Event()

    async def swallowing_call() -> None:
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # what a misbehaving library does

    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while not background.cancelled():
            rounds += 1
            await swallowing_call()
            await asyncio.sleep(0.05)

    task = asyncio.create_task(loop())
    await entered.wait()
    t0 = time.monotonic()
    await background.stop_task(task, timeout=5)
    assert task.done() and time.monotonic() - t0 < 1.0
    assert rounds == 1


async def test_stop_gives_up_on_a_task_that_never_ends(caplog: pytest.LogCaptureFixture) -> None:
    let_go = False

    async def stubborn() -> None:
        while not let_go:  # deaf to cancellation: only the test's flag ends it
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                pass

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    t0 = time.monotonic()
    await background.stop_task(task, timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 2.0
    assert not task.done()
    assert "stubborn did not stop" in caplog.text
    let_go = True
    await asyncio.wait_for(task, 2)


async def test_the_app_shuts_down_although_a_redis_call_swallowed_its_cancellation(redis_srv,
                                                                                   tmp_path: Path) -> None:
    async with running_gateway(make_config(tmp_path, redis_srv.url)) as g:
        gw = g.gw
        real_ping = gw.redis.ping
        in_ping = asyncio.Event()

        async def swallowing_ping(*args, **kwargs):  # type: ignore[no-untyped-def]
            in_ping.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return True
            return await real_ping(*args, **kwargs)

        gw.redis.ping = swallowing_ping
        await asyncio.wait_for(in_ping.wait(), 10)  # the gauges loop is inside the call now
        t0 = time.monotonic()
    # The gauges loop, cancelled inside the swallowing call, ends after at most one more sleep of its
    # interval, well within the bounded wait of the shutdown; it is not left behind.
    assert time.monotonic() - t0 < 15
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "kgate-gauges" and not t.done()]
