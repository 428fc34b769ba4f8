"""The embedded store's claim on its data folder: an exclusive lock on ``<data_dir>/kgate.lock``.

A server on a unix socket only (the embedded store) owns its data folder: it takes the lock
(:class:`DataDirLock`) before it touches the socket or the append-only files, so a second process on the
same folder fails with :class:`DataDirBusy` (naming the owner's pid and socket) instead of starting a
second Redis over live files. :func:`data_dir_owner` tells who holds a folder without taking it.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from gateway.ledger.redis_binary import RedisServerError


class DataDirBusy(RedisServerError):
    """Another process owns the data folder (its lock file's contents are in ``owner``)."""

    def __init__(self, data_dir: Path, owner: dict[str, Any]):
        self.data_dir = data_dir
        self.owner = owner
        what = owner.get("command") or "another process"
        pid = owner.get("pid", "unknown")
        sock = owner.get("socket")
        super().__init__(f"{data_dir} is in use by {what} (pid {pid}"
                         + (f", store unix://{sock}" if sock else "") + ")")


LOCK_NAME = "kgate.lock"


class _Held:
    def __init__(self, fd: int, info: dict[str, Any]):
        self.fd, self.info, self.count = fd, info, 1


# Locks this process holds, by resolved folder: flock conflicts between two descriptors of one process,
# so a second holder in the same process (the serve command, then its embedded Redis) shares the first.
_HELD: dict[Path, _Held] = {}


class DataDirLock:
    """An exclusive, non-blocking ``flock`` on ``<data_dir>/kgate.lock``, re-entrant within a process.

    The lock file holds JSON about the owner (pid, command, socket) for the message a second process
    prints; :func:`data_dir_owner` reads it. The kernel drops the lock when the owner dies, however it
    dies, so a stale file never blocks anyone. The file itself is never removed (removing a lock file
    races with the next process opening it).
    """

    def __init__(self, data_dir: str | os.PathLike[str], **info: Any):
        self.data_dir = Path(data_dir)
        self._info = info
        self._key: Path | None = None

    def acquire(self) -> DataDirLock:
        """Take the lock (or join this process's hold), recording ``info``; raises :class:`DataDirBusy`."""
        if self._key is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key = self.data_dir.resolve()
        held = _HELD.get(key)
        if held is not None:
            held.count += 1
        else:
            fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DataDirBusy(self.data_dir, _read_owner(key / LOCK_NAME)) from None
            held = _HELD[key] = _Held(fd, {"pid": os.getpid()})
        self._key = key
        self.update(**self._info)
        return self

    def update(self, **info: Any) -> None:
        """Add facts about the owner (e.g. the socket, once known) to the lock file."""
        held = _HELD.get(self._key) if self._key is not None else None
        if held is None:
            return
        held.info.update({k: v for k, v in info.items() if v is not None})
        data = json.dumps(held.info).encode()
        os.ftruncate(held.fd, 0)
        os.pwrite(held.fd, data, 0)

    def release(self) -> None:
        """Leave the hold; the last holder of this process unlocks."""
        key, self._key = self._key, None
        held = _HELD.get(key) if key is not None else None
        if held is None:
            return
        held.count -= 1
        if held.count == 0:
            del _HELD[key]  # type: ignore[arg-type]
            os.close(held.fd)  # closing the descriptor releases the flock

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def data_dir_owner(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lock file's facts when another process holds ``data_dir``; None when nobody (else) does."""
    path = Path(data_dir) / LOCK_NAME
    if not path.exists():
        return None
    key = Path(data_dir).resolve()
    if key in _HELD:
        return None  # this process owns it
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_owner(path)
    finally:
        os.close(fd)  # also drops the shared lock, if taken
    return None
