"""The ledger scripts' wire format: what goes into ``ARGV`` and what comes back. The only Python code that
knows positions in either (the Lua side's mirror is at the top of gateway/ledger/lua/lib.lua).

Arguments, the same layout for every script::

    [1] now           the clock, or '' for Redis TIME        [2] lease expiry mode: 'charge' | 'release'
    [3] record ttl    seconds                                [4] request id ('' for state)
    [5] option        reserve: lease seconds; settle: report '1'|'0'; release: forget '1'|'0'; state: ''
    [6...]            two per budget: '<window> <rolling 1|0> <limit> <label>', its metric's amount

Replies: ``[status, now, then three per budget: used, held, reset_at]``; the figures are there when the
script reports them (not for release, nor for a settle without report). A refused reserve answers
``['refused', now, budget index (1-based), used, held, retry_at]``.

Numbers go in as text that round-trips exactly (``repr`` of a float: 17 significant digits at most) and come
back as text, or as integers for whole numbers below 1e15. Either client may answer ``bytes`` (the pipelined
client) or ``str`` (redis-py with ``decode_responses``); :func:`float` reads all three.

A reply is decoded into a :class:`Reply`, whose figures are read into :class:`Figures` (or
:class:`RefusedAt`) only when asked for: every request runs a reserve and a settle, so the request path
builds one object per reserve and none per settle (:func:`status`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from gateway.ledger.values import BudgetSpec

Arg = str | bytes
_T = TypeVar("_T")
_FIGURES = 2  # index of the first budget's figures in a reply
_REFUSED_INDEX, _REFUSED_USED, _REFUSED_HELD, _REFUSED_RETRY = 2, 3, 4, 5
_NONE: Mapping[str, float] = MappingProxyType({})


# ------------------------------------------------------------------------------------------ arguments
def num(x: float) -> str:
    """A float as text that round-trips exactly (Lua reads it by coercion, Redis with strtold)."""
    return repr(float(x))


def budget_arg(budget: BudgetSpec) -> bytes:
    """A budget as a script argument; the label goes last so that it may contain spaces (Lua takes the
    rest of the text after the third space)."""
    return f"{budget.window} {int(budget.rolling)} {num(budget.limit)} {budget.label}".encode()


def call_args(now: str, expiry: str, ttl: str, request_id: str, option: str,
              budgets: Sequence[BudgetSpec] = (), amounts: Mapping[str, float] = _NONE) -> list[Arg]:
    """One script call's ``ARGV``: the header, then each budget with its metric's amount from ``amounts``
    (``now``, ``ttl`` and ``option`` already text, see :func:`num`)."""
    argv: list[Arg] = [now, expiry, ttl, request_id, option]
    for b in budgets:
        argv += (b.script_arg, repr(float(amounts[b.metric])))  # num(), without a call per budget
    return argv


# ------------------------------------------------------------------------------------------ replies
def status(raw: Sequence[Any]) -> str:
    """A reply's status alone (a settle needs nothing else, or its figures: :func:`with_figures`)."""
    head = raw[0]
    return head if type(head) is str else head.decode()


def with_figures(items: Iterable[_T], raw: Sequence[Any]) -> Iterator[tuple[_T, float, float, float]]:
    """``(item, used, held, reset_at)`` for each of ``items`` (the budgets sent, in order) from a reply that
    reports figures. Flat tuples, no object per budget: a settle with report reads every budget of every
    scope."""
    values = iter(map(float, raw[_FIGURES:]))
    return zip(items, values, values, values, strict=False)


@dataclass(slots=True)
class Figures:
    """One budget's figures in a reply: usage in its window, the amount held, and when the window resets
    (rolling: when the oldest usage leaves)."""

    used: float
    held: float
    reset_at: float


@dataclass(slots=True)
class RefusedAt:
    """The budget that refused a reserve: its index in the scope's budgets (0-based), its usage and holds,
    and when the amount could fit."""

    index: int
    used: float
    held: float
    retry_at: float


@dataclass(slots=True, init=False)
class Reply:
    """A script's reply: its status (``ok``, ``refused``, ``dup``; ``applied``, ``posted``, ``repeat``;
    ``released``, ``unknown``; ``state``), Redis' clock, and the raw reply, whose figures are decoded only
    when asked for (the request path reads one budget's, of one scope). Built from the raw reply, in one
    call: every reserve makes one."""

    status: str
    now: float
    raw: Sequence[Any]

    def __init__(self, raw: Sequence[Any]):
        head = raw[0]
        self.status = head if type(head) is str else head.decode()
        self.now = float(raw[1])
        self.raw = raw

    def used_held(self, i: int) -> tuple[float, float]:
        """Budget ``i``'s used and held amounts (the cheap read behind ``Reservation.tightest``)."""
        at = _FIGURES + 3 * i
        return float(self.raw[at]), float(self.raw[at + 1])

    def used_held_columns(self) -> tuple[list[float], list[float]]:
        """Every budget's used amount, and every budget's held amount, in the order of the budgets sent: two
        slices of the reply read by ``map`` (no Python loop; a reserve's caller reads them all to find
        the tightest budget, and the lease book to size a slice)."""
        figures = self.raw[_FIGURES:]
        return list(map(float, figures[0::3])), list(map(float, figures[1::3]))

    def reset_at(self, i: int) -> float:
        """Budget ``i``'s reset time alone (with :meth:`used_held_columns`: its figures)."""
        return float(self.raw[_FIGURES + 3 * i + 2])

    def figures(self) -> list[Figures]:
        """Every budget's figures, in the order of the budgets sent."""
        values = iter(map(float, self.raw[_FIGURES:]))
        return [Figures(used, held, reset_at) for used, held, reset_at in zip(values, values, values, strict=False)]

    def figures_at(self, i: int) -> Figures:
        """Budget ``i``'s figures alone."""
        at = _FIGURES + 3 * i
        raw = self.raw
        return Figures(float(raw[at]), float(raw[at + 1]), float(raw[at + 2]))

    def refused(self) -> RefusedAt:
        """Which budget refused (status ``refused`` only)."""
        raw = self.raw
        return RefusedAt(int(raw[_REFUSED_INDEX]) - 1, float(raw[_REFUSED_USED]), float(raw[_REFUSED_HELD]),
                         float(raw[_REFUSED_RETRY]))

