"""The decision service: kgate's engine for a gateway that forwards the requests itself (issue 16).

nginx/OpenResty (``deploy/nginx/``), Envoy's external processor (:mod:`gateway.decision.extproc`) or any
gateway that can make a call before and after a request uses kgate in two steps:

1. :meth:`DecisionService.admit` with the client's method, path, headers and body → :class:`Allow` (send
   ``body`` to ``path`` on the upstream, with exactly ``upstream_headers``; the budgets are held) or
   :class:`Deny` (answer ``status``/``headers``/``body``, already in the client's API shape; recorded);
2. :meth:`DecisionService.settle` with the request id and what the upstream answered — the JSON body, or
   the stream's bytes in as many segments as the gateway likes (each with its offset, so a segment sent
   twice or out of order is harmless), or only the provider's usage object — and ``final`` on the last one:
   the request is charged, settled and recorded, in the engine's order (settle, then audit).

The flow is the engine's (:class:`gateway.engine.flow.Engine`), so a policy behaves as in the built-in
proxy. What the gateway does not report is never taken on trust as less: a request that is never settled is
charged at :attr:`DecisionService.settle_timeout` by its tier's ``on_missing_usage`` (the bound, by default),
and one whose decision process dies expires with its lease in Redis, as the proxy's do.

The admitted requests wait here, in this process's memory: a settle must reach the process that admitted
(the plugins call one local kgate, over a Unix socket or loopback). Repeating a final settle answers the
same result (idempotent by request id); a settle for an id this process does not hold is
:class:`UnknownRequest`.

The messages are in :mod:`gateway.decision.messages`, the table of waiting requests and its sweeper in
:mod:`gateway.decision.pending`, the mapping of an ending to its charge in :mod:`gateway.decision.charge`;
their public names are importable from here too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.decision.charge import charge
from gateway.decision.messages import (
    CREDENTIAL_HEADERS,
    OUTCOMES,
    AdmitInput,
    Allow,
    Deny,
    Settled,
    SettleInput,
    UnknownRequest,
)
from gateway.decision.pending import Pending, PendingRequests
from gateway.engine.errors import (
    BadRequest,
    GatewayError,
    InternalError,
    MethodNotAllowed,
    PayloadTooLarge,
    render,
    shape_for_path,
)
from gateway.engine.flow import Engine
from gateway.engine.metering import resolve_path
from gateway.engine.model_names import renamer
from gateway.engine.request import Admission, Call, Denial, Ending, Facts
from gateway.proxy import upstream as up

__all__ = ["CREDENTIAL_HEADERS", "OUTCOMES", "AdmitInput", "Allow", "DecisionService", "Deny", "SettleInput",
           "Settled", "UnknownRequest"]

log = logging.getLogger("kgate.decision")


class DecisionService:
    """Admit and settle requests that another gateway forwards; one per gateway process, over its engine."""

    def __init__(self, engine: Engine, *, settle_timeout: float | None = None, keep_settled: float = 60.0):
        self.engine = engine
        self._settle_timeout = settle_timeout
        # Seconds a settled request's result is kept for a repeated final settle (a plugin's retry comes within
        # its settle timeout).
        self.keep_settled = keep_settled
        self._waiting = PendingRequests(self.expire)

    # ----------------------------------------------------------------------------------------- admit
    async def admit(self, req: AdmitInput) -> Allow | Deny:
        engine, gw = self.engine, self.engine.gw
        shape = shape_for_path(req.path)
        try:
            path, _, query = req.path.partition("?")
            if req.method.upper() != "POST":
                raise MethodNotAllowed(f"method {req.method[:16]!r} is not allowed on {path[:200]!r}; use POST")
            adapter, params = resolve_path(req.path)
        except GatewayError as err:
            return self._refuse(err, shape)
        facts = engine.begin(adapter.api)
        limit = facts.config.server.max_body_bytes

        async def read_body() -> bytes:  # after identification, as the proxy reads it: a refusal is recorded
            if len(req.body) > limit:
                raise PayloadTooLarge(f"request body of {len(req.body)} bytes exceeds the limit of {limit}")
            return req.body

        headers = CIMultiDictProxy(CIMultiDict(req.headers))
        qs = _query(query)
        call = Call(adapter, params, path, headers, qs, query, lambda: req.peer)
        ending = Ending()
        adm: Admission | Denial | None = None
        gw.inflight += 1
        try:
            adm = await engine.admit(facts, call, read_body)
            if isinstance(adm, Denial):
                ending = engine.denied(adm)
                await engine.conclude(facts, ending)
                engine.done(facts, ending)
                return self._deny(facts, adm.error, adapter.shape, _fail_open(adm))
            ending = adm.ending
            try:
                allow = self._allow(adm, headers)
            except GatewayError as err:  # the upstream's own settings cannot be sent (none so far)
                await engine.abandon(adm, cancelled=False)
                engine.failed(facts, err, ending)
                await engine.conclude(facts, ending)
                engine.done(facts, ending)
                return self._deny(facts, err, adapter.shape, adm.tier.on_store_error == "allow")
            engine.sent(adm)
            meter = engine.stream_meter(adm) if facts.stream else None
            self._waiting.add(facts.request_id, Pending(
                adm, time.monotonic() + self.settle_timeout_for(adm), meter,
                renamer(adm.parsed.model_name, adm.parsed.model)))
            return allow
        except asyncio.CancelledError:  # the calling gateway hung up while the request was being admitted
            if facts.request_id not in self._waiting:
                if isinstance(adm, Admission):
                    await engine.abandon(adm, cancelled=False)
                engine.done(facts, ending)
            raise
        except Exception:
            log.exception("internal error admitting request %s", facts.request_id)
            bug = InternalError("internal error; the request was not charged")
            engine.failed(facts, bug, ending)
            engine.done(facts, ending)
            return self._deny(facts, bug, adapter.shape, False)
        finally:
            gw.inflight -= 1

    def _allow(self, adm: Admission, headers: Mapping[str, str]) -> Allow:
        facts, fwd, parsed = adm.facts, adm.forward, adm.parsed
        gw = self.engine.gw
        target = gw.upstreams.get(fwd.upstream) if gw.upstreams is not None else None
        if target is not None:
            upstream_headers = up.request_headers(target, parsed.adapter.shape, headers, facts.request_id)
        else:
            upstream_headers = {"content-type": "application/json", "x-request-id": facts.request_id,
                                **up.provider_headers(headers)}
        named = renamer(parsed.model_name, parsed.model)
        bound = parsed.bound
        return Allow(
            request_id=facts.request_id, upstream=fwd.upstream,
            upstream_url=target.base_url if target is not None else None, path=fwd.path, body=fwd.body,
            upstream_headers=upstream_headers, remove_headers=CREDENTIAL_HEADERS,
            response_headers=self.engine.answer_headers(adm), stream=facts.stream,
            strip_usage=facts.stream and not fwd.wants_usage,
            rename=tuple(named.pairs) if named is not None else (), model=parsed.model_name,
            api=parsed.adapter.api, k_max=bound.k_max, flops_max=bound.flops_max, samples=bound.samples,
            clamped=tuple(facts.clamped), fail_open=adm.tier.on_store_error == "allow")

    def _deny(self, facts: Facts, err: GatewayError, shape: str, fail_open: bool) -> Deny:
        headers = {**err.headers, "x-kgate-request-id": facts.request_id, "content-type": "application/json"}
        return Deny(facts.request_id, err.status, headers, orjson.dumps(render(err, shape)),  # type: ignore[arg-type]
                    err.code or err.kind, fail_open)

    def _refuse(self, err: GatewayError, shape: str) -> Deny:
        """A request refused before it is a model call (wrong method, unknown path): not recorded, as the
        proxy's router answers these."""
        headers = {**err.headers, "content-type": "application/json"}
        return Deny("", err.status, headers, orjson.dumps(render(err, shape)),  # type: ignore[arg-type]
                    err.code or err.kind, False)

    # ---------------------------------------------------------------------------------------- settle
    async def settle(self, request_id: str, part: SettleInput) -> Settled:
        """Take the next part of a request's answer; on ``final``, charge, settle and record it."""
        if part.outcome not in OUTCOMES:
            raise BadRequest(f"outcome must be one of {', '.join(OUTCOMES)}", param="outcome")
        if part.offset < 0:
            raise BadRequest("offset must not be negative", param="offset")
        p = self._waiting.get(request_id)
        if p is None:
            done = self._waiting.settled(request_id)
            if done is not None:
                return done
            raise UnknownRequest(request_id)
        async with p.lock:
            if p.result is not None:
                return p.result
            return await self._take(p, part)

    async def _take(self, p: Pending, part: SettleInput) -> Settled:
        adm = p.adm
        if part.status is not None:
            if not 100 <= part.status <= 599:
                raise BadRequest("status must be an HTTP status (100-599)", param="status")
            if p.status is None:
                p.status = part.status
                adm.ending.first_byte_seconds = time.perf_counter() - (adm.ending.sent_at or adm.facts.started)
        passed = p.feed(part.offset, part.data)
        if not part.final:
            return Settled(adm.facts.request_id, "metering", p.received, passed)
        if p.early:
            # The last part came, a gap remains: what arrived after the gap is metered all the same (usage
            # comes last), and the request is marked as cut.
            for offset in sorted(p.early):
                passed += p.consume(p.early.pop(offset))
            if part.outcome == "complete":
                part = SettleInput(part.status, b"", 0, True, part.usage, "upstream_broken")
        result = await self._finish(p, part, passed)
        return result

    async def _finish(self, p: Pending, part: SettleInput, passed: bytes, why: str = "") -> Settled:
        engine, adm = self.engine, p.adm
        facts, ending = adm.facts, adm.ending
        ending.upstream_seconds = time.perf_counter() - (ending.sent_at or facts.started)
        headers: dict[str, str] = {}
        try:
            try:
                headers = await charge(engine, p, part, why)
                if p.meter is not None and p.status is not None and p.status < 400:
                    tail = p.meter.close() if not p.meter.finished else b""
                    passed += p.renamer.body(tail) if tail and p.renamer is not None else tail
            except GatewayError as err:
                await engine.abandon(adm, cancelled=False)  # nothing generated, unless the error charged it
                engine.failed(facts, err, ending)
            await engine.conclude(facts, ending)
        except Exception:
            log.exception("internal error settling request %s", facts.request_id)
            engine.failed(facts, InternalError("internal error while settling"), ending)
        finally:
            engine.done(facts, ending)
            self._waiting.remove(facts.request_id)
        m = ending.measured
        result = Settled(facts.request_id, "settled", p.received, passed, ending.decision, ending.status,
                         ending.reason, {**m.as_dict(), "model": facts.model, "api": facts.api} if m else None,
                         headers)
        p.result = result
        self._remember(result)
        return result

    def _remember(self, result: Settled) -> None:
        self._waiting.remember(result, time.monotonic() + self.keep_settled)

    # --------------------------------------------------------------------------------------- expiry
    def settle_timeout_for(self, adm: Admission) -> float:
        """How long an admitted request may wait for its final settle: the upstream's total timeout and the
        store's lease grace (the hold's own lease), unless configured."""
        if self._settle_timeout is not None:
            return self._settle_timeout
        cfg = adm.facts.config
        upstream = cfg.upstreams.get(adm.facts.upstream or "")
        total = upstream.total_timeout_seconds if upstream is not None else 600.0
        return float(total) + cfg.store.lease_grace_seconds

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every admitted request to be settled; True if they were."""
        return await self._waiting.wait_idle(timeout)

    @property
    def pending(self) -> int:
        return len(self._waiting)

    async def expire(self, now: float | None = None) -> int:
        """Settle every request whose time is up as unanswered (charged by ``on_missing_usage``); forget
        settled results past ``keep_settled``. Returns how many requests expired."""
        now = time.monotonic() if now is None else now
        self._waiting.forget(now)
        expired = self._waiting.due(now)
        for p in expired:
            async with p.lock:
                if p.result is None:
                    await self._finish(p, _UNANSWERED, b"", "the calling gateway never settled the request")
        return len(expired)

    async def close(self) -> None:
        """Shutting down: every request still waiting is settled as the proxy settles one cut by a shutdown
        (charged by ``on_missing_usage`` if it was sent); its audit record is written."""
        await self._waiting.stop()
        for p in self._waiting.waiting():
            async with p.lock:
                if p.result is None:
                    await self._finish(p, _UNANSWERED, b"", "kgate shut down before the request was settled")


_UNANSWERED = SettleInput(final=True, outcome="upstream_timeout")


def _fail_open(denial: Denial) -> bool:
    """Whether the denied caller's tier serves when the store is away (known once its tier is)."""
    tier = denial.facts.config.tiers.get(denial.facts.tier or "")
    return tier is not None and tier.on_store_error == "allow"


def _query(query: str) -> Mapping[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(query, keep_blank_values=True)) if query else {}
