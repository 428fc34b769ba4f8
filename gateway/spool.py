"""The local spool: usage metered while Redis was unreachable, replayed exactly once when it returns.

When a tier says ``on_store_error: allow``, a request that could not reserve is served anyway and its
actual usage is appended here — one JSON line per request, fsynced before the request is reported done —
instead of being lost. A background task replays the lines into the ledger in order as soon as the store
answers again. Replay uses :meth:`Ledger.settle` with the request id, which is idempotent: a line replayed
twice (a crash between the ledger write and the spool's progress mark) still counts once.

The spool is bounded (``store.spool_max_bytes``): when full, new usage is refused (logged and counted as
lost), never the file grown without limit. Its depth is a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from .ledger import BudgetSpec, HoldRequest, Ledger, Reservation, ScopeRef

log = logging.getLogger("kgate.spool")


def _hold_to_dict(h: HoldRequest) -> dict[str, Any]:
    return {"scope": h.scope.scope, "id": h.scope.id,
            "budgets": [[b.label, b.metric, b.window, b.rolling, b.limit] for b in h.budgets],
            "amounts": dict(h.amounts)}


def _hold_from_dict(d: Mapping[str, Any]) -> HoldRequest:
    return HoldRequest(ScopeRef(d["scope"], d["id"]),
                       tuple(BudgetSpec(str(b[0]), str(b[1]), str(b[2]), bool(b[3]), float(b[4]))
                             for b in d["budgets"]),
                       {k: float(v) for k, v in d["amounts"].items()})


class Spool:
    """An append-only, fsynced, bounded file of usage waiting for the ledger."""

    def __init__(self, path: str | Path, *, max_bytes: int = 64 << 20,
                 on_replayed: Callable[[dict[str, Any]], None] | None = None):
        self.path = Path(path)
        self.offset_path = self.path.with_suffix(self.path.suffix + ".offset")
        self.max_bytes = max_bytes
        self.on_replayed = on_replayed
        self.lost = 0
        self.replayed = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------------------------------ writes
    def append(self, request_id: str, holds: Sequence[HoldRequest], actual: Mapping[str, float],
               meta: Mapping[str, Any] | None = None) -> bool:
        """Record usage that the ledger has not seen; True once it is on disk."""
        line = orjson.dumps({"request_id": request_id, "holds": [_hold_to_dict(h) for h in holds],
                             "actual": dict(actual), "meta": dict(meta or {})}) + b"\n"
        with self._lock:
            size = os.fstat(self._fd).st_size
            if size - self._offset() + len(line) > self.max_bytes:
                self.lost += 1
                log.error("spool full (%d bytes): usage of request %s is lost", size, request_id)
                return False
            os.write(self._fd, line)
            os.fsync(self._fd)
        self._wake.set()
        return True

    def append_settle(self, request_id: str, reservation: Reservation, actual: Mapping[str, float],
                      meta: Mapping[str, Any] | None = None) -> bool:
        """A settle that failed: its hold stays in Redis until its lease expires; replay corrects it."""
        return self.append(request_id, reservation.holds, actual, meta)

    # ------------------------------------------------------------------------------------------ depth
    def _offset(self) -> int:
        try:
            return int(self.offset_path.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def depth(self) -> tuple[int, int]:
        """(records, bytes) waiting for replay."""
        with self._lock:
            off = self._offset()
            try:
                with open(self.path, "rb") as f:
                    f.seek(off)
                    rest = f.read()
            except OSError:
                return 0, 0
        return rest.count(b"\n"), len(rest)

    # ------------------------------------------------------------------------------------------ replay
    async def replay(self, ledger: Ledger) -> int:
        """Replay what is pending, in order; stops at the first store error. Returns lines replayed."""
        done = 0
        while True:
            entry = await asyncio.to_thread(self._next)
            if entry is None:
                return done
            off_after, rec = entry
            if rec is not None:
                reservation = Reservation(rec["request_id"], tuple(_hold_from_dict(h) for h in rec["holds"]))
                await ledger.settle(reservation, rec["actual"])  # raises on store error: retried later
                if self.on_replayed is not None:
                    self.on_replayed(rec)
                self.replayed += 1
                done += 1
            await asyncio.to_thread(self._commit, off_after)

    def _next(self) -> tuple[int, dict[str, Any] | None] | None:
        off = self._offset()
        with open(self.path, "rb") as f:
            f.seek(off)
            line = f.readline()
        if not line or not line.endswith(b"\n"):
            return None
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.error("skipping a corrupt spool line at offset %d", off)
            return off + len(line), None
        return off + len(line), rec

    def _commit(self, offset: int) -> None:
        with self._lock:
            if offset >= os.fstat(self._fd).st_size:
                # Everything replayed: start the file afresh so that it does not grow for ever.
                os.ftruncate(self._fd, 0)
                offset = 0
            tmp = self.offset_path.with_suffix(".tmp")
            tmp.write_text(str(offset))
            os.replace(tmp, self.offset_path)

    def start(self, ledger: Ledger, *, interval: float = 1.0,
              on_error: Callable[[BaseException], None] | None = None) -> None:
        """Replay in the background: on every append and every ``interval`` seconds while anything waits."""

        async def loop() -> None:
            backoff = interval
            while True:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=backoff)
                self._wake.clear()
                if self.depth()[0] == 0:
                    backoff = interval
                    continue
                try:
                    n = await self.replay(ledger)
                    if n:
                        log.info("replayed %d spooled usage records into the ledger", n)
                    backoff = interval
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if on_error is not None:
                        on_error(exc)
                    backoff = min(backoff * 2, 10.0)

        self._task = asyncio.create_task(loop(), name="kgate-spool-replay")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        os.close(self._fd)
