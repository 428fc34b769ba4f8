"""Window arithmetic in Python (gateway/policy/windows.py); test_ledger_windows.py checks the Lua against it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy import windows


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(("window", "t", "start", "end"), [
    ("1m", ts(2026, 3, 1, 10, 5, 30), ts(2026, 3, 1, 10, 5), ts(2026, 3, 1, 10, 6)),
    ("1h", ts(2026, 3, 1, 10, 5, 30), ts(2026, 3, 1, 10), ts(2026, 3, 1, 11)),
    ("1d", ts(2026, 3, 1, 23, 59, 59), ts(2026, 3, 1), ts(2026, 3, 2)),
    ("day", ts(2026, 3, 1, 0, 0, 0), ts(2026, 3, 1), ts(2026, 3, 2)),
    ("7d", ts(2026, 1, 1, 12), ts(2025, 12, 29), ts(2026, 1, 5)),  # Thursday → the Monday before
    ("7d", ts(2026, 1, 5), ts(2026, 1, 5), ts(2026, 1, 12)),  # a Monday starts its own week
    ("month", ts(2026, 1, 31, 23, 59, 59), ts(2026, 1, 1), ts(2026, 2, 1)),
    ("month", ts(2024, 2, 29, 12), ts(2024, 2, 1), ts(2024, 3, 1)),  # leap year
    ("month", ts(2025, 12, 15), ts(2025, 12, 1), ts(2026, 1, 1)),  # December → January
    ("30d", 30 * 86400 * 5 + 7.5, 30 * 86400 * 5, 30 * 86400 * 6),
])
def test_fixed_window(window: str, t: float, start: float, end: float) -> None:
    assert windows.fixed_window(window, t) == (start, end)


@given(st.sampled_from(windows.WINDOWS), st.floats(min_value=0, max_value=4_102_444_800))
def test_fixed_window_contains_t(window: str, t: float) -> None:
    start, end = windows.fixed_window(window, t)
    assert start <= t < end
    assert end - start == windows.window_length(window, t)
    if window == "7d":
        assert datetime.fromtimestamp(start, UTC).weekday() == 0
    if window == "month":
        assert datetime.fromtimestamp(start, UTC).day == 1


def test_rolling_slices() -> None:
    assert windows.slice_seconds("1m") == 1
    assert windows.slice_seconds("1h") == 60
    assert windows.slice_seconds("1d") == 1440
    idx = windows.rolling_slice("1h", 3600 * 100 + 125)
    assert idx == 6002
    # usage stays at least one full window, at most one window plus one slice
    leaves = windows.rolling_leaves_at("1h", idx)
    assert 3600 * 100 + 125 + 3600 <= leaves <= 3600 * 100 + 125 + 3600 + 60
    with pytest.raises(ValueError):
        windows.slice_seconds("month")


def test_unknown_window() -> None:
    with pytest.raises(ValueError, match="unknown window"):
        windows.fixed_window("2h", 0)
    with pytest.raises(ValueError):
        windows.window_length("month")
