"""Budget window arithmetic (docs/design.md §2, §3), the Python statement of what the Lua scripts compute.

The ledger scripts do this arithmetic themselves inside Redis (the clock is Redis ``TIME``); this module
says the same thing in Python, for validation, documentation and tests that check the scripts against it.

- Fixed windows are buckets aligned in UTC: ``1m``, ``1h``, ``1d`` and ``day`` on multiples of their
  length since the epoch (``1d`` and ``day`` are the same calendar day), ``7d`` on Mondays 00:00 UTC,
  ``30d`` on multiples of 30 days since the epoch, ``month`` on the first of each calendar month.
- Rolling windows are cut into :data:`ROLLING_SLICES` slices of ``length / ROLLING_SLICES`` seconds
  (1 s for ``1m``, 1 min for ``1h``, 24 min for ``1d``...). Usage recorded at time t belongs to slice
  ``floor(t / slice)`` and stays counted until that slice is more than ``ROLLING_SLICES`` slices old:
  it leaves the window between one window and one window plus one slice after it was recorded — never
  early, which is the safe side for a limit.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

WINDOW_SECONDS: dict[str, int] = {
    "1m": 60,
    "1h": 3600,
    "1d": 86400,
    "7d": 7 * 86400,
    "30d": 30 * 86400,
    "day": 86400,
}
"""Length of each window of constant length (``month`` varies, see :func:`fixed_window`)."""

ROLLING_SLICES = 60
"""How many slices a rolling window is cut into (must match ``SLICES`` in gateway/ledger/lua/lib.lua)."""

MONDAY_OFFSET = 4 * 86400
"""1970-01-05T00:00Z, the first Monday after the epoch: fixed ``7d`` windows start on Mondays."""

WINDOWS = (*WINDOW_SECONDS, "month")


def fixed_window(window: str, t: float) -> tuple[float, float]:
    """The ``[start, end)`` (epoch seconds, UTC) of the fixed window of kind ``window`` containing ``t``."""
    if window == "month":
        d = datetime.fromtimestamp(math.floor(t), UTC)
        first = datetime(d.year, d.month, 1, tzinfo=UTC)
        following = datetime(d.year + (d.month == 12), d.month % 12 + 1, 1, tzinfo=UTC)
        return first.timestamp(), following.timestamp()
    length = _length(window)
    offset = MONDAY_OFFSET if window == "7d" else 0
    start = math.floor((t - offset) / length) * length + offset
    return float(start), float(start + length)


def slice_seconds(window: str) -> float:
    """Width of one slice of a rolling window."""
    if window == "month":
        raise ValueError("calendar windows cannot be rolling")
    return _length(window) / ROLLING_SLICES


def rolling_slice(window: str, t: float) -> int:
    """Index of the slice of a rolling ``window`` that usage recorded at ``t`` goes into."""
    return math.floor(t / slice_seconds(window))


def rolling_leaves_at(window: str, slice_index: int) -> float:
    """When usage recorded in slice ``slice_index`` stops counting in the rolling ``window``."""
    return (slice_index + ROLLING_SLICES + 1) * slice_seconds(window)


def window_length(window: str, t: float | None = None) -> float:
    """Length in seconds; for ``month`` the length of the month containing ``t``."""
    if window == "month":
        if t is None:
            raise ValueError("the length of a month depends on which month: give t")
        start, end = fixed_window(window, t)
        return end - start
    return float(_length(window))


def _length(window: str) -> int:
    try:
        return WINDOW_SECONDS[window]
    except KeyError:
        raise ValueError(f"unknown window {window!r}; expected one of {', '.join(WINDOWS)}") from None
