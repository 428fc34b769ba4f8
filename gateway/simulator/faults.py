"""The simulator's faults: what can go wrong with an answer, how a SPEC names it, and how it is done.

A fault SPEC is a kind and ``key=value`` options, comma-separated: ``status=500,rate=0.1``,
``status=429,retry_after=2``, ``timeout,rate=1,ms=500`` (accept, never answer, hang up after ``ms`` or
when the client leaves), ``reset`` (TCP reset before any response), ``midstream,after=N`` (N stream
events then the connection drops, no terminal event or usage; a JSON body is cut in half),
``malformed,after=N`` (a broken SSE line after N events, the stream then goes on; a JSON body is
truncated so it does not parse). Every fault takes ``rate`` (default 1) and ``path=PREFIX``. Several
SPECs are joined with ``;`` (the ``x-sim-fault`` header, :func:`header_faults`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from aiohttp import web

FAULT_KINDS = ("status", "timeout", "reset", "midstream", "malformed")
# What a malformed fault inserts: a data line whose JSON never closes, and a Gemini array element cut short.
MALFORMED_SSE = b'data: {"id": "broken", "choices": [{"delta": {"content": "\n\n'
MALFORMED_JSON = b',\r\n{"candidates": [{"content": '
_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected failure; ``rate`` is the chance that a request (matching ``path``) gets it."""

    kind: str
    rate: float = 1.0
    status: int = 500
    after: int = 1  # stream events sent before the drop (midstream) or the broken line (malformed)
    ms: float | None = None  # timeout: hold this long, then hang up (None: until the client leaves)
    path: str | None = None
    retry_after: float | None = None  # status: a Retry-After header (429 gets 1 by default)


@lru_cache(maxsize=256)
def parse_fault(spec: str) -> Fault:
    """``"status=500,rate=0.1"`` → Fault; ValueError naming the problem."""
    kind: str | None = None
    opts: dict[str, Any] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq:
            if key not in FAULT_KINDS or key == "status":
                raise ValueError(f"fault {spec!r}: unknown kind {key!r} (one of status=N, "
                                 f"{', '.join(FAULT_KINDS[1:])})")
            kind = key
            continue
        value = value.strip()
        try:
            if key == "status":
                kind, opts["status"] = "status", int(value)
                if not 100 <= opts["status"] <= 599:
                    raise ValueError
            elif key == "rate":
                opts["rate"] = float(value)
                if not 0 <= opts["rate"] <= 1:
                    raise ValueError
            elif key == "after":
                opts["after"] = int(value)
                if opts["after"] < 0:
                    raise ValueError
            elif key in ("ms", "retry_after"):
                opts[key] = float(value)
                if opts[key] < 0:
                    raise ValueError
            elif key == "path":
                opts["path"] = value
            else:
                raise ValueError(f"fault {spec!r}: unknown option {key!r}")
        except ValueError as e:
            raise ValueError(str(e) or f"fault {spec!r}: bad value for {key}: {value!r}") from None
    if kind is None:
        raise ValueError(f"fault {spec!r}: no kind (status=N, timeout, reset, midstream or malformed)")
    if kind == "status" and opts.get("status") == 429 and "retry_after" not in opts:
        opts["retry_after"] = 1.0
    return Fault(kind=kind, **opts)


@lru_cache(maxsize=256)
def header_faults(value: str) -> tuple[Fault, ...]:
    """The faults of an ``x-sim-fault`` header: SPECs joined with ``;``, or ``none``."""
    if value.strip().lower() in ("", "none"):
        return ()
    return tuple(parse_fault(s) for s in value.split(";") if s.strip())


async def drop(request: web.Request, fault: Fault) -> web.StreamResponse:
    """Answer nothing: a TCP reset now, or hold the connection and hang up (timeout)."""
    if fault.kind == "reset":
        reset(request)
        return web.Response()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (fault.ms / 1000 if fault.ms is not None else 3600.0)
    while True:  # poll: the handler is not cancelled when the client leaves
        t = request.transport
        left = deadline - loop.time()
        if t is None or t.is_closing() or left <= 0:
            break
        await asyncio.sleep(min(0.05, left))
    await hang_up(request)
    return web.Response()


async def broken_json(request: web.Request, raw: bytes, fault: Fault) -> web.StreamResponse:
    """A non-streamed answer under a midstream (cut body) or malformed (truncated JSON) fault."""
    half = raw[: len(raw) // 2]
    if fault.kind == "malformed":
        return web.Response(body=half, content_type=_JSON)
    resp = web.StreamResponse(headers={"Content-Type": _JSON})
    resp.content_length = len(raw)
    try:
        await resp.prepare(request)
        await resp.write(half)
    except ConnectionError:
        return resp
    await hang_up(request)
    return resp


async def hang_up(request: web.Request) -> None:
    """Close the connection once what was written has left (FIN, not RST)."""
    t = request.transport
    if t is None:
        return
    for _ in range(200):
        if t.is_closing() or not t.get_write_buffer_size():
            break
        await asyncio.sleep(0.005)
    t.close()


def reset(request: web.Request) -> None:
    """Abort with SO_LINGER 0, so the peer sees a TCP reset."""
    t = request.transport
    if t is None:
        return
    sock = t.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError, TypeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    t.abort()
