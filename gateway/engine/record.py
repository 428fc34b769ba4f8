"""The end of every request: its audit record and its metrics (docs/design.md §4 step 13, §7).

:func:`record` writes the record and waits until the OS has it; a transport calls it (through
:meth:`gateway.engine.Engine.conclude`) before the answer's last byte, so a client that saw an answer can
count on its record surviving a crash. :func:`observe` runs for every request, whatever happened: metrics,
and the record if nothing wrote it yet.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from gateway.engine.errors import GatewayError
from gateway.engine.request import Ending, Facts
from gateway.engine.state import Gateway

log = logging.getLogger("kgate.engine")


def error_ending(gw: Gateway, facts: Facts, err: GatewayError, ending: Ending | None = None) -> Ending:
    """The ending of a request that ends with ``err``: the decision is the error's own, ``partial`` when the
    request was charged (the upstream did work the client never saw), and the error is counted."""
    end = ending if ending is not None else Ending(store=facts.store)
    end.status = err.status
    # A failure after the upstream did its work keeps the note on what it was charged.
    end.reason = f"{err.message}; {end.reason}" if end.measured is not None and end.reason else err.message
    end.rule = err.detail.get("rule", end.rule if end.rule is not None else facts.rule)
    end.decision = "partial" if end.measured is not None and err.decision == "failed" else err.decision
    gw.metrics.observe_error(err)
    return end


def observe(gw: Gateway, facts: Facts, ending: Ending) -> None:
    """Metrics for every request, and its audit record if none was written (no waiting)."""
    cfg = facts.config
    elapsed = time.perf_counter() - facts.started
    model = facts.model  # one lookup: the model's name for the metrics and its evaluated K
    m = cfg.models.get(model) if model is not None else None
    if m is None or model is None:
        model, m = "unknown", cfg.models.get("unknown")  # a model the policy itself calls "unknown", as before
    ex = ending
    evaluated = m.evaluated_max_k if m is not None else None
    gw.metrics.observe_request(model=model, tier=facts.tier or "none", api=facts.api, decision=ending.decision,
                               usage=ending.measured, overhead_s=elapsed - ex.upstream_seconds,
                               evaluated_max_k=evaluated, would_deny=facts.would_deny,
                               rule=ending.rule if ending.rule is not None else facts.rule)
    if ex.upstream_seconds and facts.upstream:
        gw.metrics.observe_upstream(facts.upstream, ex.upstream_seconds, first_byte_s=ex.first_byte_seconds)
    if gw.audit is not None and not ending.recorded:
        if facts.eval is not None:  # its run waits until the record is written: written, then released
            gw.detach(record(gw, facts, ending))
            return
        ending.recorded = True
        gw.audit.write_nowait(audit_record(gw, facts, ending, elapsed), fresh=True, plain=True)


async def record(gw: Gateway, facts: Facts, ending: Ending, *, again: bool = False) -> dict[str, Any] | None:
    """Write the audit record and wait until the OS has it; the record as written (with its ``seq`` and
    ``hash``), or None when none was written. ``again``: a second record of a request whose usage went
    elsewhere than its first record says (a settle that failed after the answer)."""
    if gw.audit is None or (ending.recorded and not again):
        return None
    ending.recorded = True
    written = None
    try:
        written = await gw.audit.write(audit_record(gw, facts, ending, time.perf_counter() - facts.started),
                                       fresh=True, plain=True)
    except Exception:  # counted in the writer's write_errors; the client still gets its answer
        log.exception("audit record of request %s could not be written", facts.request_id)
    if facts.eval is not None and gw.evals is not None:
        gw.detach(_released(gw, facts))  # not before the last byte: a run's finish polls for it
    return written


async def _released(gw: Gateway, facts: Facts) -> None:
    assert gw.evals is not None
    try:
        await gw.evals.recorded(facts.eval or "", facts.request_id)
    except Exception:  # the entry then lapses at its deadline
        log.warning("evaluation run %s: request %s could not be noted as recorded", facts.eval, facts.request_id)


def audit_record(gw: Gateway, facts: Facts, ending: Ending, elapsed: float) -> dict[str, Any]:
    """A request's audit record: a fresh dict of fixed keys, none of which the log drops (it is written
    ``plain``; tests/unit/test_perf_finish.py holds these keys apart from the dropped ones)."""
    p, measured, model = facts.principal, ending.measured, facts.model
    m = facts.config.models.get(model) if model is not None else None  # one lookup for both model fields
    usage = None
    if measured:
        usage = measured.as_dict()  # a new dict each call: extended in place rather than copied
        usage["overrun"] = measured.overrun
    rec = {
        "ts": time.time(),
        "request_id": facts.request_id,
        "replica": gw.replica,
        "principal": p.id if p else None,
        "org": p.org if p else None,
        "key_id": p.key_id if p else None,
        "tier": facts.tier,
        "grant": facts.grant,
        "model": model if m is not None else None,
        "upstream": facts.upstream,
        "upstream_model": (m.upstream_model or model) if m is not None and model else None,
        "api": facts.api,
        "stream": facts.stream,
        "bound": facts.bound.as_dict() if facts.bound else None,
        "usage": usage,
        "decision": ending.decision,
        "reason": ending.reason,
        "rule": ending.rule if ending.rule is not None else facts.rule,
        "clamped": [*facts.clamped],  # a new list, without the call of list()
        "status": ending.status,
        "latency_ms": round(elapsed * 1000, 3),
        "policy_sha256": facts.config.version,
        "mode": facts.mode,
        "would_deny": facts.would_deny,
        "store": ending.store,
    }
    if facts.eval is not None:
        rec["eval"] = facts.eval
    return rec
