"""After the upstream answered (or did not): what a request is charged, and posting it to the ledger
(docs/design.md §3.3, §4 steps 11-12, §6).

- A provider's own usage is charged as reported; without it, the tier's ``on_missing_usage`` rule decides
  (by default the admission bound: hidden reasoning leaves no trace in what was streamed or returned).
- :func:`post_usage` queues a JSON answer's settle before the answer and does not wait for Redis's reply;
  :func:`settle_to_the_end` waits, and a cancellation cannot cut it short.
- A settle the store did not take goes to the spool (replayed exactly once); a request whose usage could
  not be posted anywhere is recorded ``unsettled`` and its hold expires with its lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from gateway.engine.budgets import budget_holds
from gateway.engine.compute import Measured, Usage, measure, usage_at_bound
from gateway.engine.errors import GatewayError, UpstreamTimeout
from gateway.engine.record import record
from gateway.engine.request import Admission
from gateway.engine.state import Gateway
from gateway.ledger.errors import ScriptMissing, StoreError
from gateway.ledger.leases import LocalReservation
from gateway.ledger.ledger import Reservation

log = logging.getLogger("kgate.engine")


# ------------------------------------------------------------------------------------- what is charged
def chargeable(gw: Gateway, adm: Admission, usage: Usage) -> Usage:
    """The usage to charge: the provider's own, else what the tier's ``on_missing_usage`` says."""
    if usage.source == "upstream":
        return usage
    if adm.facts.upstream:
        gw.metrics.upstream_error(adm.facts.upstream, "no_usage")
    if adm.tier.on_missing_usage == "bound":
        return usage_at_bound(adm.parsed.bound, usage)
    return usage


def charge_note(measured: Measured) -> str:
    return "the admission bound" if measured.usage.source == "bound" else \
        f"{measured.usage.generated_tokens} generated tokens ({measured.usage.source})"


def count_upstream_error(gw: Gateway, upstream: str, err: GatewayError) -> GatewayError:
    """Count a failed upstream exchange under the kinds of ``kgate_upstream_errors_total``; returns ``err``."""
    if isinstance(err, UpstreamTimeout):
        kind = "timeout"
    elif err.code == "upstream_unreachable":
        kind = "connect"
    elif err.code == "upstream_malformed":
        kind = "malformed"
    elif err.code == "upstream_too_large":
        kind = "too_large"  # over the upstream's max_response_bytes
    else:
        kind = "disconnect"  # reset, hung up, or a stream that ended before its final event
    gw.metrics.upstream_error(upstream, kind)
    return err


async def charge_unanswered(gw: Gateway, adm: Admission) -> None:
    """The request reached the upstream but no usage came back (a timeout, a body cut or refused as too
    large): a provider that finishes its work after kgate gave up still spent it. Charged by the tier's
    ``on_missing_usage`` rule (by default the admission bound), with the reason noted."""
    end, bound = adm.ending, adm.parsed.bound
    if end.sent_at is not None:
        end.upstream_seconds = time.perf_counter() - end.sent_at
    seen = Usage(samples=bound.samples, prompt_tokens=bound.prompt_tokens, reasoning_tokens=0,
                 output_tokens=0, source="counted")
    measured = measure(chargeable(gw, adm, seen), adm.parsed.model, bound)
    end.measured = measured
    await settle_to_the_end(gw, adm, measured)
    end.reason = f"the upstream's usage never came; charged {charge_note(measured)}"


async def release(gw: Gateway, adm: Admission) -> None:
    """Charge nothing: void the request's holds (once)."""
    if adm.reservation is None or adm.ending.released:
        return
    adm.ending.released = True
    assert gw.ledger is not None
    if isinstance(adm.reservation, LocalReservation) and gw.leases is not None:
        gw.leases.release(adm.reservation)
        return
    try:
        await gw.ledger.release(adm.reservation)
    except StoreError:
        gw.metrics.store_error("release")
        # Void it when the store is back; without a spool, the lease expires and is charged.
        if gw.spool is not None:
            await asyncio.to_thread(gw.spool.append_release, adm.reservation.request_id, adm.reservation.holds)


# ------------------------------------------------------------------------------------------- posting
def post_usage(gw: Gateway, adm: Admission, measured: Measured) -> bool:
    """Settle a request that holds in Redis without making its answer wait for Redis's reply; False when
    that cannot keep the settle's order — redis-py (TLS, Sentinel, Cluster), a connection being reopened —
    or the usage went to the spool at admission: the caller then waits for :func:`settle_to_the_end`.

    The settle's scripts are queued on the ledger's pipelined connection by this call, before the answer
    is written, so every later script of this replica — the client's next request, an admin read — runs
    after it in Redis. They leave in one write with the other scripts queued in the same turn of the event
    loop, at the start of the next turn (usually just after the answer). The reply comes to
    :func:`_settled`, a callback (no task, no coroutine); a shutdown waits for the replies still due
    (``gw.settling``).

    Until the settle lands, the hold stands in for the request; under strict admission it is never less
    than what the request could use. A replica killed in between — during the upstream call, as always,
    or now also within the turn that wrote the answer — leaves the hold to its lease expiry
    (``lease_expiry: charge`` charges it in full; ``kgate audit reconcile`` explains the excess).

    What it saves: the settle's round trip to Redis on every JSON answer, about 0.2 ms at one connection
    (``bench/gateway_bench.py``). Writing the settle before the answer (its own write, or one more turn of
    the loop) cost about 4% of the throughput at 32 connections, a task per request 2.6% of the gateway's
    instructions; neither was kept.
    """
    reservation = adm.reservation
    if reservation is None or gw.ledger is None:
        return False
    actual = _actual(measured)
    if isinstance(reservation, LocalReservation) and gw.leases is not None:
        gw.leases.post(reservation, actual)  # into its slices' next batches (gateway/ledger/leases.py)
        learn(gw, adm, measured)
        return True
    t0 = time.perf_counter()
    gw.settling += 1  # counted down by _settled when Redis answers, or below when nothing was sent
    sent = False
    try:
        sent = gw.ledger.post_settle(reservation, actual,
                                     lambda error: _settled(gw, adm, reservation, actual, error, t0))
        if not sent:
            return False
    except ValueError as exc:
        _cannot_post(gw, adm, exc)
    finally:
        if not sent:
            gw.settling -= 1
    learn(gw, adm, measured)
    return True


def _settled(gw: Gateway, adm: Admission, reservation: Reservation, actual: dict[str, float],
             error: BaseException | None, t0: float) -> None:
    """Redis has answered a settle posted by :func:`post_usage`."""
    gw.settling -= 1
    if error is None:
        gw.metrics.store_latency("settle", time.perf_counter() - t0)
    else:
        gw.detach(_settle_failed(gw, adm, reservation, actual, error))


async def _settle_failed(gw: Gateway, adm: Admission, reservation: Reservation, actual: dict[str, float],
                         error: BaseException) -> None:
    """A settle posted after the answer failed: its usage goes to the spool, as a failed settle's always
    does. If the request's audit record is written already, a second record of the same request id says
    where the usage went (``store``: ``spooled``, or ``unsettled`` when not even the spool took it); if not,
    that record will say it. Reports and reconcile count a request id's usage once."""
    if isinstance(error, ScriptMissing) and gw.ledger is not None:
        try:  # Redis lost the script (flushed, or a load refused at connect): an awaited settle loads it
            await gw.ledger.settle(reservation, actual, report=False)
            return
        except StoreError as exc:
            error = exc
    await _spool_settle(gw, adm, reservation, actual, error)
    if adm.ending.recorded:
        await record(gw, adm.facts, adm.ending, again=True)


async def settle_to_the_end(gw: Gateway, adm: Admission, measured: Measured) -> None:
    """:func:`settle`, which a cancellation (a shutdown's) cannot cut short: cancelled part-way, it runs
    again to its end in a task of its own while the cancellation goes on. A settle is idempotent per request
    id, so one that had already reached Redis counts once; so is a spooled line, replayed."""
    try:
        await settle(gw, adm, measured)
    except asyncio.CancelledError:
        gw.detach(settle(gw, adm, measured, again=True))
        raise


async def settle(gw: Gateway, adm: Admission, measured: Measured, *, again: bool = False) -> None:
    """Post the actual usage and wait for it (idempotent per request id); spool it when the store is away.
    ``again``: a rerun of a settle that was cut short (the model's running mean has this request already)."""
    actual = _actual(measured)
    if not again:
        learn(gw, adm, measured)
    facts, end, reservation = adm.facts, adm.ending, adm.reservation
    if reservation is None:
        if end.store == "spooled" and gw.spool is not None and facts.principal is not None:
            holds = budget_holds(adm.tier, facts.principal, {}, actual)
            if not await asyncio.to_thread(gw.spool.append, facts.request_id, holds, actual, _meta(adm)):
                end.store = "unmetered"
        return
    assert gw.ledger is not None
    if isinstance(reservation, LocalReservation) and gw.leases is not None:
        await gw.leases.settle(reservation, actual)  # once per request: a rerun changes nothing
        return
    t0 = time.perf_counter()
    try:
        await gw.ledger.settle(reservation, actual, report=False)
        gw.metrics.store_latency("settle", time.perf_counter() - t0)
    except ValueError as exc:  # nothing was sent
        _cannot_post(gw, adm, exc)
    except StoreError as exc:
        await _spool_settle(gw, adm, reservation, actual, exc)


async def _spool_settle(gw: Gateway, adm: Admission, reservation: Reservation, actual: dict[str, float],
                        error: BaseException) -> None:
    """A settle that failed goes to the spool (replayed when the store is back; idempotent)."""
    end = adm.ending
    gw.metrics.store_error("settle")
    log.warning("settle of request %s failed: %r", adm.facts.request_id, error)
    if gw.spool is not None and await asyncio.to_thread(
            gw.spool.append_settle, adm.facts.request_id, reservation, actual, _meta(adm)):
        end.store = "spooled"
        if end.decision in ("allowed", "clamped"):
            end.decision = "spooled"
        end.reason = end.reason or "the settle failed (store unreachable); the usage is spooled for replay"
    else:
        _unsettled(gw, adm, "the settle failed and the spool did not take it")


def _cannot_post(gw: Gateway, adm: Admission, exc: ValueError) -> None:
    """Usage the ledger cannot post (not finite) is no reason to withhold an answer the upstream has
    given: the hold stays until its lease expires, and the record says so."""
    log.error("request %s: usage the ledger cannot post (%s)", adm.facts.request_id, exc)
    _unsettled(gw, adm, f"usage the ledger cannot post ({exc})")


def _unsettled(gw: Gateway, adm: Admission, why: str) -> None:
    end = adm.ending
    end.store = "unsettled"
    end.reason = end.reason or (f"{why}; the hold stays until its lease expires "
                                f"(lease_expiry: {gw.config.store.lease_expiry})")


def _actual(measured: Measured) -> dict[str, float]:
    u = measured.usage
    out, reasoning = u.output_tokens, u.reasoning_tokens  # generated_tokens without the property's call
    return {"requests": 1, "prompt_tokens": u.prompt_tokens, "output_tokens": out,
            "reasoning_tokens": reasoning, "generated_tokens": reasoning + out,
            "flops": measured.flops, "k_units": measured.k}


def learn(gw: Gateway, adm: Admission, measured: Measured) -> None:
    """The running mean of generated tokens per sample, per principal and model (what ``admission:
    expected`` holds)."""
    u = measured.usage
    principal = adm.facts.principal
    if u.samples > 0 and u.source == "upstream" and principal is not None:
        per_sample = u.generated_tokens / u.samples
        key = (principal.id, adm.parsed.model_name)
        means = gw.model_means
        prev = means.get(key)
        if prev is None and len(means) > 100_000:  # bounded: a mean is relearnt after a few requests
            means.clear()
        means[key] = per_sample if prev is None else 0.9 * prev + 0.1 * per_sample


def _meta(adm: Admission) -> dict[str, Any]:
    p = adm.facts.principal
    return {"principal": p.id if p else None, "org": p.org if p else None, "tier": adm.facts.tier,
            "model": adm.facts.model}
