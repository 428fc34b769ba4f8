"""``kgate audit reconcile``: the audit log's totals against the Redis ledger, budget by budget.

For every budget of every tier in the policy, for each principal, org (and the global scope) that the
audit log shows in that budget's current window, it compares what the audit records add up to with what
the ledger says was used. Differences are explained where the ledger itself shows why:

- ``held``: requests still in flight hold amounts that neither side has posted yet (with budget leases,
  also requests settled into a slice's batch that has not reached Redis yet: the slice still holds them);
- ``spool``: usage metered during a store outage that has not been replayed yet;
- ``lease-expiry``: a hold whose gateway died was charged in full (``lease_expiry: charge``) and no audit
  record of its actual usage exists — the ledger is higher by at most the held amount; a budget slice of
  a dead gateway (gateway/ledger/leases.py) is charged the same way, its unused part included;
- anything else is ``unexplained`` and makes the command exit 1.

Rolling windows are compared over their whole span (the ledger keeps per-slice usage; the audit sums the
same span), within one slice's width.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from gateway.audit.records import METERED_DECISIONS, Metered, iter_records, usage_amounts
from gateway.policy.config import METRICS, default_config_path, load_config
from gateway.policy.windows import WINDOWS, fixed_window, slice_seconds, window_length

REL_TOL = 1e-6


class TotalKey(NamedTuple):
    scope: str  # principal | org | global
    id: str  # the principal or org id; "" for global
    metric: str
    window: str
    bucket: int  # the window's start, epoch seconds (UTC)


def bucket_start(window: str, ts: float) -> int:
    """Start of the fixed window holding ``ts``, exactly as the ledger buckets it (gateway.policy.windows)."""
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
    metered = Metered()
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kgate audit reconcile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="audit files or folders (default: the configured audit dir)")
    p.add_argument("--config", help="policy/config YAML (default: the example policy)")
    p.add_argument("--store", help="Redis URL (default: the config's store)")
    p.add_argument("--at", type=float, help="reconcile the windows containing this epoch time (default: now)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    return p


def _span(window: str, rolling: bool, at: float) -> tuple[float, float]:
    if rolling:
        return at - window_length(window) - slice_seconds(window), at
    return fixed_window(window, at)


async def reconcile(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    from gateway.admin.cli import open_gateway
    from gateway.ledger.ledger import BudgetSpec, ScopeRef

    cfg = load_config(args.config or default_config_path())
    paths = [Path(p) for p in args.paths] or [Path(cfg.audit.dir)]
    at = args.at or time.time()
    records = [(t, r) for t, r in iter_records(paths, None, None) if t is not None]
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    unexplained = 0
    async with open_gateway(args) as gw:
        assert gw.ledger is not None
        spool_depth = 0
        spool_dir = Path(cfg.store.data_dir) / "spool"
        for f in spool_dir.glob("*.jsonl") if spool_dir.exists() else ():
            spool_depth += sum(1 for _ in f.open("rb"))
        for tier_name, tier in cfg.tiers.items():
            for b in tier.budgets:
                lo, hi = _span(b.window, b.rolling, at)
                sums: dict[str, float] = {}
                for t, rec in records:
                    if not (lo <= t < hi) or rec.get("tier") != tier_name:
                        continue
                    if rec.get("decision") not in METERED_DECISIONS:
                        continue
                    rid = rec.get("request_id")
                    key = f"{rid}:{b.label}:{tier_name}"
                    if rid and key in seen:
                        continue  # a spooled request and its replay are one request
                    seen.add(key)
                    sid = {"principal": rec.get("principal"), "org": rec.get("org"), "global": "*"}[b.scope]
                    if sid:
                        sums[str(sid)] = sums.get(str(sid), 0.0) + usage_amounts(rec)[b.metric]
                for sid, audit_total in sorted(sums.items()):
                    spec = BudgetSpec.from_config(b)
                    st = (await gw.ledger.state(ScopeRef(b.scope, sid), [spec]))[0]
                    diff = st.used - audit_total
                    tol = REL_TOL * max(abs(st.used), abs(audit_total), 1.0)
                    if abs(diff) <= tol:
                        why = "match"
                    elif st.held > 0 and 0 < -diff <= st.held + tol:
                        why = "held (requests in flight, or settled into a lease batch not yet sent)"
                    elif spool_depth and diff < 0:
                        why = f"spool ({spool_depth} records waiting for replay)"
                    elif diff > 0 and cfg.store.lease_expiry == "charge":
                        why = "lease-expiry (holds or budget slices of a gateway that died were charged in full)"
                    else:
                        why = "unexplained"
                        unexplained += 1
                    rows.append({"tier": tier_name, "budget": b.label, "scope": b.scope, "id": sid,
                                 "window_start": lo, "audit": audit_total, "ledger": st.used, "held": st.held,
                                 "difference": diff, "explanation": why})
    return rows, unexplained


def reconcile_main(argv: list[str]) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        rows, unexplained = asyncio.run(reconcile(args))
    except Exception as exc:
        print(f"kgate audit reconcile: {exc}", file=sys.stderr)
        return 2
    if args.format == "json":
        sys.stdout.write(orjson.dumps({"rows": rows, "unexplained": unexplained}).decode() + "\n")
    else:
        print(f"{'tier':<10}{'budget':<36}{'id':<16}{'audit':>14}{'ledger':>14}{'held':>10}  explanation")
        for r in rows:
            print(f"{r['tier']:<10}{r['budget']:<36}{r['id']:<16}{r['audit']:>14.6g}{r['ledger']:>14.6g}"
                  f"{r['held']:>10.4g}  {r['explanation']}")
        print(f"{len(rows)} budgets compared, {unexplained} unexplained differences")
    return 1 if unexplained else 0
