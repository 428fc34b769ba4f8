"""Where the audit log lives on disk: file names, their order, and where a replica's chain stands.

Each replica writes ``<dir>/<replica>/audit-YYYY-MM-DD.jsonl`` (UTC day of the write), one record per
line; a file that cannot be continued is followed by a segment ``audit-YYYY-MM-DD.N.jsonl``. The chain
continues across daily files and restarts: :func:`resume` reads the last line of the newest file. A torn
last line (a crash in the middle of a write) is never appended to: the writer opens a new segment whose
first record notes the torn tail (``event: torn_tail`` with ``torn_file``, ``torn_offset``,
``torn_bytes``) so that ``kgate audit verify`` can tell a crash from tampering.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.audit.chain import GENESIS, AuditError

FILE_RE = re.compile(r"^audit-(\d{4}-\d{2}-\d{2})(?:\.(\d+))?\.jsonl$")
_TAIL_CHUNK = 64 * 1024


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


def next_path(replica_dir: Path, day: str) -> Path:
    """The day's base file, or when it exists and cannot be continued, its next free segment."""
    base = replica_dir / f"audit-{day}.jsonl"
    if not base.exists():
        return base
    segments = [file_order(p)[1] for p in replica_files(replica_dir) if file_order(p)[0] == day]
    return replica_dir / f"audit-{day}.{max(segments, default=0) + 1}.jsonl"


def utc_day(ts: float) -> str:
    """``YYYY-MM-DD``, the UTC day of epoch seconds ``ts``: the day file a record written then goes to."""
    return _day_text(math.floor(ts / 86400))


@functools.lru_cache(maxsize=4)
def _day_text(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86400))


# --------------------------------------------------------------------------------------- resuming
@dataclass
class Torn:
    """An incomplete line the writer will not append after; the next segment's first record notes it."""

    file: str
    offset: int
    nbytes: int


@dataclass
class Resume:
    """Where a replica's chain stands: the last record's seq and hash, a torn tail, the newest file."""

    seq: int
    prev: str
    torn: Torn | None
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


def resume(replica_dir: Path) -> Resume:
    """Where the chain stands: last seq and hash, and a torn tail in the newest file, if any."""
    files = replica_files(replica_dir)
    torn: Torn | None = None
    for i, path in enumerate(reversed(files)):
        start, data = _tail(path)
        if not data:
            continue
        end = data.rfind(b"\n")
        if end != len(data) - 1:
            if i == 0:  # only the newest file can have a tail torn by this writer's last crash
                torn = Torn(path.name, start + end + 1, len(data) - end - 1)
            data = data[: end + 1]
        if not data:
            continue
        lines = data.split(b"\n")
        seq, h = _parse_tail_record(lines[-2], path)
        return Resume(seq, h, torn, files[-1])
    return Resume(0, GENESIS, torn, files[-1] if files else None)
