"""`kgate audit report`'s effective compute section (issue 17, item 5).

A real audit log (written by :class:`AuditLog`) and a policy with training FLOPs and evaluated bounds; the
report through its CLI entry in every format: per model the largest per-answer FLOPs and K, the mean K, the
training FLOPs and their ratio, the evaluated bound, and the answers above it split into those served to
``beyond_evaluated`` tiers and the flagged others. Without a policy the measured figures stay and the
policy's columns are empty, saying why. No Redis.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.audit.effective import EffectiveCompute
from gateway.audit.log import AuditLog
from gateway.audit.report import format_table, report_columns, report_main, report_rows
from gateway.policy.config import load_config

D1 = 1740819600.0  # 2025-03-01T09:00:00Z
DAY = 86400.0

POLICY = """
upstreams:
  sim: {{base_url: "http://127.0.0.1:9"}}
models:
  m-eval:
    upstream: sim
    upstream_model: m-eval-upstream
    active_params: 1.0e9
    training_flops: 1.0e24
    evaluated_max_k: 8
    evaluated_max_samples: 2
  m-notrain:
    upstream: sim
    active_params: 1.0e9
    evaluated_max_k: 4
  m-bare:
    upstream: sim
    active_params: 1.0e9
tiers:
  std: {{}}
  vetted: {{beyond_evaluated: true}}
audit:
  dir: {audit}
"""

OTHER_POLICY = "0" * 64


def usage(k: float, *, samples: int = 1, reasoning: int = 100, overrun: bool = False) -> dict[str, Any]:
    return {"samples": samples, "prompt_tokens": 10, "reasoning_tokens": reasoning, "output_tokens": 50,
            "generated_tokens": reasoning + 50, "k": k, "flops": 1e15 * k, "source": "upstream",
            "overrun": overrun}


# (request id, model, tier, decision, usage, extra fields). Policy sha256 is the policy's unless given.
M_EVAL = [
    ("a", "std", "allowed", usage(2.0), {}),
    ("b", "vetted", "allowed", usage(20.0), {}),                             # above K, allowed tier
    ("c", "std", "allowed", usage(9.0), {"mode": "shadow", "would_deny": True}),  # flagged: shadow
    ("d", "std", "clamped", usage(3.0, samples=3), {}),                      # flagged: samples above 2
    ("e", "std", "allowed", usage(8.0), {}),                                 # exactly the bound: not above
    ("f", "std", "denied", usage(100.0), {}),                                # not metered
    ("g", "std", "spooled", usage(12.0), {}),                                # flagged, once ...
    ("g", "std", "replayed", usage(12.0), {}),                               # ... though recorded twice
    ("h", "std", "failed", usage(50.0), {}),                                 # not metered
    ("i", "std", "allowed", usage(10.0, overrun=True), {"policy_sha256": OTHER_POLICY}),  # flagged: old policy
    ("j", "retired", "partial", usage(9.0), {}),                             # a tier the policy lost: flagged
    ("k", "std", "allowed", usage(1.0), {"eval": "run-1"}),                  # an evaluation run's answer
]


async def _write_log(root: Path, sha: str) -> None:
    t = [D1]
    log = AuditLog(root, "r1", clock=lambda: t[0])
    await log.start()
    n = 0

    async def write(rid: str, model: str | None, tier: str | None, decision: str, use: dict[str, Any] | None,
                    extra: dict[str, Any], day: int = 0) -> None:
        nonlocal n
        n += 1
        t[0] = D1 + day * DAY + n * 60
        rec = {"request_id": rid, "principal": "alice", "org": "acme", "tier": tier, "model": model,
               "upstream_model": f"{model}-upstream" if model else None, "api": "openai.chat",
               "decision": decision, "policy_sha256": sha, "mode": "enforce", **extra}
        if use is not None:
            rec["usage"] = use
        await log.write(rec)

    for rid, tier, decision, use, extra in M_EVAL:
        await write(f"eval-{rid}", "m-eval", tier, decision, use, extra)
    for i in range(7):  # all above K=4 on a normal tier: 7 flagged, 5 examples
        await write(f"nt-{i}", "m-notrain", "std", "allowed", usage(5.0 + i), {})
    await write("bare-1", "m-bare", "std", "allowed", usage(3.0), {})
    await write("ghost-1", "ghost", "std", "allowed", usage(7.0), {})
    await write("admin-1", None, None, "admin", None, {"reason": "key.create"})
    # The next day: far above the bound, on a normal tier (outside a --to 2025-03-01 range).
    await write("late-1", "m-eval", "std", "allowed", usage(40.0), {}, day=1)
    await log.close()


@pytest.fixture
async def setup(tmp_path: Path) -> tuple[Path, Path]:
    """(audit dir, policy file) — the log's records name the policy's sha256 (one names another)."""
    audit = tmp_path / "audit"
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(audit=audit))
    await _write_log(audit, load_config(policy).version)
    return audit, policy


@pytest.fixture(autouse=True)
def _no_default_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No policy unless a test gives one: not the example policy of the working directory."""
    monkeypatch.setenv("KGATE_CONFIG", str(tmp_path / "no-such-policy.yaml"))


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert report_main(list(args)) == 0
    return capsys.readouterr().out


def rows_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["model"]: r for r in doc["effective_compute"]["models"]}


# ---------------------------------------------------------------------------------------------- JSON
async def test_json_figures_and_flags(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    audit, policy = setup
    doc = orjson.loads(run(capsys, "--format", "json", "--config", str(policy), "--to", "2025-03-01", str(audit)))
    section = doc["effective_compute"]
    assert section["policy"] == {"files": [str(policy)], "sha256": load_config(policy).version,
                                 "origin": "--config"}
    assert section["note"] is None
    assert section["answers_under_other_policy"] == 1  # eval-i
    rows = rows_of(doc)
    assert set(rows) == {"m-eval", "m-notrain", "m-bare", "ghost"}  # the admin record has no model, no usage

    ev = rows["m-eval"]
    # metered, once per request id: a b c d e g i j k (not the denied f, the failed h, g's replay)
    assert ev["requests"] == 9 and ev["evaluation_requests"] == 1
    assert ev["max_k"] == 20.0 and ev["max_k_request_id"] == "eval-b"
    assert ev["max_flops"] == pytest.approx(2e16) and ev["max_flops_request_id"] == "eval-b"
    assert ev["mean_k"] == pytest.approx((2 + 20 + 9 + 3 + 8 + 12 + 10 + 9 + 1) / 9)
    assert ev["max_samples"] == 3 and ev["upstream_models"] == ["m-eval-upstream"]
    assert ev["training_flops"] == 1e24
    assert ev["inference_to_training_flops"] == pytest.approx(2e16 / 1e24)
    assert ev["evaluated"] == {"max_k": 8.0, "max_samples": 2, "max_reasoning_tokens": None,
                               "source": "typed in the policy"}
    # above: b (K, vetted), c (K), d (samples), g (K), i (K), j (K) — e sits exactly on the bound
    assert ev["above_evaluated"] == 6
    assert ev["above_evaluated_by"] == {"k": 5, "samples": 1, "reasoning_tokens": 0}
    assert ev["beyond_evaluated_tiers"] == 1
    assert ev["flagged"] == 5
    assert ev["flagged_request_ids"] == ["eval-c", "eval-d", "eval-g", "eval-i", "eval-j"]
    assert (ev["flagged_shadow"], ev["flagged_other_policy"], ev["flagged_overrun"]) == (1, 1, 1)
    assert ev["note"] is None

    nt = rows["m-notrain"]
    assert nt["requests"] == 7 and nt["max_k"] == 11.0 and nt["mean_k"] == pytest.approx(8.0)
    assert nt["training_flops"] is None and nt["inference_to_training_flops"] is None
    assert nt["evaluated"]["max_k"] == 4.0
    assert nt["above_evaluated"] == 7 and nt["flagged"] == 7 and nt["beyond_evaluated_tiers"] == 0
    assert nt["flagged_request_ids"] == [f"nt-{i}" for i in range(5)]  # at most five examples
    assert nt["note"] == "policy sets no training_flops"

    bare = rows["m-bare"]
    assert bare["requests"] == 1 and bare["max_k"] == 3.0
    assert bare["evaluated"] is None and bare["above_evaluated"] is None and bare["flagged"] is None
    assert bare["note"] == "policy sets no training_flops and no evaluated bound"
    assert rows["ghost"]["note"] == "model not in the policy" and rows["ghost"]["flagged"] is None

    # The main rows and total are what they were: the section is added beside them.
    assert doc["total"]["requests"] == 20  # 11 request ids of m-eval, 7 + 1 + 1 others; not the admin record
    assert set(doc) == {"from", "to", "by", "rows", "total", "effective_compute"}


async def test_range_limits_the_section(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    audit, policy = setup
    whole = rows_of(orjson.loads(run(capsys, "--format", "json", "--config", str(policy), str(audit))))
    assert whole["m-eval"]["max_k"] == 40.0 and whole["m-eval"]["max_k_request_id"] == "late-1"
    assert whole["m-eval"]["flagged"] == 6 and whole["m-eval"]["flagged_request_ids"][-1] == "eval-j"  # five
    later = rows_of(orjson.loads(run(capsys, "--format", "json", "--config", str(policy), "--from", "2025-03-02",
                                     str(audit))))
    assert set(later) == {"m-eval"} and later["m-eval"]["requests"] == 1 and later["m-eval"]["flagged"] == 1


async def test_certificate_source_is_shown(setup: tuple[Path, Path]) -> None:
    """The bound's source (a certificate, once the loader copied it in) reaches the JSON and the notes."""
    audit, policy = setup
    cfg = load_config(policy)
    models = dict(cfg.models)
    models["m-eval"] = models["m-eval"].model_copy(update={"evaluated_source": "certificate cyber.json (run r1)"})
    cfg = cfg.model_copy(update={"models": models})
    report = report_rows([audit], by=["model"], effective=EffectiveCompute(cfg, "--config"))
    ev = next(r for r in report.effective["models"] if r["model"] == "m-eval")
    assert ev["evaluated"]["source"] == "certificate cyber.json (run r1)"
    assert "evaluated bound of m-eval: certificate cyber.json (run r1)" in format_table(report)


# --------------------------------------------------------------------------------------------- table
def _report_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "audit", "report", *args], capture_output=True,
                          text=True, timeout=60, check=False, env={**os.environ, **(env or {})})


def _split_table(out: str) -> tuple[list[str], list[str]]:
    """(the main table's lines, the effective compute section's lines)."""
    lines = out.splitlines()
    start = lines.index("Effective compute per model")
    assert lines[start - 1] == ""
    return lines[:start - 1], lines[start + 1:]


async def test_table_has_a_second_table_after_the_main_one(setup: tuple[Path, Path]) -> None:
    audit, policy = setup
    out = _report_cli("--config", str(policy), "--to", "2025-03-01", "--by", "model", str(audit))
    assert out.returncode == 0, out.stderr
    main, section = _split_table(out.stdout)
    # The main table is exactly what it was (header, rows, total last).
    report = report_rows([audit], until=D1 + DAY - 9 * 3600, by=["model"])
    assert "\n".join(main) + "\n" == format_table(report).split("\n\nEffective compute per model")[0] + "\n"
    assert main[0].split()[:2] == ["model", "requests"] and main[-1].split()[0] == "TOTAL"

    header = section[0].split()
    assert header == ["model", "requests", "max_flops", "max_k", "mean_k", "training_flops", "inference/training",
                      "evaluated", "above_evaluated", "beyond_evaluated_tiers", "flagged"]
    table = {ln.split()[0]: dict(zip(header, ln.split(), strict=True)) for ln in section[2:6]}
    assert set(table) == {"m-eval", "m-notrain", "m-bare", "ghost"}
    ev = table["m-eval"]
    assert (ev["requests"], ev["max_flops"], ev["max_k"], ev["training_flops"]) == ("9", "2e+16", "20.00", "1e+24")
    assert (ev["inference/training"], ev["evaluated"]) == ("2e-08", "k<=8,samples<=2")
    assert (ev["above_evaluated"], ev["beyond_evaluated_tiers"], ev["flagged"]) == ("6", "1", "5")
    assert table["m-notrain"]["training_flops"] == "-" and table["m-notrain"]["flagged"] == "7"
    assert table["m-bare"]["evaluated"] == "-" and table["m-bare"]["flagged"] == "-"
    notes = section[6:]
    assert notes[0].startswith(f"policy: {policy} (sha256 ") and "1 answer was served under another policy" in notes[0]
    assert ("FLAGGED m-eval: 5 answers above the evaluated bound served to tiers without beyond_evaluated "
            "(1 in shadow mode, 1 under another policy, 1 overran their admission bound); e.g. "
            "eval-c, eval-d, eval-g, eval-i, eval-j") in notes
    assert any(n.startswith("FLAGGED m-notrain: 7 answers") for n in notes)
    assert not any(n.startswith("FLAGGED m-bare") for n in notes)
    assert "ghost: model not in the policy" in notes


# ------------------------------------------------------------------------------------------------ CSV
async def test_csv_stays_the_main_rows(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    audit, policy = setup
    out = run(capsys, "--format", "csv", "--config", str(policy), "--by", "model", str(audit))
    rows = list(csv.DictReader(io.StringIO(out)))
    report = report_rows([audit], by=["model"])
    assert list(rows[0]) == report_columns(report)
    assert [r["model"] for r in rows] == [r["model"] for r in report.rows]
    assert "Effective" not in out and "flagged" not in out


# ----------------------------------------------------------------------------------------------- HTML
class _Rows(HTMLParser):
    """The effective compute table's rows: (class of the tr, cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.rows: list[tuple[str, list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("class") == "effective":
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append((a.get("class") or "", []))
        elif self.inside and tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("td", "th") and self.cell is not None:
            self.rows[-1][1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


async def test_html_section_marks_flagged_rows(setup: tuple[Path, Path], tmp_path: Path) -> None:
    audit, policy = setup
    page = tmp_path / "report.html"
    assert report_main(["--format", "html", "--config", str(policy), "-o", str(page), str(audit)]) == 0
    html = page.read_text()
    assert "<h2>Effective compute per model</h2>" in html
    assert html.index("<h2>Effective compute per model</h2>") > html.index("<h2>Usage by principal</h2>")
    parser = _Rows()
    parser.feed(html)
    head, *body = parser.rows
    assert head[1][0] == "model" and head[1][-1] == "flagged"
    by_model = {cells[0]: (cls, cells) for cls, cells in body}
    assert by_model["m-eval"][0] == "flagged" and by_model["m-eval"][1][-1] == "⚑ 6 flagged"
    assert by_model["m-notrain"][0] == "flagged"
    assert by_model["m-bare"][0] == "" and by_model["m-bare"][1][-1] == "-"
    assert by_model["ghost"][0] == ""
    assert "FLAGGED m-eval: 6 answers" in html and "eval-c, eval-d, eval-g, eval-i, eval-j" in html


# ------------------------------------------------------------------------------------------ no policy
async def test_without_a_policy_the_measured_figures_stay(setup: tuple[Path, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    audit, _ = setup
    doc = orjson.loads(run(capsys, "--format", "json", str(audit)))
    section = doc["effective_compute"]
    assert section["policy"] is None and section["answers_under_other_policy"] is None
    assert "no-such-policy.yaml does not exist" in section["note"] and "--config" in section["note"]
    ev = rows_of(doc)["m-eval"]
    assert ev["requests"] == 10 and ev["max_k"] == 40.0
    for key in ("training_flops", "inference_to_training_flops", "evaluated", "above_evaluated",
                "beyond_evaluated_tiers", "flagged"):
        assert ev[key] is None, key
    assert ev["flagged_request_ids"] == [] and ev["note"] == "no policy"

    out = _report_cli(str(audit), env={"KGATE_CONFIG": str(tmp_path / "no-such-policy.yaml")})
    assert out.returncode == 0, out.stderr
    _, lines = _split_table(out.stdout)
    header = lines[0].split()
    ev_cells = dict(zip(header, next(ln for ln in lines if ln.startswith("m-eval")).split(), strict=True))
    assert ev_cells["max_k"] == "40.00"
    assert [ev_cells[c] for c in ("training_flops", "evaluated", "flagged")] == ["-", "-", "-"]
    assert any(ln.startswith("policy: none; no policy (KGATE_CONFIG=") for ln in lines)
    assert not any(ln.startswith("FLAGGED") for ln in lines)


async def test_default_policy_is_used_and_a_broken_one_is_said(setup: tuple[Path, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    audit, policy = setup
    # KGATE_CONFIG names the policy: used without --config, and for the audit dir when no PATH is given.
    monkeypatch.setenv("KGATE_CONFIG", str(policy))
    doc = orjson.loads(run(capsys, "--format", "json"))
    assert doc["effective_compute"]["policy"]["origin"] == "KGATE_CONFIG"
    assert rows_of(doc)["m-eval"]["flagged"] == 6
    # A default policy that does not load: the report still runs, and says why the columns are empty.
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: {m: {upstream: nowhere, active_params: 1}}\n")
    monkeypatch.setenv("KGATE_CONFIG", str(broken))
    doc = orjson.loads(run(capsys, "--format", "json", str(audit)))
    assert doc["effective_compute"]["policy"] is None
    assert f"the default policy {broken} does not load" in doc["effective_compute"]["note"]
    assert rows_of(doc)["m-eval"]["flagged"] is None
    # Named with --config, it is an error: one line, exit status 2.
    assert report_main(["--config", str(broken), str(audit)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load config" in err and "unknown upstream" in err
