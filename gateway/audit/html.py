"""The HTML form of ``kgate audit report``: one self-contained page (inline CSS and SVG, no scripts, no
network), with compute over time (FLOPs and K-units), the distribution of K per tier, the table, and the
effective compute per model (rows with flagged answers marked)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from html import escape

from gateway.audit.effective import COLUMNS as EFFECTIVE_COLUMNS
from gateway.audit.effective import notes as effective_notes
from gateway.audit.effective import row_cells as effective_cells
from gateway.audit.report import Report, cell, report_columns

# Per-request K, in powers of two: "how many standard answers' worth" is read on a log scale.
K_BINS: tuple[tuple[float, float, str], ...] = (
    (0, 1, "<1"), (1, 2, "1-2"), (2, 4, "2-4"), (4, 8, "4-8"), (8, 16, "8-16"), (16, 32, "16-32"),
    (32, 64, "32-64"), (64, 128, "64-128"), (128, math.inf, "≥128"),
)

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
.meta{color:#59636e;margin-bottom:16px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #d1d9e0;border-radius:6px;padding:8px 14px;min-width:140px}
.card b{display:block;font-size:18px}
.multiples{display:flex;gap:16px;flex-wrap:wrap}
table{border-collapse:collapse;font-size:12px;margin-top:8px}
th,td{border:1px solid #d1d9e0;padding:3px 6px;white-space:nowrap}th{background:#f6f8fa;position:sticky;top:0}
.wide{overflow-x:auto;max-width:100%}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.total td{font-weight:bold;background:#f6f8fa}
tr.flagged td{background:#ffebe9}td.flag{color:#cf222e;font-weight:bold}.notes{margin:6px 0;padding-left:18px}
svg text{font:11px system-ui,sans-serif;fill:#59636e}svg .title{font-size:12px;fill:#1f2328}
"""


def si(x: float) -> str:
    """1.2e15 → ``1.2P``: compact numbers for axis labels and cards."""
    if x == 0 or not math.isfinite(x):
        return "0"
    exp = min(int(math.log10(abs(x)) // 3), 8) if abs(x) >= 1 else 0
    value = x / 10 ** (3 * exp)
    return f"{value:.3g}{' kMGTPEZY'[exp].strip()}"


def _bars(points: list[tuple[str, float]], *, title: str, color: str, width: int = 880,
          height: int = 170, unit: str = "") -> str:
    """A bar chart as inline SVG; each bar has a tooltip with its exact value."""
    left, right, top, bottom = 56, 8, 22, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((v for _, v in points), default=0.0) or 1.0
    n = max(len(points), 1)
    slot = plot_w / n
    bar_w = max(slot * 0.8, 1.0)
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}">',
             f'<text class="title" x="{left}" y="14">{escape(title)}</text>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
             'stroke="#8c959f"/>']
    for frac in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - frac)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{si(peak * frac)}</text>')
        if frac:
            parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                         'stroke="#eaeef2"/>')
    # Thin the axis labels so that they never overlap (about 6.5 px per character at 11 px).
    longest = max((len(label) for label, _ in points), default=1)
    label_every = max(1, math.ceil((longest * 6.5 + 8) / slot))
    for i, (label, value) in enumerate(points):
        h = plot_h * value / peak
        x = left + i * slot + (slot - bar_w) / 2
        parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                     f'fill="{color}"><title>{escape(label)}: {value:.6g}{unit}</title></rect>')
        if i % label_every == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 14}" text-anchor="middle">'
                         f'{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def k_histogram(values: list[float]) -> list[tuple[str, float]]:
    counts = [0] * len(K_BINS)
    for k in values:
        for i, (lo, hi, _) in enumerate(K_BINS):
            if lo <= k < hi:
                counts[i] += 1
                break
    return [(label, float(c)) for (_, _, label), c in zip(K_BINS, counts, strict=True)]


def _table(report: Report) -> str:
    cols = report_columns(report)
    keys = set(report.by)
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    rows = []
    for r in report.rows:
        cells = "".join(f'<td{"" if c in keys else " class=n"}>{escape(cell(r[c], c))}</td>' for c in cols)
        rows.append(f"<tr>{cells}</tr>")
    total = "".join("<td>TOTAL</td>" if i == 0 else "<td></td>" for i in range(len(report.by)))
    total += "".join(f"<td class=n>{escape(cell(report.total[c], c))}</td>" for c in cols[len(report.by):])
    rows.append(f'<tr class="total">{total}</tr>')
    # Wider than a window with all its columns: the table scrolls sideways, the page does not.
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _effective(report: Report) -> str:
    """The effective compute section: one row per model; a row with flagged answers is tinted and says so."""
    section = report.effective
    if not section:
        return ""
    head = "".join(f"<th>{escape(c)}</th>" for c in EFFECTIVE_COLUMNS)
    rows = []
    for row in section["models"]:
        cells = effective_cells(row)
        tds = [f"<td>{escape(cells[0])}</td>"]
        tds += [f"<td class=n>{escape(c)}</td>" for c in cells[1:-1]]
        flagged = bool(row["flagged"])
        tds.append(f'<td class="n flag">⚑ {escape(cells[-1])} flagged</td>' if flagged
                   else f"<td class=n>{escape(cells[-1])}</td>")
        rows.append(f'<tr class="flagged">{"".join(tds)}</tr>' if flagged else f"<tr>{''.join(tds)}</tr>")
    if not rows:
        rows.append(f'<tr><td colspan="{len(EFFECTIVE_COLUMNS)}">No metered answers in this range.</td></tr>')
    items = "".join(f"<li>{escape(line)}</li>" for line in effective_notes(section))
    return (f'<div class="wide"><table class="effective"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div><ul class="notes">{items}</ul>')


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _period(report: Report) -> str:
    """The period as dates: the range asked for, else the first and last record read."""
    lo = report.since if report.since is not None else report.first
    hi = report.until if report.until is not None else report.last
    if lo is None or hi is None:
        return "No records in this range"
    return f"From {_when(lo)} to {_when(hi)}"


def render_html(report: Report) -> str:
    """The whole report as one HTML document (no external resources)."""
    t = report.total
    cards = "".join(f'<div class="card">{label}<b>{value}</b></div>' for label, value in (
        ("requests", f"{t['requests']:,}"), ("generated tokens", si(t["generated_tokens"])),
        ("reasoning tokens", si(t["reasoning_tokens"])), ("FLOPs", si(t["flops"])),
        ("K-units", f"{t['k_units']:.2f}"), ("denied", f"{t['denied']:,}")))
    unit = report.time_unit
    series = list(report.series.items())
    if series:
        time_charts = (_bars([(k, v["flops"]) for k, v in series], title=f"FLOPs per {unit}", color="#0969da")
                       + "<br>"
                       + _bars([(k, v["k_units"]) for k, v in series], title=f"K-units per {unit}",
                               color="#8250df"))
    else:
        time_charts = "<p>No metered requests in this range.</p>"
    hists = "".join(
        _bars(k_histogram(values), title=f"tier {tier}: {len(values)} requests by K",
              color="#1a7f37", width=420, height=170, unit=" requests")
        for tier, values in sorted(report.k_by_tier.items()))
    by = ", ".join(report.by) or "(nothing)"
    note = (f"<p class=meta>{report.unreadable} unreadable lines were skipped; run "
            f"<code>kgate audit verify</code>.</p>" if report.unreadable else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>kgate audit report</title><style>{_CSS}</style></head>
<body>
<h1>kgate audit report</h1>
<div class="meta">{escape(_period(report))}
 · grouped by {escape(by)} · usage summed over metered decisions (allowed, clamped, partial, spooled,
 replayed), once per request id</div>
{note}<div class="cards">{cards}</div>
<h2>Compute over time</h2>
{time_charts}
<h2>Distribution of K per tier</h2>
<div class="multiples">{hists or "<p>No metered requests in this range.</p>"}</div>
<h2>Usage by {escape(by)}</h2>
{_table(report)}
<h2>Effective compute per model</h2>
<p class=meta>Per answer: the largest inference FLOPs and K served, next to the model's training FLOPs and the
compute it was evaluated under (from the policy). Answers above the evaluated bound are allowed for tiers with
<code>beyond_evaluated</code>; elsewhere they are flagged.</p>
{_effective(report)}
</body></html>
"""
