"""Appending chained lines to one replica's audit files: the chain's state and the open file.

:class:`ChainAppender` takes the replica's lock (``<dir>/<replica>/.lock``: one writer per replica id),
resumes the chain (:func:`gateway.audit.files.resume`), opens the day's file or a new segment, and
appends whole lines: a write that fails part-way is cut off again, and when even that fails the file is
never appended to again (the next segment notes the torn tail). It is not thread-safe: one thread at a
time uses it (the event loop, or the audit log's fsync thread).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.audit.chain import GENESIS, AuditError, chain_line, rfc3339
from gateway.audit.files import FILE_RE, Torn, next_path, resume


class ChainAppender:
    """The chain (``seq``, ``prev``) of one replica and the file it appends to.

    ``key``: the HMAC key of the chain, or None; ``clock`` stamps a torn-tail note; ``fsync``: fsync the
    file being left when the day moves on (its last lines are acknowledged with the batch that moves).
    ``records_written`` counts the lines appended.
    """

    def __init__(self, dir: Path, replica: str, key: bytes | None, clock: Callable[[], float], fsync: bool):
        self.dir = dir
        self.replica = replica
        self.path = dir / replica
        self.key = key
        self._clock = clock
        self._fsync = fsync
        self.records_written = 0
        self.seq = 0
        self.prev = GENESIS
        self.fd: int | None = None
        self._file: Path | None = None
        self._day = ""
        self._size = 0
        self._torn: Torn | None = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------------------ lifetime
    def open(self) -> None:
        """Create the directory, take the replica's lock and resume the chain (blocking: in a thread)."""
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
            state = resume(self.path)
        except Exception:
            self.release_lock()
            raise
        self.seq, self.prev, self._torn = state.seq, state.prev, state.torn
        if state.newest is not None:
            m = FILE_RE.match(state.newest.name)
            self._day = m.group(1) if m else ""
            # A file with a torn tail is never appended to; the first write opens a new segment.
            self._file = state.newest if state.torn is None else None

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def close_file(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    # ------------------------------------------------------------------------------------- files
    def ready(self, day: str) -> bool:
        """Whether a record of ``day`` can go to the open file as it is."""
        # Days only move forward: a clock stepping back does not reopen yesterday's file.
        return self.fd is not None and self._torn is None and day <= self._day

    def ensure_file(self, day: str) -> None:
        """Open the file a record of ``day`` goes to (writing the torn-tail note first in a new segment)."""
        if self.ready(day):
            return
        if self._torn is None and self.fd is None and self._file is not None and day <= self._day:
            path = self._file  # resume appending to the newest file of today
        else:
            path = next_path(self.path, max(day, self._day))
        if self._fsync and self.fd is not None:
            os.fsync(self.fd)  # lines of this batch in the file being left are acknowledged too
        self.close_file()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self.fd, self._file, self._size = fd, path, os.fstat(fd).st_size
        m = FILE_RE.match(path.name)
        self._day = m.group(1) if m else day
        if self._torn is not None:
            torn, self._torn = self._torn, None
            note = {"ts": rfc3339(self._clock()), "replica": self.replica, "decision": "admin",
                    "event": "torn_tail", "reason": "incomplete last line left by a crash mid-write",
                    "torn_file": torn.file, "torn_offset": torn.offset, "torn_bytes": torn.nbytes}
            try:
                self.append(note)
            except BaseException:
                self._torn = torn  # the next write tries the note again in a fresh segment
                raise

    # ----------------------------------------------------------------------------------- writing
    def append(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Chain and write one record now."""
        self.write_lines(chain_line(rec, self.seq, self.prev, self.key))
        self.seq, self.prev = rec["seq"], rec["hash"]
        self.records_written += 1
        return rec

    def append_chained(self, lines: bytes, last: dict[str, Any], count: int) -> None:
        """Write the lines of ``count`` records chained already (by :func:`chain_line`, after :attr:`seq`
        and :attr:`prev`); ``last`` is the last of them."""
        self.write_lines(lines)
        self.seq, self.prev = last["seq"], last["hash"]
        self.records_written += count

    def write_lines(self, data: bytes) -> None:
        """Append whole lines to the current file, or none of them (a partial write is cut off again)."""
        assert self.fd is not None and self._file is not None
        written = 0
        try:
            written = os.write(self.fd, data)  # whole, but for a full disk or a signal
            while written < len(data):
                written += os.write(self.fd, memoryview(data)[written:])
        except OSError as exc:
            self._undo_partial(written)
            raise AuditError(f"cannot write {self._file}: {exc.strerror or exc}") from exc
        self._size += len(data)

    def _undo_partial(self, written: int) -> None:
        """After a failed write, cut the partial line off; if that fails too, never append to this file."""
        if written == 0:
            return
        assert self.fd is not None and self._file is not None
        try:
            os.ftruncate(self.fd, self._size)
        except OSError:
            self._torn = Torn(self._file.name, self._size, written)
            self.close_file()
