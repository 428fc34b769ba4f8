"""Evaluation-run operations, shared by the admin API and ``kgate eval`` (docs/design.md §14).

``start`` opens a run; ``finish`` closes it (requests are no longer tagged), waits for the run's requests
still in flight to be recorded, and ``certify`` computes and signs the certificate from the audit log.
Each change is an audit record (``decision: admin``); the start and finish records carry the run's id
(``eval``), so the certificate's chain segments begin and end with them where the operator's own
process writes to the same audit directory.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import orjson

from gateway.engine.errors import BadRequest, Conflict, NotFound
from gateway.evals.runs import EvalRun, EvalRuns
from gateway.evals.signing import SigningKey
from gateway.proxy.context import Gateway

# Each replica's cached lookup of a principal's open run lives this long (gateway.policy.directory):
# after start or finish, waiting it out means every replica has seen the change.
PROPAGATION_SECONDS = 1.0


def _runs(gw: Gateway) -> EvalRuns:
    if gw.evals is None:
        raise BadRequest("evaluation runs need the store")
    return gw.evals


async def _record(gw: Gateway, action: str, actor: str, run: EvalRun, *, tagged: bool, **extra: Any) -> None:
    if gw.audit is None:
        return
    rec: dict[str, Any] = {"ts": time.time(), "request_id": None, "replica": gw.replica, "decision": "admin",
                           "reason": action, "actor": actor, "policy_sha256": gw.config.version,
                           "admin": {**run.as_dict(), **extra}}
    if tagged:
        rec["eval"] = run.id
    await gw.audit.write(rec)


async def start(gw: Gateway, actor: str, principal: Any, label: Any, models: Any, key_id: Any = None,
                *, settle: bool = True) -> dict[str, Any]:
    """Open a run for a known principal (and optionally one of its keys) over named models."""
    from gateway.admin.ops import check_id, check_text

    pid = check_id(principal, "principal")
    text = check_text(label, "label", 256)
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise BadRequest("'models' must be a non-empty list of the policy's model names", param="models")
    unknown = [m for m in models if m not in gw.config.models]
    if unknown:
        raise BadRequest(f"unknown model(s) {', '.join(unknown)}; the policy serves "
                         f"{', '.join(sorted(gw.config.models))}", param="models")
    assert gw.directory is not None
    if await gw.directory.by_id(pid) is None:
        raise NotFound(f"unknown principal {pid!r}")
    kid = check_id(key_id, "key_id") if key_id else None
    if kid is not None and not kid.startswith("sha256:"):
        known = {k["key_id"] for k in await gw.directory.list_keys(pid) if not k["revoked"]}
        if kid not in known:
            raise NotFound(f"principal {pid!r} has no active key {kid!r}")
    run = await _runs(gw).start(pid, text, sorted(set(models)), actor, kid)
    await _record(gw, "eval.start", actor, run, tagged=True)
    if settle:  # every replica tags the principal's requests once this returns
        await _sleep(PROPAGATION_SECONDS)
    return {**run.as_dict(), "note": "requests of the principal are tagged with this run until it is finished"}


async def finish(gw: Gateway, actor: str, run_id: Any, *, settle: bool = True) -> EvalRun:
    """Close a run: its principal's new requests are no longer tagged."""
    from gateway.admin.ops import check_id

    run = await _runs(gw).close(check_id(run_id, "run"), actor)
    if settle:  # a request admitted by a replica that had not yet seen the close is still tagged
        await _sleep(PROPAGATION_SECONDS)
    await _record(gw, "eval.finish", actor, run, tagged=True)
    return run


async def certify(gw: Gateway, actor: str, run_id: Any, key: SigningKey, audit_paths: list[str], *,
                  wait_seconds: float, ignore_in_flight: bool = False) -> dict[str, Any]:
    """The signed certificate of a finished run, from the audit log under ``audit_paths``."""
    from gateway.admin.ops import check_id
    from gateway.evals.certificate import build_certificate

    runs = _runs(gw)
    run = await runs.get(check_id(run_id, "run"))
    if run.open:
        raise Conflict(f"evaluation run {run.id} is still open: finish it first", param="run")
    pending = await runs.wait_idle(run.id, wait_seconds)
    if pending and not ignore_in_flight:
        ids = ", ".join(sorted(pending)[:5])
        raise Conflict(f"{len(pending)} request(s) of run {run.id} are still in flight ({ids}); their records are "
                       "not written yet. Certify again once they end (or pass ignore_in_flight to certify "
                       "without them).", param="run")
    run_doc = run.certificate_run()
    if pending:
        run_doc["uncovered_in_flight"] = sorted(pending)
    from gateway import __version__

    key_env = gw.config.audit.hmac_key_env
    hmac_key = os.environ.get(key_env, "").encode() or None if key_env else None
    doc = build_certificate(run_doc, [Path(p) for p in audit_paths], key, hmac=hmac_key is not None,
                            software=f"kgate {__version__}", hmac_key=hmac_key)
    digest = hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()
    await runs.record_certificate(run.id, digest)
    await _record(gw, "eval.certify", actor, run, tagged=False, certificate_sha256=digest)
    return doc


async def describe(gw: Gateway, run_id: Any) -> dict[str, Any]:
    from gateway.admin.ops import check_id

    runs = _runs(gw)
    run = await runs.get(check_id(run_id, "run"))
    return {**run.as_dict(), "in_flight": len(await runs.in_flight(run.id))}


async def every(gw: Gateway) -> list[dict[str, Any]]:
    return [r.as_dict() for r in await _runs(gw).every()]


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
