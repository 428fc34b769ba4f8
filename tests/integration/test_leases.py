"""Budget leases (gateway/ledger/leases.py, issue 18): slices of a scope's budgets held in Redis and spent
locally, settled in batches — against a real Redis, with several lease books playing several replicas.

The request flow here is the engine's (gateway/engine/budgets.py::reserve): admit from a slice, else
reserve for the request itself (noting what it saw), and after a refusal wait for a slice on its way.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.ledger import leases as leases_mod
from gateway.ledger.leases import LeaseBook, LocalReservation
from gateway.ledger.ledger import BudgetRefused, BudgetSpec, HoldRequest, Ledger, Reservation, ScopeRef
from gateway.ledger.resp import hot_path_client

pytestmark = pytest.mark.timeout(60)

SCOPE = ScopeRef("principal", "p1")


def specs(**limits: float) -> tuple[BudgetSpec, ...]:
    return tuple(BudgetSpec(label=f"principal:{m}:1h", metric=m, window="1h", rolling=False, limit=v)
                 for m, v in limits.items())


async def take(book: LeaseBook, ledger: Ledger, rid: str, holds: list[HoldRequest]) -> Reservation | None:
    """One request's admission as the engine does it; None when refused."""
    local = book.admit(rid, holds)
    if local is not None:
        return local
    try:
        res = await ledger.reserve(rid, holds, 60)
    except BudgetRefused:
        retried = await book.retry(rid, holds)
        if retried is None:
            book.refused(holds)
        return retried
    book.observe(res)
    return res


async def finish(book: LeaseBook, ledger: Ledger, res: Reservation, actual: dict[str, float]) -> None:
    if isinstance(res, LocalReservation):
        await book.settle(res, actual)
    else:
        await ledger.settle(res, actual, report=False)


@pytest.fixture
async def clients(redis_url: str) -> Any:
    """Three replicas' store clients as the gateway makes them: scripts through the pipelined client."""
    plain = [aioredis.from_url(redis_url) for _ in range(3)]
    made = [hot_path_client(c, redis_url, timeout=5.0) for c in plain]
    yield made
    for c in made:
        if c is not None and hasattr(c, "aclose"):
            await c.aclose()
    for c in plain:
        await c.aclose()


async def state(ledger: Ledger, budgets: tuple[BudgetSpec, ...]) -> dict[str, tuple[float, float]]:
    return {s.budget.metric: (s.used, s.held) for s in await ledger.state(SCOPE, budgets)}


async def test_a_busy_scope_admits_locally_and_settles_exactly(clients: Any, key_prefix: str) -> None:
    budgets = specs(requests=10_000, generated_tokens=10_000_000)
    ledger = Ledger(clients[0], key_prefix=key_prefix)
    book = LeaseBook(ledger, 60)
    book.start()
    rng = random.Random(7)
    spent = 0.0
    for i in range(300):
        hold = HoldRequest(SCOPE, budgets, {"requests": 1, "generated_tokens": 400})
        res = await take(book, ledger, f"r{i}", [hold])
        assert res is not None
        used = rng.randint(1, 400)
        spent += used
        await finish(book, ledger, res, {"requests": 1, "generated_tokens": used})
    assert book.admitted_locally > 250  # all but the first few, and one per slice rotation at most
    assert book.batches_sent < 300
    during = await state(ledger, budgets)
    assert during["requests"][0] == 300 and during["generated_tokens"][0] == spent
    assert during["requests"][1] > 0  # the live slice is a hold
    await book.close()
    assert await state(ledger, budgets) == {"requests": (300, 0), "generated_tokens": (spent, 0)}


@pytest.mark.parametrize("replicas", [1, 3])
async def test_a_burst_admits_exactly_the_limit_across_replicas(clients: Any, key_prefix: str,
                                                                replicas: int) -> None:
    """300 requests at once, a requests budget of 37: exactly 37 admitted, the last units once."""
    budgets = specs(requests=37, generated_tokens=1_000_000)
    ledgers = [Ledger(clients[i], key_prefix=key_prefix) for i in range(replicas)]
    books = [LeaseBook(ld, 60) for ld in ledgers]
    for b in books:
        b.start()
    outcome: Counter[str] = Counter()
    admitted: list[tuple[int, Reservation]] = []

    async def one(i: int) -> None:
        k = i % replicas
        hold = HoldRequest(SCOPE, budgets, {"requests": 1, "generated_tokens": 100})
        res = await take(books[k], ledgers[k], f"b{i}", [hold])
        outcome["admitted" if res is not None else "refused"] += 1
        if res is not None:
            admitted.append((k, res))
            outcome["local" if isinstance(res, LocalReservation) else "own"] += 1

    for i in range(2 * replicas):  # every replica's first requests reserve for themselves, then slices come
        await one(1000 + i)
    await asyncio.sleep(0.05)
    assert sum(b.outstanding() for b in books) == replicas
    await asyncio.gather(*(one(i) for i in range(300)))
    assert outcome["admitted"] == 37 and outcome["refused"] == 300 + 2 * replicas - 37, outcome
    assert outcome["local"] > 0, outcome  # slices were used, not only per-request holds
    for k, res in admitted:
        await finish(books[k], ledgers[k], res, {"requests": 1, "generated_tokens": 50})
    for b in books:
        await b.close()
    assert await state(ledgers[0], budgets) == {"requests": (37, 0), "generated_tokens": (37 * 50, 0)}


async def test_near_the_limit_every_request_reserves_for_itself(clients: Any, key_prefix: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice worth fewer than two requests is not taken: the last units go one reserve at a time."""
    budgets = specs(requests=6)
    ledger = Ledger(clients[0], key_prefix=key_prefix)
    book = LeaseBook(ledger, 60)
    hold = HoldRequest(SCOPE, budgets, {"requests": 1})
    got = [await take(book, ledger, f"t{i}", [hold]) for i in range(8)]
    await asyncio.sleep(0.05)
    assert [g is not None for g in got] == [True] * 6 + [False] * 2
    assert not any(isinstance(g, LocalReservation) for g in got)  # 6 * 0.25 < 2: always tight
    await book.close()


async def test_a_dead_replicas_slice_expires_like_any_hold(clients: Any, key_prefix: str) -> None:
    """A replica that dies leaves its slice to its lease: charged whole (the default) or released."""
    budgets = specs(requests=1000)
    now = [1_000_000.0]
    for expiry in ("charge", "release"):
        ledger = Ledger(clients[0], key_prefix=f"{key_prefix}-{expiry}", lease_expiry=expiry,  # type: ignore[arg-type]
                        clock=lambda: now[0])
        book = LeaseBook(ledger, 30)
        hold = HoldRequest(SCOPE, budgets, {"requests": 1})
        first = await take(book, ledger, "d0", [hold])
        assert first is not None and not isinstance(first, LocalReservation)
        await ledger.settle(first, {"requests": 1}, report=False)
        assert not isinstance(await take(book, ledger, "d1", [hold]), LocalReservation)  # held 60 s, in flight
        await asyncio.sleep(0.05)  # the slice asked for meanwhile has come
        assert isinstance(book.admit("d2", [hold]), LocalReservation)
        size = (await state(ledger, budgets))["requests"][1] - 1
        assert size >= 4
        # The replica dies here: no settle, no close. Past the slice's lease, the next script reaps it.
        now[0] += 31
        used, held = (await state(ledger, budgets))["requests"]
        assert held == 1  # d1's own hold, whose lease runs on
        assert used == (1 + size if expiry == "charge" else 1)


async def test_rotation_returns_the_unused_part_and_releases_the_slice(clients: Any, key_prefix: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases_mod, "ROTATE_SECONDS", 0.2)
    budgets = specs(requests=1000)
    ledger = Ledger(clients[0], key_prefix=key_prefix)
    book = LeaseBook(ledger, 60)
    book.start()
    hold = HoldRequest(SCOPE, budgets, {"requests": 1})
    await take(book, ledger, "x0", [hold])  # held for itself, never settled here
    await take(book, ledger, "x1", [hold])  # likewise; a slice is asked for
    await asyncio.sleep(0.05)
    inflight = book.admit("x2", [hold])
    assert isinstance(inflight, LocalReservation)
    assert (await state(ledger, budgets))["requests"][1] > 3
    await asyncio.sleep(0.5)  # rotated: the unused part went back; x2's 1 stays held in the slice
    assert await state(ledger, budgets) == {"requests": (0, 3)}
    assert book.outstanding() == 1
    await book.settle(inflight, {"requests": 1})
    await asyncio.sleep(0.1)
    assert await state(ledger, budgets) == {"requests": (1, 2)}
    assert book.outstanding() == 0  # released: its record is finished, its lease gone
    await book.close()
    assert await ledger.holds_outstanding([SCOPE]) == 2
