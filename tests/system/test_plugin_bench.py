"""The plugin benchmark (bench/plugin_bench.py: nginx + kgate's plugin vs nginx alone vs kgate's built-in proxy)
runs end to end, briefly, and reports every case, so its command keeps working. Its figures are not checked
here: timing belongs to the benchmark, not to the test suite. Skipped when wrk, nginx, lua-nginx-module or
lua-cjson is missing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nginxutil import nginx_binary

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_plugin_bench_runs_every_case(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    nginx_binary()  # skips (or fails under KGATE_REQUIRE_NGINX=1) when nginx or its Lua modules are missing
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plugin_bench.py"), "--duration", "1", "--runs", "1",
         "--connections", "1", "--json-out", str(out)],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    cases = {f"{c}/{m}/c1" for c in ("simulator", "nginx-alone", "builtin-proxy", "nginx+plugin")
             for m in ("json", "stream")}
    assert set(doc["results"]) == cases
    for name, r in doc["results"].items():
        assert r["rps"] > 0 and r["non2xx"] == 0, (name, r)
    assert doc["nginx_workers"] == 1
    assert doc["audit"]["audit_records"] > 0, doc["audit"]
    assert doc["audit"]["audit_records"] == doc["audit"]["with_request_id"], doc["audit"]
    assert not doc["nginx_errors"], doc["nginx_errors"]
    assert "throughput / simulator" in proc.stdout and "WARNING" not in proc.stdout, proc.stdout
