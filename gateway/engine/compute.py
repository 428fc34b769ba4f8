"""The compute model (docs/design.md §1): samples, tokens, K and FLOPs, before and after a request.

Symbols: S samples, P prompt tokens, R reasoning tokens, V visible output tokens, G = R + V,
N active parameters, V_ref the model's reference answer length.

- FLOPs = 2·N·(P_eff + G) + attention terms (Kaplan et al. 2020, §2.1) when ``n_layers``/``d_attn`` are
  known; P_eff = P when samples share the prefill, S·P otherwise.
- K = G / max(V/S, V_ref).
- Admission: C per-sample output cap, R_budget per-sample reasoning bound; K_max = S·(1 + R_budget/V_ref),
  generated ≤ S·C. Every provider kgate speaks counts reasoning inside the output cap (Gemini in
  practice too), so R_budget ≤ C.
- Only limits a provider enforces bound anything: the output cap C (which kgate writes into every forwarded
  request) and Anthropic's ``thinking.budget_tokens``. What a request *claims* about reasoning never
  lowers the bound: thinking switched off (which lowers the expected amount of ``admission: expected``),
  Gemini's positive ``thinkingBudget`` (a guide the model may overshoot), an effort (the expected amount
  again, through the model's effort table). A provider or chat template that ignores the claim can still
  spend up to C on reasoning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from gateway.policy.config import EFFORT_ORDER, ModelConfig, TierConfig

# upstream: the provider reported it; counted: kgate counted streamed tokens; estimated: from returned text;
# bound: the provider's usage never came where hidden reasoning could hide, so the request is charged its
# admission bound (a tier's ``on_missing_usage: bound``, the default).
UsageSource = Literal["upstream", "counted", "estimated", "bound"]


# The value classes below are frozen dataclasses with a hand-written ``__init__`` (``init=False``): the
# generated one of a frozen dataclass sets each field through ``object.__setattr__``, about three times the
# cost of filling the instance's dict directly, and these are built several times per request. Each
# ``__init__`` takes the fields in their declared order with their declared defaults and fills the dict in
# one ``update`` call, in that order (tests/unit/test_perf_compute.py checks both): a dict filled in one
# call is also quicker to read attributes from, and to copy (``Bound.as_dict``), than one filled key by key.
@dataclass(frozen=True, init=False)
class ComputeRequest:
    """What a parsed request asks for, in the terms of the compute model.

    ``output_cap`` and ``thinking_budget`` are what the request itself says (None: not given);
    :func:`admission_bound` combines them with the model's limits.
    """

    api: str
    model: str
    samples: int = 1
    prompt_tokens: int = 0
    output_cap: int | None = None
    thinking_budget: int | None = None
    thinking_disabled: bool = False
    effort: str | None = None
    stream: bool = False
    prompts: int = 1

    def __init__(self, api: str, model: str, samples: int = 1, prompt_tokens: int = 0, output_cap: int | None = None,
                 thinking_budget: int | None = None, thinking_disabled: bool = False, effort: str | None = None,
                 stream: bool = False, prompts: int = 1) -> None:
        self.__dict__.update(api=api, model=model, samples=samples, prompt_tokens=prompt_tokens, output_cap=output_cap,
                             thinking_budget=thinking_budget, thinking_disabled=thinking_disabled, effort=effort,
                             stream=stream, prompts=prompts)

    def named(self, model: str, prompt_tokens: int) -> ComputeRequest:
        """This request for ``model`` with ``prompt_tokens`` (``dataclasses.replace`` spelled out: it
        is on every request's path, and replace() looks up every field by name)."""
        return ComputeRequest(self.api, model, self.samples, prompt_tokens, self.output_cap, self.thinking_budget,
                              self.thinking_disabled, self.effort, self.stream, self.prompts)


@dataclass(frozen=True, init=False)
class Bound:
    """The admission bound: upper limits of what the request can spend."""

    samples: int
    prompt_tokens: int
    output_cap: int
    reasoning_budget: int
    generated_tokens_max: int
    output_tokens_max: int
    reasoning_tokens_max: int
    k_max: float
    flops_max: float

    def __init__(self, samples: int, prompt_tokens: int, output_cap: int, reasoning_budget: int,
                 generated_tokens_max: int, output_tokens_max: int, reasoning_tokens_max: int, k_max: float,
                 flops_max: float) -> None:
        self.__dict__.update(samples=samples, prompt_tokens=prompt_tokens, output_cap=output_cap,
                             reasoning_budget=reasoning_budget, generated_tokens_max=generated_tokens_max,
                             output_tokens_max=output_tokens_max, reasoning_tokens_max=reasoning_tokens_max,
                             k_max=k_max, flops_max=flops_max)

    def as_dict(self) -> dict[str, Any]:
        """The fields by name, in their declared order (a new dict). A copy of the instance's dict, which
        ``__init__`` fills with exactly the fields in that order (tests/unit/test_perf_compute.py checks it):
        dataclasses.asdict deep-copies and costs more than the whole bound computation."""
        return self.__dict__.copy()


@dataclass(frozen=True, init=False)
class Usage:
    """What a request actually spent, with where the figures came from."""

    samples: int
    prompt_tokens: int
    reasoning_tokens: int
    output_tokens: int  # visible tokens, all samples together
    source: UsageSource = "upstream"
    cached_tokens: int = 0

    def __init__(self, samples: int, prompt_tokens: int, reasoning_tokens: int, output_tokens: int,
                 source: UsageSource = "upstream", cached_tokens: int = 0) -> None:
        self.__dict__.update(samples=samples, prompt_tokens=prompt_tokens, reasoning_tokens=reasoning_tokens,
                             output_tokens=output_tokens, source=source, cached_tokens=cached_tokens)

    @property
    def generated_tokens(self) -> int:
        return self.reasoning_tokens + self.output_tokens


@dataclass(frozen=True, init=False)
class Measured:
    usage: Usage
    k: float
    flops: float
    overrun: bool = False
    overrun_reasons: tuple[str, ...] = ()

    def __init__(self, usage: Usage, k: float, flops: float, overrun: bool = False,
                 overrun_reasons: tuple[str, ...] = ()) -> None:
        self.__dict__.update(usage=usage, k=k, flops=flops, overrun=overrun, overrun_reasons=overrun_reasons)

    def as_dict(self) -> dict[str, Any]:
        u = self.usage
        return {
            "samples": u.samples,
            "prompt_tokens": u.prompt_tokens,
            "reasoning_tokens": u.reasoning_tokens,
            "output_tokens": u.output_tokens,
            "generated_tokens": u.reasoning_tokens + u.output_tokens,  # u.generated_tokens, without the call
            "k": self.k,
            "flops": self.flops,
            "source": u.source,
        }


# ------------------------------------------------------------------------------------------------ FLOPs
def flops(model: ModelConfig, prompt_tokens: int, generated_tokens: float, samples: int) -> float:
    """Forward-pass FLOPs for a request: 2·N per token, plus attention when the model gives its shape."""
    s = samples if samples > 1 else 1
    p_eff = prompt_tokens if model.shared_prefill else s * prompt_tokens
    total = 2.0 * model.active_params * (p_eff + generated_tokens)
    if model.n_layers and model.d_attn:
        nd = float(model.n_layers * model.d_attn)
        prefills = 1 if model.shared_prefill else s
        total += prefills * nd * prompt_tokens * prompt_tokens
        length = generated_tokens / s
        total += s * 2.0 * nd * (prompt_tokens * length + length * length / 2.0)
    return total


def k_multiple(model: ModelConfig, samples: int, generated_tokens: int, visible_tokens: int) -> float:
    """K = G / max(V/S, V_ref): standard single answers' worth of generation."""
    s = samples if samples > 1 else 1
    per_answer, ref = visible_tokens / s, float(model.reference_output_tokens)
    return generated_tokens / (per_answer if per_answer > ref else ref)


# -------------------------------------------------------------------------------------------- admission
def output_cap(req: ComputeRequest, model: ModelConfig) -> int:
    """C: the request's per-sample cap, never above the model's own maximum."""
    cap = model.max_output_tokens if req.output_cap is None else req.output_cap
    return max(0, min(cap, model.max_output_tokens))


# APIs whose explicit thinking budget the provider enforces as a hard limit. Gemini's ``thinkingBudget`` is
# documented as a guide the model may over- or undershoot: only ``maxOutputTokens`` bounds its thoughts.
HARD_THINKING_BUDGET_APIS = frozenset({"anthropic.messages"})


def hard_thinking_budget(req: ComputeRequest) -> int | None:
    """The request's thinking budget where the provider enforces it (None: no such limit)."""
    b = req.thinking_budget
    if b is not None and b > 0 and req.api in HARD_THINKING_BUDGET_APIS:
        return b
    return None


def reasoning_budget(req: ComputeRequest, model: ModelConfig, cap: int | None = None) -> int:
    """R_budget: the hard per-sample reasoning bound (0 for a model without reasoning).

    ``thinking_disabled`` is a claim, not a limit (a provider or chat template may ignore it): it does not
    lower the bound.
    """
    if not model.reasoning:
        return 0
    c = output_cap(req, model) if cap is None else cap
    hard = hard_thinking_budget(req)
    return c if hard is None else min(hard, c)


def k_max(model: ModelConfig, samples: int, r_budget: int) -> float:
    return samples * (1.0 + r_budget / model.reference_output_tokens)


def admission_bound(req: ComputeRequest, model: ModelConfig) -> Bound:
    """The upper bound of what ``req`` can spend on ``model``: decided before compute is spent."""
    s = req.samples
    c = output_cap(req, model)
    rb = reasoning_budget(req, model, c)
    gen_max = s * c
    return Bound(
        samples=s,
        prompt_tokens=req.prompt_tokens,
        output_cap=c,
        reasoning_budget=rb,
        generated_tokens_max=gen_max,
        output_tokens_max=gen_max,
        reasoning_tokens_max=s * rb,
        k_max=k_max(model, s, rb),
        flops_max=flops(model, req.prompt_tokens, gen_max, s),
    )


def usage_at_bound(bound: Bound, seen: Usage | None = None) -> Usage:
    """What a request is charged when its usage cannot be known: everything its bound allowed — every
    sample to its cap, as much of it reasoning as the bound allows — and never less than was seen."""
    reasoning = bound.reasoning_tokens_max
    generated = bound.generated_tokens_max
    prompt = bound.prompt_tokens
    if seen is not None:
        prompt = max(prompt, seen.prompt_tokens)
        generated = max(generated, seen.generated_tokens)
        reasoning = max(reasoning, seen.reasoning_tokens)
    reasoning = min(reasoning, generated)
    return Usage(samples=bound.samples, prompt_tokens=prompt, reasoning_tokens=reasoning,
                 output_tokens=generated - reasoning, source="bound")


def expected_generated(req: ComputeRequest, model: ModelConfig, bound: Bound,
                       recent_mean: float | None = None) -> float:
    """Expected generated tokens for ``admission: expected``: never more than the bound.

    The model's recent mean (all samples) wins where the ledger has one; else the effort table gives the
    expected reasoning per sample, plus a reference-length answer.
    """
    if recent_mean is not None and recent_mean > 0:
        return min(float(bound.generated_tokens_max), recent_mean)
    per_sample = float(min(bound.output_cap, model.reference_output_tokens))
    if req.thinking_disabled:  # the claim lowers what is expected, never the bound
        return min(float(bound.generated_tokens_max), per_sample * bound.samples)
    if model.reasoning and bound.reasoning_budget > 0:
        table = model.reasoning_effort_tokens
        effort = req.effort or "medium"
        if effort in table:
            per_sample += min(table[effort], bound.reasoning_budget)
        else:
            per_sample += bound.reasoning_budget / 2.0
    return min(float(bound.generated_tokens_max), per_sample * bound.samples)


# -------------------------------------------------------------------------------------------- measuring
def measure(usage: Usage, model: ModelConfig, bound: Bound | None = None) -> Measured:
    """K and FLOPs from actual usage; flags an overrun when the provider exceeded the admission bound.

    (The bound's four tests are made once here, and the reasons spelled out only for an overrun: almost
    every request has none, and building an empty list of them was a measurable part of this function.)"""
    generated = usage.reasoning_tokens + usage.output_tokens  # usage.generated_tokens, once
    k = k_multiple(model, usage.samples, generated, usage.output_tokens)
    f = flops(model, usage.prompt_tokens, generated, usage.samples)
    if bound is None or (k <= bound.k_max * (1 + 1e-9) and generated <= bound.generated_tokens_max
                         and usage.reasoning_tokens <= bound.reasoning_tokens_max
                         and f <= bound.flops_max * (1 + 1e-9)):
        return Measured(usage, k, f)
    reasons = _overrun_reasons(usage, bound, k, f, generated)  # (none, when a figure is not a number)
    return Measured(usage, k, f, True, reasons) if reasons else Measured(usage, k, f)


def _overrun_reasons(usage: Usage, bound: Bound, k: float, f: float, generated: int) -> tuple[str, ...]:
    """Why a request's usage exceeds its admission bound (one reason per figure exceeded)."""
    reasons: list[str] = []
    if k > bound.k_max * (1 + 1e-9):
        reasons.append(f"k {k:.4g} > k_max {bound.k_max:.4g}")
    if generated > bound.generated_tokens_max:
        reasons.append(f"generated {generated} > {bound.generated_tokens_max}")
    if usage.reasoning_tokens > bound.reasoning_tokens_max:
        reasons.append(f"reasoning {usage.reasoning_tokens} > {bound.reasoning_tokens_max}")
    if f > bound.flops_max * (1 + 1e-9):
        # Usually the prompt: the estimate before the request (body bytes / 3) cannot see context the
        # provider holds (a previous response, a cached context, a file by id or URL).
        why = f"flops {f:.4g} > flops_max {bound.flops_max:.4g}"
        if usage.prompt_tokens > bound.prompt_tokens:
            why += f" (prompt {usage.prompt_tokens} > estimated {bound.prompt_tokens})"
        reasons.append(why)
    return tuple(reasons)


# ----------------------------------------------------------------------------------------- caps & clamp
@dataclass(frozen=True)
class CapViolation:
    # max_k | max_samples | max_reasoning_tokens | max_flops | efforts, or the model's evaluated_max_k |
    # evaluated_max_samples | evaluated_max_reasoning_tokens (``source``: where that figure comes from)
    cap: str
    bound: float | str
    limit: float | str
    source: str | None = None

    def message(self) -> str:
        if self.cap.startswith("evaluated_"):
            what = self.cap.removeprefix("evaluated_")
            return (f"request exceeds the compute the model was evaluated under ({what}: bound {_fmt(self.bound)}, "
                    f"evaluated {_fmt(self.limit)}; {self.source or 'evaluated figures of the policy'}); "
                    "your tier is not cleared beyond evaluated compute")
        return f"request exceeds the tier's {self.cap}: bound {_fmt(self.bound)}, limit {_fmt(self.limit)}"


def _fmt(x: float | str) -> str:
    if isinstance(x, str):
        return x
    return f"{x:.6g}"


def effective_max_k(tier: TierConfig, model: ModelConfig) -> float | None:
    """The K cap that applies: the tier's, and the model's evaluated K unless the tier may go beyond it."""
    caps = [c for c in (tier.max_k,) if c is not None]
    if model.evaluated_max_k is not None and not tier.beyond_evaluated:
        caps.append(model.evaluated_max_k)
    return min(caps) if caps else None


def _tighter(tier_cap: float | None, evaluated: float | None, tier: TierConfig) -> tuple[float | None, bool]:
    """(the cap that applies, whether it is the evaluated figure): the tier's, or the model's evaluated one
    when it is lower and the tier is not cleared beyond evaluated compute."""
    if evaluated is None or tier.beyond_evaluated or (tier_cap is not None and tier_cap <= evaluated):
        return tier_cap, False
    return evaluated, True


def effective_max_samples(tier: TierConfig, model: ModelConfig) -> int | None:
    cap, _ = _tighter(tier.max_samples, model.evaluated_max_samples, tier)
    return None if cap is None else int(cap)


def effective_max_reasoning(tier: TierConfig, model: ModelConfig) -> int | None:
    cap, _ = _tighter(tier.max_reasoning_tokens, model.evaluated_max_reasoning_tokens, tier)
    return None if cap is None else int(cap)


def check_caps(req: ComputeRequest, bound: Bound, tier: TierConfig, model: ModelConfig) -> list[CapViolation]:
    """Every per-request cap the bound exceeds (an empty list: the request fits)."""
    out: list[CapViolation] = []
    src = model.evaluated_source
    scap, evaluated = _tighter(tier.max_samples, model.evaluated_max_samples, tier)
    if scap is not None and bound.samples > scap:
        out.append(CapViolation("evaluated_max_samples" if evaluated else "max_samples", bound.samples, scap, src))
    kcap, evaluated = _tighter(tier.max_k, model.evaluated_max_k, tier)
    if kcap is not None and bound.k_max > kcap * (1 + 1e-12):
        out.append(CapViolation("evaluated_max_k" if evaluated else "max_k", bound.k_max, kcap, src))
    rcap, evaluated = _tighter(tier.max_reasoning_tokens, model.evaluated_max_reasoning_tokens, tier)
    if rcap is not None and bound.reasoning_tokens_max > rcap:
        out.append(CapViolation("evaluated_max_reasoning_tokens" if evaluated else "max_reasoning_tokens",
                                bound.reasoning_tokens_max, rcap, src))
    if tier.max_flops is not None and bound.flops_max > tier.max_flops:
        out.append(CapViolation("max_flops", bound.flops_max, tier.max_flops))
    if tier.efforts is not None and req.effort is not None and req.effort not in tier.efforts:
        out.append(CapViolation("efforts", req.effort, ",".join(tier.efforts)))
    return out


@dataclass(frozen=True)
class ClampTarget:
    """The largest request that fits a tier's per-request caps: what an adapter rewrites to."""

    samples: int
    output_cap: int
    reasoning_budget: int | None  # per-sample thinking budget to write (None: leave as is)
    effort: str | None


def clamp_target(req: ComputeRequest, model: ModelConfig, tier: TierConfig) -> ClampTarget | None:
    """The largest samples and output cap (and effort) that fit the tier's caps, or None when nothing does.

    Samples are lowered first (to ``max_samples`` and ⌊max_k⌋); then, for a reasoning model, the
    per-sample reasoning bound to V_ref·(K_cap/S − 1) by lowering the thinking budget and output cap; then
    the output cap until the FLOPs bound fits. A request whose clamped cap would be zero is not clamped.
    """
    s = req.samples
    scap = effective_max_samples(tier, model)
    if scap is not None:
        s = min(s, scap)
    kcap = effective_max_k(tier, model)
    if kcap is not None:
        s = min(s, max(math.floor(kcap + 1e-9), 0))
    if s < 1:
        return None
    c = output_cap(req, model)
    rb = reasoning_budget(req, model, c)
    if kcap is not None and rb > 0:
        # Keep room to think: fewer samples, each with at least a reference answer's worth of reasoning
        # (or what was asked, if less), rather than many samples that cannot reason at all.
        want = min(rb, model.reference_output_tokens)
        while s > 1 and model.reference_output_tokens * (kcap / s - 1.0) < want:
            s -= 1
    rb_limit: float = rb
    if kcap is not None and rb > 0:
        rb_limit = min(rb_limit, model.reference_output_tokens * (kcap / s - 1.0))
    rcap = effective_max_reasoning(tier, model)
    if rcap is not None and rb > 0:
        rb_limit = min(rb_limit, rcap / s)
    new_rb = max(math.floor(rb_limit + 1e-9), 0)
    thinking_budget: int | None = None
    if new_rb < rb:
        hard = hard_thinking_budget(req)
        if hard is not None and hard <= c:
            # An explicit budget binds: lower it, keep the cap above it for the answer.
            thinking_budget = new_rb
            if c > new_rb and hard >= c:
                c = new_rb
        else:
            # The output cap is the reasoning bound: lowering it lowers both (a soft budget the client sent
            # is lowered with it, so that it stays below the cap).
            c = new_rb
            thinking_budget = None if req.thinking_budget is None or req.thinking_budget <= 0 else new_rb
    if tier.max_flops is not None:
        p = req.prompt_tokens
        if flops(model, p, 0, s) > tier.max_flops:
            return None
        lo, hi = 0, c
        while lo < hi:  # largest per-sample cap whose FLOPs bound fits
            mid = (lo + hi + 1) // 2
            if flops(model, p, s * mid, s) <= tier.max_flops:
                lo = mid
            else:
                hi = mid - 1
        c = lo
        if thinking_budget is not None:
            thinking_budget = min(thinking_budget, c)
    if c < 1:
        return None
    effort = req.effort
    if tier.efforts is not None and effort is not None and effort not in tier.efforts:
        lower = [e for e in EFFORT_ORDER[: EFFORT_ORDER.index(effort)] if e in tier.efforts]
        if not lower:
            return None
        effort = lower[-1]
    return ClampTarget(samples=s, output_cap=c, reasoning_budget=thinking_budget, effort=effort)


def with_prompt_tokens(req: ComputeRequest, prompt_tokens: int) -> ComputeRequest:
    return replace(req, prompt_tokens=prompt_tokens)


def estimate_prompt_tokens(n_bytes: int) -> int:
    """Prompt tokens before the request: byte length / 3 (corrected at settlement)."""
    return max(1, math.ceil(n_bytes / 3))
