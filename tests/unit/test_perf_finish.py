"""The finishing half's fast paths (after the upstream answered) give what their plain forms gave.

Each test holds a shape kept for speed to the form it replaced: answer headers set field by field, cached
header texts, the audit record written ``plain`` (no look for dropped keys), the usage functions with
``nonneg`` and ``has_counts`` inlined, the allowlisted response headers, the model renamer's ``find``.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from gateway.adapters.base import nonneg
from gateway.adapters.openai_chat import ChatCompletions, _visible_tokens
from gateway.adapters.openai_common import (
    cached_tokens,
    has_counts,
    reasoning_outside,
    reasoning_text,
    reported_reasoning,
    split_reasoning,
    text_tokens,
    usage_from_counts,
)
from gateway.audit.log import _DROPPED_KEYS, AuditLog
from gateway.engine import budgets
from gateway.engine.budgets import answer_headers, ratelimit_headers
from gateway.engine.compute import Bound, Measured, Usage
from gateway.engine.model_names import Renamer
from gateway.engine.record import audit_record
from gateway.engine.request import Ending, Facts
from gateway.proxy import upstream as up

NUMBERS = [0, 0.0, -0.0, 1, 1.0, True, False, 5, 5.0, 2.5, 1e12, 999_999_999_123.0, 10**20, 1e20, 10**20 + 1,
           1e-7, 123456789.123, -3, -3.5, math.inf, -math.inf, math.nan, 16, 0.25, 1 / 3]


# ------------------------------------------------------------------------------------- answer headers
def _q_plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.6g}"


def _ratelimit_plain(label: str, limit: float, remaining: float, reset: int) -> dict[str, str]:
    return {"RateLimit-Policy": f'"{label}";q={_q_plain(limit)}',
            "RateLimit": f'"{label}";r={_q_plain(remaining)};t={reset}'}


def test_ratelimit_texts_are_the_plain_formula_whatever_was_cached_before() -> None:
    budgets._POLICY_VALUES.clear()
    budgets._G6.clear()
    for first in (NUMBERS, list(reversed(NUMBERS))):  # equal numbers (0 and -0.0, 1 and 1.0 and True) cached first
        for x in first:
            assert ratelimit_headers("b", x, x, 3) == _ratelimit_plain("b", x, x, 3), x
            assert budgets._g6(x) == f"{x:.6g}", x


def _facts(**kw: Any) -> Facts:
    return Facts(request_id="req-1", api="openai.chat", started=time.perf_counter(), config=kw.pop("config", None),
                 **kw)


@pytest.mark.parametrize("reset_in", [30.2, 0.0005, -5.0])
def test_answer_headers_are_ratelimit_headers_of_the_tightest_budget(reset_in: float) -> None:
    for limit, remaining in [(1e12, 999_999_999_123.0), (100, 2.5), (7.5, -0.0), (1e15, 1e15)]:
        now = time.time()
        tight = SimpleNamespace(budget=SimpleNamespace(label="tokens-1h"), limit=limit, remaining=remaining,
                                reset_at=now + reset_in)
        reservation: Any = SimpleNamespace(tightest=lambda t=tight: t)
        bound = SimpleNamespace(k_max=1.0)
        h = answer_headers(_facts(bound=bound, clamped=("n=1", "max_tokens=16")), reservation)
        reset = int(h["RateLimit"].rsplit(";t=", 1)[1])
        expected_reset = max(0, int(tight.reset_at - time.time() + 0.999))
        assert reset in (expected_reset, expected_reset + 1)  # the clock moved on between the two readings
        assert h == {"x-kgate-request-id": "req-1", "x-kgate-k-max": "1", "x-kgate-clamped": "n=1, max_tokens=16",
                     **ratelimit_headers("tokens-1h", limit, remaining, reset)}
        assert list(h) == ["x-kgate-request-id", "x-kgate-k-max", "x-kgate-clamped", "RateLimit-Policy", "RateLimit"]
    assert answer_headers(_facts(), None) == {"x-kgate-request-id": "req-1"}


# ----------------------------------------------------------------------------------------- the record
def _record_facts(model: str | None, models: dict[str, Any], **kw: Any) -> tuple[Facts, Ending]:
    cfg = SimpleNamespace(models=models, version="v1")
    principal = SimpleNamespace(id="p", org="o", key_id="k")
    bound = Bound(samples=1, prompt_tokens=35, output_cap=16, reasoning_budget=0, output_tokens_max=16,
                  reasoning_tokens_max=0, generated_tokens_max=16, k_max=1.0, flops_max=8e11)
    facts = _facts(config=cfg, principal=principal, tier="t", model=model, upstream="sim", bound=bound, **kw)
    ending = Ending(decision="allowed", status=200, measured=Measured(Usage(1, 5, 0, 16), 0.25, 3e11))
    return facts, ending


def _upstream_model_plain(cfg: Any, model: str | None) -> str | None:
    m = cfg.models.get(model) if model else None
    return None if m is None else (m.upstream_model or model)


MODELS = {"dense": SimpleNamespace(upstream_model="llama"), "same": SimpleNamespace(upstream_model=None),
          "": SimpleNamespace(upstream_model="odd")}


@pytest.mark.parametrize("model", ["dense", "same", "", "missing", None])
def test_record_model_fields_are_the_plain_formulas(model: str | None) -> None:
    facts, ending = _record_facts(model, MODELS)
    rec = audit_record(SimpleNamespace(replica="r"), facts, ending, 0.0151)  # type: ignore[arg-type]
    assert rec["model"] == (model if model in MODELS else None)
    assert rec["upstream_model"] == _upstream_model_plain(facts.config, model)
    assert rec["clamped"] == [] and type(rec["clamped"]) is list


def test_records_written_plain_have_none_of_the_keys_the_log_drops() -> None:
    """audit_record's keys are a fixed list; it is written ``plain`` (the log does not look for these keys),
    so a key added to it that the log would drop must fail here."""
    for kw in ({}, {"eval": "run-1", "grant": "g", "clamped": ("n=1",)}):
        facts, ending = _record_facts("dense", MODELS, **kw)
        rec = audit_record(SimpleNamespace(replica="r"), facts, ending, 0.01)  # type: ignore[arg-type]
        assert _DROPPED_KEYS.isdisjoint(rec), sorted(_DROPPED_KEYS.intersection(rec))
        assert "eval" in rec or not kw


@pytest.mark.parametrize("fsync", [False, True], ids=["loop-writer", "fsync-thread"])
async def test_a_plain_record_is_written_as_a_looked_at_one(tmp_path: Path, fsync: bool) -> None:
    lines = []
    for plain in (False, True):
        log = AuditLog(tmp_path / str(plain), "r1", clock=lambda: 1_740_000_000.0, fsync=fsync)
        await log.start()
        for i in range(2):
            facts, ending = _record_facts("dense", MODELS, eval="run" if i else None)
            rec = audit_record(SimpleNamespace(replica="r1"), facts, ending, 0.01)  # type: ignore[arg-type]
            rec["ts"] = 1_740_000_000.25 + i
            rec["request_id"] = f"req-{i}"
            await log.write(rec, fresh=True, plain=plain)
        await log.close()
        (path,) = (tmp_path / str(plain) / "r1").glob("audit-*.jsonl")
        lines.append(path.read_bytes())
    assert lines[0] == lines[1] and lines[0].count(b"\n") == 2


# ---------------------------------------------------------------------------------------------- usage
def _usage_from_counts_plain(u: Any, *, samples: int, reasoning_estimate: int = 0,
                             visible_estimate: int | None = None, source: Any = "upstream",
                             prompt_key: str = "prompt_tokens", completion_key: str = "completion_tokens",
                             details_key: str = "completion_tokens_details") -> Usage:
    """usage_from_counts as it was before its fast paths."""
    prompt = nonneg(u.get(prompt_key))
    total = nonneg(u.get("total_tokens"))
    completion_v = u.get(completion_key)
    completion = nonneg(completion_v) if completion_v is not None else max(total - prompt, 0)
    details = u.get(details_key)
    reasoning = nonneg(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
    reasoning = reasoning or nonneg(u.get("reasoning_tokens"))
    if reasoning and reasoning_outside(prompt, completion, reasoning, total):
        visible = completion
    elif reasoning:
        reasoning = min(reasoning, completion)
        visible = completion - reasoning
    else:
        reasoning = split_reasoning(completion, reasoning_estimate, visible_estimate)
        visible = completion - reasoning
    hidden = total - (prompt + reasoning + visible)
    if hidden > 0:
        reasoning += hidden
    cached = 0
    for key in ("prompt_tokens_details", "input_tokens_details"):
        d = u.get(key)
        if isinstance(d, dict) and d.get("cached_tokens"):
            cached = nonneg(d.get("cached_tokens"))
            break
    else:
        cached = nonneg(u.get("prompt_cache_hit_tokens"))
    return Usage(samples=max(samples, 1), prompt_tokens=prompt, reasoning_tokens=reasoning, output_tokens=visible,
                 source=source, cached_tokens=cached)


FIGURES = [None, 0, 1, 5, 16, 21, 2**53, 2**53 + 1, 10**30, -1, True, False, 3.0, 2.7, -2.5, 1e300, math.nan,
           math.inf, "7", "x", "1e400", [], {}]


def _random_usage(rnd: random.Random, keys: tuple[str, str, str]) -> dict[str, Any]:
    u: dict[str, Any] = {}
    for key in (*keys[:2], "total_tokens", "reasoning_tokens", "prompt_cache_hit_tokens"):
        if rnd.random() < 0.7:
            u[key] = rnd.choice(FIGURES) if rnd.random() < 0.4 else rnd.randint(0, 60)
    for key in (keys[2], "prompt_tokens_details", "input_tokens_details"):
        if rnd.random() < 0.3:
            u[key] = rnd.choice([None, 3, {"reasoning_tokens": rnd.choice(FIGURES),
                                            "cached_tokens": rnd.choice(FIGURES)}, {}])
    return u


def _fields(u: Usage) -> tuple[Any, ...]:
    return (type(u.samples), u.samples, u.prompt_tokens, u.reasoning_tokens, u.output_tokens, u.source,
            u.cached_tokens)


@pytest.mark.parametrize("keys", [("prompt_tokens", "completion_tokens", "completion_tokens_details"),
                                  ("input_tokens", "output_tokens", "output_tokens_details")])
def test_usage_from_counts_is_its_plain_form(keys: tuple[str, str, str]) -> None:
    rnd = random.Random(11)
    named = {} if keys[0] == "prompt_tokens" else {"prompt_key": keys[0], "completion_key": keys[1],
                                                   "details_key": keys[2]}
    for _ in range(20_000):
        u = _random_usage(rnd, keys)
        kw: dict[str, Any] = {"samples": rnd.choice([0, 1, 2, True, -1]),
                              "reasoning_estimate": rnd.choice([0, 0, 5, -1]),
                              "visible_estimate": rnd.choice([None, 0, 3, 50]), **named}
        got, want = usage_from_counts(u, **kw), _usage_from_counts_plain(u, **kw)
        assert _fields(got) == _fields(want), (u, kw)
        details = u.get(keys[2])
        reported = nonneg(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
        assert reported_reasoning(u, keys[2]) == (reported or nonneg(u.get("reasoning_tokens")))
        assert cached_tokens(u) == want.cached_tokens


def _usage_from_json_plain(body: Any, req: Any) -> Usage:
    """ChatCompletions.usage_from_json before reasoning_text and has_counts were inlined."""
    n_choices = reasoning_est = 0
    messages: list[Any] = []
    usage = None
    if isinstance(body, dict):
        usage = body.get("usage")
        choices = body.get("choices")
        if isinstance(choices, list):
            for c in choices:
                if isinstance(c, dict):
                    n_choices += 1
                    message = c.get("message")
                    if isinstance(message, dict):
                        messages.append(message)
                        reasoning_est += text_tokens(reasoning_text(message))
    samples = n_choices or req.samples
    if has_counts(usage, "prompt_tokens", "completion_tokens", "total_tokens"):
        return _usage_from_counts_plain(usage, samples=samples, reasoning_estimate=reasoning_est,
                                        visible_estimate=sum(_visible_tokens(m) for m in messages)
                                        if reasoning_est else None)
    return Usage(samples=max(samples, 1), prompt_tokens=req.prompt_tokens, reasoning_tokens=reasoning_est,
                 output_tokens=sum(_visible_tokens(m) for m in messages), source="estimated")


def test_chat_usage_from_json_is_its_plain_form() -> None:
    rnd = random.Random(5)
    texts = [None, "", "thinking about it", 0, 7, [], "x" * 41]
    adapter = ChatCompletions()
    req = SimpleNamespace(samples=2, prompt_tokens=30)
    for _ in range(5000):
        choices = []
        for _ in range(rnd.randint(0, 3)):
            msg: dict[str, Any] = {"role": "assistant", "content": rnd.choice(texts)}
            for key in ("reasoning_content", "reasoning"):
                if rnd.random() < 0.5:
                    msg[key] = rnd.choice(texts)
            choices.append(rnd.choice([{"message": msg}, {"message": msg}, {"message": None}, "junk"]))
        usage = rnd.choice([None, {}, {"other": 1}, {"prompt_tokens": None, "total_tokens": None},
                            _random_usage(rnd, ("prompt_tokens", "completion_tokens", "completion_tokens_details"))])
        body = rnd.choice([{"choices": choices, "usage": usage}, {"choices": "x", "usage": usage}, [choices]])
        got = adapter.usage_from_json(body, req)  # type: ignore[arg-type]
        assert _fields(got) == _fields(_usage_from_json_plain(body, req)), body


def test_actual_is_the_plain_form() -> None:
    from gateway.engine.settlement import _actual

    u = Usage(2, 5, 3, 16)
    m = Measured(u, 0.25, 3e11)
    assert _actual(m) == {"requests": 1, "prompt_tokens": 5, "output_tokens": 16, "reasoning_tokens": 3,
                          "generated_tokens": u.generated_tokens, "flops": 3e11, "k_units": 0.25}


# ------------------------------------------------------------------------------------ upstream answer
def test_response_headers_are_the_allowlist_with_clean_values() -> None:
    values = ["application/json", "", "a" * 1024, "a" * 1025, "bad\r\nx", "caf\u00e9", "tab\there", "ok-1", "\x00"]
    rnd = random.Random(3)
    names = [*up.FORWARD_RESPONSE_HEADERS, "set-cookie", "server", "Content-Type"]
    for _ in range(3000):
        given = {n: rnd.choice(values) for n in rnd.sample(names, rnd.randint(0, len(names)))}
        want = {k: v for k in up.FORWARD_RESPONSE_HEADERS if (v := given.get(k)) is not None and up._clean(v)}
        got = up.response_headers(given)
        assert got == want and list(got) == list(want), given


def test_renamer_renames_every_spelling_and_leaves_other_bodies_alone() -> None:
    r = Renamer("llama-bench", "dense")
    body = b'{"model":"llama-bench","x":{"model": "llama-bench"},"modelVersion":"llama-bench"}'
    assert orjson.loads(r.body(body)) == {"model": "dense", "x": {"model": "dense"}, "modelVersion": "dense"}
    other = b'{"model":"other","text":"llama-bench"}'
    assert r.body(other) is other
    stream = r.stream()
    assert stream(b'{"id":1}') == b'{"id":1}'
    assert stream(b'{"model": "llama-bench"}') == b'{"model": "dense"}'
    assert stream(b'{"model": "llama-bench","n":2}') == b'{"model": "dense","n":2}'
