"""``kgate audit report``: audited usage over a time range, grouped, as a table, CSV, JSON or HTML.

:func:`report_rows` sums usage grouped by principal, org, model, tier, decision, day, ... (the HTML page is
:mod:`gateway.audit.html`); :func:`report_main` is the command. Usage is summed over the metered decisions,
once per request id (:class:`gateway.audit.records.Metered`).

Every format also carries the per-model "effective compute" section (:mod:`gateway.audit.effective`): the
largest per-answer inference FLOPs and K next to the policy's training FLOPs and evaluated bound, and the
answers above that bound. The table prints it as a second table after the main one, the JSON under
``effective_compute``, the HTML page as its own section; the CSV stays the main rows only (one header, one
kind of row, for the scripts that read it: the section is in the JSON).
"""

from __future__ import annotations

import csv
import io
import re
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from gateway.audit.chain import DECISIONS
from gateway.audit.command import ArgParser, load_audit_config, run_cli
from gateway.audit.effective import EffectiveCompute, format_section, load_policy
from gateway.audit.records import SUM_METRICS, TOKEN_METRICS, Metered, ReadStats, iter_records, usage_amounts, utc_date
from gateway.engine.errors import UsageError

GROUP_FIELDS = ("principal", "org", "model", "tier", "decision", "day", "replica", "api", "upstream")


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
    effective: dict[str, Any] = field(default_factory=dict)  # EffectiveCompute.result(): effective compute


# What a report calls a record that has no principal (or no model, tier ...): an admin operation names no
# caller of the API, and a request refused before its key was known has none.
ADMIN_LABEL = "(admin)"
UNAUTHENTICATED_LABEL = "(unauthenticated)"
NONE_LABEL = "(none)"


def _group_value(rec: dict[str, Any], t: float | None, name: str) -> str:
    if name == "day":
        return utc_date(t) if t is not None else "unknown"
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
                by: Iterable[str] = ("principal",), effective: EffectiveCompute | None = None) -> Report:
    """Aggregate the audit log for ``kgate audit report``.

    ``requests`` counts distinct requests (records other than ``admin``, each request id once); token,
    FLOP and K sums cover metered decisions only; the decision columns count records. ``effective`` (by
    default one without a policy) takes each metered answer for the effective compute section.
    """
    effective = effective if effective is not None else EffectiveCompute()
    by = tuple(by)
    for name in by:
        if name not in GROUP_FIELDS:
            raise UsageError(f"cannot group by {name!r}: choose from {', '.join(GROUP_FIELDS)}")
    stats = ReadStats()
    metered = Metered()
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
        effective.add(rec, amounts["flops"], amounts["k_units"])
        if t is not None:
            points.append((t, amounts["flops"], amounts["k_units"]))
    rows = [groups[k] for k in sorted(groups)]
    for row in (*rows, total):
        for m in TOKEN_METRICS:
            row[m] = int(row[m])
    report = Report(by, rows, total, since, until, k_by_tier=dict(k_by_tier), unreadable=stats.unreadable,
                    first=first, last=last, effective=effective.result())
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


def cell(value: Any, column: str) -> str:
    """A value as the report shows it (the table, and escaped, the HTML page): FLOPs in four significant
    digits, K-units with two decimals."""
    if column == "flops":
        return f"{value:.4g}"
    if column == "k_units":
        return f"{value:.2f}"
    return str(value)


def format_table(report: Report) -> str:
    cols = report_columns(report)
    body = [[cell(r[c], c) for c in cols] for r in report.rows]
    total = [("TOTAL" if i == 0 and report.by else "") for i in range(len(report.by))]
    body.append(total + [cell(report.total[c], c) for c in cols[len(report.by):]])
    widths = [max(len(c), *(len(row[i]) for row in body)) for i, c in enumerate(cols)]
    numeric = [i >= len(report.by) for i in range(len(cols))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric, strict=True)).rstrip()

    out = [line(cols), line(["-" * w for w in widths])]
    out += [line(r) for r in body[:-1]]
    out += [line(["-" * w for w in widths]), line(body[-1])]
    main = "\n".join(out) + "\n"
    return main + format_section(report.effective) if report.effective else main


def format_csv(report: Report) -> str:
    """The main rows (not the total, not the effective compute section: that is in the JSON)."""
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
           "rows": report.rows, "total": report.total, "effective_compute": report.effective}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"


def _html_name(report: Report) -> str:
    """``kgate-audit-report-2025-03-01--2025-03-03.html``: the period's days (the records', if unbounded)."""
    lo = report.since if report.since is not None else report.first
    hi = report.until - 1 if report.until is not None else report.last  # --to DATE ends at the next midnight
    days = [utc_date(t) if t is not None else "all" for t in (lo, hi)]
    return f"kgate-audit-report-{days[0]}--{days[1]}.html"


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


def report_main(args: list[str]) -> int:
    """``kgate audit report [--from T] [--to T] [--by FIELDS] [--format table|csv|json|html] [--config FILE]
    [PATH...]``."""
    return run_cli("kgate audit report", _report_main, args)


def _report_main(args: list[str]) -> int:
    p = ArgParser(prog="kgate audit report", description="Sum audited usage over a time range.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="audit files or directories (default: the configured audit dir)")
    p.add_argument("--from", dest="since", metavar="T", help="ISO date or datetime (UTC), inclusive")
    p.add_argument("--to", dest="until", metavar="T",
                   help="ISO date (inclusive: through its end) or datetime (exclusive), UTC")
    p.add_argument("--by", default="principal", metavar="FIELDS",
                   help=f"comma-separated grouping, from: {', '.join(GROUP_FIELDS)} (default: principal)")
    p.add_argument("--format", default="table", choices=("table", "csv", "json", "html"))
    p.add_argument("--config", help="configuration file: audit.dir, and the policy whose training FLOPs and "
                                     "evaluated bounds the effective compute section shows (default: "
                                     "KGATE_CONFIG, else the example policy, when it exists)")
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
    policy, origin, note = load_policy(ns.config)
    paths = ns.paths or [policy.audit.dir if policy is not None else load_audit_config(ns.config).dir]
    if not ns.paths and not Path(paths[0]).exists():
        raise UsageError(f"audit directory {paths[0]} does not exist (give PATH or --config)")
    report = report_rows(paths, since, until, by, EffectiveCompute(policy, origin, note))
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
