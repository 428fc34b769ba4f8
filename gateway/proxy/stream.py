"""A streamed answer: passed to the client event by event while the engine's meter reads it.

:func:`relay` is the flow of one stream, whatever server carries the client's connection: it writes through
a :class:`ClientStream` — aiohttp's response (:mod:`gateway.proxy.handler`) or the fast path's own chunked
writer (:mod:`gateway.proxy.fastpath`) — so both send the same events and make the same records.

A client that goes away, or stops reading for ``server.write_timeout_seconds``, does not end what the
upstream spends: the rest of the stream is drained (bounded) for its usage, then charged. A stream that
breaks, stalls or ends without its final event gets an error event in the API's shape, and is charged
what was metered (or what ``on_missing_usage`` says).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Protocol

from gateway.adapters.base import StreamMeter
from gateway.engine.errors import GatewayError, InternalError, UpstreamError, UpstreamTimeout, render_stream_error
from gateway.engine.flow import Engine
from gateway.engine.model_names import renamer
from gateway.engine.request import Admission
from gateway.evals.receipts import sse_comment
from gateway.proxy import upstream as up
from gateway.proxy.forward import Answer, refused_answer, send
from gateway.proxy.upstream_client import HttpBroken, HttpTimeout

log = logging.getLogger("kgate.handler")
_now = time.perf_counter

STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientStream(Protocol):
    """The client's side of a streamed answer, as a server writes it. Each call says False (or returns)
    when the client has gone away; none raises for that."""

    async def start(self, status: int, headers: dict[str, str]) -> bool:
        """Send the response head (the body follows in chunks); False: the client has gone away."""

    async def write(self, data: bytes, timeout: float) -> bool:
        """Send ``data``; False when the client has gone away, or has not taken what was sent for ``timeout``
        seconds (a client that stops reading must not pin the request: its connection is dropped and the
        request is treated as a disconnect)."""

    async def end(self, timeout: float) -> None:
        """The stream's last bytes; a client that does not take them within ``timeout`` is dropped."""


async def relay(engine: Engine, adm: Admission, client_headers: Mapping[str, str], out: ClientStream
                ) -> Answer | None:
    """Send the admitted stream request upstream and relay its answer to ``out``, metered. An upstream's
    error status comes back as the :class:`Answer` to send instead (no stream was started); None once the
    stream has been relayed, charged and recorded."""
    target, resp = await send(client_headers, engine, adm)
    t0 = adm.ending.sent_at or 0.0
    if resp.status >= 400:
        try:
            data = await up.read_body(target, resp)
        except GatewayError:
            data = b""
        finally:
            resp.release()
        adm.ending.upstream_seconds = _now() - t0
        return await refused_answer(engine, adm, target, resp.status, data, resp.headers)
    meter = engine.stream_meter(adm)
    headers = {**up.response_headers(resp.headers), **engine.answer_headers(adm), **STREAM_HEADERS}
    failure: GatewayError | None = None
    client_gone = False
    named = renamer(adm.parsed.model_name, adm.parsed.model)
    rename = named.stream() if named is not None else None
    write_timeout = adm.facts.config.server.write_timeout_seconds
    ex = adm.ending
    started = False
    try:
        started = await out.start(resp.status, headers)
        if not started:
            client_gone = True
        else:
            async for chunk in resp.iter_any():
                if ex.first_byte_seconds is None:
                    ex.first_byte_seconds = _now() - t0
                data = meter.feed(chunk)
                if data and not await out.write(rename(data) if rename else data, write_timeout):
                    client_gone = True
                    break
            else:
                tail = meter.close()
                if tail and not await out.write(rename(tail) if rename else tail, write_timeout):
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
        # Not shielded: a second cancellation here reruns the settle in a task of its own.
        await engine.finish_stream(adm, meter, "client disconnected")
        raise
    except Exception:  # a bug of ours mid-stream: the client still gets an error event and the end
        log.exception("internal error while streaming request %s", adm.facts.request_id)
        failure = InternalError("internal error while streaming; you are charged only what was generated")
    finally:
        if failure is not None or (client_gone and not meter.finished):
            resp.close()  # cancels the upstream generation: nothing more is spent for a gone client
        else:
            resp.release()
    if not meter.finished and failure is None and not client_gone:
        failure = UpstreamError(f"upstream {target.name!r} ended the stream early")
    await engine.finish_stream(adm, meter,
                               "client disconnected" if client_gone else (failure.message if failure else ""))
    if failure is not None:
        if isinstance(failure, (UpstreamError, UpstreamTimeout)):  # not a bug of ours
            await engine.upstream_failed(adm, failure, working=False)
        if not client_gone and started:
            client_gone = not await out.write(render_stream_error(failure, adm.parsed.adapter.api), write_timeout)
    if not client_gone:
        written = await engine.conclude(adm.facts, adm.ending)
        if adm.tier.receipts and started and _is_sse(adm):
            token = engine.receipt(adm, written)
            if token is not None:
                await out.write(sse_comment(token), write_timeout)
        await out.end(write_timeout)
    return None


def _is_sse(adm: Admission) -> bool:
    """Whether the stream is server-sent events (Gemini streams a JSON array unless asked for alt=sse)."""
    return adm.parsed.adapter.api != "gemini" or adm.parsed.path_params.get("alt") == "sse"


async def _drain(target: up.Target, resp: up.Response, meter: StreamMeter) -> None:
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
