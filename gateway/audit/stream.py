"""The audit log's copy in a Redis Stream: each written record XADDed from the event loop, best effort.

The file is the record of truth; the stream is for consumers that tail the log across replicas. A record
reaches :class:`StreamSink` only once it is in the file, and the sink never delays or fails the file log:
a full backlog, a failed or slow XADD is counted in ``errors`` and the record is dropped from the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Any

import orjson

from gateway.audit.chain import json_default

log = logging.getLogger("gateway.audit.log")  # the audit log's logger: its messages keep their name


class StreamSink:
    """XADD each written record to ``stream`` (``MAXLEN ~ maxlen``) with fields ``replica``, ``seq``,
    ``hash`` and ``record`` (the JSON line). At most ``queue_max`` records wait; an XADD gets ``timeout``
    seconds, and so does the backlog on :meth:`close`. Counters: ``written``, ``errors``."""

    def __init__(self, redis: Any, stream: str, replica: str, *, maxlen: int, queue_max: int, timeout: float):
        self._redis = redis
        self._stream = stream
        self._replica = replica.encode()
        self._maxlen = maxlen
        self._timeout = timeout
        self._queue: asyncio.Queue[dict[bytes, bytes] | None] = asyncio.Queue(queue_max)
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.errors = 0

    def start(self) -> None:
        """Start sending (on the running event loop)."""
        self._task = asyncio.create_task(self._run(), name=f"audit-stream-{self._replica.decode()}")

    def put(self, rec: dict[str, Any]) -> None:
        """Queue a written record (on the event loop). Never raises: the record is in the file already,
        and the stream's failures are counted apart."""
        try:
            fields = {b"replica": self._replica, b"seq": str(rec["seq"]).encode(),
                      b"hash": rec["hash"].encode(),
                      b"record": orjson.dumps(rec, default=json_default, option=orjson.OPT_SORT_KEYS)}
            self._queue.put_nowait(fields)
        except (asyncio.QueueFull, TypeError):  # Redis is slower than the gateway: drop, count, never wait
            self.errors += 1

    async def _run(self) -> None:
        """XADD each queued line; errors are counted, the file log never waits."""
        while True:
            fields = await self._queue.get()
            if fields is None:
                return
            try:
                result = self._redis.xadd(self._stream, fields, maxlen=self._maxlen, approximate=True)
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, self._timeout)
                self.written += 1
            except asyncio.CancelledError:
                self.errors += 1
                raise
            except Exception as exc:
                self.errors += 1
                log.debug("audit stream XADD failed: %s", exc)

    async def close(self) -> None:
        """Give the stream at most ``timeout`` to catch up; count what it could not take."""
        task = self._task
        if task is None:
            return
        try:
            self._queue.put_nowait(None)
        except asyncio.QueueFull:
            task.cancel()
        done, _ = await asyncio.wait([task], timeout=self._timeout)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        while not self._queue.empty():
            if self._queue.get_nowait() is not None:
                self.errors += 1
