"""Admitting a request (docs/design.md §4 steps 1-9): identify → parse → bound → tier → model → fields →
per-request caps (reject or clamp) → reserve → the request to forward.

Every refusal is a :class:`~gateway.engine.errors.GatewayError`; :func:`admit` raises it with the
:class:`~gateway.engine.request.Facts` learnt so far attached, for the record.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from urllib.parse import urlencode

import orjson

from gateway.adapters.fields import check_fields
from gateway.engine.budgets import reserve
from gateway.engine.compute import admission_bound, check_caps, clamp_target
from gateway.engine.errors import Forbidden
from gateway.engine.identity import (
    authorize_model,
    effective_tier,
    effective_tier_now,
    evaluation_run,
    evaluation_run_now,
    identify,
    identify_now,
)
from gateway.engine.metering import ParsedRequest, decode_body, parse_request
from gateway.engine.request import Admission, Call, Ending, Facts, Forward
from gateway.engine.settlement import release
from gateway.engine.state import Gateway
from gateway.ledger.errors import StoreError
from gateway.policy.config import TierConfig

BodyReader = Callable[[], Awaitable[bytes]]
log = logging.getLogger("kgate.engine")


async def admit(gw: Gateway, facts: Facts, call: Call, read_body: BodyReader | None) -> Admission:
    """Admit ``call`` or raise the error that refuses it; ``facts`` is filled in stage by stage."""
    cfg = facts.config
    # Each lookup of the caller is answered from the directory's cache without a coroutine when it can be
    # (the ``*_now`` functions; ``...``: it cannot), else awaited: a coroutine per lookup was a measurable
    # part of every request.
    principal = identify_now(gw, cfg, call)
    if principal is ...:
        principal = await identify(gw, cfg, call)
    facts.principal = principal
    run = evaluation_run_now(gw, principal)
    facts.eval = run if run is not ... else await evaluation_run(gw, principal)
    raw = call.body if call.body is not None or read_body is None else await read_body()
    assert raw is not None
    body = call.doc if call.doc is not None else decode_body(raw)
    adapter = call.adapter
    assert adapter is not None, "a model call names its API's adapter"
    facts.stream = adapter.is_stream(body, call.params)
    parsed = parse_request(cfg, adapter, call.params, raw, body)
    facts.model, facts.bound = parsed.model_name, parsed.bound
    found = effective_tier_now(gw, cfg, principal, facts)
    facts.tier, tier = found if found is not ... else await effective_tier(gw, cfg, principal, facts)
    facts.mode = tier.mode
    authorize_model(tier, parsed.model_name)
    # The client's own headers: a beta flag is a question for the tier even where it would not be forwarded.
    violation = check_fields(adapter.api, parsed.screen, tier, call.query_string, call.headers)
    if violation is not None:  # shadow mode: forwarded all the same, recorded as what enforce would refuse
        facts.would_deny, facts.rule, facts.reason = True, violation.rule, violation.error.message
    parsed = enforce_caps(parsed, tier, facts)
    facts.bound = parsed.bound
    facts.upstream = parsed.model.upstream
    if gw.upstreams is not None:  # an upstream the transport cannot reach is refused before anything is held
        gw.upstreams.get(facts.upstream)
    reservation = await reserve(gw, facts, tier, parsed)
    if facts.eval is not None:
        await track_evaluated(gw, facts)
    ending = Ending(reason=facts.reason, rule=facts.rule, store=facts.store)
    adm = Admission(facts, tier, parsed, reservation, _NO_FORWARD, ending)
    try:
        adm.forward = forward(parsed, facts, call)
    except BaseException:
        await release(gw, adm)
        raise
    return adm


async def track_evaluated(gw: Gateway, facts: Facts) -> None:
    """Note a request of an evaluation run as in flight until its record is written, so that the run's
    certificate waits for it (a store failure only shortens that wait: it is logged, never refused)."""
    if gw.evals is None or facts.upstream is None:
        return
    cfg = facts.config
    up = cfg.upstreams.get(facts.upstream)
    deadline = (up.total_timeout_seconds if up else 600.0) + cfg.store.lease_grace_seconds
    try:
        await gw.evals.admitted(facts.eval or "", facts.request_id, deadline)
    except StoreError:
        log.warning("evaluation run %s: request %s could not be noted as in flight", facts.eval,
                    facts.request_id)


def enforce_caps(parsed: ParsedRequest, tier: TierConfig, facts: Facts) -> ParsedRequest:
    """Reject or clamp a request whose bound exceeds the tier's per-request caps."""
    violations = check_caps(parsed.request, parsed.bound, tier, parsed.model)
    if not violations:
        return parsed
    first = violations[0]
    if tier.mode == "shadow":
        facts.would_deny, facts.rule, facts.reason = True, first.cap, first.message()
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
                facts.clamped = changes
                facts.rule = ",".join(v.cap for v in violations)
                return replace(parsed, body=body, request=req, bound=bound)
    raise Forbidden(first.message(), code=f"{first.cap}_exceeded", param=None, detail={"rule": first.cap})


def forward(parsed: ParsedRequest, facts: Facts, call: Call) -> Forward:
    """The request to send upstream: the bound's caps written into the body (a client's larger cap is a real
    clamp, noted in ``facts.clamped``), the upstream's model name, the client's query minus its key."""
    upstream_model = parsed.model.upstream_model or parsed.model_name
    body = dict(parsed.body)  # shallow: the adapters copy any nested object they change
    clamps = parsed.adapter.write_bound(body, parsed.request, parsed.bound)
    if clamps:
        facts.clamped = [*facts.clamped, *clamps]
    wants_usage = parsed.adapter.prepare_upstream(body, upstream_model, facts.stream)
    query = urlencode([(k, v) for k, v in call.query.items() if k != "key"]) if call.query_string else ""
    path = parsed.adapter.upstream_url_path(upstream_model, parsed.path_params, query)
    return Forward(parsed.model.upstream, path, orjson.dumps(body), wants_usage)


_NO_FORWARD = Forward("", "", b"", False)
