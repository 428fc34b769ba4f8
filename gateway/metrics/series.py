"""Prometheus metrics (docs/design.md §7.2): every series kgate exports, and one cheap method per event.

A :class:`Metrics` owns its own :class:`CollectorRegistry` (never the process-global one) so that tests
can build many apps in one process. Names follow Prometheus conventions: prefix ``kgate_``, base units
in the name, ``_total`` on counters.

Cardinality: no label ever carries a principal, an org or anything a client chose. ``model`` and
``tier`` come from the policy (the handler passes a configured name or ``"unknown"``; once
:meth:`Metrics.set_policy` has run, any other name is folded into ``"unknown"`` here too), ``upstream``
and ``rule`` from the policy, ``api``, ``op`` and error ``kind`` from the code.

Counters and histograms are :mod:`gateway.metrics.loop` families (no lock per increment: every update runs
on the event loop); gauges are prometheus_client's. Labelled children are cached in dicts keyed by their
label tuple. The hot path (:meth:`Metrics.observe_request`) finds everything a finished request touches
in one object per label set (:class:`_RequestSeries`), with one dict lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.openmetrics import exposition as openmetrics

from gateway import __version__
from gateway.metrics.loop import CounterChild, HistogramChild, LoopCounter, LoopHistogram

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from gateway.engine.compute import Measured
    from gateway.engine.errors import GatewayError
    from gateway.policy.config import Config

Decision = Literal["allowed", "denied", "clamped", "failed", "partial", "spooled", "would_deny"]
DECISIONS: frozenset[str] = frozenset(
    ("allowed", "denied", "clamped", "failed", "partial", "spooled", "would_deny")
)
TOKEN_KINDS: tuple[str, ...] = ("prompt", "reasoning", "output")
_SERVED = frozenset(("allowed", "clamped", "partial", "spooled"))
UNKNOWN = "unknown"
OTHER = "other"  # a denial or clamp without a named rule, or past the series fuse
MAX_RULE_SERIES = 500

# K is a compute multiple: 1 is one reference-length answer; powers of two up to the largest
# best-of / long-reasoning modes worth distinguishing.
K_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
SAMPLES_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
# Model calls take from tens of milliseconds (an error) to many minutes (long reasoning, streamed).
UPSTREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# The gateway's own work should stay in the low milliseconds; the tail shows store or CPU trouble.
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
STORE_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class MetricSpec:
    """What one exported family looks like: its exposed name, type and label names."""

    name: str  # as exposed: counters end in _total; histograms add _bucket/_sum/_count
    type: Literal["counter", "gauge", "histogram"]
    labels: tuple[str, ...]
    help: str


@dataclass(frozen=True)
class _ModelTier:
    """The children that one measured request touches, cached per (model, tier)."""

    prompt: CounterChild
    reasoning: CounterChild
    output: CounterChild
    flops: CounterChild
    k: HistogramChild
    samples: HistogramChild
    k_above_evaluated: CounterChild
    overruns: CounterChild


@dataclass(frozen=True, slots=True)
class _RequestSeries:
    """Everything :meth:`Metrics.observe_request` touches for one set of its arguments' labels (model, tier,
    api, decision, would_deny, as passed): found with one dict lookup per request instead of one per
    family, with the labels folded (unknown model or tier, shadow-mode ``would_deny``) once. ``rules`` is
    where the decision's rules count: :meth:`Metrics._denial`, :meth:`Metrics._clamp`, or nowhere."""

    requests: CounterChild  # kgate_requests_total{model, tier, api, decision}
    usage: _ModelTier  # the (model, tier) series of what a served request spent
    overhead: HistogramChild  # kgate_gateway_overhead_seconds{api}
    tier: str  # as exported
    rules: Callable[[str, str], CounterChild] | None


class _StoreTimer:
    """``with metrics.time_store("reserve"): await ...``: latency always, an error when it raises."""

    __slots__ = ("_metrics", "_op", "_start")

    def __init__(self, metrics: Metrics, op: str):
        self._metrics = metrics
        self._op = op
        self._start = 0.0

    def __enter__(self) -> _StoreTimer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # A cancelled call (client gone, shutdown) is not a store error.
        failed = exc_type is not None and not issubclass(exc_type, asyncio.CancelledError)
        self._metrics.observe_store(self._op, time.perf_counter() - self._start, error=failed)


def _rules(denied_rules: Iterable[str], rule: str | None) -> list[str]:
    """The rules behind a denial or a clamp: the named ones, and ``rule`` split at commas; else ``other``."""
    return [*denied_rules, *(r for r in (rule or "").split(",") if r)] or [OTHER]


class Metrics:
    """Every metric kgate exports, in a registry of its own, with one method per event."""

    def __init__(self, version: str = __version__, *, process_metrics: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        self.specs: dict[str, MetricSpec] = {}
        self._models: frozenset[str] | None = None
        self._tiers: frozenset[str] | None = None
        self._policy_sha: str | None = None
        self._hooks: list[Callable[[Metrics], None]] = []
        self._audit_seen = (0, 0)

        r = self.registry
        self._requests = self._counter(
            "kgate_requests_total", "Requests by model, tier, API and decision.",
            ("model", "tier", "api", "decision"))
        self._tokens = self._counter(
            "kgate_tokens_total", "Tokens by kind: prompt (once per request unless the model does not "
            "share prefill), reasoning and visible output (all samples).", ("model", "tier", "kind"))
        self._flops = self._counter(
            "kgate_flops_total", "Forward-pass FLOPs of served requests (compute model, docs/design.md §1).",
            ("model", "tier"))
        self._k = self._histogram(
            "kgate_request_k", "Compute multiple K per served request: G / max(V/S, V_ref).",
            ("model", "tier"), K_BUCKETS)
        self._samples = self._histogram(
            "kgate_request_samples", "Samples generated per served request.", ("model", "tier"),
            SAMPLES_BUCKETS)
        self._k_above = self._counter(
            "kgate_k_above_evaluated_total",
            "Served requests whose measured K exceeded the model's evaluated_max_k.", ("model", "tier"))
        self._overruns = self._counter(
            "kgate_overruns_total", "Requests whose provider overran the admission bound it was given.",
            ("model", "tier"))
        self._usage_source = self._counter(
            "kgate_usage_source_total", "Measured requests by where the usage came from: upstream "
            "(reported), counted (streamed tokens counted by kgate) or estimated.", ("source",))
        self._denials = self._counter(
            "kgate_denials_total", "Denials (and shadow-mode would-be denials) by tier and the rule that "
            "refused: a per-request cap, model, or a budget label from the policy.", ("tier", "rule"))
        self._clamps = self._counter(
            "kgate_clamps_total", "Requests clamped (rewritten down to fit) by tier and the cap that "
            "applied.", ("tier", "rule"))
        self._overhead = self._histogram(
            "kgate_gateway_overhead_seconds", "Time spent in the gateway per request, upstream excluded.",
            ("api",), OVERHEAD_BUCKETS)
        self._upstream_latency = self._histogram(
            "kgate_upstream_latency_seconds", "Upstream exchange duration, request sent to last byte "
            "(failed exchanges included: _count is the number of upstream calls).", ("upstream",),
            UPSTREAM_BUCKETS)
        self._upstream_first_byte = self._histogram(
            "kgate_upstream_first_byte_seconds", "Time from sending the upstream request to the first "
            "response byte (time to first token for streams).", ("upstream",), UPSTREAM_BUCKETS)
        self._upstream_errors = self._counter(
            "kgate_upstream_errors_total", "Failed upstream exchanges by kind (http_<status>, connect, "
            "timeout, disconnect, malformed, ...).", ("upstream", "kind"))
        self._store_latency = self._histogram(
            "kgate_store_latency_seconds", "Redis ledger/store operation latency by operation, failed "
            "operations included.", ("op",),
            STORE_BUCKETS)
        self._store_errors = self._counter(
            "kgate_store_errors_total", "Failed Redis ledger/store operations by operation.", ("op",))
        self._holds = self._gauge(
            "kgate_holds_outstanding", "Budget holds this replica has reserved and not yet settled or "
            "released.", ())
        self._spool_records = self._gauge(
            "kgate_spool_depth_records", "Usage records spooled locally while Redis was unreachable, not "
            "yet replayed.", ())
        self._spool_bytes = self._gauge(
            "kgate_spool_depth_bytes", "Size of the local usage spool not yet replayed, in bytes.", ())
        self._audit_records = self._counter(
            "kgate_audit_records_total", "Audit records written.", ())
        self._audit_errors = self._counter(
            "kgate_audit_write_errors_total", "Audit records that could not be written.", ())
        self._errors = self._counter(
            "kgate_errors_total", "Errors answered to clients, by kind (the error vocabulary).", ("kind",))
        self._reloads = self._counter(
            "kgate_policy_reloads_total", "Policy reloads by result (success, failure).", ("result",))
        self._policy_info = self._gauge(
            "kgate_policy_info", "The policy in force: 1 for its sha256.", ("sha256",))
        self._ready = self._gauge(
            "kgate_ready", "1 when this replica is ready (Redis reachable, policy loaded), as /readyz.", ())
        self._build_info = self._gauge("kgate_build_info", "kgate build: 1 for its version.", ("version",))
        self._build_info.labels(version).set(1)
        if process_metrics:
            ProcessCollector(registry=r)

        # label tuple → child; filled on first use
        self._series: dict[tuple[str, str, str, str, bool], _RequestSeries] = {}  # by observe_request's arguments
        self._model_tier_children: dict[tuple[str, str], _ModelTier] = {}
        self._source_children: dict[str, CounterChild] = {}
        self._denial_children: dict[tuple[str, str], CounterChild] = {}
        self._clamp_children: dict[tuple[str, str], CounterChild] = {}
        self._overhead_children: dict[str, HistogramChild] = {}
        self._upstream_children: dict[str, tuple[HistogramChild, HistogramChild]] = {}
        self._upstream_error_children: dict[tuple[str, str], CounterChild] = {}
        self._store_children: dict[str, tuple[HistogramChild, CounterChild]] = {}
        self._error_children: dict[str, CounterChild] = {}

    # ------------------------------------------------------------------------------------ definitions
    def _counter(self, name: str, doc: str, labels: tuple[str, ...]) -> LoopCounter:
        self.specs[name] = MetricSpec(name, "counter", labels, doc)
        # the exposition appends _total itself
        return LoopCounter(name.removesuffix("_total"), doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
        self.specs[name] = MetricSpec(name, "gauge", labels, doc)
        return Gauge(name, doc, labels, registry=self.registry)

    def _histogram(self, name: str, doc: str, labels: tuple[str, ...],
                   buckets: tuple[float, ...]) -> LoopHistogram:
        self.specs[name] = MetricSpec(name, "histogram", labels, doc)
        return LoopHistogram(name, doc, labels, registry=self.registry, buckets=buckets)

    # -------------------------------------------------------------------------------------- label guard
    def set_policy(self, config: Config) -> None:
        """Record the policy in force: ``kgate_policy_info{sha256}`` and the label guard.

        After this, model and tier names not in the policy are exported as ``"unknown"``, so a client
        can never mint label values. Call it on startup and after every successful reload.
        """
        self._models = frozenset(config.models)
        self._tiers = frozenset(config.tiers)
        self._series.clear()  # their labels were folded under the old names
        sha = config.version or UNKNOWN
        if self._policy_sha is not None and self._policy_sha != sha:
            self._policy_info.remove(self._policy_sha)
        self._policy_info.labels(sha).set(1)
        self._policy_sha = sha

    def _model(self, model: str) -> str:
        known = self._models
        return model if known is None or model in known else UNKNOWN

    def _tier(self, tier: str) -> str:
        known = self._tiers
        return tier if known is None or tier in known else UNKNOWN

    # ---------------------------------------------------------------------------------------- requests
    def observe_request(self, model: str, tier: str, api: str, decision: Decision | str,
                        usage: Measured | None = None, overhead_s: float | None = None,
                        evaluated_max_k: float | None = None, denied_rules: Iterable[str] = (), *,
                        would_deny: bool = False, rule: str | None = None) -> None:
        """One finished request: its decision, what it spent (``usage``), and the gateway's overhead.

        ``usage`` is the measured compute of a served (or partly served) request, None when nothing was
        generated. ``evaluated_max_k`` is the model's, to count K above it.

        The rules behind the decision come as ``denied_rules`` or ``rule`` (one name, or several joined
        by commas): for ``denied`` (and a shadow-mode ``would_deny``) they count in
        ``kgate_denials_total``, for ``clamped`` in ``kgate_clamps_total``. ``would_deny=True`` marks a
        request that shadow mode served although the policy would have refused it: a served one
        (allowed, clamped, partial, spooled) is counted under the decision ``would_deny``.
        """
        series = self._series.get((model, tier, api, decision, would_deny))
        if series is None:
            series = self._request_series(model, tier, api, decision, would_deny)
        series.requests.value += 1.0  # CounterChild.inc(1.0) without the call (and its sign check)
        if usage is not None:
            self._observe_usage(series.usage, usage, evaluated_max_k)
        if overhead_s is not None:
            series.overhead.observe(overhead_s if overhead_s > 0.0 else 0.0)
        if series.rules is not None:
            for r in _rules(denied_rules, rule):
                series.rules(series.tier, r).inc()

    def _request_series(self, model: str, tier: str, api: str, decision: Decision | str,
                        would_deny: bool) -> _RequestSeries:
        """The series of :meth:`observe_request` for these labels, made and remembered (until the policy
        changes: the folding of model and tier names depends on it)."""
        folded_model, folded_tier = self._model(model), self._tier(tier)
        folded = "would_deny" if would_deny and decision in _SERVED else decision
        if folded not in DECISIONS:
            raise ValueError(f"unknown decision {folded!r}; expected one of {sorted(DECISIONS)}")
        rules: Callable[[str, str], CounterChild] | None = None
        if folded in ("denied", "would_deny") or would_deny:
            rules = self._denial
        elif folded == "clamped":
            rules = self._clamp
        series = _RequestSeries(self._requests.labels(folded_model, folded_tier, api, folded),
                                self._model_tier(folded_model, folded_tier), self._overhead_child(api),
                                folded_tier, rules)
        if len(self._series) >= 4096:  # names not in the policy fold into a few series, but each is a key here
            self._series.clear()
        self._series[(model, tier, api, decision, would_deny)] = series
        return series

    def _model_tier(self, model: str, tier: str) -> _ModelTier:
        mt = self._model_tier_children.get((model, tier))
        if mt is None:
            mt = self._model_tier_children[(model, tier)] = _ModelTier(
                prompt=self._tokens.labels(model, tier, "prompt"),
                reasoning=self._tokens.labels(model, tier, "reasoning"),
                output=self._tokens.labels(model, tier, "output"),
                flops=self._flops.labels(model, tier),
                k=self._k.labels(model, tier),
                samples=self._samples.labels(model, tier),
                k_above_evaluated=self._k_above.labels(model, tier),
                overruns=self._overruns.labels(model, tier),
            )
        return mt

    def _observe_usage(self, mt: _ModelTier, measured: Measured, evaluated_max_k: float | None) -> None:
        # Counters by their value, without CounterChild.inc's call: every amount here is >= 0 already.
        u = measured.usage
        mt.prompt.value += u.prompt_tokens if u.prompt_tokens > 0 else 0
        mt.reasoning.value += u.reasoning_tokens if u.reasoning_tokens > 0 else 0
        mt.output.value += u.output_tokens if u.output_tokens > 0 else 0
        mt.flops.value += measured.flops if measured.flops > 0.0 else 0.0
        mt.k.observe(measured.k)
        mt.samples.observe(u.samples)
        if evaluated_max_k is not None and measured.k > evaluated_max_k:
            mt.k_above_evaluated.value += 1.0
        if measured.overrun:
            mt.overruns.value += 1.0
        src = self._source_children.get(u.source)
        if src is None:
            src = self._source_children[u.source] = self._usage_source.labels(u.source)
        src.value += 1.0

    def _overhead_child(self, api: str) -> HistogramChild:
        child = self._overhead_children.get(api)
        if child is None:
            child = self._overhead_children[api] = self._overhead.labels(api)
        return child

    def _denial(self, tier: str, rule: str) -> CounterChild:
        return self._rule_child(self._denials, self._denial_children, tier, rule)

    def _clamp(self, tier: str, rule: str) -> CounterChild:
        return self._rule_child(self._clamps, self._clamp_children, tier, rule)

    @staticmethod
    def _rule_child(family: LoopCounter, cache: dict[tuple[str, str], CounterChild], tier: str,
                    rule: str) -> CounterChild:
        child = cache.get((tier, rule))
        if child is None:
            # Rules come from the policy and the code, so they are few; the fuse keeps a bug that puts
            # request data into a rule name from growing the series without bound.
            if len(cache) >= MAX_RULE_SERIES:
                rule = OTHER
                child = cache.get((tier, rule))
            if child is None:
                child = cache[(tier, rule)] = family.labels(tier, rule)
        return child

    def observe_denial(self, tier: str, rule: str) -> None:
        """A denial by ``rule``: max_k, max_samples, max_reasoning_tokens, max_flops, efforts,
        evaluated_max_k, model, or a budget's label (policy-defined, so bounded)."""
        self._denial(self._tier(tier), rule).inc()

    def observe_overhead(self, api: str, seconds: float) -> None:
        """Gateway overhead of one request, for callers that time it apart from observe_request."""
        self._overhead_child(api).observe(max(seconds, 0.0))

    # ---------------------------------------------------------------------------------------- upstream
    def observe_upstream(self, upstream: str, latency_s: float, error_kind: str | None = None,
                         first_byte_s: float | None = None) -> None:
        """One upstream exchange: its duration, time to first byte if known, and its failure kind if any."""
        children = self._upstream_children.get(upstream)
        if children is None:
            children = self._upstream_children[upstream] = (
                self._upstream_latency.labels(upstream), self._upstream_first_byte.labels(upstream))
        children[0].observe(latency_s if latency_s > 0.0 else 0.0)
        if first_byte_s is not None:
            children[1].observe(max(first_byte_s, 0.0))
        if error_kind is not None:
            self.observe_upstream_error(upstream, error_kind)

    def observe_upstream_error(self, upstream: str, kind: str) -> None:
        """A failed upstream exchange, for callers that time it with :meth:`upstream_latency`."""
        key = (upstream, kind)
        child = self._upstream_error_children.get(key)
        if child is None:
            child = self._upstream_error_children[key] = self._upstream_errors.labels(*key)
        child.inc()

    def upstream_latency(self, upstream: str, seconds: float) -> None:
        """Short form of :meth:`observe_upstream` for a duration alone."""
        self.observe_upstream(upstream, seconds)

    upstream_error = observe_upstream_error

    # ------------------------------------------------------------------------------------------- store
    def observe_store(self, op: str, latency_s: float, error: bool = False) -> None:
        """One store operation (reserve, settle, release, lookup, replay, ping, ...)."""
        children = self._store_children.get(op) or self._store_child(op)
        children[0].observe(latency_s if latency_s > 0.0 else 0.0)
        if error:
            children[1].inc()

    def _store_child(self, op: str) -> tuple[HistogramChild, CounterChild]:
        children = self._store_children.get(op)
        if children is None:
            children = self._store_children[op] = (self._store_latency.labels(op),
                                                   self._store_errors.labels(op))
        return children

    def store_latency(self, op: str, seconds: float) -> None:
        """Short form of :meth:`observe_store` for an operation that succeeded (spelled out: a reserve and a
        settle of every request not admitted from a slice come here)."""
        children = self._store_children.get(op) or self._store_child(op)
        children[0].observe(seconds if seconds > 0.0 else 0.0)

    def store_error(self, op: str, seconds: float | None = None) -> None:
        """A failed store operation, with its latency when known (prefer :meth:`time_store`, which
        records both: the latency histogram's count is the denominator of the error-ratio alerts)."""
        if seconds is not None:
            self.observe_store(op, seconds, error=True)
            return
        self._store_child(op)[1].inc()

    def time_store(self, op: str) -> _StoreTimer:
        """A context manager timing one store operation; an exception (not a cancellation) counts as an
        error and propagates."""
        return _StoreTimer(self, op)

    def set_holds_outstanding(self, n: int) -> None:
        self._holds.set(n)

    def holds_placed(self, n: int = 1) -> None:
        self._holds.inc(n)

    def holds_resolved(self, n: int = 1) -> None:
        """Holds settled, released or found expired."""
        self._holds.dec(n)

    def set_spool_depth(self, records: int, size_bytes: int) -> None:
        self._spool_records.set(records)
        self._spool_bytes.set(size_bytes)

    # ------------------------------------------------------------------------------- audit, errors, ...
    def observe_audit_write(self, ok: bool = True) -> None:
        if ok:
            self._audit_records.inc()
        else:
            self._audit_errors.inc()

    def audit_write_error(self) -> None:
        self._audit_errors.inc()

    def set_audit_totals(self, records_written: int, write_errors: int) -> None:
        """Bring the audit counters up to a writer's own running totals (call it from a scrape hook).

        Counters only move forward: the difference since the last call is added; totals below the last
        seen (a new writer) count from zero again.
        """
        last_records, last_errors = self._audit_seen
        self._audit_records.inc(records_written - last_records if records_written >= last_records
                                else records_written)
        self._audit_errors.inc(write_errors - last_errors if write_errors >= last_errors else write_errors)
        self._audit_seen = (records_written, write_errors)

    def observe_error(self, error: GatewayError | str) -> None:
        """An error answered to a client, by its vocabulary kind (``GatewayError.kind``)."""
        kind = error if isinstance(error, str) else error.kind
        child = self._error_children.get(kind)
        if child is None:
            child = self._error_children[kind] = self._errors.labels(kind)
        child.inc()

    error = observe_error

    def observe_policy_reload(self, ok: bool, config: Config | None = None) -> None:
        """A reload attempt; on success with its ``config``, also records the new policy in force."""
        self._reloads.labels("success" if ok else "failure").inc()
        if ok and config is not None:
            self.set_policy(config)

    def set_ready(self, ready: bool) -> None:
        self._ready.set(1 if ready else 0)

    # ------------------------------------------------------------------------------------------ output
    def on_scrape(self, hook: Callable[[Metrics], None]) -> None:
        """Run ``hook(self)`` before each :meth:`render`: where gauges are read from their owners
        (holds from the ledger, spool depth from the spool, audit totals from the writer) rather than
        pushed on every change. A failing hook is logged and skipped; /metrics still answers."""
        self._hooks.append(hook)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition for ``GET /metrics``: (body, content type).

        The Prometheus text format, or OpenMetrics when the scraper's ``Accept`` header asks for it.
        """
        for hook in self._hooks:
            try:
                hook(self)
            except Exception:  # a broken hook must not take /metrics down
                log.exception("metrics scrape hook %r failed", hook)
        if accept and "application/openmetrics-text" in accept:
            return openmetrics.generate_latest(self.registry), openmetrics.CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
