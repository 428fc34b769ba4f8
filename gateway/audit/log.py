"""The tamper-evident audit log (docs/design.md §7.1): one hash-chained JSON line per decision.

Each replica writes ``<dir>/<replica>/audit-YYYY-MM-DD.jsonl`` (UTC day of the write), one record per line.
The writer adds three fields to the record it is given:

- ``seq``: the per-replica sequence number, 1, 2, 3, ... across files and restarts;
- ``prev``: the ``hash`` of the record before (``GENESIS``, 64 zeros, for seq 1);
- ``hash``: hex sha256 over ``prev`` (its ASCII hex) followed by the canonical JSON of the record without
  ``hash`` (orjson, sorted keys, no spaces). With an HMAC key the hash is HMAC-SHA256 over the same bytes
  and the record says ``"mac": "hmac-sha256"``.

The chain continues across daily files and restarts: on start the writer resumes from the last line of the
newest file. A torn last line (a crash in the middle of a write) is never appended to: the writer opens a
new segment ``audit-YYYY-MM-DD.N.jsonl`` whose first record notes the torn tail (``event: torn_tail`` with
``torn_file``, ``torn_offset``, ``torn_bytes``) so that ``kgate audit verify`` can tell a crash from
tampering.

``await log.write(rec)`` returns once the line has been handed to the OS (and fsynced when ``fsync=True``),
so a process crash loses nothing acknowledged. Without fsync each record is chained and written at once,
on the event loop (a page-cache write of one line, a microsecond or two; a writer thread cost more in
wake-ups and GIL hand-offs than it saved). The price: a disk that stalls a write (a network file system,
a full dirty-page cache) stalls the loop with it; put the audit directory on a local disk, or set
``audit.fsync``. With ``fsync=True`` a dedicated thread takes each turn of the
loop's records, writes them in one write(2) and fsyncs (group commit), so the disk's flush never stalls
the loop. The records never
carry prompt or completion text; top-level keys that would (``messages``, ``prompt``, ...) are dropped and
named in ``redacted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import hmac
import inspect
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

GENESIS = "0" * 64
MAC_NAME = "hmac-sha256"
DECISIONS = ("allowed", "denied", "clamped", "failed", "partial", "spooled", "replayed", "admin")
# Fields the writer owns: a caller's values for them are replaced.
CHAIN_FIELDS = ("seq", "prev", "hash", "mac")
# Top-level keys that would carry prompt or completion text: never written.
TEXT_KEYS = frozenset({
    "messages", "prompt", "input", "contents", "system", "instructions", "completion", "choices",
    "content", "text", "body", "candidates", "output",
})
FILE_RE = re.compile(r"^audit-(\d{4}-\d{2}-\d{2})(?:\.(\d+))?\.jsonl$")
_TAIL_CHUNK = 64 * 1024


class AuditError(Exception):
    """The audit log cannot do what was asked: not started, closed, a failed write, a corrupt tail."""


# ------------------------------------------------------------------------------------------ the chain
def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: orjson with sorted keys, no spaces, without ``hash``."""
    return orjson.dumps({k: v for k, v in record.items() if k != "hash"}, option=orjson.OPT_SORT_KEYS)


def chain_hash(prev: str, body: bytes, key: bytes | None = None) -> str:
    """sha256 (or HMAC-SHA256 with ``key``) over the previous hash's hex text followed by ``body``."""
    msg = prev.encode("utf-8", "surrogatepass") + body
    if key is None:
        return hashlib.sha256(msg).hexdigest()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def hmac_key_from_env(name: str | None) -> bytes | None:
    """The HMAC key held in the environment variable ``name`` (``audit.hmac_key_env``), or None when unset.

    Raises :class:`AuditError` when a variable is named but missing or empty: a configured HMAC key that
    silently falls back to plain hashes would weaken the log without anyone noticing.
    """
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise AuditError(f"audit HMAC key: environment variable {name} is not set or empty")
    return value.encode("utf-8")


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC with milliseconds: ``2025-01-31T23:59:59.123Z`` (the same text as ``datetime``'s
    ``isoformat(timespec="milliseconds")``, which rounds to microseconds, then truncates)."""
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    sec = int(whole)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    elif us < 0:
        sec, us = sec - 1, us + 1_000_000
    return f"{_second_text(sec)}.{us // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _second_text(sec: int) -> str:
    # Every record of one second shares this prefix: formatting a datetime per record was a measurable
    # part of writing one.
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def file_order(path: Path) -> tuple[str, int, str]:
    """Sort key that puts a replica's files in write order: by day, then segment (the base file is 0)."""
    m = FILE_RE.match(path.name)
    if not m:
        return ("~", 0, path.name)
    return (m.group(1), int(m.group(2) or 0), path.name)


def replica_files(replica_dir: Path) -> list[Path]:
    """A replica's audit files in write order."""
    if not replica_dir.is_dir():
        return []
    return sorted((p for p in replica_dir.iterdir() if FILE_RE.match(p.name) and p.is_file()), key=file_order)


def _utc_day(ts: float) -> str:
    return _day_text(math.floor(ts / 86400))


@functools.lru_cache(maxsize=4)
def _day_text(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86400))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, (Path, bytes)):
        return str(obj)
    raise TypeError(f"audit record value of type {type(obj).__name__} is not JSON-serializable")


# --------------------------------------------------------------------------------------- resuming
@dataclass
class _Torn:
    """An incomplete line the writer will not append after; the next segment's first record notes it."""

    file: str
    offset: int
    nbytes: int


@dataclass
class _Resume:
    seq: int
    prev: str
    torn: _Torn | None
    newest: Path | None


def _tail(path: Path) -> tuple[int, bytes]:
    """(offset, bytes) of the end of ``path``, holding at least two newlines or the whole file."""
    size = path.stat().st_size
    start = size
    data = b""
    with open(path, "rb") as fh:
        while start > 0 and data.count(b"\n") < 2:
            step = min(_TAIL_CHUNK, start)
            start -= step
            fh.seek(start)
            data = fh.read(step) + data
    return start, data


def _parse_tail_record(raw: bytes, path: Path) -> tuple[int, str]:
    try:
        rec = orjson.loads(raw)
        seq, h = rec["seq"], rec["hash"]
        if isinstance(seq, int) and isinstance(h, str):
            return seq, h
    except (orjson.JSONDecodeError, TypeError, KeyError):
        pass
    raise AuditError(f"cannot resume the audit chain: the last line of {path} is not an audit record "
                     f"(run `kgate audit verify {path.parent}`)")


def _resume(replica_dir: Path) -> _Resume:
    """Where the chain stands: last seq and hash, and a torn tail in the newest file, if any."""
    files = replica_files(replica_dir)
    torn: _Torn | None = None
    for i, path in enumerate(reversed(files)):
        start, data = _tail(path)
        if not data:
            continue
        end = data.rfind(b"\n")
        if end != len(data) - 1:
            if i == 0:  # only the newest file can have a tail torn by this writer's last crash
                torn = _Torn(path.name, start + end + 1, len(data) - end - 1)
            data = data[: end + 1]
        if not data:
            continue
        lines = data.split(b"\n")
        seq, h = _parse_tail_record(lines[-2], path)
        return _Resume(seq, h, torn, files[-1])
    return _Resume(0, GENESIS, torn, files[-1] if files else None)


# ------------------------------------------------------------------------------------------ writer
@dataclass
class _Item:
    payload: bytes
    now: float
    future: asyncio.Future[dict[str, Any]] | None


_STOP = object()


class AuditLog:
    """One replica's hash-chained audit log.

    ``hmac_key``: authenticate the chain with HMAC-SHA256 (see :func:`hmac_key_from_env`).
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
        self._key = hmac_key
        self._redis = redis if stream else None
        self._stream = stream
        self._stream_maxlen = stream_maxlen
        self._stream_timeout = stream_timeout
        self._clock = clock
        self._fsync = fsync
        self.records_written = 0
        self.write_errors = 0
        self.stream_written = 0
        self.stream_errors = 0
        self.redactions = 0
        # Writer-thread state: only the thread touches these after start().
        self._seq = 0
        self._prev = GENESIS
        self._fd: int | None = None
        self._file: Path | None = None
        self._day = ""
        self._size = 0
        self._torn: _Torn | None = None
        self._lock_fd: int | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outbox: list[_Item] = []  # fsync thread: records of this loop turn, not yet handed over
        self._thread: threading.Thread | None = None  # only with fsync: the group-commit writer
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._closing = False
        self._sink_queue: asyncio.Queue[dict[bytes, bytes] | None] = asyncio.Queue(stream_queue_max)
        self._sink_task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------------------------- lifetime
    async def start(self) -> None:
        """Create the directory, take the replica's lock, resume the chain (and start the fsync thread)."""
        if self._started:
            raise AuditError("audit log already started")
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open_state)
        self._started = True
        if self._fsync:
            self._stopped = self._loop.create_future()
            self._thread = threading.Thread(target=self._run, name=f"audit-{self.replica}", daemon=True)
            self._thread.start()
        if self._redis is not None:
            self._sink_task = asyncio.create_task(self._sink(), name=f"audit-stream-{self.replica}")

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
            self._close_file()
            self._release_lock()
        if self._sink_task is not None:
            await self._close_sink(self._sink_task)

    def _open_state(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AuditError(f"another process is writing the audit log of replica {self.replica!r} "
                                 f"in {self.dir}: each replica needs its own id") from None
            raise
        self._lock_fd = fd
        try:
            state = _resume(self.path)
        except Exception:
            self._release_lock()
            raise
        self._seq, self._prev, self._torn = state.seq, state.prev, state.torn
        if state.newest is not None:
            m = FILE_RE.match(state.newest.name)
            self._day = m.group(1) if m else ""
            # A file with a torn tail is never appended to; the first write opens a new segment.
            self._file = state.newest if state.torn is None else None

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------------------------------ writing
    async def write(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``record``; return it as written (with ``seq``, ``prev``, ``hash``) once it is in the file.
        (Values JSON has no type for — a set, a Path — are written as lists and strings; the returned dict
        may hold them as given.)

        Raises :class:`AuditError` when the line could not be written (also counted in ``write_errors``).
        """
        loop = self._require_started()
        if self._thread is None:
            return self._write_now(self._prepare(record))
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._enqueue(self._prepare(record), fut)
        return await fut

    def write_nowait(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` without waiting for it; a failed write is counted in ``write_errors``."""
        self._require_started()
        if self._thread is None:
            with contextlib.suppress(AuditError):  # counted, and logged, by _write_now
                self._write_now(self._prepare(record))
            return
        self._enqueue(self._prepare(record), None)

    def _require_started(self) -> asyncio.AbstractEventLoop:
        if not self._started or self._loop is None:
            raise AuditError("audit log not started")
        if self._closing:
            raise AuditError("audit log is closed")
        return self._loop

    def _prepare(self, record: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        """The record as the log keeps it (no chain fields of the caller's, no text, ``ts`` in RFC 3339),
        and the clock reading that picks its day file."""
        now = self._clock()
        rec = dict(record)
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
            payload = orjson.dumps(rec, default=_json_default)
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
        try:
            self._ensure_file(_utc_day(now))
            self._append(rec)
        except TypeError:  # an unserializable value is the caller's bug, reported to the caller
            self.write_errors += 1
            raise
        except Exception as exc:
            raise self._failed(exc, 1) from None
        self._to_sink(rec)
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
                if self._fsync and self._fd is not None and any(isinstance(r, dict) for _, r in done):
                    try:
                        os.fsync(self._fd)
                    except OSError as exc:  # the lines are in the OS already; durability is not certain
                        self.write_errors += 1
                        log.error("audit fsync failed: %s", exc)
                assert self._loop is not None
                # One wake-up of the event loop per batch, and none at all when nobody waits for these
                # records (write_nowait) and there is no stream sink: waking the loop is a syscall.
                if done and (self._sink_task is not None or any(
                        item.future is not None or isinstance(result, BaseException) for item, result in done)):
                    self._loop.call_soon_threadsafe(self._settle_batch, done)
        finally:
            self._close_file()
            self._release_lock()
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
        self._to_sink(result)

    def _to_sink(self, result: dict[str, Any]) -> None:
        """Hand a written record to the Redis Stream sink, if there is one (on the event loop). Never
        raises: the record is in the file already, and the stream's failures are counted apart."""
        if self._sink_task is not None:
            try:
                fields = {b"replica": self.replica.encode(), b"seq": str(result["seq"]).encode(),
                          b"hash": result["hash"].encode(),
                          b"record": orjson.dumps(result, default=_json_default, option=orjson.OPT_SORT_KEYS)}
                self._sink_queue.put_nowait(fields)
            except (asyncio.QueueFull, TypeError):  # Redis is slower than the gateway: drop, count, never wait
                self.stream_errors += 1

    def _write_batch(self, items: list[_Item]) -> list[tuple[_Item, dict[str, Any] | BaseException]]:
        """The fsync thread: chain and write ``items`` in order, one write(2) per file they go to. Returns
        each item's record as written, or the error that kept it out of the file."""
        done: list[tuple[_Item, dict[str, Any] | BaseException]] = []
        pending: list[tuple[_Item, dict[str, Any], bytes]] = []  # chained, not yet written
        for item in items:
            try:
                day = _utc_day(item.now)
                if not self._file_ready(day):
                    self._flush(pending, done)
                    self._ensure_file(day)
                seq, prev = (pending[-1][1]["seq"], pending[-1][1]["hash"]) if pending else (self._seq, self._prev)
                rec = orjson.loads(item.payload)
                pending.append((item, rec, self._chain(rec, seq, prev)))
            except Exception as exc:
                done.append((item, self._failed(exc, 1)))
        self._flush(pending, done)
        return done

    def _flush(self, pending: list[tuple[_Item, dict[str, Any], bytes]],
               done: list[tuple[_Item, dict[str, Any] | BaseException]]) -> None:
        if not pending:
            return
        try:
            self._write_all(b"".join(line for _, _, line in pending))
        except Exception as exc:
            err = self._failed(exc, len(pending))
            done.extend((item, err) for item, _, _ in pending)
        else:
            last = pending[-1][1]
            self._seq, self._prev = last["seq"], last["hash"]
            self.records_written += len(pending)
            done.extend((item, rec) for item, rec, _ in pending)
        pending.clear()

    def _failed(self, exc: Exception, count: int) -> AuditError:
        self.write_errors += count
        log.error("audit write failed: %s", exc)
        return exc if isinstance(exc, AuditError) else AuditError(f"audit write failed: {exc}")

    def _file_ready(self, day: str) -> bool:
        # Days only move forward: a clock stepping back does not reopen yesterday's file.
        return self._fd is not None and self._torn is None and day <= self._day

    def _ensure_file(self, day: str) -> None:
        if self._file_ready(day):
            return
        if self._torn is None and self._fd is None and self._file is not None and day <= self._day:
            path = self._file  # resume appending to the newest file of today
        else:
            path = self._next_path(max(day, self._day))
        if self._fsync and self._fd is not None:
            os.fsync(self._fd)  # lines of this batch in the file being left are acknowledged too
        self._close_file()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._fd, self._file, self._size = fd, path, os.fstat(fd).st_size
        m = FILE_RE.match(path.name)
        self._day = m.group(1) if m else day
        if self._torn is not None:
            torn, self._torn = self._torn, None
            note = {"ts": rfc3339(self._clock()), "replica": self.replica, "decision": "admin",
                    "event": "torn_tail", "reason": "incomplete last line left by a crash mid-write",
                    "torn_file": torn.file, "torn_offset": torn.offset, "torn_bytes": torn.nbytes}
            try:
                self._append(note)
            except BaseException:
                self._torn = torn  # the next write tries the note again in a fresh segment
                raise

    def _next_path(self, day: str) -> Path:
        """Today's base file, or when it exists and cannot be continued, its next free segment."""
        base = self.path / f"audit-{day}.jsonl"
        if not base.exists():
            return base
        segments = [file_order(p)[1] for p in replica_files(self.path) if file_order(p)[0] == day]
        return self.path / f"audit-{day}.{max(segments, default=0) + 1}.jsonl"

    def _append(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Chain and write one record now."""
        self._write_all(self._chain(rec, self._seq, self._prev))
        self._seq, self._prev = rec["seq"], rec["hash"]
        self.records_written += 1
        return rec

    def _chain(self, rec: dict[str, Any], seq: int, prev: str) -> bytes:
        """Give ``rec`` its place after (``seq``, ``prev``) in the chain; return its line."""
        rec["seq"] = seq + 1
        rec["prev"] = prev
        rec.pop("hash", None)
        if self._key is not None:
            rec["mac"] = MAC_NAME
        else:
            rec.pop("mac", None)
        body = orjson.dumps(rec, default=_json_default, option=orjson.OPT_SORT_KEYS)  # canonical: no hash yet
        rec["hash"] = digest = chain_hash(prev, body, self._key)
        # One serialization per record: the line is the canonical body with the hash appended (verify
        # parses the line, so key order in the file does not matter).
        return b"%s,\"hash\":\"%s\"}\n" % (body[:-1], digest.encode())

    def _write_all(self, data: bytes) -> None:
        """Append whole lines to the current file, or none of them (a partial write is cut off again)."""
        assert self._fd is not None and self._file is not None
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            self._undo_partial(written)
            raise AuditError(f"cannot write {self._file}: {exc.strerror or exc}") from exc
        self._size += len(data)

    def _undo_partial(self, written: int) -> None:
        """After a failed write, cut the partial line off; if that fails too, never append to this file."""
        if written == 0:
            return
        assert self._fd is not None and self._file is not None
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._torn = _Torn(self._file.name, self._size, written)
            self._close_file()

    def _close_file(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    # --------------------------------------------------------------------------------- stream sink
    async def _sink(self) -> None:
        """XADD each written line to the Redis Stream; errors are counted, the file log never waits."""
        assert self._redis is not None and self._stream is not None
        while True:
            fields = await self._sink_queue.get()
            if fields is None:
                return
            try:
                result = self._redis.xadd(self._stream, fields, maxlen=self._stream_maxlen, approximate=True)
                if inspect.isawaitable(result):
                    await asyncio.wait_for(result, self._stream_timeout)
                self.stream_written += 1
            except asyncio.CancelledError:
                self.stream_errors += 1
                raise
            except Exception as exc:
                self.stream_errors += 1
                log.debug("audit stream XADD failed: %s", exc)

    async def _close_sink(self, task: asyncio.Task[None]) -> None:
        """Give the stream at most ``stream_timeout`` to catch up; count what it could not take."""
        try:
            self._sink_queue.put_nowait(None)
        except asyncio.QueueFull:
            task.cancel()
        done, _ = await asyncio.wait([task], timeout=self._stream_timeout)
        if not done:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        while not self._sink_queue.empty():
            if self._sink_queue.get_nowait() is not None:
                self.stream_errors += 1


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
