"""What a request is charged at its final settle: how its exchange with the upstream ended — the status,
:attr:`SettleInput.outcome`, a stream's meter or a unary answer's body or usage — mapped to the engine's
calls, so that the charge is the proxy's (the table in docs/design.md §13)."""

from __future__ import annotations

import orjson

from gateway.decision.messages import SettleInput
from gateway.decision.pending import Pending
from gateway.engine.errors import UpstreamError, UpstreamTimeout
from gateway.engine.flow import Engine


async def charge(engine: Engine, p: Pending, part: SettleInput, why: str = "") -> dict[str, str]:
    """Charge the request by how its exchange ended; the headers kgate would add to a unary answer."""
    adm = p.adm
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
