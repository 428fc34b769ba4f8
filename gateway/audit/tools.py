"""Reading the audit log: ``kgate audit verify``, ``kgate audit report`` and the reconcile totals.

- :func:`verify` walks each replica's chain in file order and names the first broken record by file, line
  and kind: ``altered`` (hash mismatch, or a line that is not a record), ``missing`` (a sequence gap),
  ``reordered``, ``inserted``, ``truncated`` (an incomplete line nobody noted), ``hmac-key-needed``,
  ``wrong-hmac-key``. A torn last line that the writer noted after a crash is a warning, not a failure.
- :func:`report_rows` / :func:`report_main` sum usage over a time range grouped by principal, org, model,
  tier, decision or day, as a table, CSV, JSON or one self-contained HTML page.
- :func:`audit_totals` sums usage per (scope, id, metric, window, bucket) for ``kgate audit reconcile``.

Usage is summed over the decisions in :data:`METERED_DECISIONS`, once per ``request_id`` (a spooled
request and its replay are one request).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from gateway.audit.log import (
    DECISIONS,
    FILE_RE,
    GENESIS,
    MAC_NAME,
    AuditError,
    canonical,
    chain_hash,
    file_order,
    hmac_key_from_env,
)
from gateway.engine.errors import UsageError
from gateway.policy.config import METRICS, AuditConfig

METERED_DECISIONS = frozenset({"allowed", "clamped", "partial", "spooled", "replayed"})
TOKEN_METRICS = ("prompt_tokens", "reasoning_tokens", "output_tokens", "generated_tokens")
SUM_METRICS = (*TOKEN_METRICS, "flops", "k_units")
GROUP_FIELDS = ("principal", "org", "model", "tier", "decision", "day", "replica", "api", "upstream")


# ------------------------------------------------------------------------------------- discovery
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


# ---------------------------------------------------------------------------------------- verify
@dataclass(frozen=True)
class Problem:
    """The first broken record of one replica's chain."""

    kind: str
    file: str
    line: int
    detail: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind}: {self.detail}"


@dataclass
class VerifyResult:
    records: int = 0
    replicas: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Line:
    file: Path
    lineno: int
    offset: int
    raw: bytes
    last_in_file: bool

    @property
    def where(self) -> str:
        return f"{self.file}:{self.lineno}"

    @property
    def terminated(self) -> bool:
        return self.raw.endswith(b"\n")


def _lines(files: list[Path]) -> Iterator[_Line]:
    for f in files:
        with open(f, "rb") as fh:
            pending: _Line | None = None
            offset = 0
            for lineno, raw in enumerate(fh, 1):
                if pending is not None:
                    yield pending
                pending = _Line(f, lineno, offset, raw, False)
                offset += len(raw)
            if pending is not None:
                yield _Line(f, pending.lineno, pending.offset, pending.raw, True)


class _Peekable:
    def __init__(self, it: Iterator[_Line]):
        self._it = it
        self._head: list[_Line] = []

    def __iter__(self) -> _Peekable:
        return self

    def __next__(self) -> _Line:
        return self._head.pop() if self._head else next(self._it)

    def peek(self) -> _Line | None:
        if not self._head:
            try:
                self._head.append(next(self._it))
            except StopIteration:
                return None
        return self._head[0]


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The record on a line, or None when the line is not a chained audit record."""
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(rec, dict):
        return None
    if not (isinstance(rec.get("seq"), int) and isinstance(rec.get("prev"), str)
            and isinstance(rec.get("hash"), str)):
        return None
    return rec


def _self_hash_ok(rec: dict[str, Any], key: bytes | None) -> bool:
    return chain_hash(rec["prev"], canonical(rec), key) == rec["hash"]


class _Chain:
    """Verifies one replica's files; stops at the first problem."""

    def __init__(self, files: list[Path], key: bytes | None, allow_pruned: bool, warnings: list[str]):
        self.lines = _Peekable(_lines(files))
        self.key = key
        self.allow_pruned = allow_pruned
        self.warnings = warnings
        self.records = 0

    def run(self) -> Problem | None:
        exp_seq: int | None = None
        exp_prev = GENESIS
        last: tuple[_Line, dict[str, Any]] | None = None
        seen_mac = False
        for ln in self.lines:
            if not ln.terminated:
                problem = self._torn(ln)
                if problem:
                    return problem
                continue
            rec = _parse(ln.raw)
            if rec is None:
                what = "an empty line" if not ln.raw.strip() else "not a valid audit record"
                return self._problem("altered", ln, f"{what} (the file was edited)")
            seq, prev = rec["seq"], rec["prev"]
            key: bytes | None = None
            if "mac" in rec:
                if rec["mac"] != MAC_NAME:
                    return self._problem("altered", ln, f"unknown mac {rec['mac']!r}")
                if self.key is None:
                    return self._problem("hmac-key-needed", ln, "records are authenticated with HMAC-SHA256; "
                                         "give the key with --hmac-key-env NAME or --config FILE")
                key, seen_mac = self.key, True
            elif seen_mac and self.key is not None:
                return self._problem("altered", ln, f"seq {seq} has a plain hash after HMAC records "
                                     "(authentication was stripped)")
            if not _self_hash_ok(rec, key):
                if key is not None and not self._any_verifies(ln):
                    return self._problem("wrong-hmac-key", ln, "no record of this replica verifies with the "
                                         "given HMAC key (wrong key, or every record altered)")
                return self._problem("altered", ln, f"hash mismatch at seq {seq}: the record was changed "
                                     "after it was written")
            if exp_seq is None:
                problem = self._start(ln, seq, prev)
            else:
                problem = self._link(ln, seq, prev, exp_seq, exp_prev, last)
            if problem:
                return problem
            exp_seq, exp_prev, last = seq + 1, rec["hash"], (ln, rec)
            self.records += 1
        return None

    def _problem(self, kind: str, ln: _Line, detail: str) -> Problem:
        return Problem(kind, str(ln.file), ln.lineno, detail)

    def _torn(self, ln: _Line) -> Problem | None:
        """An unterminated last line: fine when the writer's next segment notes it, else truncation."""
        nxt = self.lines.peek()
        if nxt is None:
            return self._problem("truncated", ln, f"incomplete last line ({len(ln.raw)} bytes, no newline): "
                                 "torn by a crash mid-write or cut off")
        note = _parse(nxt.raw) if nxt.lineno == 1 and nxt.file != ln.file else None
        if (note and note.get("event") == "torn_tail" and note.get("torn_file") == ln.file.name
                and note.get("torn_offset") == ln.offset):
            self.warnings.append(f"{ln.where}: torn: incomplete last line ({len(ln.raw)} bytes) left by a "
                                 f"crash mid-write; noted by the writer at {nxt.where}, the chain continues")
            return None
        return self._problem("truncated", ln, f"incomplete line ({len(ln.raw)} bytes, no newline) that the "
                             "writer did not note: the file was cut")

    def _start(self, ln: _Line, seq: int, prev: str) -> Problem | None:
        if seq == 1 and prev == GENESIS:
            return None
        if seq == 1:
            return self._problem("altered", ln, "seq 1 does not start from the genesis hash")
        if self.allow_pruned:
            return None
        later = self._find_seq(1)
        if later is not None:
            return self._problem("reordered", ln, f"the chain starts at seq {seq}; seq 1 appears later at "
                                 f"{later.where}")
        return self._problem("missing", ln, f"the chain starts at seq {seq}: records 1..{seq - 1} are "
                             "missing (older files deleted? --allow-pruned accepts a pruned start)")

    def _link(self, ln: _Line, seq: int, prev: str, exp_seq: int, exp_prev: str,
              last: tuple[_Line, dict[str, Any]] | None) -> Problem | None:
        if seq == exp_seq and prev == exp_prev:
            return None
        before = f" ({last[0].where})" if last else ""
        if seq == exp_seq:
            return self._problem("altered", ln, f"prev does not match the hash of seq {seq - 1}{before}: "
                                 "one of the two records was replaced")
        if seq > exp_seq:
            later = self._find_seq(exp_seq)
            if later is not None:
                return self._problem("reordered", ln, f"seq {seq} where seq {exp_seq} was expected; seq "
                                     f"{exp_seq} appears later at {later.where}")
            gap = f"seq {exp_seq}" if seq == exp_seq + 1 else f"seqs {exp_seq}..{seq - 1}"
            where = " (at the start of this file: a file before it may have been deleted)" \
                if ln.lineno == 1 else ""
            return self._problem("missing", ln, f"{gap} missing before this record{where}")
        if last is not None and seq == exp_seq - 1 and prev == last[1]["prev"]:
            return self._problem("inserted", last[0], f"this record (seq {seq}) is not part of the chain: "
                                 f"the next record {ln.where} chains to the one before it")
        return self._problem("inserted", ln, f"seq {seq} again where seq {exp_seq} was expected: "
                             "a duplicated or inserted record")

    def _find_seq(self, seq: int) -> _Line | None:
        for ln in self.lines:
            rec = _parse(ln.raw)
            if rec is not None and rec["seq"] == seq:
                return ln
        return None

    def _any_verifies(self, first: _Line) -> bool:
        for ln in (first, *self.lines):
            rec = _parse(ln.raw)
            if rec is not None and "mac" in rec and _self_hash_ok(rec, self.key):
                return True
        return False


def verify(paths: Iterable[str | Path], *, hmac_key: bytes | None = None,
           allow_pruned: bool = False) -> VerifyResult:
    """Verify every replica chain under ``paths``; at most one problem (the first) per replica."""
    groups = discover(paths)
    result = VerifyResult(replicas=len(groups))
    for files in groups.values():
        chain = _Chain(files, hmac_key, allow_pruned, result.warnings)
        problem = chain.run()
        result.records += chain.records
        if problem:
            result.problems.append(problem)
    return result


# --------------------------------------------------------------------------------------- parsing
class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line instead of usage text and SystemExit."""

    def error(self, message: str) -> Any:
        raise UsageError(message)


def _run_cli(prog: str, main: Any, args: list[str]) -> int:
    try:
        return int(main(args))
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except AuditError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


def _load_audit_config(path: str | None) -> AuditConfig:
    """The ``audit`` section of the given config, or of the default one when it exists (None otherwise)."""
    from gateway.policy.config import ConfigError, default_config_path, load_config

    cfg_path = Path(path) if path else default_config_path()
    if not path and not cfg_path.exists():
        return AuditConfig()
    try:
        return load_config(cfg_path).audit
    except ConfigError as exc:
        raise UsageError(f"cannot load config: {exc.errors[0]}") from None


def _configured_key(name: str | None) -> bytes | None:
    """The key of the config's ``audit.hmac_key_env``, or None when that variable is unset: the gateway
    then writes plain sha256 chains (the key is optional), and HMAC records, if any, are reported as
    ``hmac-key-needed`` naming the variable."""
    if not name or not os.environ.get(name):
        return None
    return hmac_key_from_env(name)


def parse_time(text: str, *, end: bool = False) -> float:
    """ISO date or datetime → epoch seconds (naive times are UTC). A date as an end means its day's end."""
    text = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            d = date.fromisoformat(text) + timedelta(days=1 if end else 0)
            return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"not an ISO date or datetime: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


# ----------------------------------------------------------------------------------------- verify CLI
def verify_main(args: list[str]) -> int:
    """``kgate audit verify PATH...``: 0 and ``ok: N records, M replicas``, or 1 naming the first break."""
    return _run_cli("kgate audit verify", _verify_main, args)


def _verify_main(args: list[str]) -> int:
    p = _Parser(prog="kgate audit verify", description="Verify the hash chains of audit log files.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="audit files or directories "
                   "(default: the configured audit dir)")
    p.add_argument("--config", help="configuration file (for audit.dir and audit.hmac_key_env)")
    p.add_argument("--hmac-key-env", metavar="NAME", help="environment variable holding the HMAC key")
    p.add_argument("--allow-pruned", action="store_true",
                   help="accept a chain whose oldest files were removed by retention")
    ns = p.parse_args(args)
    # The config is read only when it is needed: for the default PATH or for the HMAC key's variable.
    paths: list[str] = ns.paths
    key: bytes | None = hmac_key_from_env(ns.hmac_key_env)  # named on the command line: it must be set
    if not paths or (ns.config and not ns.hmac_key_env):
        audit_cfg = _load_audit_config(ns.config)
        paths = paths or [audit_cfg.dir]
        if key is None:
            key = _configured_key(audit_cfg.hmac_key_env)
    result = verify(paths, hmac_key=key, allow_pruned=ns.allow_pruned)
    if result.replicas == 0:
        raise UsageError(f"no audit files (audit-YYYY-MM-DD.jsonl) under {' '.join(map(str, paths))}")
    for w in result.warnings:
        print(f"warning: {w}")
    if result.ok:
        print(f"ok: {result.records} records, {result.replicas} replicas")
        return 0
    for problem in result.problems:
        print(problem)
    print(f"FAILED: {len(result.problems)} of {result.replicas} replicas have a broken chain "
          f"({result.records} records verified before the breaks)")
    return 1


# ----------------------------------------------------------------------------------------- reading
def record_time(rec: dict[str, Any]) -> float | None:
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
    records: int = 0
    unreadable: int = 0


def iter_records(paths: Iterable[str | Path], since: float | None = None, until: float | None = None,
                 stats: ReadStats | None = None) -> Iterator[tuple[float | None, dict[str, Any]]]:
    """(time, record) for each readable record with ``since <= ts < until``; bad lines are skipped."""
    stats = stats if stats is not None else ReadStats()
    lo = _utc_day(since - 86400) if since is not None else None  # records may land in the next day's file
    hi = _utc_day(until + 86400) if until is not None else None
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


def _utc_day(ts: float) -> str:
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


class _Metered:
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


# ---------------------------------------------------------------------------------------- reconcile
class TotalKey(NamedTuple):
    scope: str  # principal | org | global
    id: str  # the principal or org id; "" for global
    metric: str
    window: str
    bucket: int  # the window's start, epoch seconds (UTC)


def bucket_start(window: str, ts: float) -> int:
    """Start of the fixed window holding ``ts``, exactly as the ledger buckets it (gateway.policy.windows)."""
    from gateway.policy.windows import WINDOWS, fixed_window

    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}")
    return int(fixed_window(window, ts)[0])


def audit_totals(paths: Iterable[str | Path], since: float | datetime | None = None,
                 until: float | datetime | None = None, *,
                 windows: Iterable[str] = ("day",)) -> dict[TotalKey, float]:
    """Usage totals from the audit log, keyed by (scope, id, metric, window, bucket start).

    Sums ``usage`` of metered decisions (:data:`METERED_DECISIONS`) once per request id, at the record's
    ``ts``, into the principal's, the org's and the global totals, for every ledger metric and each window
    in ``windows``. Records without a parsable ``ts`` are skipped. This is what the ledger should hold,
    up to requests that straddle a bucket boundary (the ledger buckets by Redis time at reservation).
    """
    lo = since.timestamp() if isinstance(since, datetime) else since
    hi = until.timestamp() if isinstance(until, datetime) else until
    wins = tuple(windows)
    for w in wins:
        bucket_start(w, 0)  # validate early
    metered = _Metered()
    totals: dict[TotalKey, float] = defaultdict(float)
    for t, rec in iter_records(paths, lo, hi):
        if t is None or not metered(rec):
            continue
        amounts = usage_amounts(rec)
        scopes = (("principal", str(rec.get("principal") or "")), ("org", str(rec.get("org") or "")),
                  ("global", ""))
        for w in wins:
            b = bucket_start(w, t)
            for scope, sid in scopes:
                for metric in METRICS:
                    totals[TotalKey(scope, sid, metric, w, b)] += amounts[metric]
    return dict(totals)


# -------------------------------------------------------------------------------- meter --request-id
METER_FIELDS = ("samples", "prompt_tokens", "reasoning_tokens", "output_tokens", "generated_tokens", "k",
                "flops", "source")


def charged_usage(request_id: str, audit: str | None = None, config: str | None = None) -> dict[str, Any]:
    """What the gateway charged for one request, from its audit record, in ``kgate meter``'s shape.

    The record holds the usage as the gateway measured it, including what a client never sees: the
    upstream's usage chunk of a stream (which the gateway asked for and stripped) and hidden reasoning
    tokens. With several records for the request (spooled, then replayed), the last one with usage wins.
    """
    paths = [audit or _load_audit_config(config).dir]
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


# ------------------------------------------------------------------------------------------- report
@dataclass
class Report:
    """Rows grouped by ``by``, the grand total, and the series the HTML charts draw."""

    by: tuple[str, ...]
    rows: list[dict[str, Any]]
    total: dict[str, Any]
    since: float | None
    until: float | None
    time_unit: str = "day"
    series: dict[str, dict[str, float]] = field(default_factory=dict)  # bucket -> flops/k_units
    k_by_tier: dict[str, list[float]] = field(default_factory=dict)
    unreadable: int = 0
    first: float | None = None  # the earliest and latest record times read: the period's real dates
    last: float | None = None


# What a report calls a record that has no principal (or no model, tier ...): an admin operation names no
# caller of the API, and a request refused before its key was known has none.
ADMIN_LABEL = "(admin)"
UNAUTHENTICATED_LABEL = "(unauthenticated)"
NONE_LABEL = "(none)"


def _group_value(rec: dict[str, Any], t: float | None, name: str) -> str:
    if name == "day":
        return _utc_day(t) if t is not None else "unknown"
    value = rec.get(name)
    if value is not None and value != "":
        return str(value)
    if rec.get("decision") == "admin":
        return ADMIN_LABEL
    return UNAUTHENTICATED_LABEL if name in ("principal", "org") and not rec.get("principal") else NONE_LABEL


def _new_row() -> dict[str, Any]:
    row: dict[str, Any] = {"requests": 0}
    row.update({m: 0 for m in TOKEN_METRICS})
    row.update({"flops": 0.0, "k_units": 0.0})
    row.update({d: 0 for d in DECISIONS})
    row["other"] = 0
    return row


def report_rows(paths: Iterable[str | Path], since: float | None = None, until: float | None = None,
                by: Iterable[str] = ("principal",)) -> Report:
    """Aggregate the audit log for ``kgate audit report``.

    ``requests`` counts distinct requests (records other than ``admin``, each request id once); token,
    FLOP and K sums cover metered decisions only; the decision columns count records.
    """
    by = tuple(by)
    for name in by:
        if name not in GROUP_FIELDS:
            raise UsageError(f"cannot group by {name!r}: choose from {', '.join(GROUP_FIELDS)}")
    stats = ReadStats()
    metered = _Metered()
    seen_requests: set[str] = set()
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    total = _new_row()
    k_by_tier: dict[str, list[float]] = defaultdict(list)
    points: list[tuple[float, float, float]] = []
    first = last = None
    for t, rec in iter_records(paths, since, until, stats):
        if t is not None:
            first = t if first is None else min(first, t)
            last = t if last is None else max(last, t)
        key = tuple(_group_value(rec, t, name) for name in by)
        row = groups.get(key)
        if row is None:
            row = groups[key] = {**dict(zip(by, key, strict=True)), **_new_row()}
        decision = rec.get("decision")
        column = decision if decision in DECISIONS else "other"
        rid = rec.get("request_id")
        new_request = decision != "admin" and not (isinstance(rid, str) and rid and rid in seen_requests)
        if isinstance(rid, str) and rid:
            seen_requests.add(rid)
        for target in (row, total):
            target[column] += 1
            target["requests"] += int(new_request)
        if not metered(rec):
            continue
        amounts = usage_amounts(rec)
        for target in (row, total):
            for m in SUM_METRICS:
                target[m] += amounts[m]
        k_by_tier[_group_value(rec, t, "tier")].append(amounts["k_units"])
        if t is not None:
            points.append((t, amounts["flops"], amounts["k_units"]))
    rows = [groups[k] for k in sorted(groups)]
    for row in (*rows, total):
        for m in TOKEN_METRICS:
            row[m] = int(row[m])
    report = Report(by, rows, total, since, until, k_by_tier=dict(k_by_tier), unreadable=stats.unreadable,
                    first=first, last=last)
    _series(report, points)
    return report


def _series(report: Report, points: list[tuple[float, float, float]]) -> None:
    """FLOPs and K-units per day (per hour when everything falls within two days)."""
    if not points:
        return
    span = max(p[0] for p in points) - min(p[0] for p in points)
    hourly = span <= 2 * 86400
    report.time_unit = "hour" if hourly else "day"
    series: dict[str, dict[str, float]] = {}
    for t, fl, k in points:
        label = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:00" if hourly else "%Y-%m-%d")
        bucket = series.setdefault(label, {"flops": 0.0, "k_units": 0.0})
        bucket["flops"] += fl
        bucket["k_units"] += k
    report.series = dict(sorted(series.items()))


def report_columns(report: Report) -> list[str]:
    return [*report.by, "requests", *SUM_METRICS, *DECISIONS, "other"]


def _cell(value: Any, column: str) -> str:
    if column == "flops":
        return f"{value:.4g}"
    if column == "k_units":
        return f"{value:.2f}"
    return str(value)


def format_table(report: Report) -> str:
    cols = report_columns(report)
    body = [[_cell(r[c], c) for c in cols] for r in report.rows]
    total = [("TOTAL" if i == 0 and report.by else "") for i in range(len(report.by))]
    body.append(total + [_cell(report.total[c], c) for c in cols[len(report.by):]])
    widths = [max(len(c), *(len(row[i]) for row in body)) for i, c in enumerate(cols)]
    numeric = [i >= len(report.by) for i in range(len(cols))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric, strict=True)).rstrip()

    out = [line(cols), line(["-" * w for w in widths])]
    out += [line(r) for r in body[:-1]]
    out += [line(["-" * w for w in widths]), line(body[-1])]
    return "\n".join(out) + "\n"


def format_csv(report: Report) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=report_columns(report), lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({k: row[k] for k in writer.fieldnames})
    return buf.getvalue()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def format_json(report: Report) -> str:
    doc = {"from": _iso(report.since), "to": _iso(report.until), "by": list(report.by),
           "rows": report.rows, "total": report.total}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"


def _html_name(report: Report) -> str:
    """``kgate-audit-report-2025-03-01--2025-03-03.html``: the period's days (the records', if unbounded)."""
    lo = report.since if report.since is not None else report.first
    hi = report.until - 1 if report.until is not None else report.last  # --to DATE ends at the next midnight
    days = [_utc_day(t) if t is not None else "all" for t in (lo, hi)]
    return f"kgate-audit-report-{days[0]}--{days[1]}.html"


# ------------------------------------------------------------------------------------- report CLI
def report_main(args: list[str]) -> int:
    """``kgate audit report [--from T] [--to T] [--by FIELDS] [--format table|csv|json|html] [PATH...]``."""
    return _run_cli("kgate audit report", _report_main, args)


def _report_main(args: list[str]) -> int:
    p = _Parser(prog="kgate audit report", description="Sum audited usage over a time range.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="audit files or directories (default: the configured audit dir)")
    p.add_argument("--from", dest="since", metavar="T", help="ISO date or datetime (UTC), inclusive")
    p.add_argument("--to", dest="until", metavar="T",
                   help="ISO date (inclusive: through its end) or datetime (exclusive), UTC")
    p.add_argument("--by", default="principal", metavar="FIELDS",
                   help=f"comma-separated grouping, from: {', '.join(GROUP_FIELDS)} (default: principal)")
    p.add_argument("--format", default="table", choices=("table", "csv", "json", "html"))
    p.add_argument("--config", help="configuration file (for audit.dir)")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="write to FILE ('-': standard output). Default: standard output, except for html, which "
                        "goes to kgate-audit-report-FROM--TO.html (its path is printed)")
    ns = p.parse_args(args)
    since = parse_time(ns.since) if ns.since else None
    until = parse_time(ns.until, end=True) if ns.until else None
    if since is not None and until is not None and until <= since:
        raise UsageError("--to must be after --from")
    by = [b.strip() for b in ns.by.split(",") if b.strip()]
    if not by:
        raise UsageError("--by needs at least one field")
    paths = ns.paths or [_load_audit_config(ns.config).dir]
    if not ns.paths and not Path(paths[0]).exists():
        raise UsageError(f"audit directory {paths[0]} does not exist (give PATH or --config)")
    report = report_rows(paths, since, until, by)
    if ns.format == "html":
        from gateway.audit.html import render_html

        text = render_html(report)
    else:
        text = {"table": format_table, "csv": format_csv, "json": format_json}[ns.format](report)
    output = ns.output or (_html_name(report) if ns.format == "html" else "-")
    if output == "-":
        sys.stdout.write(text)
    else:
        Path(output).write_text(text, encoding="utf-8")
        if ns.format == "html" and not ns.output:
            print(Path(output).resolve())  # a page to open in a browser, not to scroll through in a terminal
    if report.unreadable:
        print(f"warning: skipped {report.unreadable} unreadable lines (run kgate audit verify)",
              file=sys.stderr)
    return 0


__all__ = [
    "METERED_DECISIONS", "Problem", "Report", "TotalKey", "UsageError", "VerifyResult", "audit_totals",
    "bucket_start", "charged_usage", "discover", "format_csv", "format_json", "format_table", "iter_records",
    "parse_time", "report_main", "report_rows", "usage_amounts", "verify", "verify_main",
]
