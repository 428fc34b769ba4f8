"""The compute model of docs/design.md §1: K, FLOPs, admission bounds and clamping."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.engine.compute import (
    ComputeRequest,
    Usage,
    admission_bound,
    check_caps,
    clamp_target,
    expected_generated,
    flops,
    k_multiple,
    measure,
)
from gateway.policy.config import ModelConfig, TierConfig


def model(**kw) -> ModelConfig:
    base = {"upstream": "sim", "active_params": 1e9, "reference_output_tokens": 512, "max_output_tokens": 8192}
    return ModelConfig(**{**base, **kw})


DENSE = model()
REASONER = model(reasoning=True, max_output_tokens=32768, reference_output_tokens=1000,
                 reasoning_effort_tokens={"low": 500, "high": 8000})


# ------------------------------------------------------------------------------------------- K examples
def test_single_answer_of_reference_length_is_k1():
    assert k_multiple(DENSE, 1, 512, 512) == 1.0
    assert k_multiple(DENSE, 1, 2000, 2000) == 1.0  # longer than reference: still one answer


def test_short_answer_counts_against_reference_length():
    assert k_multiple(DENSE, 1, 128, 128) == pytest.approx(0.25)


def test_best_of_8_is_about_8():
    assert k_multiple(DENSE, 8, 8 * 600, 8 * 600) == pytest.approx(8.0)


def test_design_example_9000_reasoning_before_1000_answer_is_k10():
    assert k_multiple(REASONER, 1, 10_000, 1_000) == pytest.approx(10.0)


# ------------------------------------------------------------------------------------------------ FLOPs
def test_flops_without_attention_is_2n_tokens():
    assert flops(DENSE, 100, 400, 1) == 2 * 1e9 * 500


def test_flops_shared_prefill_counts_prompt_once():
    shared = flops(DENSE, 1000, 800, 4)
    separate = flops(model(shared_prefill=False), 1000, 800, 4)
    assert shared == 2e9 * (1000 + 800)
    assert separate == 2e9 * (4 * 1000 + 800)


def test_flops_attention_term_kaplan():
    m = model(n_layers=10, d_attn=100)
    p, g, s = 300, 200, 2
    nd = 10 * 100
    length = g / s
    expected = 2e9 * (p + g) + nd * p * p + s * 2 * nd * (p * length + length * length / 2)
    assert flops(m, p, g, s) == pytest.approx(expected)


def test_moe_uses_active_parameters():
    moe = model(active_params=37e9, total_params=671e9)
    assert flops(moe, 10, 10, 1) == 2 * 37e9 * 20


# --------------------------------------------------------------------------------------------- bounds
def test_bound_non_reasoning_k_max_is_samples():
    b = admission_bound(ComputeRequest(api="x", model="m", samples=3, output_cap=100), DENSE)
    assert b.k_max == 3 and b.reasoning_budget == 0 and b.generated_tokens_max == 300


def test_bound_reasoning_uses_output_cap_without_budget():
    b = admission_bound(ComputeRequest(api="x", model="m", samples=2, output_cap=5000), REASONER)
    assert b.reasoning_budget == 5000
    assert b.k_max == pytest.approx(2 * (1 + 5000 / 1000))


def test_bound_explicit_thinking_budget_wins_when_smaller():
    req = ComputeRequest(api="anthropic.messages", model="m", output_cap=8000, thinking_budget=2000)
    b = admission_bound(req, REASONER)
    assert b.reasoning_budget == 2000 and b.k_max == pytest.approx(3.0)


@pytest.mark.parametrize("api", ["gemini", "openai.chat", "openai.responses"])
def test_a_thinking_budget_the_provider_does_not_enforce_is_no_bound(api):
    # Gemini's thinkingBudget is a guide the model may overshoot: only the output cap bounds its thoughts.
    b = admission_bound(ComputeRequest(api=api, model="m", output_cap=8000, thinking_budget=2000), REASONER)
    assert b.reasoning_budget == 8000 and b.k_max == pytest.approx(9.0)


@pytest.mark.parametrize("api", ["anthropic.messages", "openai.chat", "gemini"])
def test_thinking_disabled_is_a_claim_it_lowers_the_expected_amount_not_the_bound(api):
    on = ComputeRequest(api=api, model="m", output_cap=8000)
    off = ComputeRequest(api=api, model="m", output_cap=8000, thinking_disabled=True)
    assert admission_bound(off, REASONER) == admission_bound(on, REASONER)
    assert admission_bound(off, REASONER).reasoning_budget == 8000
    b = admission_bound(off, REASONER)
    assert expected_generated(off, REASONER, b) < expected_generated(on, REASONER, b)


def test_bound_default_cap_is_model_max_and_request_cannot_exceed_it():
    assert admission_bound(ComputeRequest(api="x", model="m"), DENSE).output_cap == 8192
    assert admission_bound(ComputeRequest(api="x", model="m", output_cap=10**9), DENSE).output_cap == 8192


def test_effort_is_soft_it_never_changes_the_bound():
    lo = admission_bound(ComputeRequest(api="x", model="m", effort="low", output_cap=9000), REASONER)
    hi = admission_bound(ComputeRequest(api="x", model="m", effort="high", output_cap=9000), REASONER)
    assert lo == hi


def test_expected_uses_effort_table_and_never_exceeds_bound():
    req = ComputeRequest(api="x", model="m", effort="low", output_cap=9000, samples=2)
    b = admission_bound(req, REASONER)
    assert expected_generated(req, REASONER, b) == 2 * (1000 + 500)
    assert expected_generated(req, REASONER, b, recent_mean=10**9) == b.generated_tokens_max


# ------------------------------------------------------------------------------------- property: K ≤ K_max
@st.composite
def request_and_usage(draw):
    reasoning = draw(st.booleans())
    v_ref = draw(st.integers(1, 4096))
    max_out = draw(st.integers(1, 65536))
    m = model(reasoning=reasoning, reference_output_tokens=v_ref, max_output_tokens=max_out)
    s = draw(st.integers(1, 128))
    cap = draw(st.one_of(st.none(), st.integers(0, 100_000)))
    budget = draw(st.one_of(st.none(), st.integers(0, 100_000)))
    disabled = draw(st.booleans())
    api = draw(st.sampled_from(["anthropic.messages", "gemini", "openai.chat"]))
    req = ComputeRequest(api=api, model="m", samples=s, output_cap=cap, thinking_budget=budget,
                         thinking_disabled=disabled, prompt_tokens=10)
    b = admission_bound(req, m)
    # A usage consistent with the caps: per sample r_i ≤ R_budget and r_i + v_i ≤ C.
    r_total = v_total = 0
    for _ in range(min(s, 8)):
        r = draw(st.integers(0, b.reasoning_budget))
        v = draw(st.integers(0, b.output_cap - r))
        r_total += r
        v_total += v
    # Replicate the drawn samples to reach S (keeps examples small but exercises large S).
    reps, extra = divmod(s, min(s, 8))
    r_total, v_total = r_total * reps, v_total * reps
    if extra:
        r_total += 0
    return m, req, b, Usage(samples=s, prompt_tokens=10, reasoning_tokens=r_total, output_tokens=v_total)


@settings(deadline=None)  # examples: the hypothesis profile (tests/unit/conftest.py)
@given(request_and_usage())
def test_k_never_exceeds_k_max(case):
    m, _req, b, usage = case
    measured = measure(usage, m, b)
    assert measured.k <= b.k_max * (1 + 1e-9)
    assert usage.generated_tokens <= b.generated_tokens_max
    assert not measured.overrun


@settings(deadline=None)  # examples: the hypothesis profile (tests/unit/conftest.py)
@given(request_and_usage(), st.integers(0, 10**6))
def test_flops_never_exceed_flops_max_for_same_prompt(case, _):
    m, _req, b, usage = case
    assert flops(m, b.prompt_tokens, usage.generated_tokens, usage.samples) <= flops(
        m, b.prompt_tokens, b.generated_tokens_max, b.samples) + 1e-6


def test_overrun_is_flagged():
    b = admission_bound(ComputeRequest(api="x", model="m", samples=1, output_cap=100), DENSE)
    m = measure(Usage(samples=1, prompt_tokens=1, reasoning_tokens=0, output_tokens=150), DENSE, b)
    assert m.overrun and "generated" in m.overrun_reasons[0]


# ------------------------------------------------------------------------------------------ caps & clamp
def test_check_caps_names_each_cap():
    tier = TierConfig(max_k=4, max_samples=2, max_reasoning_tokens=1000, max_flops=1e12, efforts=["low"])
    req = ComputeRequest(api="x", model="m", samples=4, output_cap=5000, effort="high")
    caps = {v.cap for v in check_caps(req, admission_bound(req, REASONER), tier, REASONER)}
    assert caps == {"max_k", "max_samples", "max_reasoning_tokens", "max_flops", "efforts"}


def test_evaluated_max_k_gates_unless_beyond_evaluated():
    m = model(evaluated_max_k=4)
    req = ComputeRequest(api="x", model="m", samples=8, output_cap=10)
    b = admission_bound(req, m)
    assert [v.cap for v in check_caps(req, b, TierConfig(), m)] == ["evaluated_max_k"]
    assert check_caps(req, b, TierConfig(beyond_evaluated=True), m) == []


@settings(deadline=None)  # examples: the hypothesis profile (tests/unit/conftest.py)
@given(st.integers(1, 64), st.one_of(st.none(), st.integers(1, 40000)), st.one_of(st.none(), st.integers(0, 40000)),
       st.floats(1, 64), st.one_of(st.none(), st.integers(1, 16)), st.booleans())
def test_clamp_target_fits_the_caps(s, cap, budget, max_k, max_samples, reasoning):
    m = REASONER if reasoning else DENSE
    tier = TierConfig(max_k=max_k, max_samples=max_samples, on_exceed="clamp")
    req = ComputeRequest(api="x", model="m", samples=s, output_cap=cap, thinking_budget=budget)
    target = clamp_target(req, m, tier)
    if target is None:
        return
    assume(target.output_cap >= 1)
    new_budget = budget if target.reasoning_budget is None else target.reasoning_budget
    clamped = ComputeRequest(api="x", model="m", samples=target.samples, output_cap=target.output_cap,
                             thinking_budget=new_budget)
    b = admission_bound(clamped, m)
    assert check_caps(clamped, b, tier, m) == []
    assert target.samples <= s
    assert target.output_cap <= admission_bound(req, m).output_cap


def test_clamp_lowers_samples_then_cap_for_reasoning():
    tier = TierConfig(max_k=4, on_exceed="clamp")
    req = ComputeRequest(api="x", model="m", samples=8, output_cap=20000)
    t = clamp_target(req, REASONER, tier)
    # K_max = S(1 + C/V_ref) ≤ 4: at S = 4 no reasoning would fit, so clamping keeps 2 samples that can
    # each reason for one reference answer's length (C = V_ref).
    assert t is not None and t.samples == 2 and t.output_cap == 1000
    b = admission_bound(ComputeRequest(api="x", model="m", samples=t.samples, output_cap=t.output_cap), REASONER)
    assert b.k_max <= 4 + 1e-9


def test_clamp_flops_cap_lowers_output_cap():
    tier = TierConfig(max_flops=2e9 * (100 + 50), on_exceed="clamp")
    req = ComputeRequest(api="x", model="m", samples=1, prompt_tokens=100, output_cap=1000)
    t = clamp_target(req, DENSE, tier)
    assert t is not None and t.output_cap == 50


def test_clamp_effort_to_highest_allowed_below():
    tier = TierConfig(efforts=["low", "medium"], on_exceed="clamp")
    t = clamp_target(ComputeRequest(api="x", model="m", effort="high", output_cap=100), REASONER, tier)
    assert t is not None and t.effort == "medium"
    assert clamp_target(ComputeRequest(api="x", model="m", effort="minimal", output_cap=100), REASONER,
                        tier) is None


def test_clamp_impossible_returns_none():
    tier = TierConfig(max_k=0.5, on_exceed="clamp")
    assert clamp_target(ComputeRequest(api="x", model="m"), DENSE, tier) is None
    assert math.isfinite(admission_bound(ComputeRequest(api="x", model="m"), DENSE).k_max)


@pytest.mark.parametrize(("reported", "taken"), [
    (12, 12), (0, 0), (-3, 0), (True, 0), (None, 0), (5.7, 5), ("12", 12), ("x", 0), ([1], 0),
    ("nan", 0), ("-inf", 0), (2**53, 2**53),
    # beyond any real count: the ceiling, finite for the ledger and an int64 for the audit log's JSON
    (2**53 + 1, 2**53), (10**30, 2**53), (1e300, 2**53), ("inf", 2**53), (float("inf"), 2**53),
])
def test_a_usage_figure_is_read_as_a_non_negative_int_up_to_a_ceiling(reported, taken):
    from gateway.adapters.base import nonneg

    assert nonneg(reported) == taken and type(nonneg(reported)) is int


def test_actual_flops_above_flops_max_is_an_overrun_even_when_tokens_fit():
    # Provider-held context (a previous response, a cached context) makes the real prompt far larger than
    # the estimate from the body's bytes: the tokens generated fit the bound, the FLOPs do not.
    req = ComputeRequest(api="openai.responses", model="m", output_cap=100, prompt_tokens=50)
    b = admission_bound(req, DENSE)
    fits = measure(Usage(samples=1, prompt_tokens=50, reasoning_tokens=0, output_tokens=100), DENSE, b)
    assert not fits.overrun
    held = measure(Usage(samples=1, prompt_tokens=75_000, reasoning_tokens=0, output_tokens=100), DENSE, b)
    assert held.overrun and any(r.startswith("flops") and "prompt 75000 > estimated 50" in r
                                for r in held.overrun_reasons)
