"""Reading the audit log: the records under some paths, and the usage each one stands for.

:func:`iter_records` yields every readable record (skipping, and counting, lines that are not JSON objects)
in a time range; :func:`usage_amounts` turns a record's ``usage`` into the ledger's metrics, and
:class:`Metered` decides whether it counts: usage is summed over the decisions in
:data:`METERED_DECISIONS`, once per ``request_id`` (a spooled request and its replay are one request).
:func:`charged_usage` is ``kgate meter --request-id``: what the gateway charged for one request.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.audit.command import load_audit_config
from gateway.audit.files import FILE_RE, file_order
from gateway.engine.errors import UsageError

METERED_DECISIONS = frozenset({"allowed", "clamped", "partial", "spooled", "replayed"})
TOKEN_METRICS = ("prompt_tokens", "reasoning_tokens", "output_tokens", "generated_tokens")
SUM_METRICS = (*TOKEN_METRICS, "flops", "k_units")


def discover(paths: Iterable[str | Path]) -> dict[Path, list[Path]]:
    """Audit files under ``paths`` (files or directories), grouped by replica directory, in write order."""
    # Keyed by resolved path so that a file named twice (a directory and a file in it) is read once.
    groups: dict[Path, dict[Path, Path]] = defaultdict(dict)
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in p.rglob("audit-*.jsonl") if FILE_RE.match(f.name) and f.is_file()]
        elif p.is_file():
            found = [p]
        else:
            raise UsageError(f"no such file or directory: {p}")
        for f in found:
            real = f.resolve()
            groups[real.parent].setdefault(real, f)
    return {d: sorted(fs.values(), key=file_order) for d, fs in sorted(groups.items())}


def record_time(rec: dict[str, Any]) -> float | None:
    """A record's ``ts`` as epoch seconds (RFC 3339 text, naive taken as UTC, or a number); None if neither."""
    ts = rec.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool) and math.isfinite(ts):
        return float(ts)
    if not isinstance(ts, str):
        return None
    try:
        dt = datetime.fromisoformat(ts)
    except ValueError:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


@dataclass
class ReadStats:
    """What :func:`iter_records` read: records yielded, and lines that were not JSON objects."""

    records: int = 0
    unreadable: int = 0


def iter_records(paths: Iterable[str | Path], since: float | None = None, until: float | None = None,
                 stats: ReadStats | None = None) -> Iterator[tuple[float | None, dict[str, Any]]]:
    """(time, record) for each readable record with ``since <= ts < until``; bad lines are skipped."""
    stats = stats if stats is not None else ReadStats()
    lo = utc_date(since - 86400) if since is not None else None  # records may land in the next day's file
    hi = utc_date(until + 86400) if until is not None else None
    for files in discover(paths).values():
        for f in files:
            day = file_order(f)[0]
            if (lo and day < lo) or (hi and day != "~" and day > hi):
                continue
            with open(f, "rb") as fh:
                for raw in fh:
                    try:
                        rec = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        stats.unreadable += 1
                        continue
                    if not isinstance(rec, dict):
                        stats.unreadable += 1
                        continue
                    t = record_time(rec)
                    if (since is not None or until is not None) and not _in_range(t, since, until):
                        continue
                    stats.records += 1
                    yield t, rec


def _in_range(t: float | None, since: float | None, until: float | None) -> bool:
    return t is not None and (since is None or t >= since) and (until is None or t < until)


def utc_date(ts: float) -> str:
    """``YYYY-MM-DD`` of a record time, as ``datetime`` reads it (it rounds to microseconds; the writer's
    :func:`gateway.audit.files.utc_day` floors)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0
    return float(value)


def usage_amounts(rec: dict[str, Any]) -> dict[str, float]:
    """The ledger metrics one record stands for (``requests`` is 1)."""
    usage = rec.get("usage") if isinstance(rec.get("usage"), dict) else {}
    assert isinstance(usage, dict)
    out = {m: _num(usage.get(m)) for m in TOKEN_METRICS}
    if "generated_tokens" not in usage:
        out["generated_tokens"] = out["reasoning_tokens"] + out["output_tokens"]
    out["flops"] = _num(usage.get("flops"))
    out["k_units"] = _num(usage.get("k"))
    out["requests"] = 1.0
    return out


class Metered:
    """Decides whether a record's usage counts: a metered decision, each request id once."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, rec: dict[str, Any]) -> bool:
        if rec.get("decision") not in METERED_DECISIONS:
            return False
        rid = rec.get("request_id")
        if isinstance(rid, str) and rid:
            if rid in self._seen:
                return False
            self._seen.add(rid)
        return True


# -------------------------------------------------------------------------------- meter --request-id
METER_FIELDS = ("samples", "prompt_tokens", "reasoning_tokens", "output_tokens", "generated_tokens", "k",
                "flops", "source")


def charged_usage(request_id: str, audit: str | None = None, config: str | None = None) -> dict[str, Any]:
    """What the gateway charged for one request, from its audit record, in ``kgate meter``'s shape.

    The record holds the usage as the gateway measured it, including what a client never sees: the
    upstream's usage chunk of a stream (which the gateway asked for and stripped) and hidden reasoning
    tokens. With several records for the request (spooled, then replayed), the last one with usage wins.
    """
    paths = [audit or load_audit_config(config).dir]
    if not Path(paths[0]).exists():
        raise UsageError(f"audit directory {paths[0]} does not exist (give --audit DIR or --config)")
    found: dict[str, Any] | None = None
    charged: dict[str, Any] | None = None
    for _, rec in iter_records(paths):
        if rec.get("request_id") != request_id:
            continue
        found = rec
        if isinstance(rec.get("usage"), dict):
            charged = rec
    if found is None:
        raise UsageError(f"no audit record of request {request_id!r} under {paths[0]}")
    if charged is None:
        raise UsageError(f"request {request_id!r} was {found.get('decision')} ({found.get('reason') or 'no reason'}):"
                         " nothing was metered or charged")
    usage = charged["usage"]
    return {**{f: usage.get(f) for f in METER_FIELDS}, "model": charged.get("model"), "api": charged.get("api")}
