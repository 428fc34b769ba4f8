"""gateway.metrics.series: each observe_* call shows up as the expected samples in render()."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.engine.compute import Measured, Usage
from gateway.engine.errors import BudgetExceeded
from gateway.metrics.series import DECISIONS, K_BUCKETS, Metrics
from gateway.policy.config import Config, ModelConfig, TierConfig, UpstreamConfig

Labels = dict[str, str]


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """render() parsed back: (sample name, labels) → value."""
    body, ctype = m.render()
    assert ctype.startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return samples(m).get((name, frozenset(labels.items())))


def measured(samples_: int = 4, prompt: int = 100, reasoning: int = 2000, output: int = 400,
             k: float = 8.0, flops: float = 1e12, overrun: bool = False,
             source: str = "upstream") -> Measured:
    usage = Usage(samples=samples_, prompt_tokens=prompt, reasoning_tokens=reasoning, output_tokens=output,
                  source=source)  # type: ignore[arg-type]
    return Measured(usage=usage, k=k, flops=flops, overrun=overrun)


def config(version: str = "a" * 64) -> Config:
    return Config(
        upstreams={"sim": UpstreamConfig(base_url="simulator")},
        models={"m1": ModelConfig(upstream="sim", active_params=1e9, evaluated_max_k=4)},
        tiers={"free": TierConfig(), "pro": TierConfig()},
        version=version,
    )


def test_allowed_request_records_tokens_flops_k_and_samples() -> None:
    m = Metrics(process_metrics=False)
    m.observe_request("m1", "free", "openai.chat", "allowed", measured(), overhead_s=0.003,
                      evaluated_max_k=4.0)
    mt = {"model": "m1", "tier": "free"}
    assert value(m, "kgate_requests_total", api="openai.chat", decision="allowed", **mt) == 1
    assert value(m, "kgate_tokens_total", kind="prompt", **mt) == 100
    assert value(m, "kgate_tokens_total", kind="reasoning", **mt) == 2000
    assert value(m, "kgate_tokens_total", kind="output", **mt) == 400
    assert value(m, "kgate_flops_total", **mt) == 1e12
    assert value(m, "kgate_request_k_count", **mt) == 1
    assert value(m, "kgate_request_k_sum", **mt) == 8.0
    assert value(m, "kgate_request_k_bucket", le="4.0", **mt) == 0
    assert value(m, "kgate_request_k_bucket", le="8.0", **mt) == 1
    assert value(m, "kgate_request_samples_sum", **mt) == 4
    assert value(m, "kgate_request_samples_bucket", le="2.0", **mt) == 0
    assert value(m, "kgate_request_samples_bucket", le="4.0", **mt) == 1
    assert value(m, "kgate_k_above_evaluated_total", **mt) == 1
    assert value(m, "kgate_overruns_total", **mt) == 0
    assert value(m, "kgate_usage_source_total", source="upstream") == 1
    assert value(m, "kgate_gateway_overhead_seconds_count", api="openai.chat") == 1
    assert value(m, "kgate_gateway_overhead_seconds_sum", api="openai.chat") == pytest.approx(0.003)


def test_k_buckets_are_the_documented_powers_of_two() -> None:
    assert K_BUCKETS == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    m = Metrics(process_metrics=False)
    m.observe_request("m1", "free", "openai.chat", "allowed", measured(k=0.5))
    les = {dict(lbl)["le"] for (name, lbl) in samples(m) if name == "kgate_request_k_bucket"}
    assert les == {"1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0", "+Inf"}


def test_k_at_or_below_evaluated_is_not_counted_and_overruns_and_sources_are() -> None:
    m = Metrics(process_metrics=False)
    m.observe_request("m1", "free", "openai.chat", "allowed", measured(k=4.0), evaluated_max_k=4.0)
    m.observe_request("m1", "free", "openai.chat", "allowed", measured(k=9.0))  # model has no evaluated K
    m.observe_request("m1", "free", "anthropic.messages", "partial",
                      measured(k=2.0, overrun=True, source="counted"), evaluated_max_k=4.0)
    assert value(m, "kgate_k_above_evaluated_total", model="m1", tier="free") == 0
    assert value(m, "kgate_overruns_total", model="m1", tier="free") == 1
    assert value(m, "kgate_usage_source_total", source="upstream") == 2
    assert value(m, "kgate_usage_source_total", source="counted") == 1
    assert value(m, "kgate_requests_total", model="m1", tier="free", api="openai.chat",
                 decision="allowed") == 2
    assert value(m, "kgate_request_k_count", model="m1", tier="free") == 3


def test_denied_request_counts_rules_and_no_usage() -> None:
    m = Metrics(process_metrics=False)
    m.observe_request("m1", "free", "openai.chat", "denied", None, overhead_s=0.001,
                      denied_rules=("max_k", "principal:flops:1d"))
    m.observe_request("m1", "free", "openai.chat", "would_deny", measured(), denied_rules=("max_k",))
    m.observe_denial("pro", "model")
    assert value(m, "kgate_requests_total", model="m1", tier="free", api="openai.chat",
                 decision="denied") == 1
    assert value(m, "kgate_denials_total", tier="free", rule="max_k") == 2
    assert value(m, "kgate_denials_total", tier="free", rule="principal:flops:1d") == 1
    assert value(m, "kgate_denials_total", tier="pro", rule="model") == 1
    # only the shadow-mode request, which was served, spent tokens
    assert value(m, "kgate_request_k_count", model="m1", tier="free") == 1


def test_every_decision_is_accepted_and_an_unknown_one_is_refused() -> None:
    m = Metrics(process_metrics=False)
    for d in sorted(DECISIONS):
        m.observe_request("m1", "free", "openai.chat", d)
    got = {dict(lbl)["decision"] for (name, lbl) in samples(m) if name == "kgate_requests_total"}
    assert got == DECISIONS
    with pytest.raises(ValueError, match="decision"):
        m.observe_request("m1", "free", "openai.chat", "okay")


def test_policy_guard_folds_unknown_models_and_tiers_and_info_follows_reloads() -> None:
    m = Metrics(process_metrics=False)
    m.set_policy(config("a" * 64))
    m.observe_request("client-made-up-model", "free", "openai.chat", "denied", denied_rules=("model",))
    m.observe_request("m1", "no-such-tier", "openai.chat", "denied")
    m.observe_denial("no-such-tier", "model")
    assert value(m, "kgate_requests_total", model="unknown", tier="free", api="openai.chat",
                 decision="denied") == 1
    assert value(m, "kgate_requests_total", model="m1", tier="unknown", api="openai.chat",
                 decision="denied") == 1
    assert value(m, "kgate_denials_total", tier="unknown", rule="model") == 1
    assert not any("client-made-up-model" in str(k) for k in samples(m))
    assert value(m, "kgate_policy_info", sha256="a" * 64) == 1

    m.observe_policy_reload(True, config("b" * 64))
    m.observe_policy_reload(False)
    assert value(m, "kgate_policy_info", sha256="b" * 64) == 1
    assert value(m, "kgate_policy_info", sha256="a" * 64) is None  # the old policy's series is gone
    assert value(m, "kgate_policy_reloads_total", result="success") == 1
    assert value(m, "kgate_policy_reloads_total", result="failure") == 1


def test_upstream_latency_first_byte_and_errors() -> None:
    m = Metrics(process_metrics=False)
    m.observe_upstream("openai", 1.5, first_byte_s=0.2)
    m.observe_upstream("openai", 0.01, error_kind="connect")
    m.observe_upstream_error("openai", "status_5xx")
    assert value(m, "kgate_upstream_latency_seconds_count", upstream="openai") == 2
    assert value(m, "kgate_upstream_latency_seconds_sum", upstream="openai") == pytest.approx(1.51)
    assert value(m, "kgate_upstream_latency_seconds_bucket", upstream="openai", le="1.0") == 1
    assert value(m, "kgate_upstream_first_byte_seconds_count", upstream="openai") == 1
    assert value(m, "kgate_upstream_errors_total", upstream="openai", kind="connect") == 1
    assert value(m, "kgate_upstream_errors_total", upstream="openai", kind="status_5xx") == 1


async def test_store_timer_counts_errors_but_not_cancellation() -> None:
    m = Metrics(process_metrics=False)
    with m.time_store("reserve"):
        await asyncio.sleep(0)
    with pytest.raises(ConnectionError), m.time_store("reserve"):
        raise ConnectionError("redis gone")
    task = asyncio.create_task(_timed_sleep(m))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    m.observe_store("settle", 0.004, error=True)
    assert value(m, "kgate_store_latency_seconds_count", op="reserve") == 3
    assert value(m, "kgate_store_errors_total", op="reserve") == 1
    assert value(m, "kgate_store_errors_total", op="settle") == 1
    assert value(m, "kgate_store_latency_seconds_bucket", op="settle", le="0.005") == 1


async def _timed_sleep(m: Metrics) -> None:
    with m.time_store("reserve"):
        await asyncio.sleep(10)


def test_gauges_audit_errors_ready_and_build_info() -> None:
    m = Metrics(process_metrics=False)
    m.holds_placed(3)
    m.holds_resolved()
    assert value(m, "kgate_holds_outstanding") == 2
    m.set_holds_outstanding(7)
    assert value(m, "kgate_holds_outstanding") == 7
    m.set_spool_depth(12, 3456)
    assert value(m, "kgate_spool_depth_records") == 12
    assert value(m, "kgate_spool_depth_bytes") == 3456
    m.observe_audit_write()
    m.observe_audit_write(ok=False)
    m.audit_write_error()
    assert value(m, "kgate_audit_records_total") == 1
    assert value(m, "kgate_audit_write_errors_total") == 2
    m.observe_error(BudgetExceeded("over budget"))
    m.observe_error("upstream_timeout")
    assert value(m, "kgate_errors_total", kind="budget_exceeded") == 1
    assert value(m, "kgate_errors_total", kind="upstream_timeout") == 1
    assert value(m, "kgate_ready") == 0
    m.set_ready(True)
    assert value(m, "kgate_ready") == 1
    assert value(m, "kgate_build_info", version=__version__) == 1


def test_registries_are_private_and_every_spec_is_exported() -> None:
    a, b = Metrics(), Metrics()
    a.observe_error("bad_request")
    assert value(b, "kgate_errors_total", kind="bad_request") is None
    assert not any(f.name.startswith("kgate_") for f in REGISTRY.collect())
    body = a.render()[0].decode()
    for name, spec in a.specs.items():
        assert name.startswith("kgate_")
        assert f"# TYPE {name} {spec.type}" in body
        assert "principal" not in spec.labels and "org" not in spec.labels
    assert "process_cpu_seconds_total" in body  # process metrics are on by default


def test_openmetrics_when_asked() -> None:
    m = Metrics(process_metrics=False)
    m.observe_error("bad_request")
    body, ctype = m.render("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    assert b'kgate_errors_total{kind="bad_request"} 1.0' in body


def test_handler_style_keywords_would_deny_rule_and_clamps() -> None:
    m = Metrics(process_metrics=False)
    # shadow mode served a request the policy would refuse: counted once, as would_deny
    m.observe_request(model="m1", tier="free", api="openai.chat", decision="allowed", usage=measured(),
                      would_deny=True, rule="max_k")
    m.observe_request(model="m1", tier="free", api="openai.chat", decision="clamped", usage=measured(),
                      rule="max_k,max_samples")
    m.observe_request(model="m1", tier="free", api="openai.chat", decision="denied",
                      rule="principal:k_units:1d")
    m.observe_request(model="m1", tier="free", api="openai.chat", decision="denied")  # e.g. 401: no rule
    m.observe_request(model="m1", tier="free", api="openai.chat", decision="failed", rule="max_k")
    # a shadow-mode request that then failed upstream stays a failure, and still counts its rule
    m.observe_request(model="m1", tier="free", api="openai.chat", decision="failed", would_deny=True,
                      rule="max_samples")
    base = {"model": "m1", "tier": "free", "api": "openai.chat"}
    assert value(m, "kgate_requests_total", decision="would_deny", **base) == 1
    assert value(m, "kgate_requests_total", decision="allowed", **base) is None
    assert value(m, "kgate_requests_total", decision="clamped", **base) == 1
    assert value(m, "kgate_denials_total", tier="free", rule="max_k") == 1  # the would_deny; not the failure
    assert value(m, "kgate_denials_total", tier="free", rule="max_samples") == 1
    assert value(m, "kgate_requests_total", decision="failed", **base) == 2
    assert value(m, "kgate_denials_total", tier="free", rule="principal:k_units:1d") == 1
    assert value(m, "kgate_denials_total", tier="free", rule="other") == 1
    assert value(m, "kgate_clamps_total", tier="free", rule="max_k") == 1
    assert value(m, "kgate_clamps_total", tier="free", rule="max_samples") == 1


def test_rule_series_fuse() -> None:
    from gateway.metrics.series import MAX_RULE_SERIES

    m = Metrics(process_metrics=False)
    for i in range(MAX_RULE_SERIES + 50):
        m.observe_denial("free", f"rule-{i}")
    rules = {dict(lbl)["rule"] for (name, lbl) in samples(m) if name == "kgate_denials_total"}
    assert len(rules) == MAX_RULE_SERIES + 1
    assert value(m, "kgate_denials_total", tier="free", rule="other") == 50


def test_short_forms_used_by_the_handler() -> None:
    m = Metrics(process_metrics=False)
    m.store_latency("reserve", 0.002)
    m.store_error("reserve")
    m.store_error("settle", 0.3)
    m.upstream_latency("vllm", 2.0)
    m.upstream_error("vllm", "http_503")
    m.error("bad_request")
    assert value(m, "kgate_store_latency_seconds_count", op="reserve") == 1
    assert value(m, "kgate_store_errors_total", op="reserve") == 1
    assert value(m, "kgate_store_latency_seconds_count", op="settle") == 1
    assert value(m, "kgate_store_errors_total", op="settle") == 1
    assert value(m, "kgate_upstream_latency_seconds_count", upstream="vllm") == 1
    assert value(m, "kgate_upstream_errors_total", upstream="vllm", kind="http_503") == 1
    assert value(m, "kgate_errors_total", kind="bad_request") == 1


def test_scrape_hooks_refresh_gauges_and_audit_totals(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics(process_metrics=False)
    state = {"holds": 4, "records": 10, "errors": 0}

    def refresh(mm: Metrics) -> None:
        mm.set_holds_outstanding(state["holds"])
        mm.set_audit_totals(state["records"], state["errors"])

    def broken(mm: Metrics) -> None:
        raise RuntimeError("spool gone")

    m.on_scrape(broken)
    m.on_scrape(refresh)
    assert value(m, "kgate_holds_outstanding") == 4
    assert value(m, "kgate_audit_records_total") == 10
    state.update(holds=1, records=25, errors=2)
    assert value(m, "kgate_holds_outstanding") == 1
    assert value(m, "kgate_audit_records_total") == 25
    assert value(m, "kgate_audit_write_errors_total") == 2
    state.update(records=3, errors=0)  # a new writer counts from zero: the counter still only grows
    assert value(m, "kgate_audit_records_total") == 28
    assert value(m, "kgate_audit_write_errors_total") == 2
    assert "scrape hook" in caplog.text


# ------------------------------------------------------------------------- through the running gateway
def _total(fams: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """Sum of ``name`` over every series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in fams.items() if n == name and want <= lbl)


async def test_running_gateway_exports_what_it_did(tmp_path: Path) -> None:
    """Real Redis, real app and simulator: each kind of request shows up on GET /metrics."""
    import aiohttp
    from gatewayutil import KEYS, admin_listener, make_config, running_gateway

    from gateway.ledger.redis_server import RedisServer

    server = RedisServer(port=0, appendonly=False)
    server.start_sync()
    try:
        config = make_config(tmp_path, server.url)
        async with running_gateway(config) as g, aiohttp.ClientSession() as s:
            async def chat(who: str, **body: object) -> int:
                payload = {"messages": [{"role": "user", "content": "hi"}], **body}
                async with s.post(g.url + "/v1/chat/completions", json=payload,
                                  headers={"Authorization": f"Bearer {KEYS[who]}"}) as r:
                    await r.read()
                    return r.status

            assert await chat("alice", model="dense", n=2, max_tokens=20) == 200
            assert await chat("alice", model="dense", n=6, max_tokens=10) == 403  # max_samples 4
            assert await chat("carol", model="reasoner", n=4, reasoning_effort="high",
                              max_completion_tokens=8000) == 200                # clamped
            assert await chat("alice", model="client-invented-model", max_tokens=5) >= 400
            async with admin_listener(g) as admin, s.get(admin + "/metrics") as r:  # not on the client port
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
    finally:
        server.stop_sync()
        server.cleanup()

    fams = {(smp.name, frozenset(smp.labels.items())): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}
    assert _total(fams, "kgate_requests_total", model="dense", tier="basic", decision="allowed") == 1
    assert _total(fams, "kgate_requests_total", tier="basic", decision="denied") == 1
    assert _total(fams, "kgate_requests_total", model="unknown", decision="denied") == 1
    assert _total(fams, "kgate_denials_total", tier="basic", rule="max_samples") == 1
    assert _total(fams, "kgate_requests_total", model="reasoner", tier="clamp", decision="clamped") == 1
    assert _total(fams, "kgate_clamps_total", tier="clamp") >= 1
    assert _total(fams, "kgate_tokens_total", model="dense", tier="basic", kind="output") > 0
    assert _total(fams, "kgate_request_k_count", model="dense", tier="basic") == 1
    assert _total(fams, "kgate_flops_total", model="dense") > 0
    assert _total(fams, "kgate_gateway_overhead_seconds_count") >= 3
    assert _total(fams, "kgate_store_latency_seconds_count") >= 1
    assert _total(fams, "kgate_policy_info", sha256=config.version) == 1
    assert _total(fams, "kgate_build_info", version=__version__) == 1
    assert "client-invented-model" not in text


def test_loop_families_count_like_prometheus_client() -> None:
    """The lock-free families: a value on a bound lands in that bucket (le), buckets are cumulative in the
    exposition, counters refuse to go down and keep a _created series, label counts are checked."""
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Histogram,
        disable_created_metrics,
        enable_created_metrics,
        generate_latest,
    )

    from gateway.metrics.loop import LoopCounter, LoopHistogram

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = LoopHistogram("lat_seconds", "latency", ("op",), ours, buckets=(0.1, 1.0))
    ph = Histogram("lat_seconds", "latency", ("op",), registry=theirs, buckets=(0.1, 1.0))
    c = LoopCounter("hits", "hits", ("kind",), ours)
    pc = Counter("hits", "hits", ("kind",), registry=theirs)
    for v in (0.0, 0.1, 0.10001, 1.0, 5.0, 1e9):
        h.labels("get").observe(v)
        ph.labels("get").observe(v)
    c.labels("a").inc()
    c.labels("a").inc(2.5)
    pc.labels("a").inc()
    pc.labels("a").inc(2.5)

    def lines(reg: CollectorRegistry) -> list[str]:
        # _created holds a timestamp: compare its series, not its value
        return sorted(line.rsplit(" ", 1)[0] if "_created" in line else line
                      for line in generate_latest(reg).decode().splitlines() if not line.startswith("#"))

    assert lines(ours) == lines(theirs)
    assert 'lat_seconds_bucket{le="0.1",op="get"} 2.0' in lines(ours)
    assert 'hits_created{kind="a"}' in lines(ours) and 'lat_seconds_created{op="get"}' in lines(ours)
    disable_created_metrics()  # what PROMETHEUS_DISABLE_CREATED_SERIES does, for ours as for theirs
    try:
        assert lines(ours) == lines(theirs) and not [line for line in lines(ours) if "_created" in line]
    finally:
        enable_created_metrics()
    with pytest.raises(ValueError):
        c.labels("a").inc(-1)
    with pytest.raises(ValueError):
        c.labels("a", "b")
    with pytest.raises(ValueError):  # the registry refuses a second family of the same name
        LoopCounter("hits", "again", (), ours)
