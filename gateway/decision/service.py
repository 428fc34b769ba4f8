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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.adapters.base import StreamMeter
from gateway.engine.errors import (
    BadRequest,
    GatewayError,
    InternalError,
    MethodNotAllowed,
    PayloadTooLarge,
    UpstreamError,
    UpstreamTimeout,
    render,
    shape_for_path,
)
from gateway.engine.flow import Engine
from gateway.engine.metering import resolve_path
from gateway.engine.model_names import Renamer, renamer
from gateway.engine.request import Admission, Call, Denial, Ending, Facts
from gateway.proxy import upstream as up

log = logging.getLogger("kgate.decision")

# How the exchange with the upstream ended, as the calling gateway saw it (``SettleInput.outcome``).
OUTCOMES = ("complete", "client_disconnected", "upstream_timeout", "upstream_broken", "upstream_unreachable",
            "not_sent")

# Client headers that carry a caller's credentials: never sent upstream (the gateway's own key is).
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key", "proxy-authorization",
                      "cookie")


class UnknownRequest(LookupError):
    """A settle for a request id this process does not hold (never admitted here, or already expired)."""


@dataclass(frozen=True, slots=True)
class AdmitInput:
    """The client's request as the calling gateway received it."""

    method: str
    path: str  # the path with its query string, as the client sent it
    headers: Mapping[str, str]  # any case
    body: bytes
    peer: str = "unknown"  # the client's address as the gateway saw it ("unix" for a Unix socket)


@dataclass(frozen=True, slots=True)
class Allow:
    """Send ``body`` to ``path`` on upstream ``upstream``, with ``upstream_headers`` instead of the client's
    (its credentials removed, the upstream's own added); add ``response_headers`` to the answer."""

    request_id: str
    upstream: str
    upstream_url: str | None  # the upstream's base URL as kgate knows it (None: the gateway routes itself)
    path: str
    body: bytes
    upstream_headers: dict[str, str]
    remove_headers: tuple[str, ...]
    response_headers: dict[str, str]
    stream: bool
    strip_usage: bool  # kgate asked for streamed usage the client did not: drop the usage-only event
    rename: tuple[tuple[bytes, bytes], ...]  # plain byte replacements: the upstream's model name → the public
    model: str
    api: str
    k_max: float
    flops_max: float
    samples: int
    clamped: tuple[str, ...]
    fail_open: bool  # the caller's tier serves when the store is away (on_store_error: allow)

    def as_json(self) -> dict[str, Any]:
        return {"decision": "allow", "request_id": self.request_id, "upstream": self.upstream,
                "upstream_url": self.upstream_url, "path": self.path, "body": self.body.decode(),
                "upstream_headers": self.upstream_headers, "remove_headers": list(self.remove_headers),
                "response_headers": self.response_headers, "stream": self.stream,
                "strip_usage": self.strip_usage,
                "rename": [[old.decode(), new.decode()] for old, new in self.rename],
                "model": self.model, "api": self.api, "k_max": self.k_max, "flops_max": self.flops_max,
                "samples": self.samples, "clamped": list(self.clamped), "fail_open": self.fail_open}


@dataclass(frozen=True, slots=True)
class Deny:
    """Answer the client this, instead of forwarding (already recorded in the audit log)."""

    request_id: str
    status: int
    headers: dict[str, str]
    body: bytes  # JSON, in the client's API's error shape
    code: str
    fail_open: bool

    def as_json(self) -> dict[str, Any]:
        return {"decision": "deny", "request_id": self.request_id, "status": self.status,
                "headers": self.headers, "body": self.body.decode(), "code": self.code,
                "fail_open": self.fail_open}


@dataclass(frozen=True, slots=True)
class SettleInput:
    """The next part of what the upstream answered. ``data`` starts at byte ``offset`` of the answer's body;
    ``usage`` (the provider's usage object, in its API's shape) may stand in for the body of a unary answer."""

    status: int | None = None  # the upstream's HTTP status, once known
    data: bytes = b""
    offset: int = 0
    final: bool = False
    usage: dict[str, Any] | None = None
    outcome: str = "complete"


@dataclass(slots=True)
class Settled:
    """Where a request stands after a settle call."""

    request_id: str
    state: str  # "metering" (more to come) | "settled"
    received: int  # body bytes taken so far, in order
    passed: bytes = b""  # a stream's bytes to pass to the client, for an in-process caller (usage stripped)
    decision: str | None = None
    status: int | None = None
    reason: str = ""
    charged: dict[str, Any] | None = None  # K, FLOPs, tokens (kgate meter's object) once settled
    headers: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "state": self.state, "received": self.received,
                "decision": self.decision, "status": self.status, "reason": self.reason,
                "charged": self.charged, "headers": self.headers}


@dataclass(slots=True, eq=False)
class _Pending:
    """An admitted request waiting for its answer."""

    adm: Admission
    deadline: float  # monotonic
    meter: StreamMeter | None
    renamer: Renamer | None
    status: int | None = None
    received: int = 0
    body: list[bytes] = field(default_factory=list)  # a unary answer's bytes, in order
    early: dict[int, bytes] = field(default_factory=dict)  # segments that arrived before their turn
    early_bytes: int = 0
    result: Settled | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DecisionService:
    """Admit and settle requests that another gateway forwards; one per gateway process, over its engine."""

    def __init__(self, engine: Engine, *, settle_timeout: float | None = None, keep_settled: float = 60.0):
        self.engine = engine
        self._settle_timeout = settle_timeout
        # Seconds a settled request's result is kept for a repeated final settle (a plugin's retry comes within
        # its settle timeout); in arrival order, so expiry pops from the front.
        self.keep_settled = keep_settled
        self._pending: dict[str, _Pending] = {}
        self._settled: dict[str, tuple[float, Settled]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # set whenever no admitted request waits
        self._idle.set()

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
            self._idle.clear()
            self._pending[facts.request_id] = _Pending(
                adm, time.monotonic() + self.settle_timeout_for(adm), meter,
                renamer(adm.parsed.model_name, adm.parsed.model))
            self._start_sweeper()
            return allow
        except asyncio.CancelledError:  # the calling gateway hung up while the request was being admitted
            if facts.request_id not in self._pending:
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
        p = self._pending.get(request_id)
        if p is None:
            done = self._settled.get(request_id)
            if done is not None:
                return done[1]
            raise UnknownRequest(request_id)
        async with p.lock:
            if p.result is not None:
                return p.result
            return await self._take(p, part)

    async def _take(self, p: _Pending, part: SettleInput) -> Settled:
        adm = p.adm
        if part.status is not None:
            if not 100 <= part.status <= 599:
                raise BadRequest("status must be an HTTP status (100-599)", param="status")
            if p.status is None:
                p.status = part.status
                adm.ending.first_byte_seconds = time.perf_counter() - (adm.ending.sent_at or adm.facts.started)
        passed = self._feed(p, part.offset, part.data)
        if not part.final:
            return Settled(adm.facts.request_id, "metering", p.received, passed)
        if p.early:
            # The last part came, a gap remains: what arrived after the gap is metered all the same (usage
            # comes last), and the request is marked as cut.
            for offset in sorted(p.early):
                passed += self._consume(p, p.early.pop(offset))
            if part.outcome == "complete":
                part = SettleInput(part.status, b"", 0, True, part.usage, "upstream_broken")
        result = await self._finish(p, part, passed)
        return result

    def _feed(self, p: _Pending, offset: int, data: bytes) -> bytes:
        """Take ``data`` at ``offset``: bytes already taken are skipped (a repeated segment), bytes ahead of
        their turn wait (up to the upstream's ``max_response_bytes``); returns what a stream passes on."""
        if not data:
            return b""
        if offset > p.received:
            limit = self._limit(p)
            if p.early_bytes + len(data) > limit:
                raise BadRequest(f"more than {limit} bytes arrived ahead of a gap at byte {p.received}",
                                 param="offset")
            if offset not in p.early:
                p.early[offset] = data
                p.early_bytes += len(data)
            return b""
        if offset < p.received:
            data = data[p.received - offset:]
            if not data:
                return b""
        passed = self._consume(p, data)
        while p.early:
            nxt = min(p.early)
            if nxt > p.received:
                break
            chunk = p.early.pop(nxt)
            p.early_bytes -= len(chunk)
            chunk = chunk[p.received - nxt:]
            if chunk:
                passed += self._consume(p, chunk)
        return passed

    def _consume(self, p: _Pending, data: bytes) -> bytes:
        p.received += len(data)
        if p.meter is not None:
            out = p.meter.feed(data)
            if out and p.renamer is not None:
                out = p.renamer.body(out)
            return out
        if p.received > self._limit(p):
            raise BadRequest(f"the answer is larger than the upstream's max_response_bytes ({self._limit(p)})",
                             param="data")
        p.body.append(data)
        return b""

    def _limit(self, p: _Pending) -> int:
        cfg = p.adm.facts.config.upstreams.get(p.adm.facts.upstream or "")
        return cfg.max_response_bytes if cfg is not None else 64 << 20

    async def _finish(self, p: _Pending, part: SettleInput, passed: bytes, why: str = "") -> Settled:
        engine, adm = self.engine, p.adm
        facts, ending = adm.facts, adm.ending
        ending.upstream_seconds = time.perf_counter() - (ending.sent_at or facts.started)
        headers: dict[str, str] = {}
        try:
            try:
                headers = await self._charge(p, part, why)
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
            self._pending.pop(facts.request_id, None)
            if not self._pending:
                self._idle.set()
        m = ending.measured
        result = Settled(facts.request_id, "settled", p.received, passed, ending.decision, ending.status,
                         ending.reason, {**m.as_dict(), "model": facts.model, "api": facts.api} if m else None,
                         headers)
        p.result = result
        self._remember(result)
        return result

    async def _charge(self, p: _Pending, part: SettleInput, why: str = "") -> dict[str, str]:
        """Charge the request by how its exchange ended; the headers kgate would add to a unary answer."""
        engine, adm = self.engine, p.adm
        name = adm.facts.upstream or ""
        outcome, status = part.outcome, p.status
        if outcome in ("not_sent", "upstream_unreachable"):  # nothing reached a model: nothing is charged
            raise UpstreamError(f"upstream {name!r} was not reached", code="upstream_unreachable")
        if status is None:  # no answer came: a timeout is work the upstream may finish all the same
            if outcome == "upstream_timeout":
                late = UpstreamTimeout(why or f"upstream {name!r} did not answer in time")
                raise await engine.upstream_failed(adm, late, working=True)
            if outcome == "client_disconnected":  # gone while the upstream worked: charged as unanswered
                raise await engine.upstream_failed(adm, UpstreamError("the client disconnected before the "
                                                                      "answer", code="client_closed"),
                                                   working=True)
            raise await engine.upstream_failed(adm, UpstreamError(f"upstream {name!r} failed before answering"),
                                               working=False)
        if status >= 400:
            err = await engine.upstream_refused(adm, status)
            if err is not None:
                raise err
            return {}
        if p.meter is not None:
            meter = p.meter
            if not meter.finished:
                meter.close()
            problem = {"complete": "", "client_disconnected": "client disconnected",
                       "upstream_timeout": f"upstream {name!r} stalled mid-stream",
                       "upstream_broken": f"upstream {name!r} broke off the stream"}[outcome]
            if not problem and not meter.finished:
                problem = f"upstream {name!r} ended the stream early"
            await engine.finish_stream(adm, meter, problem)
            return {}
        if outcome != "complete" and part.usage is None:  # a unary answer cut: its usage is lost with it
            err = (UpstreamTimeout(f"upstream {name!r} timed out while sending its answer")
                   if outcome == "upstream_timeout" else UpstreamError(f"upstream {name!r} broke off its answer"))
            raise await engine.upstream_failed(adm, err, working=True)
        if part.usage is not None:
            key = "usageMetadata" if adm.parsed.adapter.api == "gemini" else "usage"
            data = orjson.dumps({key: part.usage})
        else:
            data = b"".join(p.body)
        return await engine.finish_json(adm, status, data)

    def _remember(self, result: Settled) -> None:
        now = time.monotonic()
        kept = dataclasses.replace(result, passed=b"")  # the bytes were passed on once; a repeat gets none
        self._settled[result.request_id] = (now + self.keep_settled, kept)

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
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def expire(self, now: float | None = None) -> int:
        """Settle every request whose time is up as unanswered (charged by ``on_missing_usage``); forget
        settled results past ``keep_settled``. Returns how many requests expired."""
        now = time.monotonic() if now is None else now
        settled = self._settled
        while settled:
            rid = next(iter(settled))
            if settled[rid][0] > now:
                break
            del settled[rid]
        expired = [p for p in self._pending.values() if p.deadline <= now]
        for p in expired:
            async with p.lock:
                if p.result is None:
                    await self._finish(p, _UNANSWERED, b"", "the calling gateway never settled the request")
        return len(expired)

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while self._pending or self._settled:
            await asyncio.sleep(1.0)
            try:
                await self.expire()
            except Exception:  # never let the sweeper die with requests still held
                log.exception("expiring unsettled requests")

    async def close(self) -> None:
        """Shutting down: every request still waiting is settled as the proxy settles one cut by a shutdown
        (charged by ``on_missing_usage`` if it was sent); its audit record is written."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for p in list(self._pending.values()):
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
