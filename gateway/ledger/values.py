"""The ledger's values: what callers hand to :class:`gateway.ledger.ledger.Ledger` and what they get back.

Import them from ``gateway.ledger.ledger``, which re-exports them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from gateway.ledger import codec
from gateway.policy.config import METRICS
from gateway.policy.windows import WINDOWS

SCOPES = ("principal", "org", "global")
LeaseExpiry = Literal["charge", "release"]
SettleOutcome = Literal["applied", "posted", "repeat"]


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
    def script_arg(self) -> bytes:
        """This budget as a script argument (:func:`gateway.ledger.codec.budget_arg`), encoded once per spec:
        specs are reused across requests."""
        return codec.budget_arg(self)


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

    @cached_property
    def key(self) -> str:
        """``<scope>:<id>``, unique per scope (a scope name has no colon). The ledger's and the lease book's
        caches are keyed by it: a str caches its hash, where hashing a frozen dataclass runs a Python
        ``__hash__`` that builds a tuple of the fields on every lookup."""
        return f"{self.scope}:{self.id}"


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


@dataclass(frozen=True, init=False)
class Reservation:
    """The holds of one request. ``states`` is each budget's state right after its hold (for RateLimit
    headers). A reservation rebuilt without states (e.g. to replay spooled usage) settles all the same.

    ``replies`` are Redis' answers to the reserve, one per hold: the states are read from them when first
    asked for (the request path only wants the tightest budget, and building every state was 4% of it).

    ``__init__`` is spelled out (as :class:`gateway.engine.compute.Usage`'s): the one a frozen dataclass
    generates sets each field through ``object.__setattr__``, and every request builds one.
    tests/unit/test_perf_ledger.py checks that it sets exactly the dataclass's fields.
    """

    request_id: str
    holds: tuple[HoldRequest, ...]
    replies: tuple[codec.Reply, ...] = ()
    expires_at: float = 0.0

    def __init__(self, request_id: str, holds: tuple[HoldRequest, ...], replies: tuple[codec.Reply, ...] = (),
                 expires_at: float = 0.0) -> None:
        d = self.__dict__
        d["request_id"] = request_id
        d["holds"] = holds
        d["replies"] = replies
        d["expires_at"] = expires_at

    @cached_property
    def states(self) -> tuple[BudgetState, ...]:
        return tuple(state for hold, reply in zip(self.holds, self.replies, strict=False)  # none: rebuilt
                     for state in states_of(hold.scope, hold.budgets, reply.raw))

    def tightest(self) -> BudgetState | None:
        """The budget with the smallest remaining fraction of its limit (for ``RateLimit`` headers); the
        first of them on a tie."""
        best: Tightest | None = None
        for hold, reply in zip(self.holds, self.replies, strict=False):
            t = tightest_in(hold.scope, hold.budgets, reply)
            if t is not None and (best is None or t[0] < best[0]):
                best = t
        return None if best is None else best[1]


Tightest = tuple[float, BudgetState]  # (remaining fraction of the limit, the budget's state)


def tightest_in(scope: ScopeRef, budgets: tuple[BudgetSpec, ...], reply: codec.Reply) -> Tightest | None:
    """The budget of one scope's reply with the smallest remaining fraction of its limit (the first on a
    tie), with that fraction; None without budgets. One scope's part of :meth:`Reservation.tightest`, apart
    so that a slice of the lease book computes it once for every request admitted from it."""
    used, held = reply.used_held_columns()
    best_fraction = 0.0
    best = -1
    for i, (b, u, h) in enumerate(zip(budgets, used, held, strict=False)):
        limit = b.limit
        if limit > 0:
            free = limit - u - h
            fraction = (free if free > 0.0 else 0.0) / limit
        else:
            fraction = 0.0
        if best < 0 or fraction < best_fraction:
            best_fraction, best = fraction, i
    if best < 0:
        return None
    b, u, h = budgets[best], used[best], held[best]
    # state_of(scope, b, reply.figures_at(best)), from the figures read already
    return best_fraction, BudgetState(scope, b, b.limit, u, h, _free(b.limit - u - h), reply.reset_at(best))


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


def state_of(scope: ScopeRef, budget: BudgetSpec, f: codec.Figures) -> BudgetState:
    return BudgetState(scope, budget, budget.limit, f.used, f.held, _free(budget.limit - f.used - f.held),
                       f.reset_at)


def states_of(scope: ScopeRef, budgets: tuple[BudgetSpec, ...], raw: Sequence[Any]) -> list[BudgetState]:
    """The states of ``budgets`` from a script's raw reply that reports them."""
    return [BudgetState(scope, b, b.limit, used, held, _free(b.limit - used - held), reset_at)
            for b, used, held, reset_at in codec.with_figures(budgets, raw)]


def _free(x: float) -> float:
    return x if x > 0.0 else 0.0  # max(x, 0.0) without max()'s argument parsing (hot: every budget of a report)
