"""Background loops (gauges, policy watch, spool replay, the directory's listener) and how they stop.

A loop is stopped by cancelling its task. A library awaited inside the loop can swallow that cancellation
(seen in CI: the gauges loop, cancelled during a Redis call, went back to sleep and the app's shutdown
waited for it for ever). So every loop also checks :func:`cancelled` before each round — in Python 3.11
a task remembers that it was asked to stop even when the ``CancelledError`` never reached it — and
:func:`stop_task` waits for a bounded time only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("kgate.background")

STOP_TIMEOUT = 5.0  # seconds a loop gets to end after its cancellation


def cancelled() -> bool:
    """Whether the current task has been asked to stop (also after a swallowed ``CancelledError``)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def stop_task(task: asyncio.Task[Any] | None, timeout: float = STOP_TIMEOUT) -> None:
    """Cancel ``task`` and wait for it to end, at most ``timeout`` seconds (then leave it, with a warning)."""
    if task is None or task.done():
        return
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.warning("background task %s did not stop within %g s; left behind", task.get_name(), timeout)
        return
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task %s ended with %r", task.get_name(), task.exception())
