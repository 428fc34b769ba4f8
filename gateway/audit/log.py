"""The tamper-evident audit log (docs/design.md §7.1): one hash-chained JSON line per decision.

:class:`AuditLog` is one replica's writer. What a record holds and what its hash covers is
:mod:`gateway.audit.chain`; the files it goes to (``<dir>/<replica>/audit-YYYY-MM-DD.jsonl``, segments
after a torn tail) are :mod:`gateway.audit.files`; :mod:`gateway.audit.appender` keeps the chain's state
and appends the lines; :mod:`gateway.audit.stream` copies them to a Redis Stream.

``await log.write(rec)`` returns once the line has been handed to the OS (and fsynced when ``fsync=True``),
so a process crash loses nothing acknowledged. Without fsync each record is chained and written at once,
on the event loop (a page-cache write of one line, a microsecond or two; a writer thread cost more in
wake-ups and GIL hand-offs than it saved). The price: a disk that stalls a write (a network file system,
a full dirty-page cache) stalls the loop with it; put the audit directory on a local disk, or set
``audit.fsync``. With ``fsync=True`` a dedicated thread takes each turn of the
loop's records, writes them in one write(2) and fsyncs (group commit), so the disk's flush never stalls
the loop. The records never carry prompt or completion text (:data:`gateway.audit.chain.TEXT_KEYS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.audit.appender import ChainAppender
from gateway.audit.chain import CHAIN_FIELDS, TEXT_KEYS, AuditError, chain_line, json_default, rfc3339
from gateway.audit.files import utc_day
from gateway.audit.stream import StreamSink

log = logging.getLogger(__name__)


@dataclass
class _Item:
    payload: bytes
    now: float
    future: asyncio.Future[dict[str, Any]] | None


_STOP = object()
# Keys a record given to the log loses (a caller's chain fields, text).
_DROPPED_KEYS = frozenset(CHAIN_FIELDS) | TEXT_KEYS


class AuditLog:
    """One replica's hash-chained audit log.

    ``hmac_key``: authenticate the chain with HMAC-SHA256 (see :func:`gateway.audit.chain.hmac_key_from_env`).
    ``redis`` / ``stream``: also XADD each line to a Redis Stream (``MAXLEN ~ stream_maxlen``) from the
    event loop, with fields ``replica``, ``seq``, ``hash`` and ``record`` (the JSON line). Failures, a full
    backlog (``stream_queue_max``) and an XADD slower than ``stream_timeout`` are counted in
    ``stream_errors`` and never delay or fail the file log; ``close`` gives the backlog ``stream_timeout``.
    ``fsync``: fsync after each batch of lines before acknowledging them (group commit, on a writer thread);
    by default each line is handed to the OS from the event loop as it is written, which survives a process
    crash but not a power loss.
    ``clock``: seconds since the epoch; it stamps ``ts`` (when the caller gave none) and picks the day file.
    A ``ts`` given as epoch seconds is written as RFC 3339 UTC with milliseconds.

    Counters for metrics: ``records_written``, ``write_errors``, ``stream_written``, ``stream_errors``,
    ``redactions``.
    """

    def __init__(self, dir: str | Path, replica: str, *, hmac_key: bytes | None = None,
                 redis: Any = None, stream: str | None = None, clock: Callable[[], float] = time.time,
                 fsync: bool = False, stream_maxlen: int = 1_000_000, stream_queue_max: int = 10_000,
                 stream_timeout: float = 2.0):
        if not replica or "/" in replica or replica in (".", ".."):
            raise ValueError(f"invalid replica id {replica!r}: it names a directory")
        self.dir = Path(dir)
        self.replica = replica
        self.path = self.dir / replica
        self._clock = clock
        self._fsync = fsync
        self.write_errors = 0
        self.redactions = 0
        # The chain and its files: with fsync only the writer thread touches it after start().
        self._out = ChainAppender(self.dir, replica, hmac_key, clock, fsync)
        self._sink = StreamSink(redis, stream, replica, maxlen=stream_maxlen, queue_max=stream_queue_max,
                                timeout=stream_timeout) if redis is not None and stream else None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outbox: list[_Item] = []  # fsync thread: records of this loop turn, not yet handed over
        self._thread: threading.Thread | None = None  # only with fsync: the group-commit writer
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._closing = False

    @property
    def records_written(self) -> int:
        return self._out.records_written

    @property
    def stream_written(self) -> int:
        return self._sink.written if self._sink is not None else 0

    @property
    def stream_errors(self) -> int:
        return self._sink.errors if self._sink is not None else 0

    # ---------------------------------------------------------------------------------- lifetime
    async def start(self, *, open_file: bool = True) -> None:
        """Create the directory, take the replica's lock, resume the chain, open the day's file (and start
        the fsync thread). ``open_file=False``: open it at the first record instead (a command line that
        may write nothing leaves no empty file behind)."""
        if self._started:
            raise AuditError("audit log already started")
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open if open_file else self._out.open)
        self._started = True
        if self._fsync:
            self._stopped = self._loop.create_future()
            self._thread = threading.Thread(target=self._run, name=f"audit-{self.replica}", daemon=True)
            self._thread.start()
        if self._sink is not None:
            self._sink.start()

    def _open(self) -> None:
        """In a thread: resume the chain and open the file the next record goes to now, not at the first
        record: under load the process may be out of file descriptors by then (thousands of open streams).
        A torn tail is noted here, in the new segment, as the first write would have done."""
        out = self._out
        out.open()
        try:
            written = out.records_written
            out.ensure_file(utc_day(self._clock()))
            if self._fsync and out.records_written != written and out.fd is not None:
                os.fsync(out.fd)  # the torn-tail note, durable like any record with fsync
        except Exception as exc:  # the first write tries again (and fails, counted, if it still cannot)
            log.warning("audit log: cannot open the current file at start: %s", exc)

    async def close(self) -> None:
        """Stop accepting records, write everything queued, flush, and release the files."""
        if not self._started or self._closing:
            return
        self._closing = True
        self._handoff()
        if self._thread is not None:
            self._queue.put(_STOP)
            assert self._stopped is not None
            await self._stopped
            await asyncio.to_thread(self._thread.join)
        else:
            self._out.close_file()
            self._out.release_lock()
        if self._sink is not None:
            await self._sink.close()

    # ------------------------------------------------------------------------------------ writing
    async def write(self, record: Mapping[str, Any], *, fresh: bool = False, plain: bool = False) -> dict[str, Any]:
        """Append ``record``; return it as written (with ``seq``, ``prev``, ``hash``) once it is in the file.
        (Values JSON has no type for — a set, a Path — are written as lists and strings; the returned dict
        may hold them as given.) ``fresh``: ``record`` is a dict made for this call that the caller does not
        use again; the log then completes it in place instead of copying it. ``plain``: the caller vouches
        that ``record`` has none of the keys the log drops (chain fields, text): it was built from a fixed
        list of keys (:func:`gateway.engine.record.audit_record`; tests/unit/test_perf_finish.py holds that
        list apart from the dropped keys), so the log skips looking (a look at every key of every record).

        Raises :class:`AuditError` when the line could not be written (also counted in ``write_errors``).
        """
        loop = self._require_started()
        if self._thread is None:
            return self._write_now(self._prepare(record, fresh, plain))
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._enqueue(self._prepare(record, fresh, plain), fut)
        return await fut

    def write_nowait(self, record: Mapping[str, Any], *, fresh: bool = False, plain: bool = False) -> None:
        """Write ``record`` without waiting for it; a failed write is counted in ``write_errors``.
        ``fresh`` and ``plain`` as for :meth:`write`."""
        self._require_started()
        if self._thread is None:
            with contextlib.suppress(AuditError):  # counted, and logged, by _write_now
                self._write_now(self._prepare(record, fresh, plain))
            return
        self._enqueue(self._prepare(record, fresh, plain), None)

    def _require_started(self) -> asyncio.AbstractEventLoop:
        if not self._started or self._loop is None:
            raise AuditError("audit log not started")
        if self._closing:
            raise AuditError("audit log is closed")
        return self._loop

    def _prepare(self, record: Mapping[str, Any], fresh: bool = False, plain: bool = False
                 ) -> tuple[dict[str, Any], float]:
        """The record as the log keeps it (no chain fields of the caller's, no text, ``ts`` in RFC 3339),
        and the clock reading that picks its day file."""
        now = self._clock()
        rec = record if fresh and type(record) is dict else dict(record)
        # One look at the keys for a record of unknown keys (which usually has none of these); none for a
        # record the caller vouches for (``plain``)
        if not plain and not _DROPPED_KEYS.isdisjoint(rec):
            for k in CHAIN_FIELDS:
                rec.pop(k, None)
            if not TEXT_KEYS.isdisjoint(rec):
                text_keys = sorted(TEXT_KEYS.intersection(rec))
                for k in text_keys:
                    del rec[k]
                rec["redacted"] = text_keys
                self.redactions += 1
                log.warning("audit record carried text fields %s: dropped", text_keys)
        ts = rec.get("ts")
        if ts is None:
            rec["ts"] = rfc3339(now)
        elif ts.__class__ is float:  # the usual case (time.time()), before the general test below
            rec["ts"] = rfc3339(ts)
        elif isinstance(ts, (int, float)) and not isinstance(ts, bool):
            rec["ts"] = rfc3339(float(ts))  # epoch seconds from the caller: stored as RFC 3339 like the rest
        rec.setdefault("replica", self.replica)
        return rec, now

    def _enqueue(self, prepared: tuple[dict[str, Any], float], fut: asyncio.Future[dict[str, Any]] | None) -> None:
        """The fsync thread's way in."""
        rec, now = prepared
        try:
            # Serialize now, on the caller's side: the caller may reuse its dicts, and an unserializable
            # value is the caller's bug, reported to the caller.
            payload = orjson.dumps(rec, default=json_default)
        except TypeError:
            self.write_errors += 1
            raise
        # Hand over once per turn of the event loop, not record by record: one wake-up of the thread.
        self._outbox.append(_Item(payload, now, fut))
        if len(self._outbox) == 1:
            assert self._loop is not None
            self._loop.call_soon(self._handoff)

    def _handoff(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self._queue.put(batch)

    def _write_now(self, prepared: tuple[dict[str, Any], float]) -> dict[str, Any]:
        """The loop writer: chain and write one record at once, on the event loop. A page-cache write of a
        line costs a microsecond or two; handing it anywhere else cost more (a thread's wake-ups and GIL
        hand-offs, or a future and two more turns of the loop for the request that waits for it)."""
        rec, now = prepared
        out = self._out
        try:
            out.ensure_file(utc_day(now))
            out.append(rec)
        except TypeError:  # an unserializable value is the caller's bug, reported to the caller
            self.write_errors += 1
            raise
        except Exception as exc:
            raise self._failed(exc, 1) from None
        if self._sink is not None:
            self._sink.put(rec)
        return rec

    # ------------------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        stop = False
        try:
            while not stop:
                batch: list[Any] = []
                first = self._queue.get()
                while True:
                    if isinstance(first, list):
                        batch.extend(first)
                    else:
                        batch.append(first)
                    try:
                        first = self._queue.get_nowait()
                    except queue.Empty:
                        break
                stop = _STOP in batch
                done = self._write_batch([item for item in batch if item is not _STOP])
                fd = self._out.fd
                if self._fsync and fd is not None and any(isinstance(r, dict) for _, r in done):
                    try:
                        os.fsync(fd)
                    except OSError as exc:  # the lines are in the OS already; durability is not certain
                        self.write_errors += 1
                        log.error("audit fsync failed: %s", exc)
                assert self._loop is not None
                # One wake-up of the event loop per batch, and none at all when nobody waits for these
                # records (write_nowait) and there is no stream sink: waking the loop is a syscall.
                if done and (self._sink is not None or any(
                        item.future is not None or isinstance(result, BaseException) for item, result in done)):
                    self._loop.call_soon_threadsafe(self._settle_batch, done)
        finally:
            self._out.close_file()
            self._out.release_lock()
            assert self._loop is not None and self._stopped is not None
            with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
                self._loop.call_soon_threadsafe(_set_done, self._stopped)

    def _settle_batch(self, done: list[tuple[_Item, dict[str, Any] | BaseException]]) -> None:
        for item, result in done:
            self._settle(item, result)

    def _settle(self, item: _Item, result: dict[str, Any] | BaseException) -> None:
        """On the event loop: acknowledge the writer and hand the line to the stream sink."""
        if isinstance(result, BaseException):
            if item.future is not None and not item.future.done():
                item.future.set_exception(result)
            return
        if item.future is not None and not item.future.done():
            item.future.set_result(result)
        if self._sink is not None:
            self._sink.put(result)

    def _write_batch(self, items: list[_Item]) -> list[tuple[_Item, dict[str, Any] | BaseException]]:
        """The fsync thread: chain and write ``items`` in order, one write(2) per file they go to. Returns
        each item's record as written, or the error that kept it out of the file."""
        out = self._out
        done: list[tuple[_Item, dict[str, Any] | BaseException]] = []
        pending: list[tuple[_Item, dict[str, Any], bytes]] = []  # chained, not yet written
        for item in items:
            try:
                day = utc_day(item.now)
                if not out.ready(day):
                    self._flush(pending, done)
                    out.ensure_file(day)
                seq, prev = (pending[-1][1]["seq"], pending[-1][1]["hash"]) if pending else (out.seq, out.prev)
                rec = orjson.loads(item.payload)
                pending.append((item, rec, chain_line(rec, seq, prev, out.key)))
            except Exception as exc:
                done.append((item, self._failed(exc, 1)))
        self._flush(pending, done)
        return done

    def _flush(self, pending: list[tuple[_Item, dict[str, Any], bytes]],
               done: list[tuple[_Item, dict[str, Any] | BaseException]]) -> None:
        if not pending:
            return
        try:
            self._out.append_chained(b"".join(line for _, _, line in pending), pending[-1][1], len(pending))
        except Exception as exc:
            err = self._failed(exc, len(pending))
            done.extend((item, err) for item, _, _ in pending)
        else:
            done.extend((item, rec) for item, rec, _ in pending)
        pending.clear()

    def _failed(self, exc: Exception, count: int) -> AuditError:
        self.write_errors += count
        log.error("audit write failed: %s", exc)
        return exc if isinstance(exc, AuditError) else AuditError(f"audit write failed: {exc}")


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
