"""The ledger's and the metrics' fast paths do what the plain forms did.

Each test here pins a shape that a fast path spells out a second time (a dataclass's fields, a budget's
tightest figures, a batch's sums, the series a finished request touches) against the general form, so
that the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import random
from typing import Any

import pytest

from gateway.engine.compute import Measured, Usage
from gateway.ledger import codec
from gateway.ledger.leases import BATCH_SECONDS, LeaseBook, LocalReservation, Slice
from gateway.ledger.ledger import (
    BudgetSpec,
    HoldRequest,
    Ledger,
    Reservation,
    ScopeRef,
    _actual_amount,
    _actual_amounts,
    _hold_amount,
    _hold_amounts,
)
from gateway.ledger.values import state_of
from gateway.metrics.series import DECISIONS, Metrics, _rules

METRICS = ("requests", "prompt_tokens", "output_tokens", "reasoning_tokens", "generated_tokens", "flops", "k_units")


def _spec(metric: str, limit: float, label: str = "") -> BudgetSpec:
    return BudgetSpec(label or f"{metric}:{limit:g}", metric, "1h", False, limit)


def _reply(rnd: random.Random, n: int) -> codec.Reply:
    raw: list[Any] = [b"ok", b"1700000000"]
    for _ in range(n):
        raw += [repr(rnd.choice([0.0, rnd.uniform(0, 1e6)])).encode(), rnd.choice([0, 7, rnd.uniform(0, 1e6)]),
                str(1700000000 + rnd.randrange(86400)).encode()]
    return codec.Reply(raw)


def _budgets(rnd: random.Random) -> tuple[BudgetSpec, ...]:
    return tuple(_spec(rnd.choice(METRICS), rnd.choice([0.0, 1.0, 5e5, 1e6, 2e6]), f"b{i}")
                 for i in range(rnd.randrange(1, 5)))


# ------------------------------------------------------------------------------ spelled-out __init__
@pytest.mark.parametrize("cls", [Reservation, LocalReservation])
def test_spelled_out_init_sets_exactly_the_dataclass_fields(cls: type[Reservation]) -> None:
    """The hand-written ``__init__`` takes the fields in order with their defaults, and sets each one."""
    fields = dataclasses.fields(cls)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        if f.default is not dataclasses.MISSING:
            assert p.default == f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert p.default is None, f.name  # made per instance, as the factory would
        else:
            assert p.default is inspect.Parameter.empty, f.name
    hold = HoldRequest(ScopeRef("principal", "p"), (_spec("requests", 10),), {})
    made = cls("r1", (hold,))
    assert set(vars(made)) == {f.name for f in fields}
    for f in fields:
        want = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if want is not None:
            assert getattr(made, f.name) == want, f.name
    assert made == cls("r1", (hold,)) and made != cls("r2", (hold,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.request_id = "r3"  # type: ignore[misc]
    if cls is LocalReservation:
        a, b = LocalReservation("r", ()), LocalReservation("r", ())
        assert a.ended is not b.ended  # one list each, as default_factory made


# ------------------------------------------------------------------------------ ScopeRef.key
def test_scope_keys_are_unique_per_scope() -> None:
    refs = [ScopeRef(s, i) for s in ("principal", "org", "global") for i in ("a", "a:b", "b", ":", "*", "a:b:c")]
    assert len({r.key for r in refs}) == len(refs) == len(set(refs))
    assert ScopeRef("org", "x:y").key == ScopeRef("org", "x:y").key
    ledger = Ledger(_NoStore())  # type: ignore[arg-type]
    bases = {ledger.key_base(r) for r in refs}
    assert len(bases) == len(refs)
    assert ledger.key_base(ScopeRef("principal", "{a}%")) == "kgate:{principal:%7Ba%7D%25}"


class _NoStore:
    """What the ledger needs from a store to be built; nothing is sent here."""

    connected = False

    def register_script(self, text: str) -> object:
        return object()


# ------------------------------------------------------------------------------ the tightest budget
def _tightest_plain(holds: tuple[HoldRequest, ...], replies: tuple[codec.Reply, ...]) -> Any:
    """Reservation.tightest as it was: one budget at a time, each read with used_held and figures_at."""
    best = None
    for hold, reply in zip(holds, replies, strict=False):
        for i, b in enumerate(hold.budgets):
            if b.limit > 0:
                used, held = reply.used_held(i)
                free = b.limit - used - held
                fraction = (free if free > 0.0 else 0.0) / b.limit
            else:
                fraction = 0.0
            if best is None or fraction < best[0]:
                best = (fraction, hold, i, reply)
    if best is None:
        return None
    _, hold, i, reply = best
    return state_of(hold.scope, hold.budgets[i], reply.figures_at(i))


def test_tightest_from_columns_and_from_slices_is_the_plain_one() -> None:
    rnd = random.Random(11)
    scopes = (ScopeRef("principal", "p"), ScopeRef("org", "o"), ScopeRef("global", "*"))
    for _ in range(3000):
        holds = tuple(HoldRequest(scopes[k], _budgets(rnd), {}) for k in range(rnd.randrange(1, 4)))
        replies = tuple(_reply(rnd, len(h.budgets)) for h in holds)
        want = _tightest_plain(holds, replies)
        assert Reservation("r", holds, replies).tightest() == want
        slices = tuple(Slice(f"lease:{k}", h.scope, h.budgets, [0.0] * len(h.budgets),
                             Reservation(f"lease:{k}", (h,), (reply,)))
                       for k, (h, reply) in enumerate(zip(holds, replies, strict=True)))
        local = LocalReservation("r", holds, replies, 0.0, slices, tuple((0.0,) * len(h.budgets) for h in holds))
        assert local.tightest() == want
        assert local.tightest() == want  # the slices' cached figures, again


def test_used_held_columns_and_reset_at_are_used_held_and_figures_at() -> None:
    rnd = random.Random(5)
    for n in range(6):
        reply = _reply(rnd, n)
        used, held = reply.used_held_columns()
        assert list(zip(used, held, strict=True)) == [reply.used_held(i) for i in range(n)]
        assert [reply.reset_at(i) for i in range(n)] == [reply.figures_at(i).reset_at for i in range(n)]


# ------------------------------------------------------------------------------ amounts
def test_hold_and_actual_amounts_are_the_per_budget_ones() -> None:
    rnd = random.Random(3)
    for _ in range(2000):
        budgets = _budgets(rnd)
        given: dict[str, Any] = {m: rnd.choice([0, 1, 2.5, 1e15]) for m in METRICS if rnd.random() < 0.7}
        hold = HoldRequest(ScopeRef("principal", "p"), budgets, given)
        try:
            plain: dict[str, float] | None = {b.metric: _hold_amount(hold, b) for b in budgets}
        except ValueError:
            plain = None
        if plain is None:
            with pytest.raises(ValueError, match="no amount to hold"):
                _hold_amounts(hold)
        else:
            assert _hold_amounts(hold) == plain
        assert _actual_amounts(given, (hold, hold)) == {b.metric: _actual_amount(given, b.metric) for b in budgets}
    for bad in (-1.0, float("nan"), float("inf")):
        hold = HoldRequest(ScopeRef("principal", "p"), (_spec("requests", 5), _spec("flops", 5)), {"flops": bad})
        with pytest.raises(ValueError, match="finite number >= 0"):
            _hold_amounts(hold)
        with pytest.raises(ValueError, match="finite number >= 0"):
            _actual_amounts({"flops": bad}, (hold,))


# ------------------------------------------------------------------------------ the lease book
class _Ledger:
    """A ledger that takes every batch and remembers it."""

    def __init__(self) -> None:
        self.batches: list[tuple[dict[str, float], list[float]]] = []

    async def settle_batch(self, scope: ScopeRef, budgets: Any, batch_id: str, slice_id: str,
                           actual: dict[str, float], cuts: list[float]) -> str:
        self.batches.append((dict(actual), list(cuts)))
        return "applied"

    async def release(self, reservation: Reservation) -> None:
        return None


async def test_admitting_and_batching_count_what_the_plain_loops_counted() -> None:
    """Amounts per budget (a metric of two budgets included), demand, remainders and a batch's sums."""
    rnd = random.Random(17)
    budgets = (_spec("requests", 1e12, "r1m"), _spec("generated_tokens", 1e15), _spec("requests", 1e12, "r1d"),
               _spec("k_units", 1e15))
    scope = ScopeRef("principal", "p")
    ledger = _Ledger()
    book = LeaseBook(ledger, 60.0)  # type: ignore[arg-type]
    first = HoldRequest(scope, budgets, {"generated_tokens": 10})
    assert book.admit("r0", [first]) is None  # the first request reserves for itself
    key = (scope.key, id(budgets))
    slice_reply = codec.Reply([b"ok", b"5", *(x for _ in budgets for x in (b"0", b"0", b"60"))])
    s = book._slices[key] = Slice("lease:x:1", scope, budgets, [1e9] * 4,
                                  Reservation("lease:x:1", (first,), (slice_reply,)))
    demand = book._demand[key]
    assert demand.names == tuple(b.metric for b in budgets)
    admitted, expected_sums = [], [1.0, 10, 1.0, 0.0]  # r0's, noted before it was turned away
    for i in range(200):
        given: dict[str, float] = {"generated_tokens": rnd.randrange(1, 500)}
        if rnd.random() < 0.5:
            given["k_units"] = rnd.random()
        if rnd.random() < 0.3:
            given["requests"] = 1
        res = book.admit(f"r{i + 1}", [HoldRequest(scope, budgets, given)])
        assert isinstance(res, LocalReservation)
        want = tuple(given.get(b.metric, 1.0 if b.metric == "requests" else 0.0) for b in budgets)
        assert res.amounts == (want,)
        expected_sums = [a + w for a, w in zip(expected_sums, want, strict=True)]
        admitted.append(res)
    assert demand.sums == expected_sums
    remaining, taken = [1e9] * 4, [0.0] * 4  # in order, one request at a time, as the plain loops did
    for r in admitted:
        for j, a in enumerate(r.amounts[0]):
            remaining[j] -= a
            taken[j] += a
    assert s.remaining == remaining and s.inflight == 200
    actuals = []
    for res in admitted:
        actual = {m: float(rnd.randrange(0, 50))
                  for m in ("generated_tokens", "k_units", "flops") if rnd.random() < 0.8}
        actuals.append(actual)
        book.post(res, actual)
        book.post(res, actual)  # once per request
    await asyncio.sleep(BATCH_SECONDS * 4)  # the batch goes out
    assert len(ledger.batches) == 1
    await book.close()
    sent_actual, sent_cuts = ledger.batches[0]
    plain: dict[str, float] = {}
    for actual in actuals:
        for metric, value in actual.items():
            plain[metric] = plain.get(metric, 0.0) + value
    assert sent_actual == {b.metric: plain.get(b.metric, 0.0) for b in budgets}
    assert sent_cuts == taken
    assert ledger.batches[1:] == [(dict.fromkeys(sent_actual, 0.0), remaining)]  # the unused part goes back
    assert s.inflight == 0 and book.outstanding() == 0


# ------------------------------------------------------------------------------ metrics
def _observe_plain(m: Metrics, model: str, tier: str, api: str, decision: str, usage: Measured | None,
                   overhead_s: float | None, evaluated_max_k: float | None, would_deny: bool, rule: str | None) -> None:
    """observe_request as it was: each family's child looked up on its own, every increment through inc()."""
    model, tier = m._model(model), m._tier(tier)
    if would_deny and decision in ("allowed", "clamped", "partial", "spooled"):
        decision = "would_deny"
    m._requests.labels(model, tier, api, decision).inc()
    if usage is not None:
        u = usage.usage
        m._tokens.labels(model, tier, "prompt").inc(max(u.prompt_tokens, 0))
        m._tokens.labels(model, tier, "reasoning").inc(max(u.reasoning_tokens, 0))
        m._tokens.labels(model, tier, "output").inc(max(u.output_tokens, 0))
        m._flops.labels(model, tier).inc(max(usage.flops, 0.0))
        m._k.labels(model, tier).observe(usage.k)
        m._samples.labels(model, tier).observe(u.samples)
        if evaluated_max_k is not None and usage.k > evaluated_max_k:
            m._k_above.labels(model, tier).inc()
        if usage.overrun:
            m._overruns.labels(model, tier).inc()
        m._usage_source.labels(u.source).inc()
    if overhead_s is not None:
        m._overhead.labels(api).observe(max(overhead_s, 0.0))
    if decision in ("denied", "would_deny") or would_deny:
        for r in _rules((), rule):
            m._denials.labels(tier, r).inc()
    elif decision == "clamped":
        for r in _rules((), rule):
            m._clamps.labels(tier, r).inc()


def _exposition(m: Metrics) -> list[bytes]:
    return sorted(line for line in m.render()[0].splitlines() if b"_created" not in line)


def test_request_series_expose_what_the_plain_lookups_did() -> None:
    class Policy:
        models = {"dense": None, "moe": None}
        tiers = {"free": None, "pro": None}
        version = "abc"

    rnd = random.Random(23)
    fast, plain = Metrics(process_metrics=False), Metrics(process_metrics=False)
    for step in range(4000):
        if step == 2000:  # the label guard: names outside the policy fold into 'unknown' from here on
            fast.set_policy(Policy)  # type: ignore[arg-type]
            plain.set_policy(Policy)  # type: ignore[arg-type]
        usage = None if rnd.random() < 0.2 else Measured(
            Usage(rnd.randrange(0, 9), rnd.choice([-1, 0, 30]), rnd.choice([0, 200]), rnd.randrange(-2, 900),
                  rnd.choice(["upstream", "counted", "estimated"])),
            rnd.choice([0.5, 3.0, 40.0, 1e3]), rnd.choice([-1.0, 0.0, 2e12]), overrun=rnd.random() < 0.1)
        args = (rnd.choice(["dense", "moe", "other", "unknown"]), rnd.choice(["free", "pro", "gold", "none"]),
                rnd.choice(["openai.chat", "anthropic.messages"]), rnd.choice(sorted(DECISIONS)), usage,
                rnd.choice([None, -0.1, 0.0004, 0.3]), rnd.choice([None, 4.0]), rnd.random() < 0.2,
                rnd.choice([None, "max_k", "max_k,b1"]))
        fast.observe_request(*args[:7], would_deny=args[7], rule=args[8])
        _observe_plain(plain, *args)
    assert _exposition(fast) == _exposition(plain)
    with pytest.raises(ValueError, match="unknown decision"):
        fast.observe_request("dense", "free", "openai.chat", "maybe")
    for op, seconds in (("reserve", 0.001), ("settle", -1.0), ("reserve", 0.3)):
        fast.store_latency(op, seconds)
        plain.observe_store(op, max(seconds, 0.0))
    assert _exposition(fast) == _exposition(plain)
