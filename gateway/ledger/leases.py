"""Budget leases: a replica holds a slice of a scope's budgets and admits requests against it locally
(docs/design.md §3.7).

Most requests of a busy scope then admit without a Redis round trip, and their settles go to Redis in
batches. Exactness is kept by making every slice a hold like any request's:

- **Taking a slice** is a reserve (``reserve.lua``) of an amount on every budget of the scope, under the slice's
  own id and with the longest request lease: it fits under each limit with every other hold counted, or it
  is not taken. A request admitted from a slice takes its amounts out of the slice's remainder, so the
  requests admitted from slices never hold more than the slices do, and no number of replicas can push a
  budget past its limit (a provider overrunning its caps aside, as without leases).
- **Sizing.** A slice holds about :data:`SLICE_SECONDS` of the scope's recent demand on this replica, at
  least :data:`MIN_REQUESTS` requests like the one asking, and at most :data:`HEADROOM_SHARE` of what was
  left under each limit when last seen. When that is less than two such requests, no slice is taken: the
  scope is *tight* and every request reserves for itself, so the last units of a budget are admitted one
  reserve at a time, exactly once across replicas, with the ledger's own refusal (429, ``Retry-After``).
- **Settling.** A request admitted from a slice is settled into its slice's next batch; a batch
  (``settle_batch.lua``, idempotent per batch id) posts the batch's actual usage and shrinks the slice's
  hold by what its requests held. Batches go out on the next turn of the event loop, so a request waits
  about one round trip, as a settle without leases does, and a busy replica sends one script for many.
- **Returning.** A slice admits for at most :data:`ROTATE_SECONDS`; then (and on policy reload and shutdown)
  its unused remainder goes back in a batch, and once its requests are settled it is released. A replica
  that dies leaves its slices to expire with their lease, charged or released by ``store.lease_expiry`` as
  any hold: at most a few seconds of its demand more than it used.

What a slice changes for readers of the ledger: ``held`` counts the replicas' slices (unused parts too), so
``kgate usage`` and ``RateLimit`` headers show less remaining than requests alone would; the ``RateLimit``
figures of a request admitted from a slice are those seen when the slice was taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import operator
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from gateway.ledger.errors import StoreError
from gateway.ledger.ledger import BudgetRefused, Ledger
from gateway.ledger.values import (
    BudgetSpec,
    BudgetState,
    HoldRequest,
    Reservation,
    ScopeRef,
    SettleResult,
    Tightest,
    tightest_in,
)

log = logging.getLogger("kgate.leases")

SLICE_SECONDS = 1.0  # a slice holds about this much of the recent demand
MIN_REQUESTS = 4  # ... and at least this many requests like the one that asked
HEADROOM_SHARE = 0.25  # ... and at most this share of what is left under a limit
ROTATE_SECONDS = 2.0  # a slice admits for this long; then its unused part goes back
TIGHT_SECONDS = 0.25  # after finding a scope tight, requests reserve for themselves this long before asking again
RETRY_SECONDS = 0.5  # a batch the store did not take is sent again after this long (same id: counted once)
# A settle nobody waits for (a JSON answer's, posted) joins a batch sent within this long; one that is waited
# for (a stream's) sends its batch on the next turn of the event loop.
BATCH_SECONDS = 0.005


def slice_lease_seconds(config: Any) -> float:
    """A slice's hold lease: the longest any request admitted from it may take (the longest upstream total
    timeout) plus the lease grace — the lease a request's own hold would have."""
    longest = max((u.total_timeout_seconds for u in config.upstreams.values()), default=600.0)
    return float(longest) + float(config.store.lease_grace_seconds)


Key = tuple[str, int]  # a scope's ScopeRef.key and its budgets' id: spec tuples are cached per tier, one object each


def _key(scope: ScopeRef, budgets: tuple[BudgetSpec, ...]) -> Key:
    """The key of a scope's slice and demand. A str and an int: hashing a ScopeRef would run its Python
    ``__hash__`` on every lookup."""
    return scope.key, id(budgets)


def _amount(hold: HoldRequest, budget: BudgetSpec) -> float:
    amount = hold.amounts.get(budget.metric)
    return 1.0 if amount is None and budget.metric == "requests" else float(amount or 0.0)


@dataclass(eq=False)
class Slice:
    """A replica's slice of one scope's budgets: a hold in Redis under its own id, spent locally.

    The next batch is kept as flat lists, summed with ``map`` (no Python loop per request): ``cuts`` per
    budget, ``sums`` per metric of :attr:`metrics`, the budgets' metrics each once (the batch posts no
    other: :meth:`batch_actual`)."""

    id: str
    scope: ScopeRef
    budgets: tuple[BudgetSpec, ...]
    remaining: list[float]  # per budget: what requests may still take
    reservation: Reservation  # the slice's own hold (its reply: the figures when it was taken)
    born: float = field(default_factory=time.monotonic)
    inflight: int = 0
    retired: bool = False
    batches: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    cuts: list[float] = field(default_factory=list)  # the next batch: per budget, what leaves the slice's hold
    sums: list[float] = field(default_factory=list)  # the next batch: actual usage per metric of `metrics`
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    queued: bool = False  # a batch is to be sent on the next turn of the event loop
    timer: asyncio.TimerHandle | None = None  # ... or within BATCH_SECONDS (settles nobody waits for)
    metrics: tuple[str, ...] = field(init=False)  # the budgets' metrics, each once, in the budgets' order
    _tightest: Tightest | None = field(init=False, default=None)
    _tightest_known: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.metrics = tuple(dict.fromkeys(b.metric for b in self.budgets))

    def add(self, actual: Mapping[str, float], cuts: Sequence[float]) -> None:
        """Into the next batch: a request's ``actual`` usage (per metric; a metric it lacks adds 0) and what
        leaves the slice's hold for it (per budget)."""
        if not self.cuts:
            self.cuts = [0.0] * len(self.budgets)
            self.sums = [0.0] * len(self.metrics)
        self.cuts = list(map(operator.add, self.cuts, cuts))
        if actual:
            self.sums = list(map(operator.add, self.sums, map(actual.get, self.metrics, repeat(0.0))))

    def pending(self) -> bool:
        """Whether the next batch has anything in it."""
        return bool(self.cuts)

    def batch_actual(self) -> dict[str, float]:
        """The next batch's actual usage per metric of the budgets (0 for a metric no request reported)."""
        return dict(zip(self.metrics, self.sums or repeat(0.0), strict=False))

    def tightest(self) -> Tightest | None:
        """The tightest budget as seen when the slice was taken, with its remaining fraction: the same for
        every request admitted from the slice (which carries those figures), so computed once."""
        if not self._tightest_known:
            replies = self.reservation.replies
            self._tightest = tightest_in(self.scope, self.budgets, replies[0]) if replies else None
            self._tightest_known = True
        return self._tightest


@dataclass(slots=True)
class _Demand:
    """A scope's recent demand on this replica, and what was left under each limit.

    It keeps its budgets (the tuple whose id is in its key: kept alive, that id cannot name another tuple
    while the key is in use) and their shape, read by every request admitted: ``names``, each budget's
    metric; ``defaults``, what a request holds on it when its amounts do not name the metric. The demand
    is summed per budget, with ``map`` (no Python loop per request): budgets of one metric get the same
    amounts, so each budget's sum is its metric's."""

    budgets: tuple[BudgetSpec, ...]
    since: float = field(default_factory=time.monotonic)
    sums: list[float] | None = None  # per budget: the amounts asked for since `since` (None: none yet)
    headroom: list[float] | None = None  # per budget: limit - used - held, when last seen
    tight_until: float = 0.0
    acquiring: asyncio.Event | None = None  # set when the slice being asked for has come (or has not)
    names: tuple[str, ...] = field(init=False)
    defaults: tuple[float, ...] = field(init=False)
    zeros: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.names = tuple([b.metric for b in self.budgets])
        self.defaults = tuple([1.0 if m == "requests" else 0.0 for m in self.names])
        self.zeros = (0.0,) * len(self.names)


@dataclass(frozen=True, init=False)
class LocalReservation(Reservation):
    """A request admitted from slices, one per scope (``replies``: each slice's, from when it was taken).

    ``__init__`` is spelled out, as :class:`Reservation`'s is (every request admitted from a slice builds
    one); tests/unit/test_perf_ledger.py checks that it sets exactly the dataclass's fields."""

    slices: tuple[Slice, ...] = ()
    amounts: tuple[tuple[float, ...], ...] = ()  # per scope, per budget: what the request took
    ended: list[bool] = field(default_factory=list)  # settled or released once: a rerun changes nothing

    def __init__(self, request_id: str, holds: tuple[HoldRequest, ...], replies: tuple[Any, ...] = (),
                 expires_at: float = 0.0, slices: tuple[Slice, ...] = (),
                 amounts: tuple[tuple[float, ...], ...] = (), ended: list[bool] | None = None) -> None:
        d = self.__dict__
        d["request_id"] = request_id
        d["holds"] = holds
        d["replies"] = replies
        d["expires_at"] = expires_at
        d["slices"] = slices
        d["amounts"] = amounts
        d["ended"] = [] if ended is None else ended

    def tightest(self) -> BudgetState | None:
        """As :meth:`Reservation.tightest`, from each slice's tightest budget (computed once per slice: the
        figures are the slice's, the same for all its requests)."""
        best: Tightest | None = None
        for s in self.slices:
            t = s.tightest()
            if t is not None and (best is None or t[0] < best[0]):
                best = t
        return None if best is None else best[1]


class LeaseBook:
    """This replica's slices, over a :class:`Ledger`. ``lease_seconds`` is a slice's hold lease: the
    longest any request admitted from it may take (the longest upstream timeout plus the lease grace)."""

    def __init__(self, ledger: Ledger, lease_seconds: float, *, clock: Callable[[], float] = time.monotonic):
        self.ledger = ledger
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._slices: dict[Key, Slice] = {}
        self._retired: set[Slice] = set()
        self._demand: dict[Key, _Demand] = {}
        self._prefix = f"lease:{secrets.token_hex(6)}:"
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._rotator: asyncio.Task[None] | None = None
        self.admitted_locally = 0  # counters, for the metrics and the tests
        self.batches_sent = 0

    # ---------------------------------------------------------------------------------- admission
    def admit(self, request_id: str, holds: Sequence[HoldRequest], *, note: bool = True) -> LocalReservation | None:
        """The request admitted from this replica's slices, or None: it must reserve for itself (a slice
        is then asked for in the background, where the scope is not tight)."""
        chosen: list[Slice] = []
        taken: list[tuple[float, ...]] = []
        for hold in holds:
            budgets = hold.budgets
            key = (hold.scope.key, id(budgets))  # _key(), inlined: every request, every scope
            demand = self._demand.get(key)
            if demand is None:
                if len(self._demand) > 65536:
                    self._demand.clear()
                demand = self._demand[key] = _Demand(budgets, since=self._clock())
            # per budget: the amount given for its metric, else its default (requests: 1)
            amounts = tuple(map(hold.amounts.get, demand.names, demand.defaults))
            if note:
                demand.sums = list(map(operator.add, demand.sums or demand.zeros, amounts))
            s = self._slices.get(key)
            # no slice of these budgets, or it is retired, or it has not room for every amount
            if s is None or s.budgets is not budgets or s.retired or any(map(operator.gt, amounts, s.remaining)):
                if note:
                    self._note(key, demand, hold, self._clock())
                return None
            chosen.append(s)
            taken.append(amounts)
        for s, amounts in zip(chosen, taken, strict=True):
            s.remaining = list(map(operator.sub, s.remaining, amounts))
            s.inflight += 1
        self.admitted_locally += 1
        replies = chosen[0].reservation.replies if len(chosen) == 1 else tuple(
            r for s in chosen for r in s.reservation.replies)
        return LocalReservation(request_id, tuple(holds), replies, 0.0, tuple(chosen), tuple(taken))

    def observe(self, reservation: Reservation) -> None:
        """What a reserve of a request saw (used and held per budget): how much room a slice may take."""
        for hold, reply in zip(reservation.holds, reservation.replies, strict=False):
            demand = self._demand.get(_key(hold.scope, hold.budgets))
            if demand is not None:
                used, held = reply.used_held_columns()
                demand.headroom = [b.limit - (u + h) for b, u, h in zip(hold.budgets, used, held, strict=True)]

    def refused(self, holds: Sequence[HoldRequest]) -> None:
        """A reserve was refused: the scopes are tight (no slice until requests find room again)."""
        now = self._clock()
        for hold in holds:
            demand = self._demand.get(_key(hold.scope, hold.budgets))
            if demand is not None:
                demand.tight_until = now + TIGHT_SECONDS
                demand.headroom = None

    def _note(self, key: Key, demand: _Demand, hold: HoldRequest,
              now: float) -> None:
        if demand.acquiring is not None or now < demand.tight_until or demand.headroom is None:
            return
        demand.acquiring = asyncio.Event()
        self._spawn(self._acquire(key, demand, hold))

    async def retry(self, request_id: str, holds: Sequence[HoldRequest]) -> LocalReservation | None:
        """After a refused reserve: when this replica is taking a slice of a refusing scope, wait for it and
        admit from it. (The slice may hold the very room the reserve missed: a request refused while its
        own replica's slice was on its way would leave that room unused.)"""
        pending = [d.acquiring for h in holds
                   if (d := self._demand.get(_key(h.scope, h.budgets))) is not None and d.acquiring is not None]
        if not pending:
            return None
        for event in pending:
            await event.wait()
        return self.admit(request_id, holds, note=False)

    # ------------------------------------------------------------------------------------- slices
    def _size(self, demand: _Demand, hold: HoldRequest, now: float) -> dict[str, float] | None:
        """Per metric, the slice to ask for; None when the scope is tight."""
        assert demand.headroom is not None
        elapsed = max(now - demand.since, 0.05)
        want: dict[str, float] = {}
        for i, b in enumerate(hold.budgets):
            one = _amount(hold, b)
            rate = (one if demand.sums is None else demand.sums[i]) / elapsed
            size = max(rate * SLICE_SECONDS, MIN_REQUESTS * one)
            size = min(size, HEADROOM_SHARE * max(demand.headroom[i], 0.0))
            if one > 0 and size < 2 * one:
                return None
            if b.metric == "requests":
                size = math.floor(size)
            want[b.metric] = min(want.get(b.metric, size), size)
        return want

    async def _acquire(self, key: Key, demand: _Demand,
                       hold: HoldRequest) -> None:
        try:
            now = self._clock()
            want = self._size(demand, hold, now)
            if want is None:
                demand.tight_until = now + TIGHT_SECONDS
                return
            slice_id = f"{self._prefix}{next(self._ids)}"
            request = HoldRequest(hold.scope, hold.budgets, want)
            try:
                reservation = await self.ledger.reserve(slice_id, [request], self.lease_seconds)
            except BudgetRefused:
                demand.tight_until = self._clock() + TIGHT_SECONDS
                return
            except StoreError:
                return  # the requests' own reserves meet the outage and the tier's on_store_error
            self.observe(reservation)
            old = self._slices.get(key)
            if old is not None:
                self._retire(old)
            self._slices[key] = Slice(slice_id, hold.scope, hold.budgets,
                                      [_amount(request, b) for b in hold.budgets], reservation)
            demand.since, demand.sums = self._clock(), None
        finally:
            event, demand.acquiring = demand.acquiring, None
            if event is not None:
                event.set()

    def _retire(self, s: Slice) -> None:
        """Stop admitting from ``s`` and give its unused part back (in its next batch)."""
        if s.retired:
            return
        s.retired = True
        key = _key(s.scope, s.budgets)
        if self._slices.get(key) is s:
            del self._slices[key]
        self._retired.add(s)
        s.add({}, s.remaining)
        s.remaining = [0.0] * len(s.remaining)
        self._queue(s)

    def retire_all(self) -> None:
        """Give every slice back (a policy reload: budgets and limits may have changed)."""
        for s in list(self._slices.values()):
            self._retire(s)

    # ------------------------------------------------------------------------------------ settling
    def post(self, res: LocalReservation, actual: Mapping[str, float],
             done: Callable[[BaseException | None], None] | None = None) -> None:
        """Settle a request admitted from slices into their next batches; ``done(None)`` once sent. Once per
        request: a second settle or release of it changes nothing."""
        if res.ended:
            if done is not None:
                done(None)
            return
        res.ended.append(True)
        if done is None:  # a JSON answer's: nobody waits (every such request)
            for s, taken in zip(res.slices, res.amounts, strict=True):
                s.add(actual, taken)
                s.inflight -= 1
                if not s.queued and s.timer is None:  # else on its way already (_queue, without the call)
                    self._queue(s, urgent=False)
            return
        futures = []
        for s, taken in zip(res.slices, res.amounts, strict=True):
            s.add(actual, taken)
            s.inflight -= 1
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            s.waiters.append(fut)
            futures.append(fut)
            self._queue(s)
        left = len(futures)

        def one(_: asyncio.Future[None]) -> None:
            nonlocal left
            left -= 1
            if left == 0:
                done(None)

        for fut in futures:
            fut.add_done_callback(one)

    async def settle(self, res: LocalReservation, actual: Mapping[str, float]) -> SettleResult:
        """Settle and wait until the batches carrying it were sent (a batch the store did not take is retried
        in the background under the same id; the request does not wait for that)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def sent(_: BaseException | None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        self.post(res, actual, sent)
        await waiter
        beyond = tuple((hold.scope, b.label, actual.get(b.metric, 0.0) - taken[i])
                       for hold, taken in zip(res.holds, res.amounts, strict=True)
                       for i, b in enumerate(hold.budgets) if actual.get(b.metric, 0.0) > taken[i])
        return SettleResult(res.request_id, tuple((h.scope, "applied") for h in res.holds), (), beyond)

    def release(self, res: LocalReservation) -> None:
        """Void a request admitted from slices: what it took goes back into its slices' remainder."""
        if res.ended:
            return
        res.ended.append(True)
        for s, taken in zip(res.slices, res.amounts, strict=True):
            s.inflight -= 1
            if s.retired:
                s.add({}, taken)
                self._queue(s)
            else:
                for i, a in enumerate(taken):
                    s.remaining[i] += a

    def _queue(self, s: Slice, *, urgent: bool = True) -> None:
        if s.queued or (not urgent and s.timer is not None):  # on its way already
            return
        loop = asyncio.get_running_loop()
        if urgent:
            if s.timer is not None:
                s.timer.cancel()
                s.timer = None
            s.queued = True
            loop.call_soon(lambda: self._spawn(self._flush(s)))
        elif s.timer is None:
            s.timer = loop.call_later(BATCH_SECONDS, lambda: self._spawn(self._flush(s)))

    async def _flush(self, s: Slice) -> None:
        """Send what ``s`` gathered as one batch (everything settled during this turn of the event loop, or
        within BATCH_SECONDS)."""
        s.queued = False
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        if not s.pending():
            self._maybe_release(s)
            return
        amounts, cuts, waiters = s.batch_actual(), s.cuts, s.waiters
        s.sums, s.cuts, s.waiters = [], [], []
        batch = f"{s.id}:{next(s.batches)}"
        sent = False
        while True:
            try:
                await self.ledger.settle_batch(s.scope, s.budgets, batch, s.id, amounts, cuts)
                self.batches_sent += 1
                break
            except StoreError as exc:
                if not sent:
                    log.warning("lease batch %s not taken by the store (%s); retrying", batch, exc)
                    sent = True
                    for w in waiters:  # the request goes on; the batch keeps its id until it lands
                        if not w.done():
                            w.set_result(None)
                await asyncio.sleep(RETRY_SECONDS)
        for w in waiters:
            if not w.done():
                w.set_result(None)
        self._maybe_release(s)

    def _maybe_release(self, s: Slice) -> None:
        """A retired slice with nothing in flight or queued holds nothing more: release its record."""
        if (s.retired and s.inflight == 0 and not s.queued and s.timer is None and not s.pending()
                and s in self._retired):
            self._retired.discard(s)
            self._spawn(self._release(s))

    async def _release(self, s: Slice) -> None:
        with contextlib.suppress(StoreError):  # its lease expires with nothing left to charge
            await self.ledger.release(s.reservation)

    # ---------------------------------------------------------------------------------- lifetime
    def start(self) -> None:
        if self._rotator is None:
            self._rotator = asyncio.get_running_loop().create_task(self._rotate(), name="kgate-lease-rotator")

    async def _rotate(self) -> None:
        while True:
            await asyncio.sleep(ROTATE_SECONDS / 4)
            now = self._clock()
            for s in [s for s in self._slices.values() if now - s.born >= ROTATE_SECONDS]:
                self._retire(s)

    async def close(self, timeout: float = 5.0) -> None:
        """Give every slice back and wait (up to ``timeout``) for the batches to land."""
        if self._rotator is not None:
            self._rotator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rotator
            self._rotator = None
        self.retire_all()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(0)  # the batches queued for this turn of the loop start
            if not self._tasks:
                if not any(s.queued or s.timer is not None for s in self._retired):
                    break
                continue
            await asyncio.wait(list(self._tasks), timeout=max(deadline - time.monotonic(), 0.0))
        for t in list(self._tasks):
            t.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def outstanding(self) -> int:
        """Slices held now (admitting, or retired and waiting for their requests)."""
        return len(self._slices) + len(self._retired)
