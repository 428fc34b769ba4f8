"""Every metric the Grafana dashboard and the alert rules query exists, and the ones a request path feeds
are actually fed by requests (issue 14 item 3: ``kgate_upstream_first_byte_seconds`` was declared and
charted, but nothing ever observed it, so its panels stayed empty)."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
from gatewayutil import KEYS, make_config, running_gateway, scrape

ROOT = Path(__file__).resolve().parents[2]
QUERIED_FROM = [ROOT / "deploy" / "grafana" / "kgate-dashboard.json", ROOT / "deploy" / "prometheus" / "alerts.yml"]

# Fed only by failures (a store outage, an audit disk error, an overrun, a reload, an upstream error) or by
# state (gauges): these must exist; the test does not provoke each failure (other suites do).
FAILURE_OR_STATE = {"kgate_audit_write_errors", "kgate_store_errors", "kgate_spool_depth_bytes",
                    "kgate_spool_depth_records", "kgate_overruns", "kgate_k_above_evaluated",
                    "kgate_policy_reloads", "kgate_upstream_errors", "kgate_holds_outstanding", "kgate_ready",
                    "kgate_build_info", "kgate_policy_info"}


def queried_metrics() -> set[str]:
    names: set[str] = set()
    for f in QUERIED_FROM:
        for name in re.findall(r"kgate_[a-z0-9_]+", f.read_text()):
            names.add(re.sub(r"_(bucket|count|sum|total|created)$", "", name))
    return names


def samples(text: str, family: str) -> list[float]:
    """The values of every sample of ``family`` (its _count for a histogram, _total for a counter)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = re.split(r"[{ ]", line, maxsplit=1)[0]
        if name in (family, family + "_total", family + "_count"):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


async def test_every_metric_the_dashboard_and_alerts_query_is_observed(tmp_path, redis_url):
    names = queried_metrics()
    assert "kgate_upstream_first_byte_seconds" in names and len(names) > 15
    cfg = make_config(tmp_path, redis_url)
    msg = [{"role": "user", "content": "hi"}]
    async with running_gateway(cfg) as g, aiohttp.ClientSession() as s:
        def auth(who: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {KEYS[who]}"}

        for body, who in [
            ({"model": "dense", "messages": msg, "max_tokens": 16}, "alice"),                 # allowed, JSON
            ({"model": "dense", "messages": msg, "max_tokens": 16, "stream": True}, "alice"),  # allowed, stream
            ({"model": "reasoner", "messages": msg, "n": 4, "max_tokens": 2000}, "carol"),     # clamped
            ({"model": "reasoner", "messages": msg, "n": 64}, "alice"),                        # denied (caps)
            ({"model": "dense", "messages": "not a list"}, "alice"),                           # bad request
        ]:
            async with s.post(g.url + "/v1/chat/completions", json=body, headers=auth(who)) as r:
                await r.read()
        text = await scrape(g)  # as Prometheus reads it: from the admin listener

    missing = sorted(n for n in names if f"# HELP {n}" not in text and f"# HELP {n}_total" not in text)
    assert not missing, f"queried by deploy/ but never exported: {missing}"
    unobserved = sorted(n for n in names - FAILURE_OR_STATE if not any(v > 0 for v in samples(text, n)))
    assert not unobserved, f"queried by deploy/ but no request observed them: {unobserved}"
