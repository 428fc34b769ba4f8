"""The ledger's wire format (gateway.ledger.codec) without Redis: arguments as Lua will read them, replies
as either client delivers them (bytes from the pipelined client, str from redis-py, int for whole numbers).
The same round trips through the real scripts are in tests/integration/test_ledger_wire.py."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from gateway.ledger import codec
from gateway.ledger.errors import STORE_FAILURES, ScriptMissing, StoreError, store_error
from gateway.ledger.ledger import BudgetSpec, Reservation, ScopeRef
from gateway.ledger.values import HoldRequest

# lib.lua reads a budget argument with string.match(arg, '^(%S+) ([01]) (%S+) (.*)$'); the same in Python
# (Lua's %S: not a space character; (.*) also takes newlines, as DOTALL).
_LUA_BUDGET = re.compile(rb"^(\S+) ([01]) (\S+) (.*)$", re.DOTALL)

amounts = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
labels = st.text(min_size=1).filter(lambda s: "\x00" not in s)


def lua_budget(arg: bytes) -> tuple[str, bool, float, str]:
    m = _LUA_BUDGET.match(arg)
    assert m is not None, arg
    return m[1].decode(), m[2] == b"1", float(m[3]), m[4].decode()


@given(label=labels, limit=amounts, rolling=st.booleans())
def test_a_budget_argument_reads_back_whatever_its_label(label: str, limit: float, rolling: bool) -> None:
    spec = BudgetSpec(label, "output_tokens", "1d", rolling, limit)
    assert spec.script_arg is spec.script_arg  # encoded once per spec
    assert lua_budget(spec.script_arg) == ("1d", rolling, limit, label)


@given(x=st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_go_as_text_that_round_trips_exactly(x: float) -> None:
    assert float(codec.num(x)) == x
    assert len(codec.num(x).replace("-", "").replace(".", "").split("e")[0].lstrip("0")) <= 17


def test_call_arguments_have_one_layout_for_every_script() -> None:
    a = BudgetSpec("req", "requests", "1m", False, 10)
    b = BudgetSpec("out tokens {x}", "output_tokens", "1d", True, 1e15)
    argv = codec.call_args("1767268800.5", "charge", "3600.0", "r1", "60.0", (a, b),
                           {"requests": 1.0, "output_tokens": 3.2e13, "flops": 7.0})
    assert argv[:5] == ["1767268800.5", "charge", "3600.0", "r1", "60.0"]
    assert [lua_budget(x) for x in argv[5::2]] == [("1m", False, 10.0, "req"), ("1d", True, 1e15, "out tokens {x}")]
    assert [float(x) for x in argv[6::2]] == [1.0, 3.2e13]
    assert codec.call_args("", "release", "60.0", "r2", "1") == ["", "release", "60.0", "r2", "1"]
    with pytest.raises(KeyError):  # an amount for every budget's metric
        codec.call_args("", "charge", "60.0", "r3", "", (a, b), {"requests": 1.0})
    with pytest.raises(KeyError):
        codec.call_args("", "charge", "60.0", "r3", "", (a,))


@pytest.mark.parametrize("wire", [bytes, str], ids=["resp-bytes", "redispy-str"])
def test_replies_decode_from_either_client(wire) -> None:
    def w(x: object) -> object:
        return x if isinstance(x, int) else wire(x, "ascii") if wire is bytes else x

    # whole numbers below 1e15 come as integers, others as 17-digit text
    raw = [w("ok"), w("1767268800.25"), 3, w("2.5"), 1767312000, w("9007199254740992"), 0, w("1.7e+300")]
    reply = codec.Reply(raw)
    assert (reply.status, reply.now) == ("ok", 1767268800.25)
    assert reply.used_held(0) == (3.0, 2.5) and reply.used_held(1) == (9007199254740992.0, 0.0)
    assert reply.figures() == [codec.Figures(3.0, 2.5, 1767312000.0), codec.Figures(9007199254740992.0, 0.0, 1.7e300)]
    assert reply.figures_at(1) == reply.figures()[1]

    refused = codec.Reply([w("refused"), w("100.5"), w("2"), w("900"), w("1e+15"), w("1767312000")])
    assert refused.status == "refused"
    assert refused.refused() == codec.RefusedAt(index=1, used=900.0, held=1e15, retry_at=1767312000.0)

    bare = codec.Reply([w("repeat"), 7])  # a settle without report, a release
    assert (bare.status, bare.now, bare.figures()) == ("repeat", 7.0, [])
    assert codec.status(raw) == "ok" and codec.status([w("applied"), 7]) == "applied"


def test_the_tightest_budget_is_read_from_the_replies() -> None:
    alice = ScopeRef("principal", "alice")
    loose = BudgetSpec("loose", "requests", "1m", False, 100)
    tight = BudgetSpec("tight", "output_tokens", "1d", False, 1000)
    zero = BudgetSpec("none", "reasoning_tokens", "1d", False, 0)
    hold = HoldRequest(alice, (loose, tight), {"output_tokens": 300})
    reply = codec.Reply([b"ok", b"5", 10, 1, 60, 500, 300, 86400])
    res = Reservation("r1", (hold,), (reply,), 65.0)
    best = res.tightest()
    assert best is not None and (best.budget, best.used, best.held, best.remaining, best.reset_at) == (
        tight, 500, 300, 200, 86400)
    assert [s.remaining for s in res.states] == [89, 200]
    nothing = Reservation("r2", (HoldRequest(alice, (zero,), {}),), (codec.Reply([b"ok", b"5", 0, 0, 9]),))
    assert nothing.tightest() is not None and nothing.tightest().remaining == 0  # type: ignore[union-attr]
    assert Reservation("r3", (hold,)).tightest() is None and Reservation("r3", (hold,)).states == ()


def test_store_errors_keep_their_cause_and_noscript_is_script_missing() -> None:
    cause = NoScriptError("NOSCRIPT No matching script. Please use EVAL.")
    missing = store_error(cause)
    assert isinstance(missing, ScriptMissing) and isinstance(missing, StoreError) and missing.__cause__ is cause
    for exc in (RedisConnectionError("lost"), ResponseError("ERR boom"), TimeoutError(), OSError("refused")):
        assert isinstance(exc, STORE_FAILURES)
        err = store_error(exc)
        assert type(err) is StoreError and err.__cause__ is exc and str(err)
