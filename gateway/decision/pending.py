"""The admitted requests a decision process holds until they are settled, and their deadlines.

:class:`Pending` is one admitted request waiting for its answer: its admission, a stream meter or the unary
body's bytes, the offset taken so far, and the segments that came ahead of their turn (:meth:`Pending.feed`
takes each byte once, in order, whatever order and how many times the segments come).
:class:`PendingRequests` is this process's table of them by request id, with the results of the ones settled
lately (a repeated final settle answers the same) and the sweeper task that expires both.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.adapters.base import StreamMeter
from gateway.decision.messages import Settled
from gateway.engine.errors import BadRequest
from gateway.engine.model_names import Renamer
from gateway.engine.request import Admission

log = logging.getLogger("kgate.decision")


@dataclass(slots=True, eq=False)
class Pending:
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

    def feed(self, offset: int, data: bytes) -> bytes:
        """Take ``data`` at ``offset``: bytes already taken are skipped (a repeated segment), bytes ahead of
        their turn wait (up to the upstream's ``max_response_bytes``); returns what a stream passes on."""
        if not data:
            return b""
        if offset > self.received:
            limit = self.limit()
            if self.early_bytes + len(data) > limit:
                raise BadRequest(f"more than {limit} bytes arrived ahead of a gap at byte {self.received}",
                                 param="offset")
            if offset not in self.early:
                self.early[offset] = data
                self.early_bytes += len(data)
            return b""
        if offset < self.received:
            data = data[self.received - offset:]
            if not data:
                return b""
        passed = self.consume(data)
        while self.early:
            nxt = min(self.early)
            if nxt > self.received:
                break
            chunk = self.early.pop(nxt)
            self.early_bytes -= len(chunk)
            chunk = chunk[self.received - nxt:]
            if chunk:
                passed += self.consume(chunk)
        return passed

    def consume(self, data: bytes) -> bytes:
        """Take ``data`` as the next bytes: a stream's through its meter (what it passes on, renamed), a unary
        answer's kept for the final settle."""
        self.received += len(data)
        if self.meter is not None:
            out = self.meter.feed(data)
            if out and self.renamer is not None:
                out = self.renamer.body(out)
            return out
        if self.received > self.limit():
            raise BadRequest(f"the answer is larger than the upstream's max_response_bytes ({self.limit()})",
                             param="data")
        self.body.append(data)
        return b""

    def limit(self) -> int:
        """The upstream's ``max_response_bytes``."""
        cfg = self.adm.facts.config.upstreams.get(self.adm.facts.upstream or "")
        return cfg.max_response_bytes if cfg is not None else 64 << 20


class PendingRequests:
    """The requests admitted here and not settled yet, by request id; the results of those settled lately; a
    sweeper that calls ``expire`` every second while either holds anything."""

    def __init__(self, expire: Callable[[], Awaitable[object]]):
        self._expire = expire
        self._pending: dict[str, Pending] = {}
        # Settled results kept for a repeated final settle, with when to forget them; in arrival order, so
        # expiry pops from the front.
        self._settled: dict[str, tuple[float, Settled]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()  # set whenever no admitted request waits
        self._idle.set()

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._pending

    def get(self, request_id: str) -> Pending | None:
        return self._pending.get(request_id)

    def add(self, request_id: str, p: Pending) -> None:
        self._idle.clear()
        self._pending[request_id] = p
        self._start_sweeper()

    def remove(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        if not self._pending:
            self._idle.set()

    def waiting(self) -> list[Pending]:
        return list(self._pending.values())

    def due(self, now: float) -> list[Pending]:
        """The requests whose deadline has come."""
        return [p for p in self._pending.values() if p.deadline <= now]

    def remember(self, result: Settled, until: float) -> None:
        """Keep a settled request's result until ``until`` (monotonic) for a repeated final settle."""
        kept = dataclasses.replace(result, passed=b"")  # the bytes were passed on once; a repeat gets none
        self._settled[result.request_id] = (until, kept)

    def settled(self, request_id: str) -> Settled | None:
        done = self._settled.get(request_id)
        return done[1] if done is not None else None

    def forget(self, now: float) -> None:
        """Forget the settled results kept past their time."""
        settled = self._settled
        while settled:
            rid = next(iter(settled))
            if settled[rid][0] > now:
                break
            del settled[rid]

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every admitted request to be settled; True if they were."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while self._pending or self._settled:
            await asyncio.sleep(1.0)
            try:
                await self._expire()
            except Exception:  # never let the sweeper die with requests still held
                log.exception("expiring unsettled requests")

    async def stop(self) -> None:
        """Stop the sweeper (shutting down)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
