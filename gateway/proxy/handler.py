"""The request handler: docs/design.md §4, top to bottom.

identify → parse → bound → per-request caps (reject or clamp) → reserve → forward → meter → settle →
audit + metrics. Every failure is a :class:`~gateway.engine.errors.GatewayError`, answered in the shape of the
API the client spoke; anything unexpected is logged and answered as a 500 without a traceback.

A JSON answer does not wait for the settle's reply (:func:`post_usage`): the settle is queued before the
answer on the pipelined connection that carries every later script of this replica, and until it lands
the request's hold stands in for it. The audit record is written before the answer's last byte, as
always; a settle that fails after that is recorded a second time (:func:`_settle_failed`). A stream's end
waits for its settle.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import orjson
from aiohttp import web
from redis.exceptions import NoScriptError

from gateway.adapters import Adapter
from gateway.adapters.fields import check_fields
from gateway.engine.compute import (
    Bound,
    Measured,
    Usage,
    admission_bound,
    check_caps,
    clamp_target,
    expected_generated,
    flops,
    measure,
    usage_at_bound,
)
from gateway.engine.errors import (
    BadRequest,
    BudgetExceeded,
    ClientClosed,
    Forbidden,
    GatewayError,
    InternalError,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ShuttingDown,
    StoreUnavailable,
    Unauthenticated,
    UpstreamError,
    UpstreamTimeout,
    render,
    render_stream_error,
)
from gateway.engine.metering import ParsedRequest, decode_body, parse_request
from gateway.engine.model_names import renamer
from gateway.ledger.ledger import BudgetRefused, BudgetSpec, HoldRequest, Reservation, ScopeRef
from gateway.ledger.store import STORE_ERRORS
from gateway.policy.config import Config, TierConfig
from gateway.policy.directory import Principal
from gateway.proxy import upstream as up
from gateway.proxy.client_limits import untrusted_peer
from gateway.proxy.context import GATEWAY, Gateway
from gateway.proxy.http_client import HttpBroken, HttpTimeout

log = logging.getLogger("kgate.handler")


def _request_ids() -> Iterator[str]:
    """Request ids unique across replicas and restarts: a random 64-bit prefix per process and a counter.

    (The ledger keys settle idempotency on them; os.urandom per request was a measurable syscall.)
    """
    prefix = secrets.token_hex(8)
    for n in itertools.count(1):
        yield f"{prefix}{n:08x}"


_REQUEST_IDS = _request_ids()


@dataclass
class Outcome:
    """What happened to one request: becomes the audit record and the metrics."""

    request_id: str
    api: str
    started: float
    principal: Principal | None = None
    tier: str | None = None
    grant: str | None = None
    model: str | None = None
    upstream: str | None = None
    stream: bool = False
    bound: Bound | None = None
    measured: Measured | None = None
    decision: str = "failed"
    reason: str = ""
    rule: str | None = None
    clamped: list[str] = field(default_factory=list)
    status: int = 500
    mode: str = "enforce"
    would_deny: bool = False
    store: str = "ok"  # ok | unmetered | spooled | unsettled (the settle failed and could not be spooled)
    upstream_seconds: float = 0.0
    first_byte_seconds: float | None = None  # from sending upstream to the first byte of its answer
    sent_at: float | None = None  # perf_counter when the request left for the upstream (None: not sent)
    config: Config | None = field(default=None, repr=False)  # the policy snapshot this request runs under
    recorded: bool = False  # the audit record is written (see record)
    released: bool = False  # the hold was voided (nothing generated)


# ------------------------------------------------------------------------------------------ entry point
def api_handler(adapter: Adapter, method: str | None = None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of one API route (``method``: Gemini's generateContent / streamGenerateContent).

    The adapter is bound to the route, not looked up from the path, so the app also works mounted under
    a prefix as a sub-application.
    """

    async def handle(request: web.Request) -> web.StreamResponse:
        params = dict(request.match_info)
        if method is not None:
            params["method"] = method
            params["alt"] = request.query.get("alt", "")
        return await serve_api(request, adapter, params)

    return handle


async def serve_api(request: web.Request, adapter: Adapter, params: dict[str, str]) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    cfg = gw.config  # one snapshot per request: a reload never changes a request half-way
    out = Outcome(request_id=next(_REQUEST_IDS), api=adapter.api, started=time.perf_counter(), config=cfg)
    gw.inflight += 1
    task = asyncio.current_task()
    if task is not None:
        gw.handlers.add(task)
    try:
        if gw.draining:
            raise ShuttingDown("the gateway is shutting down; retry on another replica")
        return await _serve(request, gw, cfg, adapter, params, out)
    except GatewayError as err:
        response = _error_response(gw, out, err, adapter.shape)
        await record(gw, out)
        return response
    except Exception:
        log.exception("internal error in request %s", out.request_id)
        response = _error_response(gw, out, InternalError("internal error; the request was not charged"),
                                   adapter.shape)
        await record(gw, out)
        return response
    finally:
        gw.inflight -= 1
        if task is not None:
            gw.handlers.discard(task)
        _finish(gw, cfg, out)


async def _serve(request: web.Request, gw: Gateway, cfg: Config, adapter: Adapter, params: dict[str, str],
                 out: Outcome) -> web.StreamResponse:
    principal = await identify(request, gw, cfg)
    out.principal = principal
    raw = await read_body(request, cfg.server.max_body_bytes, cfg.server.body_timeout_seconds)
    body = decode_body(raw)
    out.stream = adapter.is_stream(body, params)
    parsed = parse_request(cfg, adapter, params, raw, body)
    out.model, out.bound = parsed.model_name, parsed.bound
    tier_name, tier = await effective_tier(gw, cfg, principal, out)
    out.tier, out.mode = tier_name, tier.mode
    authorize_model(cfg, tier, parsed.model_name)
    # The client's own headers: a beta flag is a question for the tier even where it would not be forwarded.
    violation = check_fields(adapter.api, parsed.screen, tier, request.query_string, request.headers)
    if violation is not None:  # shadow mode: forwarded all the same, recorded as what enforce would refuse
        out.would_deny, out.rule, out.reason = True, violation.rule, violation.error.message
    parsed = enforce_caps(parsed, tier, out)
    out.bound = parsed.bound
    out.upstream = parsed.model.upstream
    reservation = await reserve(gw, cfg, tier, principal, parsed, out)
    try:
        if out.stream:
            return await proxy_stream(request, gw, parsed, reservation, out)
        return await proxy_json(request, gw, parsed, reservation, out)
    except asyncio.CancelledError:
        # Cancelled (a shutdown past its drain) after the request went upstream: the provider may finish the
        # work all the same, so it is charged like any answer whose usage was lost; before, nothing was spent.
        if out.sent_at is not None and out.measured is None and not out.released:
            await _charge_unanswered(gw, parsed, reservation, out,
                                     ShuttingDown("the gateway shut down before the upstream answered"),
                                     out.sent_at)
            out.decision, out.status = "partial", 503  # charged: counted in reports and reconcile
            out.reason = f"the gateway shut down before the upstream answered; {out.reason}"
        elif reservation is not None and out.measured is None and not out.released:
            await _release(gw, reservation)
        raise
    except BaseException:
        if reservation is not None and out.measured is None and not out.released:
            await _release(gw, reservation)
        raise


# --------------------------------------------------------------------------------------------- identity
def _api_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key") or request.headers.get("x-goog-api-key") or (
        request.query.get("key") if "/v1beta/" in request.path else None)


async def identify(request: web.Request, gw: Gateway, cfg: Config) -> Principal:
    """The caller: a trusted header (behind an authenticating proxy), else an API key.

    The header counts only from a peer inside ``server.trusted_identity_sources``; sent from anywhere else it
    is refused (401 ``untrusted_identity_header``), never ignored: a caller who sends it expects to be
    someone, and must learn that it is not believed rather than be served as the key's owner.
    """
    assert gw.directory is not None
    header = cfg.server.trusted_identity_header
    if header and header in request.headers:
        peer = untrusted_peer(request, cfg.server.trusted_identity_sources)
        if peer is not None:
            raise Unauthenticated(f"the identity header {header!r} is accepted only from the gateway's trusted "
                                  f"proxies, not from {peer}", code="untrusted_identity_header")
    try:
        if header and request.headers.get(header):
            principal = await gw.directory.by_id(request.headers[header].strip())
            if principal is None or not principal.enabled:
                raise Unauthenticated("the identity in the trusted header is not a known principal")
            return replace(principal, source="header")
        key = _api_key(request)
        if not key:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>', 'x-api-key' or "
                                  "'x-goog-api-key'", code="missing_api_key")
        principal = await gw.directory.by_key(key)
    except STORE_ERRORS:
        gw.metrics.store_error("identify")
        raise StoreUnavailable("the key store is unreachable; try again shortly") from None
    if principal is None:
        raise Unauthenticated("invalid API key", code="invalid_api_key")
    return principal


async def read_body(request: web.Request, limit: int, timeout: float = 30.0) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading it whole, and a client that
    takes longer than ``timeout`` seconds to send it (a trickling client must not hold a slot for ever)."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds the limit of {limit}")
    try:
        if request.content.is_eof():  # the whole body is already here: the common case, no timer needed
            data = request.content.read_nowait()
            if len(data) > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return data
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(65536):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from None
    except ConnectionError:
        raise ClientClosed("the client closed the connection before its request body arrived") from None
    return b"".join(chunks)


async def effective_tier(gw: Gateway, cfg: Config, principal: Principal, out: Outcome) -> tuple[str, TierConfig]:
    """The principal's tier, or the tier of its active grant."""
    assert gw.directory is not None
    name = principal.tier
    try:
        grant = await gw.directory.active_grant(principal.id)
    except STORE_ERRORS:
        grant = None  # a store outage must not elevate anyone; the principal's own tier applies
    if grant is not None and grant.tier in cfg.tiers:
        name = grant.tier
        out.grant = grant.id
    tier = cfg.tiers.get(name)
    if tier is None:
        raise Forbidden(f"tier {name!r} is not defined in the policy in force", code="unknown_tier")
    return name, tier


def authorize_model(cfg: Config, tier: TierConfig, model: str) -> None:
    if tier.models != "*" and model not in tier.models:
        raise Forbidden(f"model {model!r} is not available to your tier", code="model_not_allowed",
                        detail={"rule": "model"})


# ------------------------------------------------------------------------------------- per-request caps
def enforce_caps(parsed: ParsedRequest, tier: TierConfig, out: Outcome) -> ParsedRequest:
    """Reject or clamp a request whose bound exceeds the tier's per-request caps."""
    violations = check_caps(parsed.request, parsed.bound, tier, parsed.model)
    if not violations:
        return parsed
    first = violations[0]
    if tier.mode == "shadow":
        out.would_deny, out.rule, out.reason = True, first.cap, first.message()
        return parsed
    if tier.on_exceed == "clamp":
        target = clamp_target(parsed.request, parsed.model, tier)
        if target is not None:
            body = orjson.loads(orjson.dumps(parsed.body))  # the client's body stays intact for the record
            changes = parsed.adapter.rewrite(body, parsed.request, target)
            req = parsed.adapter.parse(body, parsed.path_params).named(parsed.model_name,
                                                                      parsed.request.prompt_tokens)
            bound = admission_bound(req, parsed.model)
            if changes and not check_caps(req, bound, tier, parsed.model):
                out.clamped = changes
                out.rule = ",".join(v.cap for v in violations)
                return replace(parsed, body=body, request=req, bound=bound)
    raise Forbidden(first.message(), code=f"{first.cap}_exceeded", param=None, detail={"rule": first.cap})


# ---------------------------------------------------------------------------------------------- ledger
def budget_amounts(parsed: ParsedRequest, tier: TierConfig, gw: Gateway, principal_id: str = "") -> dict[str, float]:
    """What to hold: the upper bound (strict) or the expected spend, never above the bound (expected).

    The expected spend is learnt per principal and model (:func:`_learn`): learnt across principals, one
    tenant's small requests would lower the holds of another's large ones."""
    b, m = parsed.bound, parsed.model
    if tier.admission == "strict":
        return {"requests": 1, "prompt_tokens": b.prompt_tokens, "output_tokens": b.output_tokens_max,
                "reasoning_tokens": b.reasoning_tokens_max, "generated_tokens": b.generated_tokens_max,
                "flops": b.flops_max, "k_units": b.k_max}
    mean = gw.model_means.get((principal_id, parsed.model_name))
    # Never below a floor: a reference answer per sample (within the cap). A caller who sent many tiny
    # requests must not get its holds driven to nothing before sending large ones.
    floor = b.samples * min(b.output_cap, m.reference_output_tokens)
    g = expected_generated(parsed.request, m, b, max(mean * b.samples, floor) if mean else None)
    return {"requests": 1, "prompt_tokens": b.prompt_tokens, "output_tokens": min(g, b.output_tokens_max),
            "reasoning_tokens": min(g, b.reasoning_tokens_max), "generated_tokens": g,
            "flops": flops(m, b.prompt_tokens, g, b.samples),
            "k_units": min(b.k_max, g / m.reference_output_tokens)}


def budget_holds(tier: TierConfig, principal: Principal, overrides: Mapping[str, float],
                 amounts: Mapping[str, float]) -> list[HoldRequest]:
    """One hold request per scope, in the order principal → org → global."""
    ids = {"principal": principal.id, "org": principal.org, "global": "*"}
    return [HoldRequest(_scope_ref(scope, ids[scope]), specs, amounts)
            for scope, specs in _scoped_specs(tier, tuple(sorted(overrides.items())) if overrides else ())]


_SCOPE_REFS: dict[tuple[str, str], ScopeRef] = {}


def _scope_ref(scope: str, ident: str) -> ScopeRef:
    """One ScopeRef object per scope: the ledger keys its caches by them, and a lookup by the very same
    object skips the dataclass's field-by-field comparison."""
    ref = _SCOPE_REFS.get((scope, ident))
    if ref is None:
        if len(_SCOPE_REFS) > 65536:
            _SCOPE_REFS.clear()
        ref = _SCOPE_REFS[(scope, ident)] = ScopeRef(scope, ident)
    return ref


_SPEC_CACHE: dict[tuple[int, tuple[tuple[str, float], ...]],
                  tuple[TierConfig, list[tuple[str, tuple[BudgetSpec, ...]]]]] = {}


def _scoped_specs(tier: TierConfig, overrides: tuple[tuple[str, float], ...]
                  ) -> list[tuple[str, tuple[BudgetSpec, ...]]]:
    """A tier's budgets as ledger specs grouped by scope, built once per tier and override set.

    Specs are immutable and validated on creation; building them per request was a measurable cost.
    """
    key = (id(tier), overrides)
    hit = _SPEC_CACHE.get(key)
    if hit is not None and hit[0] is tier:  # identity check: an id can be reused after a reload
        return hit[1]
    limits = dict(overrides)
    by_scope: dict[str, list[BudgetSpec]] = {}
    for b in tier.budgets:
        by_scope.setdefault(b.scope, []).append(BudgetSpec.from_config(b, limits.get(b.label)))
    out: list[tuple[str, tuple[BudgetSpec, ...]]] = [
        (scope, tuple(by_scope[scope])) for scope in ("principal", "org", "global") if scope in by_scope]
    if len(_SPEC_CACHE) > 4096:  # tiers are replaced on reload; keep the cache from growing for ever
        _SPEC_CACHE.clear()
    _SPEC_CACHE[key] = (tier, out)
    return out


def lease_seconds(gw: Gateway, cfg: Config, parsed: ParsedRequest) -> float:
    assert gw.upstreams is not None
    target = gw.upstreams.get(parsed.model.upstream)
    return float(target.config.total_timeout_seconds) + cfg.store.lease_grace_seconds


async def reserve(gw: Gateway, cfg: Config, tier: TierConfig, principal: Principal, parsed: ParsedRequest,
                  out: Outcome) -> Reservation | None:
    """Hold the admission amount on every budget; 429 on refusal, the tier's on_store_error on outage."""
    if not tier.budgets:
        return None
    assert gw.ledger is not None and gw.directory is not None
    t0 = time.perf_counter()
    holds: list[HoldRequest] = []
    try:
        overrides = await gw.directory.overrides(principal.id)
        holds = budget_holds(tier, principal, overrides, budget_amounts(parsed, tier, gw, principal.id))
        reservation = await gw.ledger.reserve(out.request_id, holds, lease_seconds(gw, cfg, parsed))
        gw.metrics.store_latency("reserve", time.perf_counter() - t0)
        gw.store_ok = True
        return reservation
    except BudgetRefused as refused:
        r = refused.refusal
        if tier.mode == "shadow":
            # Served anyway; the actual usage is still posted (a settle without a hold), so the ledger
            # shows what enforcing this policy would have meant.
            out.would_deny, out.rule = True, r.label
            out.reason = f"budget {r.label} would refuse"
            return Reservation(out.request_id, tuple(holds))
        raise BudgetExceeded(
            f"budget {r.label} exhausted: {r.remaining:.6g} of {r.limit:.6g} {r.metric} remain in this window; "
            f"retry after {r.retry_after} s",
            code="budget_exceeded",
            headers={"Retry-After": str(r.retry_after),
                     "RateLimit-Policy": f'"{r.label}";q={_q(r.limit)}',
                     "RateLimit": f'"{r.label}";r={_q(max(r.remaining, 0))};t={r.retry_after}'},
            detail={"rule": r.label}) from None
    except STORE_ERRORS as exc:
        gw.metrics.store_error("reserve")
        gw.store_ok = False
        if tier.on_store_error == "allow" and gw.spool is not None:
            out.store = "spooled"
            log.warning("store unreachable (%s); request %s admitted unmetered into the spool",
                        type(exc).__name__, out.request_id)
            return None
        if tier.on_store_error == "allow":
            out.store = "unmetered"
            return None
        if holds and gw.spool is not None:
            # The reserve may have reached Redis before the error, and its rollback may not have: void it
            # when the store is back, or its lease would be charged for a request that was refused.
            await asyncio.to_thread(gw.spool.append_release, out.request_id, holds)
        raise StoreUnavailable("the budget store is unreachable; request refused by policy "
                               "(on_store_error: deny)") from None


def _q(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.6g}"


async def _release(gw: Gateway, reservation: Reservation) -> None:
    assert gw.ledger is not None
    try:
        await gw.ledger.release(reservation)
    except STORE_ERRORS:
        gw.metrics.store_error("release")
        # Void it when the store is back; without a spool, the lease expires and is charged.
        if gw.spool is not None:
            await asyncio.to_thread(gw.spool.append_release, reservation.request_id, reservation.holds)


def post_usage(gw: Gateway, parsed: ParsedRequest, reservation: Reservation | None, out: Outcome,
               measured: Measured) -> bool:
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
    if reservation is None or gw.ledger is None:
        return False
    actual = _actual(measured)
    t0 = time.perf_counter()
    gw.settling += 1  # counted down by _settled when Redis answers, or below when nothing was sent
    sent = False
    try:
        sent = gw.ledger.post_settle(reservation, actual,
                                     lambda error: _settled(gw, reservation, out, actual, error, t0))
        if not sent:
            return False
    except ValueError as exc:
        _cannot_post(gw, out, exc)
    finally:
        if not sent:
            gw.settling -= 1
    _learn(gw, parsed, measured, out)
    return True


def _settled(gw: Gateway, reservation: Reservation, out: Outcome, actual: dict[str, float],
             error: BaseException | None, t0: float) -> None:
    """Redis has answered a settle posted by :func:`post_usage`."""
    gw.settling -= 1
    if error is None:
        gw.metrics.store_latency("settle", time.perf_counter() - t0)
    else:
        gw.detach(_settle_failed(gw, reservation, out, actual, error))


async def _settle_failed(gw: Gateway, reservation: Reservation, out: Outcome, actual: dict[str, float],
                         error: BaseException) -> None:
    """A settle posted after the answer failed: its usage goes to the spool, as a failed settle's always
    does. If the request's audit record is written already, a second record of the same request id says
    where the usage went (``store``: ``spooled``, or ``unsettled`` when not even the spool took it); if not,
    that record will say it. Reports and reconcile count a request id's usage once."""
    if isinstance(error, NoScriptError) and gw.ledger is not None:
        try:  # Redis lost the script (flushed, or a load refused at connect): an awaited settle loads it
            await gw.ledger.settle(reservation, actual, report=False)
            return
        except STORE_ERRORS as exc:
            error = exc
    await _spool_settle(gw, reservation, out, actual, error)
    if not out.recorded or gw.audit is None or out.config is None:
        return
    try:
        await gw.audit.write(audit_record(gw, out.config, out, time.perf_counter() - out.started))
    except Exception:  # counted in the writer's write_errors
        log.exception("the second audit record of request %s could not be written", out.request_id)


async def settle_to_the_end(gw: Gateway, parsed: ParsedRequest, reservation: Reservation | None, out: Outcome,
                            measured: Measured) -> None:
    """:func:`settle`, which a cancellation (a shutdown's) cannot cut short: cancelled part-way, it runs
    again to its end in a task of its own while the cancellation goes on. A settle is idempotent per request
    id, so one that had already reached Redis counts once; so is a spooled line, replayed."""
    try:
        await settle(gw, parsed, reservation, out, measured)
    except asyncio.CancelledError:
        gw.detach(settle(gw, parsed, reservation, out, measured, again=True))
        raise


async def settle(gw: Gateway, parsed: ParsedRequest, reservation: Reservation | None, out: Outcome,
                 measured: Measured, *, again: bool = False) -> None:
    """Post the actual usage and wait for it (idempotent per request id); spool it when the store is away.
    ``again``: a rerun of a settle that was cut short (the model's running mean has this request already)."""
    actual = _actual(measured)
    if not again:
        _learn(gw, parsed, measured, out)
    if reservation is None:
        if out.store == "spooled" and gw.spool is not None and out.principal is not None and out.tier:
            tier = gw.config.tiers.get(out.tier)
            if tier is not None:
                holds = budget_holds(tier, out.principal, {}, actual)
                if not await asyncio.to_thread(gw.spool.append, out.request_id, holds, actual, _meta(out)):
                    out.store = "unmetered"
        return
    assert gw.ledger is not None
    t0 = time.perf_counter()
    try:
        await gw.ledger.settle(reservation, actual, report=False)
        gw.metrics.store_latency("settle", time.perf_counter() - t0)
    except ValueError as exc:  # nothing was sent
        _cannot_post(gw, out, exc)
    except STORE_ERRORS as exc:
        await _spool_settle(gw, reservation, out, actual, exc)


async def _spool_settle(gw: Gateway, reservation: Reservation, out: Outcome, actual: dict[str, float],
                        error: BaseException) -> None:
    """A settle that failed goes to the spool (replayed when the store is back; idempotent)."""
    gw.metrics.store_error("settle")
    log.warning("settle of request %s failed: %r", out.request_id, error)
    if gw.spool is not None and await asyncio.to_thread(
            gw.spool.append_settle, out.request_id, reservation, actual, _meta(out)):
        out.store = "spooled"
        if out.decision in ("allowed", "clamped"):
            out.decision = "spooled"
        out.reason = out.reason or "the settle failed (store unreachable); the usage is spooled for replay"
    else:
        _unsettled(gw, out, "the settle failed and the spool did not take it")


def _cannot_post(gw: Gateway, out: Outcome, exc: ValueError) -> None:
    """Usage the ledger cannot post (not finite) is no reason to withhold an answer the upstream has
    given: the hold stays until its lease expires, and the record says so."""
    log.error("request %s: usage the ledger cannot post (%s)", out.request_id, exc)
    _unsettled(gw, out, f"usage the ledger cannot post ({exc})")


def _unsettled(gw: Gateway, out: Outcome, why: str) -> None:
    out.store = "unsettled"
    out.reason = out.reason or (f"{why}; the hold stays until its lease expires "
                                f"(lease_expiry: {gw.config.store.lease_expiry})")


def _actual(measured: Measured) -> dict[str, float]:
    u = measured.usage
    return {"requests": 1, "prompt_tokens": u.prompt_tokens, "output_tokens": u.output_tokens,
            "reasoning_tokens": u.reasoning_tokens, "generated_tokens": u.generated_tokens,
            "flops": measured.flops, "k_units": measured.k}


def _learn(gw: Gateway, parsed: ParsedRequest, measured: Measured, out: Outcome) -> None:
    """The model's running mean of generated tokens per sample (what ``admission: expected`` holds)."""
    u = measured.usage
    if u.samples > 0 and u.source == "upstream" and out.principal is not None:
        per_sample = u.generated_tokens / u.samples
        key = (out.principal.id, parsed.model_name)
        means = gw.model_means
        prev = means.get(key)
        if prev is None and len(means) > 100_000:  # bounded: a mean is relearnt after a few requests
            means.clear()
        means[key] = per_sample if prev is None else 0.9 * prev + 0.1 * per_sample


def _meta(out: Outcome) -> dict[str, Any]:
    return {"principal": out.principal.id if out.principal else None,
            "org": out.principal.org if out.principal else None, "tier": out.tier, "model": out.model}


# ----------------------------------------------------------------------------------------- forwarding
def _upstream_request(request: web.Request, gw: Gateway, parsed: ParsedRequest,
                      out: Outcome) -> tuple[up.Target, str, bytes, Any, bool]:
    assert gw.upstreams is not None
    target = gw.upstreams.get(parsed.model.upstream)
    upstream_model = parsed.model.upstream_model or parsed.model_name
    body = dict(parsed.body)  # shallow: the adapters copy any nested object they change
    # The cap the bound assumed goes upstream in every request; a client's larger cap is a real clamp.
    clamps = parsed.adapter.write_bound(body, parsed.request, parsed.bound)
    if clamps:
        out.clamped = [*out.clamped, *clamps]
    client_wants_usage = parsed.adapter.prepare_upstream(body, upstream_model, out.stream)
    path = parsed.adapter.upstream_url_path(upstream_model, parsed.path_params, _query_without_key(request))
    headers = up.request_headers(target, parsed.adapter.shape, request.headers, out.request_id)
    return target, path, orjson.dumps(body), headers, client_wants_usage


def _query_without_key(request: web.Request) -> str:
    if not request.query_string:
        return ""
    from urllib.parse import urlencode

    return urlencode([(k, v) for k, v in request.query.items() if k != "key"])


def _kgate_headers(out: Outcome, reservation: Reservation | None) -> dict[str, str]:
    h = {"x-kgate-request-id": out.request_id}
    if out.bound is not None:
        h["x-kgate-k-max"] = f"{out.bound.k_max:.6g}"
    if out.clamped:
        h["x-kgate-clamped"] = ", ".join(out.clamped)
    if reservation is not None:
        tight = reservation.tightest()
        if tight is not None:
            reset = max(0, int(tight.reset_at - time.time() + 0.999))
            label = tight.budget.label
            h["RateLimit-Policy"] = f'"{label}";q={_q(tight.limit)}'
            h["RateLimit"] = f'"{label}";r={_q(tight.remaining)};t={reset}'
    return h


async def proxy_json(request: web.Request, gw: Gateway, parsed: ParsedRequest, reservation: Reservation | None,
                     out: Outcome) -> web.Response:
    assert gw.session is not None
    target, path, payload, headers, _ = _upstream_request(request, gw, parsed, out)
    t0 = time.perf_counter()
    resp = await _send_charging(gw, parsed, reservation, out, target, path, payload, headers, t0)
    out.first_byte_seconds = time.perf_counter() - t0
    try:
        data = await up.read_body(target, resp)
    except GatewayError as err:
        if resp.status < 400:  # the upstream was answering: it did the work, its usage is lost with the body
            await _charge_unanswered(gw, parsed, reservation, out, err, t0)
        raise _counted(gw, target.name, err) from None
    finally:
        resp.release()
    out.upstream_seconds = time.perf_counter() - t0
    if resp.status >= 400:
        return await _upstream_failure(gw, reservation, out, resp.status, data, resp.headers, parsed)
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        # A success the gateway cannot read (SSE for a unary call, another encoding) is work done all the
        # same: charged like any answer whose usage was lost, never released.
        bad = UpstreamError(f"upstream {target.name!r} sent a malformed response", code="upstream_malformed")
        await _charge_unanswered(gw, parsed, reservation, out, bad, t0)
        raise _counted(gw, target.name, bad) from None
    usage = _chargeable(gw, parsed, out, parsed.adapter.usage_from_json(doc, parsed.request))
    measured = measure(usage, parsed.model, parsed.bound)
    out.measured = measured
    if not post_usage(gw, parsed, reservation, out, measured):
        await settle_to_the_end(gw, parsed, reservation, out, measured)
    out.decision = _decision(out)
    out.status = resp.status
    headers = {**up.response_headers(resp.headers), **_kgate_headers(out, reservation),
               "x-kgate-k": f"{measured.k:.6g}", "x-kgate-flops": f"{measured.flops:.6g}"}
    await record(gw, out)
    return web.Response(status=resp.status, body=_public_model(parsed, data), headers=headers)


async def _upstream_failure(gw: Gateway, reservation: Reservation | None, out: Outcome, status: int, data: bytes,
                            headers: Mapping[str, str], parsed: ParsedRequest) -> web.Response:
    """An upstream error answer: nothing was generated, so nothing is charged."""
    await _charge_nothing(gw, reservation, out)
    out.measured = None
    gw.metrics.upstream_error(out.upstream or "", f"http_{status}")
    if status in (401, 403, 407):
        # The upstream refused the gateway's own credentials: not the caller's doing, and a provider's message
        # may quote the key it was sent (OpenAI quotes part of it), so that body never reaches the client.
        raise UpstreamError(f"upstream {out.upstream!r} refused the gateway's credentials ({status})",
                            code="upstream_auth")
    if status < 500:
        # The provider's own answer about the request (its API's shape already): pass it on, minus our key.
        out.decision, out.status, out.reason = "failed", status, f"upstream answered {status}"
        body = data[:1 << 20]
        secret = gw.upstreams.get(out.upstream).auth_value if gw.upstreams and out.upstream else None
        if secret:
            body = body.replace(secret.encode(), b"[redacted]")
        await record(gw, out)
        return web.Response(status=status, body=body,
                            headers={**up.response_headers(headers), "x-kgate-request-id": out.request_id})
    raise UpstreamError(f"upstream {out.upstream!r} answered {status}", code=f"upstream_{status}")


async def _send_charging(gw: Gateway, parsed: ParsedRequest, reservation: Reservation | None, out: Outcome,
                         target: up.Target, path: str, payload: bytes, headers: Any, t0: float) -> up.Response:
    """Send the request upstream (failures counted by kind); a timeout after the request left charges it as
    work done (the upstream may have generated the whole answer, which the client then never saw): see
    :func:`_charge_unanswered`."""
    assert gw.session is not None
    out.sent_at = t0
    try:
        return await up.send(gw.session, target, path, payload, headers)
    except UpstreamTimeout as err:
        if err.code != "upstream_connect_timeout":
            await _charge_unanswered(gw, parsed, reservation, out, err, t0)
        raise _counted(gw, target.name, err) from None
    except GatewayError as err:
        raise _counted(gw, target.name, err) from None


async def _charge_unanswered(gw: Gateway, parsed: ParsedRequest, reservation: Reservation | None, out: Outcome,
                             err: GatewayError, t0: float) -> None:
    """The request reached the upstream but no usage came back (a timeout, a body cut or refused as too
    large): a provider that finishes its work after kgate gave up still spent it. Charged by the tier's
    ``on_missing_usage`` rule (by default the admission bound), audited with the reason."""
    out.upstream_seconds = time.perf_counter() - t0
    seen = Usage(samples=parsed.bound.samples, prompt_tokens=parsed.bound.prompt_tokens, reasoning_tokens=0,
                 output_tokens=0, source="counted")
    measured = measure(_chargeable(gw, parsed, out, seen), parsed.model, parsed.bound)
    out.measured = measured
    await settle_to_the_end(gw, parsed, reservation, out, measured)
    out.reason = f"the upstream's usage never came; charged {_charge_note(measured)}"


def _chargeable(gw: Gateway, parsed: ParsedRequest, out: Outcome, usage: Usage) -> Usage:
    """The usage to charge: the provider's own, else what the tier's ``on_missing_usage`` says — by default
    the admission bound, since hidden reasoning leaves no trace in what was streamed or returned."""
    if usage.source == "upstream":
        return usage
    tier = out.config.tiers.get(out.tier) if out.config is not None and out.tier else None
    if out.upstream:
        gw.metrics.upstream_error(out.upstream, "no_usage")
    if tier is None or tier.on_missing_usage == "bound":
        return usage_at_bound(parsed.bound, usage)
    return usage


def _charge_note(measured: Measured) -> str:
    return "the admission bound" if measured.usage.source == "bound" else \
        f"{measured.usage.generated_tokens} generated tokens ({measured.usage.source})"


def _counted(gw: Gateway, upstream: str, err: GatewayError) -> GatewayError:
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


async def _charge_nothing(gw: Gateway, reservation: Reservation | None, out: Outcome) -> None:
    if reservation is not None and not out.released:
        out.released = True
        await _release(gw, reservation)


async def proxy_stream(request: web.Request, gw: Gateway, parsed: ParsedRequest, reservation: Reservation | None,
                       out: Outcome) -> web.StreamResponse:
    assert gw.session is not None
    target, path, payload, headers, wants_usage = _upstream_request(request, gw, parsed, out)
    t0 = time.perf_counter()
    resp = await _send_charging(gw, parsed, reservation, out, target, path, payload, headers, t0)
    if resp.status >= 400:
        try:
            data = await up.read_body(target, resp)
        except GatewayError:
            data = b""
        finally:
            resp.release()
        out.upstream_seconds = time.perf_counter() - t0
        return await _upstream_failure(gw, reservation, out, resp.status, data, resp.headers, parsed)
    meter = parsed.adapter.stream_meter(parsed.request, wants_usage)
    response = web.StreamResponse(status=resp.status, headers={
        **up.response_headers(resp.headers), **_kgate_headers(out, reservation),
        "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    failure: GatewayError | None = None
    client_gone = False
    named = renamer(parsed.model_name, parsed.model)
    rename = named.stream() if named is not None else None
    write_timeout = out.config.server.write_timeout_seconds if out.config is not None else 30.0
    transport: asyncio.WriteTransport | None = None
    try:
        transport = await _prepare(response, request)
        if transport is None:
            client_gone = True
        else:
            async for chunk in resp.iter_any():
                if out.first_byte_seconds is None:
                    out.first_byte_seconds = time.perf_counter() - t0
                data = meter.feed(chunk)
                if data and not await _write(response, transport, rename(data) if rename else data, write_timeout):
                    client_gone = True
                    break
            else:
                tail = meter.close()
                if tail and not await _write(response, transport, rename(tail) if rename else tail, write_timeout):
                    client_gone = True
        if client_gone:
            # Keep reading what the upstream generates until its usage arrives: what hidden reasoning the
            # client no longer waits for was spent all the same (bounded; past the bound, the bound is charged).
            await _drain(target, resp, meter)
    except HttpTimeout:
        failure = UpstreamTimeout(f"upstream {target.name!r} stalled mid-stream")
    except HttpBroken:
        failure = UpstreamError(f"upstream {target.name!r} broke off the stream")
    except asyncio.CancelledError:
        resp.close()
        # Not shielded: a second cancellation here reruns the settle in a task of its own (settle_to_the_end).
        await _settle_stream(gw, parsed, reservation, out, meter, t0, "client disconnected")
        raise
    except Exception:  # a bug of ours mid-stream: the client still gets an error event and the end
        log.exception("internal error while streaming request %s", out.request_id)
        failure = InternalError("internal error while streaming; you are charged only what was generated")
    finally:
        if failure is not None or (client_gone and not meter.finished):
            resp.close()  # cancels the upstream generation: nothing more is spent for a gone client
        else:
            resp.release()
    if not meter.finished and failure is None and not client_gone:
        failure = UpstreamError(f"upstream {target.name!r} ended the stream early")
    await _settle_stream(gw, parsed, reservation, out, meter, t0,
                         "client disconnected" if client_gone else (failure.message if failure else ""))
    if failure is not None:
        if isinstance(failure, (UpstreamError, UpstreamTimeout)):  # not a bug of ours
            _counted(gw, out.upstream or "", failure)
        if not client_gone and transport is not None:
            client_gone = not await _write(response, transport, render_stream_error(failure, parsed.adapter.api),
                                           write_timeout)
    if meter.error is not None:
        out.reason = out.reason or "upstream sent an error event"
    if not client_gone:
        await record(gw, out)
        try:
            async with asyncio.timeout(write_timeout):
                await response.write_eof()
        except (OSError, TimeoutError):
            if transport is not None:
                transport.abort()
    return response


def _public_model(parsed: ParsedRequest, data: bytes) -> bytes:
    r = renamer(parsed.model_name, parsed.model)
    return r.body(data) if r is not None else data


# Below this much unsent data a write cannot block on the client: no timer is needed (the common case).
_WRITE_BUFFER_SAFE = 1 << 16


async def _prepare(response: web.StreamResponse, request: web.Request) -> asyncio.WriteTransport | None:
    """Send the response's head; the connection's transport, or None when the client has gone away."""
    try:
        await response.prepare(request)
    except (ConnectionError, OSError):
        return None
    # Not an isinstance check: uvloop's transports are not asyncio.Transport subclasses.
    return cast(asyncio.WriteTransport, request.transport)


async def _write(response: web.StreamResponse, transport: asyncio.WriteTransport, data: bytes,
                 timeout: float) -> bool:
    """Send to the client; False when the client has gone away, or has not taken what was sent for
    ``timeout`` seconds (a client that stops reading must not pin the request: its connection is dropped
    and the request is treated as a disconnect)."""
    try:
        if transport.get_write_buffer_size() + len(data) <= _WRITE_BUFFER_SAFE:
            await response.write(data)
            return True
        try:
            async with asyncio.timeout(timeout):
                await response.write(data)
        except TimeoutError:
            transport.abort()
            return False
        return True
    except (ConnectionError, OSError):  # reset, broken pipe, or a transport that is closing
        return False


async def _drain(target: up.Target, resp: up.Response, meter: Any) -> None:
    """Read the rest of a stream whose client has gone, for its usage: until the stream's end, or the
    upstream's ``disconnect_drain_seconds`` / ``disconnect_drain_bytes``, whichever comes first."""
    limit, seconds = target.config.disconnect_drain_bytes, target.config.disconnect_drain_seconds
    size = 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in resp.iter_any():
                meter.feed(chunk)
                size += len(chunk)
                if meter.finished or size > limit:
                    return
            meter.close()
    except (TimeoutError, HttpTimeout, HttpBroken):
        pass  # the usage did not come: the tier's on_missing_usage rule charges the request


async def _settle_stream(gw: Gateway, parsed: ParsedRequest, reservation: Reservation | None, out: Outcome,
                         meter: Any, t0: float, problem: str) -> None:
    if out.measured is not None:
        return
    out.upstream_seconds = time.perf_counter() - t0
    usage: Usage = _chargeable(gw, parsed, out, meter.usage())
    measured = measure(usage, parsed.model, parsed.bound)
    out.measured = measured
    # Waited for, unlike a JSON answer's (post_usage): settling after a stream's last bytes cost about 3% of
    # the streaming throughput at 32 connections (bench/gateway_bench.py, side by side), for 0.2 ms on an
    # answer that takes as long as its generation.
    await settle_to_the_end(gw, parsed, reservation, out, measured)
    out.status = 200
    if problem or meter.error is not None or not meter.finished:
        out.decision = "partial"
        out.reason = problem or "stream ended without its final event"
    else:
        out.decision = _decision(out)
    if usage.source != "upstream":
        note = f"no usage from the upstream; charged {_charge_note(measured)}"
        out.reason = f"{out.reason}; {note}" if out.reason else note


def _decision(out: Outcome) -> str:
    if out.store == "spooled":
        return "spooled"
    return "clamped" if out.clamped else "allowed"


# ---------------------------------------------------------------------------------------- error & finish
def _error_response(gw: Gateway, out: Outcome, err: GatewayError, shape: str) -> web.Response:
    out.status = err.status
    # A failure after the upstream did its work keeps the note on what it was charged (_charge_unanswered).
    out.reason = f"{err.message}; {out.reason}" if out.measured is not None and out.reason else err.message
    out.rule = err.detail.get("rule", out.rule)
    out.decision = "denied" if err.status in (401, 403, 413, 429) or (
        err.status == 503 and isinstance(err, StoreUnavailable)) or isinstance(err, (BadRequest, NotFound)) \
        else "failed"
    if out.measured is not None and out.decision == "failed":
        out.decision = "partial"  # charged (the upstream did work the client never saw): metered in reports
    gw.metrics.observe_error(err)
    headers = {**err.headers, "x-kgate-request-id": out.request_id}
    return web.json_response(render(err, shape), status=err.status, headers=headers,  # type: ignore[arg-type]
                             dumps=lambda o: orjson.dumps(o).decode())


def _finish(gw: Gateway, cfg: Config, out: Outcome) -> None:
    """Audit record and metrics for every request, whatever happened."""
    elapsed = time.perf_counter() - out.started
    model = out.model if out.model in cfg.models else "unknown"
    tier = out.tier or "none"
    evaluated = cfg.models[model].evaluated_max_k if model in cfg.models else None
    gw.metrics.observe_request(model=model, tier=tier, api=out.api, decision=out.decision, usage=out.measured,
                               overhead_s=elapsed - out.upstream_seconds,
                               evaluated_max_k=evaluated, would_deny=out.would_deny, rule=out.rule)
    if out.upstream_seconds and out.upstream:
        gw.metrics.observe_upstream(out.upstream, out.upstream_seconds, first_byte_s=out.first_byte_seconds)
    if gw.audit is not None and not out.recorded:
        out.recorded = True
        gw.audit.write_nowait(audit_record(gw, cfg, out, elapsed))


async def record(gw: Gateway, out: Outcome) -> None:
    """Write the audit record and wait until the OS has it, before the response's last byte leaves: a
    client that saw an answer (a complete one, or an error) can count on its record surviving a crash."""
    if gw.audit is None or out.recorded or out.config is None:
        return
    out.recorded = True
    try:
        await gw.audit.write(audit_record(gw, out.config, out, time.perf_counter() - out.started))
    except Exception:  # counted in the writer's write_errors; the client still gets its answer
        log.exception("audit record of request %s could not be written", out.request_id)


def _upstream_model(cfg: Config, model: str | None) -> str | None:
    m = cfg.models.get(model) if model else None
    return None if m is None else (m.upstream_model or model)


def audit_record(gw: Gateway, cfg: Config, out: Outcome, elapsed: float) -> dict[str, Any]:
    p = out.principal
    return {
        "ts": time.time(),
        "request_id": out.request_id,
        "replica": gw.replica,
        "principal": p.id if p else None,
        "org": p.org if p else None,
        "key_id": p.key_id if p else None,
        "tier": out.tier,
        "grant": out.grant,
        "model": out.model if out.model in cfg.models else None,
        "upstream": out.upstream,
        "upstream_model": _upstream_model(cfg, out.model),
        "api": out.api,
        "stream": out.stream,
        "bound": out.bound.as_dict() if out.bound else None,
        "usage": {**out.measured.as_dict(), "overrun": out.measured.overrun} if out.measured else None,
        "decision": out.decision,
        "reason": out.reason,
        "rule": out.rule,
        "clamped": out.clamped,
        "status": out.status,
        "latency_ms": round(elapsed * 1000, 3),
        "policy_sha256": cfg.version,
        "mode": out.mode,
        "would_deny": out.would_deny,
        "store": out.store,
    }
