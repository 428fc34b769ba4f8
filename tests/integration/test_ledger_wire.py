"""The ledger's wire format through the real scripts, over both clients (``store_target``): arguments encoded by
gateway.ledger.codec are what lib.lua reads, replies lib.lua builds are what the codec decodes, and hold records
keep their stored format (other replicas and versions read them; see "Hold records" in lib.lua).

The same round trips without Redis are in tests/unit/test_ledger_codec.py.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest

from gateway.ledger import codec
from gateway.ledger import store as store_mod
from gateway.ledger.ledger import BudgetRefused, BudgetSpec, HoldRequest, Ledger, Reservation, ScopeRef
from gateway.ledger.scripts import as_script_store

LIB = resources.files("gateway.ledger").joinpath("lua", "lib.lua").read_text(encoding="utf-8")
ALICE = ScopeRef("principal", "alice")

ECHO_ARGS = """
local now, now_s, charge, ttl, request_id, option, budgets = read_call()
local out = { now_s, charge and 'charge' or 'release', fmt(ttl), request_id, option }
for _, b in ipairs(budgets) do
  out[#out + 1] = b.window
  out[#out + 1] = b.rolling and '1' or '0'
  out[#out + 1] = fmt(b.limit)
  out[#out + 1] = b.label
  out[#out + 1] = fmt(b.amount)
end
return out
"""

# every budget's amount comes back twice, as a reply number and as text, and its limit as a reply number
ECHO_FIGURES = """
local now, now_s, _, _, _, _, budgets = read_call()
local out = { 'ok', now_s }
for _, b in ipairs(budgets) do
  local n = #out
  out[n + 1], out[n + 2], out[n + 3] = reply_num(b.amount), fmt(b.amount), reply_num(b.limit)
end
return out
"""

AMOUNTS = (0.0, 1.0, 0.1, 1e-7, 123456789.12345679, 3.2e13, 1e15 - 1, 1e15 + 0.5, 2.0**53, 2.0**53 * 3, 1e300)
LABELS = ("req", "team budget {x}: tokens\nper day", "ünïcode ✓", "a  b", "%7B}{")


def specs() -> tuple[BudgetSpec, ...]:
    return tuple(BudgetSpec(LABELS[i % len(LABELS)], "output_tokens", ("1m", "1d", "7d")[i % 3], i % 2 == 1,
                            AMOUNTS[-1 - i]) for i in range(len(AMOUNTS)))


def text(x: object) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def encode(now: str, option: str, budgets: tuple[BudgetSpec, ...], amounts: tuple[float, ...]) -> list:
    """One call's arguments with a different amount for each budget, though they share a metric: the codec
    encodes each budget with its metric's amount, so one budget per encoding, then joined."""
    argv = head = codec.call_args(now, "charge", codec.num(3600), "req-1", option)
    for b, a in zip(budgets, amounts, strict=True):
        argv = argv + codec.call_args(now, "charge", codec.num(3600), "req-1", option, (b,), {b.metric: a})[len(head):]
    return argv


async def run(store_client, script: str, args: list) -> list:
    store = as_script_store(store_client)
    return await store.register_script(LIB + script)(keys=["kgate-wire:{alice}"], args=args)


async def test_arguments_reach_lua_as_encoded(store_client) -> None:
    budgets = specs()
    argv = encode(codec.num(1767268800.125), codec.num(90.5), budgets, AMOUNTS)
    out = [text(x) for x in await run(store_client, ECHO_ARGS, argv)]
    assert out[:5] == ["1767268800.125", "charge", "3600", "req-1", "90.5"]
    seen = [out[i:i + 5] for i in range(5, len(out), 5)]
    assert len(seen) == len(budgets)
    for (window, rolling, limit, label, amount), b, a in zip(seen, budgets, AMOUNTS, strict=True):
        assert (window, rolling == "1", float(limit), label, float(amount)) == (b.window, b.rolling, b.limit,
                                                                              b.label, a)
    release = codec.call_args("", "release", codec.num(60), "req-2", "1")  # no budgets; Redis' own clock
    out = [text(x) for x in await run(store_client, ECHO_ARGS, release)]
    assert out[1:] == ["release", "60", "req-2", "1"] and float(out[0]) > 1.7e9


async def test_replies_from_lua_decode_exactly(store_client) -> None:
    budgets = specs()
    argv = encode(codec.num(1767268800.5), "", budgets, AMOUNTS)
    reply = codec.Reply(await run(store_client, ECHO_FIGURES, argv))
    assert (reply.status, reply.now) == ("ok", 1767268800.5)
    assert reply.figures() == [codec.Figures(a, a, b.limit) for a, b in zip(AMOUNTS, budgets, strict=True)]
    assert [reply.used_held(i) for i in range(len(AMOUNTS))] == [(a, a) for a in AMOUNTS]



async def test_a_refusal_decodes_exactly(store_client, key_prefix, clock) -> None:
    ledger = Ledger(store_client, key_prefix=key_prefix, clock=clock)
    odd = BudgetSpec("odd {x}", "flops", "month", False, 1e15 + 0.25)
    await ledger.reserve("r1", [HoldRequest(ALICE, (odd,), {"flops": 6e14 + 0.125})], 60)
    with pytest.raises(BudgetRefused) as info:
        await ledger.reserve("r2", [HoldRequest(ALICE, (odd,), {"flops": 4e14 + 0.5})], 60)
    r = info.value.refusal
    assert (r.label, r.limit, r.used, r.held, r.requested) == ("odd {x}", 1e15 + 0.25, 0, 6e14 + 0.125, 4e14 + 0.5)
    assert r.remaining == 1e15 + 0.25 - (6e14 + 0.125) and r.reset_at == 1769904000  # 2026-02-01


@pytest.fixture
async def raw(store_target):
    """A plain redis-py client to the same Redis, to read and write what the scripts store."""
    client = await store_mod.connect(store_target.url, timeout=5)
    yield client
    await store_mod.close(client)


async def test_the_scripts_write_records_in_the_stored_format(store_client, raw, key_prefix, clock) -> None:
    ledger = Ledger(store_client, key_prefix=key_prefix, clock=clock)
    out = BudgetSpec("out-1d", "output_tokens", "1d", False, 1000)
    none = BudgetSpec("reasoning", "reasoning_tokens", "1d", False, 10)
    await ledger.reserve("r1", [HoldRequest(ALICE, (out, none), {"output_tokens": 300, "reasoning_tokens": 0})],
                         lease_seconds=10)
    recs = ledger.key_base(ALICE) + ":rec"
    record = json.loads(await raw.hget(recs, "r1"))
    assert record == {"e": str(int(clock() + 10)), "s": "h",
                      "b": [["out-1d", "1d", "0", "300.0"]]}  # budgets with nothing held are left out
    clock.advance(11)
    await ledger.state(ALICE, [out])  # reaps the expired lease: charged to the day (lease_expiry charge)
    record = json.loads(await raw.hget(recs, "r1"))
    day = int(clock() // 86400 * 86400)
    assert record["s"] == "c" and record["b"] == [
        ["out-1d", "1d", "0", "300.0", f"{ledger.key_base(ALICE)}:u:1d:out-1d:{day}", ""]]


async def test_a_record_written_by_an_earlier_version_is_settled(store_client, raw, key_prefix, clock) -> None:
    """Records in Redis outlive the code that wrote them: a hold an earlier gateway made, in the stored format,
    is released and replaced by the actual like any other."""
    ledger = Ledger(store_client, key_prefix=key_prefix, clock=clock)
    out = BudgetSpec("out-1d", "output_tokens", "1d", False, 1000)
    base = ledger.key_base(ALICE)
    expiry = f"{clock() + 60:.0f}"
    await raw.hset(f"{base}:rec", "old-1", json.dumps({"e": expiry, "s": "h", "b": [["out-1d", "1d", "0", "250"]]}))
    await raw.zadd(f"{base}:leases", {"old-1": float(expiry)})
    await raw.hset(f"{base}:held", "out-1d", "250")
    (before,) = await ledger.state(ALICE, [out])
    assert (before.used, before.held) == (0, 250)
    result = await ledger.settle(await ledger.reserve("new-1", [HoldRequest(ALICE, (out,), {"output_tokens": 5})],
                                                      60), {"output_tokens": 5})
    assert result.applied
    old = await ledger.settle(Reservation("old-1", (HoldRequest(ALICE, (out,), {"output_tokens": 250}),)),
                              {"output_tokens": 120})
    assert old.outcomes == ((ALICE, "applied"),)
    (after,) = old.states
    assert (after.used, after.held) == (125, 0)
    assert await raw.hget(f"{base}:rec", "old-1") == "S" and await raw.zcard(f"{base}:leases") == 0


async def test_a_charge_recorded_by_an_earlier_version_is_taken_back(store_client, raw, key_prefix, clock) -> None:
    """An expired lease charged in the stored format (state 'c', each budget with the key and field it was
    charged to) is taken back by a release, and corrected to the actual by a settle."""
    ledger = Ledger(store_client, key_prefix=key_prefix, clock=clock)
    day = BudgetSpec("out-1d", "output_tokens", "1d", False, 1000)
    hour = BudgetSpec("out-1h", "output_tokens", "1h", True, 1000)
    base = ledger.key_base(ALICE)
    start = int(clock() // 86400 * 86400)
    slice_ = int(clock() // 60)  # a rolling hour's slices are a minute wide
    await raw.set(f"{base}:u:1d:out-1d:{start}", "70", ex=3600)
    await raw.hset(f"{base}:r:1h:out-1h", str(slice_), "70")
    for rid in ("void-me", "settle-me"):
        await raw.hset(f"{base}:rec", rid, json.dumps({"e": f"{clock():.0f}", "s": "c", "b": [
            ["out-1d", "1d", "0", "35", f"{base}:u:1d:out-1d:{start}", ""],
            ["out-1h", "1h", "1", "35", f"{base}:r:1h:out-1h", str(slice_)]]}))
    holds = (HoldRequest(ALICE, (day, hour), {"output_tokens": 35}),)
    await ledger.release(Reservation("void-me", holds))
    assert [(s.used, s.held) for s in await ledger.state(ALICE, [day, hour])] == [(35, 0), (35, 0)]
    settled = await ledger.settle(Reservation("settle-me", holds), {"output_tokens": 12})
    assert settled.outcomes == ((ALICE, "applied"),)
    assert [(s.used, s.held) for s in settled.states] == [(12, 0), (12, 0)]
