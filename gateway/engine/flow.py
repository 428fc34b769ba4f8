"""The engine: one request's flow, whatever carries it (docs/design.md §4).

A transport (the aiohttp proxy in ``gateway.proxy``, or a plugin of another gateway) calls, in order:

1. :meth:`Engine.begin`, then :meth:`Engine.admit` with a :class:`~gateway.engine.request.Call` → an
   ``Admission`` (send its ``forward`` upstream) or a ``Denial`` (answer its error, then
   :meth:`Engine.conclude`);
2. :meth:`Engine.sent` when the request leaves, then one of
   - :meth:`Engine.finish_json` with a unary answer, or :meth:`Engine.stream_meter` and
     :meth:`Engine.finish_stream` for a stream: these charge the request and post the settle;
   - :meth:`Engine.upstream_refused` for an upstream's error status (nothing is charged);
   - :meth:`Engine.upstream_failed` when the exchange broke (charged if the upstream was working);
3. :meth:`Engine.conclude` before the answer's last byte: the settle is posted (or done), then the audit
   record is written and on disk. This order — settle, then audit, then the last byte — is kept here;
4. :meth:`Engine.done` whatever happened: metrics, and the record if nothing wrote it.

Nothing here imports aiohttp; the store is reached through the ledger and the directory.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Iterator
from typing import Any

import orjson

from gateway.adapters.base import StreamMeter
from gateway.engine import settlement
from gateway.engine.admission import BodyReader, admit
from gateway.engine.budgets import answer_headers
from gateway.engine.compute import measure
from gateway.engine.errors import GatewayError, InternalError, ShuttingDown, UpstreamError
from gateway.engine.identity import effective_tier, identify
from gateway.engine.record import error_ending, observe, record
from gateway.engine.request import Admission, Call, Denial, Ending, Facts
from gateway.engine.state import Gateway
from gateway.policy.config import TierConfig
from gateway.policy.directory import Principal

log = logging.getLogger("kgate.engine")


def _request_ids() -> Iterator[str]:
    """Request ids unique across replicas and restarts: a random 64-bit prefix per process and a counter.

    (The ledger keys settle idempotency on them; os.urandom per request was a measurable syscall.)
    """
    prefix = secrets.token_hex(8)
    for n in itertools.count(1):
        yield f"{prefix}{n:08x}"


_REQUEST_IDS = _request_ids()


class Engine:
    """The transport-free request flow over one gateway's state."""

    __slots__ = ("gw",)

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    # ------------------------------------------------------------------------------------ admission
    def begin(self, api: str) -> Facts:
        """A new request of ``api``: its id, its arrival time and the policy snapshot it runs under (a
        reload never changes a request half-way). The transport holds these facts from the first moment,
        so that :meth:`done` records the request whatever ends it — a cancellation during admission too."""
        return Facts(next(_REQUEST_IDS), api, time.perf_counter(), self.gw.config)

    async def admit(self, facts: Facts, call: Call, read_body: BodyReader | None = None) -> Admission | Denial:
        """Identify, parse, bound, check and hold; ``read_body`` is awaited once the caller is known (a
        transport that has the body already puts it in ``call.body``)."""
        gw = self.gw
        try:
            if gw.draining:
                raise ShuttingDown("the gateway is shutting down; retry on another replica")
            return await admit(gw, facts, call, read_body)
        except GatewayError as err:
            return Denial(facts, err)
        except Exception:
            log.exception("internal error admitting request %s", facts.request_id)
            return Denial(facts, InternalError("internal error; the request was not charged"))

    async def caller(self, call: Call) -> tuple[Principal, str, TierConfig]:
        """Who ``call`` comes from and the tier it runs under (for endpoints that only need that, such as
        ``/v1/models``); raises the GatewayError that refuses it."""
        gw = self.gw
        cfg = gw.config
        principal = await identify(gw, cfg, call)
        name, tier = await effective_tier(gw, cfg, principal)
        return principal, name, tier

    def denied(self, denial: Denial) -> Ending:
        """The ending of a denial (its decision is the error's: ``denied`` or ``failed``)."""
        return error_ending(self.gw, denial.facts, denial.error)

    def failed(self, facts: Facts, err: GatewayError, ending: Ending | None = None) -> Ending:
        """The ending of a request that ends with ``err`` (``partial`` when it was charged)."""
        return error_ending(self.gw, facts, err, ending)

    # --------------------------------------------------------------------------------- upstream leg
    def sent(self, adm: Admission) -> float:
        """The request leaves for the upstream now; returns the time (perf_counter)."""
        t0 = adm.ending.sent_at = time.perf_counter()
        return t0

    async def upstream_failed(self, adm: Admission, err: GatewayError, *, working: bool) -> GatewayError:
        """The exchange broke (a timeout, a reset, a body cut, too large, unreadable). ``working``: the
        request had reached an upstream that was answering, which may finish the work all the same — it is
        charged by the tier's ``on_missing_usage``. Counted by kind; returns ``err`` to answer with."""
        if working and adm.ending.measured is None:
            await settlement.charge_unanswered(self.gw, adm)
        return settlement.count_upstream_error(self.gw, adm.facts.upstream or "", err)

    async def upstream_refused(self, adm: Admission, status: int) -> GatewayError | None:
        """The upstream answered an error status: nothing was generated, nothing is charged. None: pass the
        provider's own answer on (a 4xx about the request, in its API's shape already); else the error to
        answer with instead."""
        await settlement.release(self.gw, adm)
        end, upstream = adm.ending, adm.facts.upstream
        end.measured = None
        self.gw.metrics.upstream_error(upstream or "", f"http_{status}")
        if status in (401, 403, 407):
            # The upstream refused the gateway's own credentials: not the caller's doing, and a provider's
            # message may quote the key it was sent (OpenAI quotes part of it), so that body is not passed on.
            return UpstreamError(f"upstream {upstream!r} refused the gateway's credentials ({status})",
                                 code="upstream_auth")
        if status < 500:
            end.decision, end.status, end.reason = "failed", status, f"upstream answered {status}"
            return None
        return UpstreamError(f"upstream {upstream!r} answered {status}", code=f"upstream_{status}")

    async def finish_json(self, adm: Admission, status: int, data: bytes) -> dict[str, str]:
        """A unary answer came whole: charge it and post its settle; the headers kgate adds to it. A body
        that cannot be read is charged as work done and raised as ``upstream_malformed``."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            # A success the gateway cannot read (SSE for a unary call, another encoding) is work done all
            # the same: charged like any answer whose usage was lost, never released.
            bad = UpstreamError(f"upstream {adm.facts.upstream!r} sent a malformed response",
                                code="upstream_malformed")
            raise await self.upstream_failed(adm, bad, working=True) from None
        parsed, end = adm.parsed, adm.ending
        usage = settlement.chargeable(self.gw, adm, parsed.adapter.usage_from_json(doc, parsed.request))
        measured = end.measured = measure(usage, parsed.model, parsed.bound)
        if not settlement.post_usage(self.gw, adm, measured):
            await settlement.settle_to_the_end(self.gw, adm, measured)
        end.decision, end.status = _decision(adm), status
        headers = answer_headers(adm.facts, adm.reservation)  # a new dict: extended, not copied
        headers["x-kgate-k"] = f"{measured.k:.6g}"
        headers["x-kgate-flops"] = f"{measured.flops:.6g}"
        return headers

    def stream_meter(self, adm: Admission) -> StreamMeter:
        return adm.parsed.adapter.stream_meter(adm.parsed.request, adm.forward.wants_usage)

    def answer_headers(self, adm: Admission) -> dict[str, str]:
        return answer_headers(adm.facts, adm.reservation)

    async def finish_stream(self, adm: Admission, meter: StreamMeter, problem: str) -> None:
        """A stream ended (whole, cut, or its client gone: ``problem`` says which): charge what it metered —
        or, without the provider's usage, what ``on_missing_usage`` says — and wait for the settle.

        Waited for, unlike a JSON answer's: settling after a stream's last bytes cost about 3% of the
        streaming throughput at 32 connections (bench/gateway_bench.py, side by side), for 0.2 ms on an
        answer that takes as long as its generation."""
        end = adm.ending
        if end.measured is not None:
            return
        if end.sent_at is not None:
            end.upstream_seconds = time.perf_counter() - end.sent_at
        usage = settlement.chargeable(self.gw, adm, meter.usage())
        measured = end.measured = measure(usage, adm.parsed.model, adm.parsed.bound)
        await settlement.settle_to_the_end(self.gw, adm, measured)
        end.status = 200
        if problem or meter.error is not None or not meter.finished:
            end.decision = "partial"
            end.reason = problem or ("upstream sent an error event" if meter.error is not None
                                     else "stream ended without its final event")
        else:
            end.decision = _decision(adm)
        if usage.source != "upstream":
            note = f"no usage from the upstream; charged {settlement.charge_note(measured)}"
            end.reason = f"{end.reason}; {note}" if end.reason else note

    async def abandon(self, adm: Admission, cancelled: bool) -> None:
        """The request's task is going away unfinished (cancelled by a shutdown past its drain, or a bug):
        work the upstream may finish all the same is charged; before sending, the holds are voided."""
        end = adm.ending
        if end.measured is not None or end.released:
            return
        if cancelled and end.sent_at is not None:
            await settlement.charge_unanswered(self.gw, adm)
            end.decision, end.status = "partial", 503  # charged: counted in reports and reconcile
            end.reason = f"the gateway shut down before the upstream answered; {end.reason}"
        else:
            await settlement.release(self.gw, adm)

    # ------------------------------------------------------------------------------------- the end
    def conclude(self, facts: Facts, ending: Ending) -> Awaitable[dict[str, Any] | None]:
        """Before the answer's last byte: the audit record, written and on disk (await it; it answers the
        record as written, or None). The settle was posted (or done) by the finish that charged the request,
        so it always precedes the record. (Not a coroutine of its own: it hands back the record's, one frame
        less on every request.)"""
        return record(self.gw, facts, ending)

    def receipt(self, adm: Admission, written: dict[str, Any] | None) -> str | None:
        """The signed receipt of a charged answer whose tier asks for one (docs/design.md §14), else None."""
        if not adm.tier.receipts or written is None or self.gw.signer is None or adm.ending.measured is None:
            return None
        from gateway.evals.receipts import issue

        return issue(self.gw.signer, written)

    def done(self, facts: Facts, ending: Ending) -> None:
        """Whatever happened: metrics, and the audit record if none was written."""
        observe(self.gw, facts, ending)


def _decision(adm: Admission) -> str:
    if adm.ending.store == "spooled":
        return "spooled"
    return "clamped" if adm.facts.clamped else "allowed"


