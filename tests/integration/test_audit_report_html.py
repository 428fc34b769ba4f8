"""`kgate audit report --format html` as an operator opens it (issue 14, item 7).

The page names the period by its real dates, calls records without a principal what they are (admin
operations, unauthenticated requests), goes to a file rather than the terminal, and renders in a real
browser: headless Chromium draws it to a PNG, and its DOM holds the charts and the table.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.log import AuditLog

D1 = 1740819600.0  # 2025-03-01T09:00:00Z
DAY = 86400.0


def _usage(r: int, v: int, k: float) -> dict[str, Any]:
    return {"samples": 1, "prompt_tokens": 20, "reasoning_tokens": r, "output_tokens": v,
            "generated_tokens": r + v, "k": k, "flops": 1e12 * (r + v), "source": "upstream"}


@pytest.fixture
async def audit_dir(tmp_path: Path) -> Path:
    """Three days of a small deployment: metered requests, a refused unauthenticated one, an admin change."""
    root = tmp_path / "audit"
    t = [D1]
    log = AuditLog(root, "r1", clock=lambda: t[0])
    await log.start()
    for i in range(12):
        t[0] = D1 + (i % 3) * DAY + i * 600
        await log.write({"request_id": f"req-{i}", "principal": "alice" if i % 2 else "bob", "org": "acme",
                         "tier": "standard" if i % 2 else "research", "model": "reasoner-32b", "api": "openai.chat",
                         "decision": "allowed", "usage": _usage(100 * i, 64, 1 + i / 2)})
    t[0] = D1 + 3600
    await log.write({"request_id": "req-anon", "principal": None, "model": None, "decision": "denied",
                     "status": 401, "reason": "missing API key"})
    await log.write({"request_id": None, "decision": "admin", "reason": "key.create", "actor": "cli:root",
                     "admin": {"principal": "carol"}})
    await log.close()
    return root


def _report(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "audit", "report", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def test_html_goes_to_a_file_named_for_its_period(audit_dir: Path, tmp_path: Path):
    out = _report(tmp_path, "--format", "html", "--by", "principal,model", str(audit_dir))
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path.name == "kgate-audit-report-2025-03-01--2025-03-03.html" and path.is_file()
    page = path.read_text()
    assert "From 2025-03-01 09:00 UTC to 2025-03-03" in page  # the records' real dates, not "the first record"
    assert "<td>(admin)</td><td>(admin)</td>" in page
    assert "<td>(unauthenticated)</td><td>(none)</td>" in page
    assert "<td></td><td></td>" not in page.split("<tbody>")[1].split('class="total"')[0]
    # --output - still writes to the terminal
    to_stdout = _report(tmp_path, "--format", "html", "--output", "-", str(audit_dir))
    assert to_stdout.returncode == 0 and to_stdout.stdout.startswith("<!DOCTYPE html>")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium is not on PATH (apt-get install chromium)")


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--hide-scrollbars", *args],
                          capture_output=True, timeout=120, check=False)


def _png_size(png: bytes) -> tuple[int, int, int]:
    """(width, height, bytes of compressed image data) of a PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, size = 8, 0, (0, 0)
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        if kind == b"IHDR":
            size = struct.unpack(">II", png[pos + 8:pos + 16])
        elif kind == b"IDAT":
            idat += length
        pos += 12 + length
    return size[0], size[1], idat


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.count: dict[str, int] = {}
        self.titles: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        self.count[tag] = self.count.get(tag, 0) + 1
        if tag == "svg":
            self.titles.append(dict(attrs).get("aria-label", ""))


@pytest.mark.slow
def test_html_renders_in_headless_chromium_with_charts_and_table(audit_dir: Path, tmp_path: Path):
    chromium = _chromium()
    out = _report(tmp_path, "--format", "html", "--by", "principal,model", str(audit_dir))
    assert out.returncode == 0, out.stderr
    page = Path(out.stdout.strip())

    dom = _run_chromium(chromium, tmp_path / "profile", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    elements = _Elements()
    elements.feed(dom.stdout.decode())
    assert elements.titles[:2] == ["FLOPs per day", "K-units per day"]
    assert any(t.startswith("tier research:") for t in elements.titles)
    assert elements.count.get("rect", 0) >= 6  # bars: three days in each time chart, and the histograms
    # The usage table (head, 3 groups, total) and the effective-compute table after it.
    assert elements.count.get("table") == 2 and elements.count.get("tr", 0) >= 7
    assert re.search(r"<td>alice</td>", dom.stdout.decode())

    shot = tmp_path / "report.png"
    blank_html = tmp_path / "blank.html"
    blank_html.write_text("<!DOCTYPE html><html><body></body></html>")
    blank = tmp_path / "blank.png"
    for target, source in ((shot, page), (blank, blank_html)):
        r = _run_chromium(chromium, tmp_path / "profile", f"--screenshot={target}", "--window-size=1280,1400",
                          source.as_uri())
        assert r.returncode == 0 and target.exists(), r.stderr.decode(errors="replace")[-2000:]
    width, height, data = _png_size(shot.read_bytes())
    assert (width, height) == (1280, 1400)
    # A blank page compresses to almost nothing; charts, text and a table do not.
    assert data > 10 * _png_size(blank.read_bytes())[2]
