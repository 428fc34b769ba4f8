"""`kgate audit report` and the reconcile totals, on a synthetic log written by the real writer."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.audit.log import AuditLog
from gateway.audit.reconcile import TotalKey, audit_totals, bucket_start
from gateway.audit.report import parse_time, report_main, report_rows

D1 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC).timestamp()
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.t = D1

    def __call__(self) -> float:
        return self.t


def usage(p: int, r: int, v: int, k: float, flops: float) -> dict[str, Any]:
    return {"samples": 1, "prompt_tokens": p, "reasoning_tokens": r, "output_tokens": v,
            "generated_tokens": r + v, "k": k, "flops": flops, "source": "upstream"}


PEOPLE = {"alice": ("acme", "pro"), "bob": ("acme", "standard"), "carol": ("globex", "standard")}

# (day, replica, principal, decision, usage, extra)
LOG: list[tuple[int, str, str, str, dict[str, Any] | None, dict[str, Any]]] = [
    (0, "r1", "alice", "allowed", usage(100, 900, 100, 10.0, 1e15), {"model": "m1"}),
    (0, "r2", "bob", "allowed", usage(50, 0, 200, 1.0, 2e14), {"model": "m1"}),
    (0, "r2", "bob", "denied", None, {"model": "m1", "status": 429}),
    (0, "r1", "carol", "clamped", usage(10, 0, 500, 2.0, 5e14), {"model": "m2"}),
    (1, "r1", "alice", "failed", usage(100, 50, 0, 0.1, 1e13), {"model": "m2", "status": 502}),
    (1, "r1", "alice", "spooled", usage(20, 180, 20, 4.0, 3e14), {"model": "m1", "request_id": "X"}),
    (2, "r1", "alice", "replayed", usage(20, 180, 20, 4.0, 3e14), {"model": "m1", "request_id": "X"}),
    (1, "r2", "alice", "admin", None, {"event": "grant", "approver": "root"}),
    (2, "r2", "carol", "partial", usage(5, 0, 30, 0.5, 1e13), {"model": "m2"}),
    (2, "r2", "bob", "allowed", usage(1, 0, 2, 1.0, 1e12), {"model": "m1", "mode": "shadow",
                                                             "would_deny": True}),
]


@pytest.fixture
async def audit_dir(tmp_path: Path) -> Path:
    root = tmp_path / "audit"
    for replica in ("r1", "r2"):
        clock = Clock()
        log = AuditLog(root, replica, clock=clock)
        await log.start()
        for i, (day, rep, who, decision, use, extra) in enumerate(LOG):
            if rep != replica:
                continue
            clock.t = D1 + day * DAY + i * 60
            org, tier = PEOPLE[who]
            rec = {"request_id": f"req-{i}", "principal": who, "org": org, "tier": tier, "decision": decision,
                   "key_id": "k", "api": "openai.chat", "status": 200, **extra}
            if use is not None:
                rec["usage"] = use
            await log.write(rec)
        await log.close()
    return root


EXPECTED = {
    "alice": {"requests": 3, "prompt_tokens": 120, "reasoning_tokens": 1080, "output_tokens": 120,
              "generated_tokens": 1200, "flops": 1.3e15, "k_units": 14.0, "allowed": 1, "failed": 1,
              "spooled": 1, "replayed": 1, "admin": 1, "denied": 0},
    "bob": {"requests": 3, "prompt_tokens": 51, "reasoning_tokens": 0, "output_tokens": 202,
            "generated_tokens": 202, "flops": 2.01e14, "k_units": 2.0, "allowed": 2, "denied": 1},
    "carol": {"requests": 2, "prompt_tokens": 15, "reasoning_tokens": 0, "output_tokens": 530,
              "generated_tokens": 530, "flops": 5.1e14, "k_units": 2.5, "clamped": 1, "partial": 1},
}


def check_row(row: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        assert float(row[key]) == pytest.approx(value, rel=1e-3), key


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert report_main(args) == 0
    return capsys.readouterr().out


async def test_report_json_totals_by_principal(audit_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = orjson.loads(run(["--format", "json", str(audit_dir)], capsys))
    assert doc["by"] == ["principal"] and doc["from"] is None
    rows = {r["principal"]: r for r in doc["rows"]}
    assert set(rows) == set(EXPECTED)
    for who, expected in EXPECTED.items():
        check_row(rows[who], expected)
    check_row(doc["total"], {"requests": 8, "generated_tokens": 1932, "k_units": 18.5, "denied": 1})


async def test_report_csv_parses_back(audit_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run(["--format", "csv", "--by", "principal", str(audit_dir)], capsys)
    rows = {r["principal"]: r for r in csv.DictReader(io.StringIO(out))}
    for who, expected in EXPECTED.items():
        check_row(rows[who], expected)


async def test_report_table_parses_back(audit_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run([str(audit_dir)], capsys).splitlines()
    header = out[0].split()
    assert header[:3] == ["principal", "requests", "prompt_tokens"]
    rows = {line.split()[0]: dict(zip(header, line.split(), strict=True)) for line in out[2:5]}
    for who, expected in EXPECTED.items():
        check_row(rows[who], expected)
    # The main table ends with its TOTAL line; the effective-compute table follows it.
    total = next(i for i, line in enumerate(out) if line.startswith("TOTAL"))
    assert out[total].split()[:2] == ["TOTAL", "8"]
    assert "Effective compute per model" in out[total + 1:]


async def test_report_groups_by_several_fields(audit_dir: Path) -> None:
    report = report_rows([audit_dir], by=["org", "day"])
    keys = [(r["org"], r["day"]) for r in report.rows]
    assert keys == sorted(keys) and ("acme", "2025-03-01") in keys
    acme_day1 = next(r for r in report.rows if (r["org"], r["day"]) == ("acme", "2025-03-01"))
    check_row(acme_day1, {"requests": 3, "generated_tokens": 1200, "k_units": 11.0, "denied": 1})
    by_decision = {r["decision"]: r for r in report_rows([audit_dir], by=["decision"]).rows}
    check_row(by_decision["failed"], {"failed": 1, "generated_tokens": 0})
    check_row(by_decision["spooled"], {"generated_tokens": 200})
    check_row(by_decision["replayed"], {"generated_tokens": 0, "requests": 0})
    tiers = {r["tier"]: r for r in report_rows([audit_dir], by=["tier", "model"]).rows if r["model"] == "m1"}
    check_row(tiers["standard"], {"requests": 3, "k_units": 2.0})


async def test_report_time_range(audit_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = orjson.loads(run(["--format", "json", "--from", "2025-03-02", "--to", "2025-03-02", str(audit_dir)],
                           capsys))
    assert doc["from"] == "2025-03-02T00:00:00Z" and doc["to"] == "2025-03-03T00:00:00Z"
    rows = {r["principal"]: r for r in doc["rows"]}
    assert set(rows) == {"alice"}
    check_row(rows["alice"], {"requests": 2, "generated_tokens": 200, "failed": 1, "spooled": 1, "admin": 1})
    # A datetime bound is exclusive and may carry a zone.
    doc = orjson.loads(run(["--format", "json", "--to", "2025-03-01T10:00:30+01:00", str(audit_dir)], capsys))
    assert [r["principal"] for r in doc["rows"]] == ["alice"]


async def test_report_html_is_self_contained_with_charts(audit_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert report_main(["--format", "html", "--by", "principal,tier", "-o", str(out), str(audit_dir)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page
    assert page.count("<svg") == 4  # FLOPs over time, K-units over time, one K histogram per tier
    assert "FLOPs per day" in page and "K-units per day" in page
    assert "tier pro: 2 requests by K" in page and "tier standard: 4 requests by K" in page
    assert "alice" in page and "TOTAL" in page

    class Checker(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []

        def handle_starttag(self, tag: str, attrs: Any) -> None:
            if tag not in ("meta", "br", "rect", "line"):
                self.stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            if tag in ("rect", "line"):
                return
            assert self.stack and self.stack.pop() == tag, tag

    checker = Checker()
    checker.feed(page)
    assert checker.stack == []


async def test_report_html_hourly_for_a_short_range(audit_dir: Path) -> None:
    from gateway.audit.html import render_html

    report = report_rows([audit_dir], parse_time("2025-03-01"), parse_time("2025-03-01", end=True))
    assert report.time_unit == "hour" and list(report.series) == ["2025-03-01 09:00"]
    assert "FLOPs per hour" in render_html(report)
    empty = render_html(report_rows([audit_dir], parse_time("2030-01-01")))
    assert "No metered requests" in empty


async def test_report_default_dir_from_config(audit_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "kgate.yaml"
    cfg.write_text(f"audit:\n  dir: {audit_dir}\n")
    doc = orjson.loads(run(["--config", str(cfg), "--format", "json"], capsys))
    assert doc["total"]["requests"] == 8


@pytest.mark.parametrize("args, needle", [
    (["--by", "colour"], "cannot group by 'colour'"),
    (["--from", "yesterday"], "not an ISO date"),
    (["--from", "2025-03-02", "--to", "2025-03-01"], "--to must be after --from"),
    (["--format", "pdf"], "invalid choice"),
    (["--by", ","], "--by needs"),
])
async def test_report_bad_input_is_one_line_and_exit_2(audit_dir: Path, capsys: pytest.CaptureFixture[str],
                                                       args: list[str], needle: str) -> None:
    assert report_main([*args, str(audit_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and needle in captured.err


async def test_report_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err


async def test_report_skips_unreadable_lines_with_a_warning(audit_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    f = sorted((audit_dir / "r1").glob("audit-*.jsonl"))[0]
    f.write_bytes(f.read_bytes() + b'{"torn')
    assert report_main(["--format", "json", str(audit_dir)]) == 0
    captured = capsys.readouterr()
    assert orjson.loads(captured.out)["total"]["requests"] == 8
    assert "skipped 1 unreadable" in captured.err


# -------------------------------------------------------------------------------------------- totals
async def test_audit_totals_per_scope_metric_and_bucket(audit_dir: Path) -> None:
    totals = audit_totals([audit_dir], windows=("day", "month"))
    day = [int(bucket_start("day", D1 + d * DAY)) for d in range(3)]

    def get(scope: str, sid: str, metric: str, b: int, window: str = "day") -> float:
        return totals.get(TotalKey(scope, sid, metric, window, b), 0.0)

    assert get("principal", "alice", "requests", day[0]) == 1
    assert get("principal", "alice", "generated_tokens", day[0]) == 1000
    assert get("principal", "alice", "requests", day[1]) == 1  # failed is not metered; spooled is
    assert get("principal", "alice", "k_units", day[1]) == 4.0
    assert get("principal", "alice", "requests", day[2]) == 0  # the replay of X is the same request
    assert get("org", "acme", "flops", day[0]) == pytest.approx(1.2e15)
    assert get("org", "globex", "output_tokens", day[2]) == 30
    assert get("global", "", "requests", day[0]) == 3
    month = bucket_start("month", D1)
    assert month == int(datetime(2025, 3, 1, tzinfo=UTC).timestamp())
    assert get("global", "", "k_units", month, "month") == pytest.approx(18.5)
    assert get("global", "", "requests", month, "month") == 6
    # A time range restricts what is summed.
    only_day2 = audit_totals([audit_dir], D1 + DAY - 9 * 3600, D1 + 2 * DAY - 9 * 3600)
    assert {k.bucket for k in only_day2} == {day[1]}
    with pytest.raises(ValueError, match="unknown window"):
        audit_totals([audit_dir], windows=("2w",))


def test_bucket_starts() -> None:
    t = datetime(2025, 3, 14, 15, 9, 26, tzinfo=UTC).timestamp()
    assert bucket_start("1m", t) == int(datetime(2025, 3, 14, 15, 9, tzinfo=UTC).timestamp())
    assert bucket_start("1h", t) == int(datetime(2025, 3, 14, 15, tzinfo=UTC).timestamp())
    midnight = int(datetime(2025, 3, 14, tzinfo=UTC).timestamp())
    assert bucket_start("day", t) == bucket_start("1d", t) == midnight
    assert bucket_start("month", t) == int(datetime(2025, 3, 1, tzinfo=UTC).timestamp())
    # 7d windows start on Mondays 00:00 UTC, as the ledger buckets them
    assert datetime.fromtimestamp(bucket_start("7d", t), UTC).weekday() == 0 and bucket_start("7d", t) <= t
