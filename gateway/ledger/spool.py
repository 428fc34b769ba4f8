"""The local spool: usage metered while Redis was unreachable, replayed exactly once when it returns.

When a tier says ``on_store_error: allow``, a request that could not reserve is served anyway and its
actual usage is appended here — one JSON line per request, fsynced before the request is reported done —
instead of being lost. A settle that failed (Redis went away while a request ran) is appended too: its hold
stays in Redis until its lease expires, and the replayed settle corrects the charge to the actual.

A hold that could not be voided is appended too (``kind: release``): a release that failed, or a reserve
that failed and was refused by policy — the reserve may have reached Redis before it died, and its
rollback could not. Without the line, the lease would expire and be charged for a request never served.

A background task replays the lines into the ledger in order as soon as the store answers again, through
the ledger's idempotent operations, so a line replayed twice (a crash between the ledger write and the
spool's progress mark) still counts once. Each finds whatever the outage left in Redis:

- usage lines: :meth:`Ledger.settle` under the request id turns a hold (a settle that failed: ``kind:
  settle``), or the charge its expired lease made, into the actual; with nothing there (a reserve that
  failed: ``kind: post``; the ledger's rollback of a reserve that may have reached Redis forgets the
  request rather than marking it) the actual is posted.
- ``release`` lines: :meth:`Ledger.release` voids a hold, takes back its expiry charge, or only marks an
  id that never reached Redis.

Progress is a byte offset kept beside the file (``<spool>.offset``); once everything is replayed the file
starts afresh. Crash safety: a line is acknowledged only after ``fsync``; a torn last line (a crash in the
middle of a write, never acknowledged) is cut off when the spool is opened, so the next line cannot be
glued to it; an offset past the end of the file (a crash between emptying the file and recording that)
counts as 0.

The spool is bounded (``store.spool_max_bytes``): when full, new usage is refused (logged and counted in
``lost``), never the file grown without limit. A line the ledger rejects as malformed is skipped (logged,
counted in ``skipped``) rather than blocking every line after it. Its depth is a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from gateway.background import cancelled, stop_task
from gateway.ledger.ledger import BudgetSpec, HoldRequest, Ledger, Reservation, ScopeRef

log = logging.getLogger("kgate.spool")

# Seconds between replay attempts while the store stays away: short, because a store that is back should
# see the backlog soon (readiness, reconcile), and one refused connection every few seconds costs nothing.
MAX_BACKOFF = 2.0


def _hold_to_dict(h: HoldRequest) -> dict[str, Any]:
    return {"scope": h.scope.scope, "id": h.scope.id,
            "budgets": [[b.label, b.metric, b.window, b.rolling, b.limit] for b in h.budgets],
            "amounts": dict(h.amounts)}


def _hold_from_dict(d: Mapping[str, Any]) -> HoldRequest:
    return HoldRequest(ScopeRef(d["scope"], d["id"]),
                       tuple(BudgetSpec(str(b[0]), str(b[1]), str(b[2]), bool(b[3]), float(b[4]))
                             for b in d["budgets"]),
                       {k: float(v) for k, v in d["amounts"].items()})


OnReplayed = Callable[[dict[str, Any]], Awaitable[None] | None]


class Spool:
    """An append-only, fsynced, bounded file of usage waiting for the ledger.

    ``append`` may be called from any thread (the gateway calls it through ``asyncio.to_thread``);
    ``replay``, ``start`` and ``close`` belong to the event loop that created the spool.
    ``on_replayed(record)`` is called for each line once the ledger has it, before the line is marked done;
    when it returns an awaitable (e.g. an audit write), the mark waits for it, so a crash in between
    replays the line again (a repeat for the ledger) rather than losing what ``on_replayed`` records.
    """

    def __init__(self, path: str | Path, *, max_bytes: int = 64 << 20, on_replayed: OnReplayed | None = None):
        self.path = Path(path)
        self.offset_path = self.path.with_suffix(self.path.suffix + ".offset")
        self.max_bytes = max_bytes
        self.on_replayed = on_replayed
        self.lost = 0  # usage refused because the spool was full or the disk failed
        self.skipped = 0  # lines the ledger could not take (corrupt or malformed): dropped, logged
        self.replayed = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._closed = False
        self._cut_torn_tail()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replaying = asyncio.Lock()

    # ------------------------------------------------------------------------------------------ writes
    def append(self, request_id: str, holds: Sequence[HoldRequest], actual: Mapping[str, float],
               meta: Mapping[str, Any] | None = None) -> bool:
        """Record the usage of a request whose reserve failed (no reservation); True once it is on disk
        (False: the spool is full, or the disk failed)."""
        return self._append("post", request_id, holds, actual, meta)

    def append_settle(self, request_id: str, reservation: Reservation, actual: Mapping[str, float],
                      meta: Mapping[str, Any] | None = None) -> bool:
        """A settle that failed: its hold stays in Redis until its lease expires; replay corrects it."""
        return self._append("settle", request_id, reservation.holds, actual, meta)

    def _append(self, kind: str, request_id: str, holds: Sequence[HoldRequest], actual: Mapping[str, float],
                meta: Mapping[str, Any] | None) -> bool:
        line = orjson.dumps({"request_id": request_id, "kind": kind, "holds": [_hold_to_dict(h) for h in holds],
                             "actual": dict(actual), "meta": dict(meta or {})}) + b"\n"
        with self._lock:
            if self._closed:
                self.lost += 1
                log.error("spool closed: %s line of request %s is lost", kind, request_id)
                return False
            size = os.fstat(self._fd).st_size
            if size - self._offset() + len(line) > self.max_bytes:
                self.lost += 1
                log.error("spool full (%d bytes): %s line of request %s is lost", size, kind, request_id)
                return False
            try:
                if os.write(self._fd, line) != len(line):
                    raise OSError("short write")
                os.fsync(self._fd)
            except OSError as exc:
                # Never leave half a line behind: the next append would be glued to it.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
                self.lost += 1
                log.error("spool write failed (%s): %s line of request %s is lost", exc, kind, request_id)
                return False
        self.wake()
        return True

    def append_release(self, request_id: str, holds: Sequence[HoldRequest],
                       meta: Mapping[str, Any] | None = None) -> bool:
        """A hold that may exist in Redis and must be voided (a release, or a denied reserve, that failed)."""
        return self._append("release", request_id, holds, {}, meta)

    def wake(self) -> None:
        """Ask the background task to replay now (any thread; e.g. when the store is known to be back)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody to wake
                loop.call_soon_threadsafe(self._wake.set)

    def _cut_torn_tail(self) -> None:
        """Drop an unterminated last line: a write a crash interrupted, which nobody was told succeeded."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.path, "rb") as f:
            start = max(0, size - 65536)
            while True:
                f.seek(start)
                tail = f.read(size - start)
                if tail.endswith(b"\n"):
                    return
                cut = tail.rfind(b"\n")
                if cut >= 0 or start == 0:
                    keep = start + cut + 1 if cut >= 0 else 0
                    break
                start = max(0, start - 65536)
        log.warning("spool %s: cutting a torn last line of %d bytes (a crash interrupted its write)",
                    self.path, size - keep)
        os.ftruncate(self._fd, keep)

    # ------------------------------------------------------------------------------------------ depth
    def _offset(self) -> int:
        try:
            off = int(self.offset_path.read_text() or 0)
        except (OSError, ValueError):
            return 0
        # Past the end: the file was emptied after a full replay and the crash came before the offset
        # was reset. Everything in the file now is new.
        try:
            size = os.stat(self.path).st_size
        except OSError:
            return 0
        return off if off <= size else 0

    def depth(self) -> tuple[int, int]:
        """(records, bytes) waiting for replay."""
        with self._lock:
            off = self._offset()
            records = size = 0
            try:
                with open(self.path, "rb") as f:
                    f.seek(off)
                    while chunk := f.read(1 << 20):
                        records += chunk.count(b"\n")
                        size += len(chunk)
            except OSError:
                return 0, 0
        return records, size

    # ------------------------------------------------------------------------------------------ replay
    async def replay(self, ledger: Ledger) -> int:
        """Replay what is pending, in order; stops at the first store error (raised). Returns lines replayed.

        Concurrent calls are serialized, so a line is never in flight twice from one process.
        """
        async with self._replaying:
            done = 0
            while True:
                entry = await asyncio.to_thread(self._next)
                if entry is None:
                    return done
                off_after, rec = entry
                release = False
                if rec is not None:
                    try:
                        rid = str(rec["request_id"])
                        holds = tuple(_hold_from_dict(h) for h in rec["holds"])
                        actual = {str(k): float(v) for k, v in rec["actual"].items()}
                        release = rec.get("kind") == "release"
                    except (KeyError, TypeError, ValueError, AttributeError) as exc:
                        self._skip(off_after, f"malformed record ({exc!r})")
                        rec = None
                    else:
                        try:  # store errors propagate: the line is retried later
                            if release:
                                await ledger.release(Reservation(rid, holds))
                            else:
                                await ledger.settle(Reservation(rid, holds), actual)
                        except ValueError as exc:  # the ledger refuses the amounts: retrying cannot help
                            self._skip(off_after, str(exc))
                            rec = None
                if rec is not None:
                    if self.on_replayed is not None and not release:
                        try:
                            result = self.on_replayed(rec)
                            if inspect.isawaitable(result):
                                await result
                        except Exception:
                            log.exception("spool: on_replayed failed for %s", rec.get("request_id"))
                    self.replayed += 1
                    done += 1
                await asyncio.to_thread(self._commit, off_after)

    def _skip(self, offset: int, why: str) -> None:
        self.skipped += 1
        log.error("spool %s: skipping the line ending at offset %d: %s", self.path, offset, why)

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
            self._skip(off + len(line), "not JSON")
            return off + len(line), None
        if not isinstance(rec, dict):
            self._skip(off + len(line), "not a JSON object")
            return off + len(line), None
        return off + len(line), rec

    def _commit(self, offset: int) -> None:
        with self._lock:
            if offset >= os.fstat(self._fd).st_size:
                # Everything replayed: start the file afresh so that it does not grow for ever. The offset
                # goes to 0 first: a crash in between replays lines again (idempotent), never skips any.
                self._write_offset(0)
                os.ftruncate(self._fd, 0)
                return
            self._write_offset(offset)

    def _write_offset(self, offset: int) -> None:
        tmp = self.offset_path.with_suffix(".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self.offset_path)

    def start(self, ledger: Ledger, *, interval: float = 1.0,
              on_error: Callable[[BaseException], None] | None = None) -> None:
        """Replay in the background: on every append (and :meth:`wake`) and every ``interval`` seconds while
        anything waits; after a store error, retry every ``MAX_BACKOFF`` seconds at most."""
        self._loop = asyncio.get_running_loop()

        async def loop() -> None:
            backoff = interval
            failing = False
            while not cancelled():
                if failing:
                    # The store is away: appends must not turn into a stream of doomed attempts.
                    await asyncio.sleep(backoff)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=interval)
                self._wake.clear()
                if (await asyncio.to_thread(self.depth))[0] == 0:
                    failing, backoff = False, interval
                    continue
                try:
                    n = await self.replay(ledger)
                    if n:
                        log.info("replayed %d spooled usage records into the ledger", n)
                    failing, backoff = False, interval
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if on_error is not None:
                        on_error(exc)
                    backoff = min(backoff * 2, MAX_BACKOFF) if failing else min(interval, MAX_BACKOFF) / 4
                    failing = True

        self._task = asyncio.create_task(loop(), name="kgate-spool-replay")

    async def close(self) -> None:
        """Stop the background replay and close the file (what waits stays for the next start)."""
        await stop_task(self._task)
        self._task = None
        self._loop = None
        with self._lock:  # an append in another thread finishes first; later ones are refused
            if not self._closed:
                self._closed = True
                os.close(self._fd)
