"""The simulator's fake model: what a request makes it generate, deterministically (docs/design.md §8).

Each API handler turns a request body into a :class:`Plan`: prompt tokens, how many samples are
generated and returned, and per sample the reasoning and visible tokens and whether the output cap cut
them. Every sample of a request is generated alike, so per-sample figures suffice; the wire renderers
(:mod:`gateway.simulator.wire`) then spell the plan in each provider's format.

The rules, chosen to be easy to predict in tests:

- prompt tokens: ``ceil(characters of all request text / 4)``, at least 1, per prompt (a legacy
  completions list of prompts counts each prompt; a token-id prompt counts its ids);
- a model reasons when its name contains one of the reasoning markers, or whenever the request turns
  thinking on; a request that turns thinking off never reasons;
- reasoning tokens per sample: an explicit thinking budget times :data:`THINKING_BUDGET_FRACTION`, else the
  effort's entry in :data:`EFFORT_TOKENS`; reasoning counts inside the per-sample output cap, as the
  providers count it, but stops early enough to leave the answer room (the visible length, at most half
  the cap), and visible tokens get what the cap leaves;
- visible tokens per sample: the configured length (64 by default), cut by the cap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# A model whose name contains one of these reasons (hides reasoning tokens inside its output).
REASONING_MARKERS: tuple[str, ...] = ("reason", "o1", "o3", "o4", "gpt-5", "r1", "think", "qwq", "gemini-2.5")

# Reasoning tokens one sample spends at each effort (a soft signal at the providers; exact here).
EFFORT_TOKENS: dict[str, int] = {
    "none": 0, "minimal": 64, "low": 256, "medium": 1024, "high": 4096, "xhigh": 8192, "max": 16384,
}

# Share of an explicit thinking budget (Anthropic budget_tokens, Gemini thinkingBudget) a sample uses.
THINKING_BUDGET_FRACTION = 0.75

# The output cap when a request names none: large enough never to cut (the real limit is the model's).
UNCAPPED = 1 << 20

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the legacy completions API's documented default
FLAVORS = ("openai", "vllm", "sglang", "deepseek")


class SimError(Exception):
    """A request the simulated provider refuses; rendered in the API's own error shape."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


@dataclass(slots=True)
class GenContext:
    """Per-request knobs: server options, overridden by ``x-sim-*`` request headers."""

    output_tokens: int = 64  # visible tokens per sample before the cap
    reasoning_tokens: int | None = None  # forces reasoning tokens per sample (x-sim-reasoning-tokens)
    flavor: str = "openai"
    markers: tuple[str, ...] = REASONING_MARKERS
    server_tools: bool = False  # Anthropic: repeat message_delta, as server-tool turns do


@dataclass(slots=True)
class Plan:
    """What one request generates. Every sample is alike; counts are per sample unless named total."""

    api: str  # chat | completions | responses | messages | gemini
    model: str
    stream: bool
    prompt_tokens: int  # the whole request's (all prompts), counted once however many samples
    choices: int  # samples returned
    generated: int  # samples generated (best_of candidates included)
    reasoning: int  # reasoning tokens per sample
    visible: int  # visible tokens per sample
    capped: bool  # the output cap cut the sample short
    cap: int
    n: int = 1  # choices per prompt (legacy completions)
    include_usage: bool = False  # OpenAI stream_options.include_usage
    continuous_usage: bool = False  # vLLM/SGLang stream_options.continuous_usage_stats
    show_reasoning: bool = False  # reasoning text is returned (Anthropic thinking, Gemini includeThoughts)
    effort: str | None = None

    @property
    def output_tokens(self) -> int:
        """Output tokens per sample as OpenAI and Anthropic count them: reasoning included."""
        return self.reasoning + self.visible

    @property
    def reported_output(self) -> int:
        """Output tokens of all returned samples (what usage reports)."""
        return self.choices * (self.reasoning + self.visible)

    @property
    def generated_tokens(self) -> int:
        """Tokens actually generated, discarded best_of candidates included."""
        return self.generated * (self.reasoning + self.visible)


# ---------------------------------------------------------------------------------------- text length
_TEXT_KEYS = ("content", "text", "parts", "input")


def text_chars(x: Any) -> int:
    """Characters of the text in a message structure (strings, lists, and the text-bearing keys)."""
    if isinstance(x, str):
        return len(x)
    if isinstance(x, list):
        return sum(text_chars(i) for i in x)
    if isinstance(x, dict):
        n = 0
        for k in _TEXT_KEYS:
            v = x.get(k)
            if v is not None:
                n += text_chars(v)
        return n
    return 0


def tokens_of_chars(chars: int) -> int:
    return max(1, (chars + 3) // 4)


# ------------------------------------------------------------------------------------------ validators
def _int(body: Mapping[str, Any], key: str, default: int | None, lo: int | None = None,
         hi: int | None = None, param: str | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    name = param or key
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise SimError(f"Invalid type for '{name}': expected an integer.", param=name)
    if lo is not None and v < lo:
        raise SimError(f"Invalid '{name}': integer below minimum value. Expected a value >= {lo}, "
                       f"but got {v} instead.", param=name)
    if hi is not None and v > hi:
        raise SimError(f"Invalid '{name}': integer above maximum value. Expected a value <= {hi}, "
                       f"but got {v} instead.", param=name)
    return v


def _obj(body: Mapping[str, Any], key: str, param: str | None = None) -> Mapping[str, Any]:
    v = body.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise SimError(f"Invalid type for '{param or key}': expected an object.", param=param or key)
    return v


def _model(body: Mapping[str, Any]) -> str:
    m = body.get("model")
    if not isinstance(m, str) or not m:
        raise SimError("you must provide a model parameter", param="model")
    return m


def _stream(body: Mapping[str, Any]) -> bool:
    v = body.get("stream")
    if v is None:
        return False
    if not isinstance(v, bool):
        raise SimError("Invalid type for 'stream': expected a boolean.", param="stream")
    return v


def _effort(value: Any, param: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in EFFORT_TOKENS:
        raise SimError(f"Invalid value for '{param}': supported values are "
                       f"{', '.join(EFFORT_TOKENS)}.", param=param)
    return value


@lru_cache(maxsize=1024)
def is_reasoning_model(model: str, markers: tuple[str, ...]) -> bool:
    m = model.lower()
    return any(k in m for k in markers)


def _reasoning_target(ctx: GenContext, model: str, enabled: bool | None, effort: str | None,
                      budget: int | None, default_effort: str) -> int:
    """Reasoning tokens one sample wants before the cap. ``enabled``: the request's on/off, if any."""
    if enabled is False:
        return 0
    if enabled is None and not is_reasoning_model(model, ctx.markers):
        return 0
    if ctx.reasoning_tokens is not None:
        return ctx.reasoning_tokens
    if budget is not None:
        return int(budget * THINKING_BUDGET_FRACTION)
    return EFFORT_TOKENS[effort or default_effort]


def _plan(api: str, model: str, stream: bool, prompt_tokens: int, choices: int, generated: int,
          reasoning_want: int, cap: int, ctx: GenContext, **extra: Any) -> Plan:
    """Fit reasoning, then visible tokens, under the per-sample cap.

    Reasoning leaves room for the answer, as models trained with thinking budgets do: at most
    ``cap - min(answer, cap // 2)``, so a cap that the reasoning alone would fill still gets a visible
    answer (of at least half the cap, or the whole answer if shorter). Forced reasoning
    (``x-sim-reasoning-tokens``) is exact and may fill the cap: tests use it to reach the cap."""
    room = 0 if ctx.reasoning_tokens is not None else min(ctx.output_tokens, cap // 2)
    reasoning = min(reasoning_want, cap - room)
    visible = min(ctx.output_tokens, cap - reasoning)
    capped = reasoning < reasoning_want or visible < ctx.output_tokens
    return Plan(api=api, model=model, stream=stream, prompt_tokens=prompt_tokens, choices=choices,
                generated=generated, reasoning=reasoning, visible=visible, capped=capped, cap=cap, **extra)


def _stream_options(body: Mapping[str, Any]) -> tuple[bool, bool]:
    so = _obj(body, "stream_options")
    return bool(so.get("include_usage")), bool(so.get("continuous_usage_stats"))


def _openai_thinking_switch(body: Mapping[str, Any], effort: str | None) -> bool | None:
    """On/off as OpenAI-compatible servers take it: DeepSeek ``thinking``, vLLM ``enable_thinking``."""
    if effort == "none":
        return False
    th = body.get("thinking")
    if isinstance(th, dict) and th.get("type") in ("enabled", "disabled"):
        return th["type"] == "enabled"
    kw = body.get("chat_template_kwargs")
    if isinstance(kw, dict) and isinstance(kw.get("enable_thinking"), bool):
        return bool(kw["enable_thinking"])
    return None


def _openai_cap(body: Mapping[str, Any], ctx: GenContext, default: int) -> int:
    """The per-sample cap: ``max_completion_tokens`` wins over ``max_tokens`` (SGLang: the reverse)."""
    mct = _int(body, "max_completion_tokens", None, 1)
    mt = _int(body, "max_tokens", None, 1)
    if ctx.flavor == "sglang":
        return mt if mt is not None else mct if mct is not None else default
    return mct if mct is not None else mt if mt is not None else default


# ------------------------------------------------------------------------------------------------ APIs
def plan_chat(body: Any, ctx: GenContext) -> Plan:
    """``POST /v1/chat/completions``."""
    if not isinstance(body, dict):
        raise SimError("The request body must be a JSON object.")
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SimError("Invalid 'messages': expected a non-empty array.", param="messages")
    n = _int(body, "n", 1, 1, 128) or 1
    effort = _effort(body.get("reasoning_effort"), "reasoning_effort")
    want = _reasoning_target(ctx, model, _openai_thinking_switch(body, effort), effort, None, "medium")
    include_usage, continuous = _stream_options(body)
    return _plan("chat", model, _stream(body), tokens_of_chars(text_chars(messages)), n, n, want,
                 _openai_cap(body, ctx, UNCAPPED), ctx, include_usage=include_usage,
                 continuous_usage=continuous, effort=effort)


def _prompt_tokens_list(prompt: Any) -> list[int]:
    """Tokens of each prompt of a legacy completions request (string, strings, token ids, lists of ids)."""
    if isinstance(prompt, str):
        return [tokens_of_chars(len(prompt))]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [len(prompt)]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(tokens_of_chars(len(p)))
            elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
                out.append(len(p))
            else:
                raise SimError("Invalid 'prompt': expected a string, an array of strings or of tokens.",
                               param="prompt")
        return out
    raise SimError("Invalid 'prompt': expected a string, an array of strings or of tokens.", param="prompt")


def plan_completions(body: Any, ctx: GenContext) -> Plan:
    """``POST /v1/completions``: each prompt times n returned choices; best_of candidates generated.

    ``best_of`` generates ``max(n, best_of)`` candidates per prompt and returns ``n``. Usage
    ``completion_tokens`` counts the returned choices only (the simulator's choice; the providers do not
    document it); the discarded candidates show in ``/_sim/stats`` as ``tokens.generated``. The vLLM
    flavour ignores ``best_of``, as vLLM does since it removed it.
    """
    if not isinstance(body, dict):
        raise SimError("The request body must be a JSON object.")
    model = _model(body)
    if "prompt" not in body:
        raise SimError("Missing required parameter: 'prompt'.", param="prompt")
    prompts = _prompt_tokens_list(body["prompt"])
    n = _int(body, "n", 1, 1, 128) or 1
    best_of = _int(body, "best_of", None, 1, 128)
    if ctx.flavor == "vllm":
        best_of = None
    stream = _stream(body)
    if best_of is not None:
        if best_of < n:
            raise SimError("best_of must be greater than or equal to n.", param="best_of")
        if stream and best_of > 1:
            raise SimError("best_of cannot be used with stream.", param="best_of")
    per_prompt = max(n, best_of or 1)
    effort = _effort(body.get("reasoning_effort"), "reasoning_effort")
    want = _reasoning_target(ctx, model, _openai_thinking_switch(body, effort), effort, None, "medium")
    include_usage, continuous = _stream_options(body)
    return _plan("completions", model, stream, sum(prompts), len(prompts) * n, len(prompts) * per_prompt,
                 want, _openai_cap(body, ctx, COMPLETIONS_DEFAULT_MAX_TOKENS), ctx, n=n,
                 include_usage=include_usage, continuous_usage=continuous, effort=effort)


def plan_responses(body: Any, ctx: GenContext) -> Plan:
    """``POST /v1/responses``: one sample; ``max_output_tokens`` (≥ 16) includes reasoning."""
    if not isinstance(body, dict):
        raise SimError("The request body must be a JSON object.")
    model = _model(body)
    inp = body.get("input")
    if not isinstance(inp, (str, list)):
        raise SimError("Missing required parameter: 'input'.", param="input")
    cap = _int(body, "max_output_tokens", UNCAPPED, 16) or UNCAPPED
    reasoning = _obj(body, "reasoning")
    effort = _effort(reasoning.get("effort"), "reasoning.effort")
    want = _reasoning_target(ctx, model, False if effort == "none" else None, effort, None, "medium")
    chars = text_chars(inp) + text_chars(body.get("instructions"))
    return _plan("responses", model, _stream(body), tokens_of_chars(chars), 1, 1, want, cap, ctx,
                 effort=effort)


def plan_messages(body: Any, ctx: GenContext) -> Plan:
    """``POST /v1/messages``: one sample; ``max_tokens`` required and counts thinking."""
    if not isinstance(body, dict):
        raise SimError("The request body must be a JSON object.")
    model = _model(body)
    if body.get("max_tokens") is None:
        raise SimError("max_tokens: Field required", param="max_tokens")
    cap = _int(body, "max_tokens", None, 1) or 1
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SimError("messages: at least one message is required", param="messages")
    thinking = _obj(body, "thinking")
    kind = thinking.get("type")
    enabled: bool | None = None
    budget: int | None = None
    if kind == "enabled":
        enabled = True
        budget = _int(thinking, "budget_tokens", None, 1024, param="thinking.budget_tokens")
        if budget is None:
            raise SimError("thinking.budget_tokens: Field required", param="thinking.budget_tokens")
        if budget >= cap:
            raise SimError("`max_tokens` must be greater than `thinking.budget_tokens`.",
                           param="max_tokens")
    elif kind == "adaptive":
        enabled = True
    elif kind == "disabled":
        enabled = False
    elif kind is not None:
        raise SimError("thinking.type: Input should be 'enabled', 'adaptive' or 'disabled'",
                       param="thinking.type")
    effort = _effort(_obj(body, "output_config").get("effort"), "output_config.effort")
    want = _reasoning_target(ctx, model, enabled, effort, budget, "high")
    chars = text_chars(messages) + text_chars(body.get("system"))
    return _plan("messages", model, _stream(body), tokens_of_chars(chars), 1, 1, want, cap, ctx,
                 show_reasoning=want > 0, effort=effort)


_GEMINI_LEVELS = {"MINIMAL": "minimal", "LOW": "low", "MEDIUM": "medium", "HIGH": "high"}


def plan_gemini(body: Any, model: str, stream: bool, ctx: GenContext) -> Plan:
    """``:generateContent`` / ``:streamGenerateContent``: ``candidateCount`` samples; thoughts count
    against ``maxOutputTokens`` but are reported outside ``candidatesTokenCount``."""
    if not isinstance(body, dict):
        raise SimError("Invalid JSON payload: expected an object.")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise SimError("* GenerateContentRequest.contents: contents is not specified", param="contents")
    gc = _obj(body, "generationConfig", "generationConfig")
    count = _int(gc, "candidateCount", 1, 1, 8, param="generationConfig.candidateCount") or 1
    cap = _int(gc, "maxOutputTokens", UNCAPPED, 1, param="generationConfig.maxOutputTokens") or UNCAPPED
    tc = _obj(gc, "thinkingConfig", "generationConfig.thinkingConfig")
    budget = _int(tc, "thinkingBudget", None, -1, param="thinkingConfig.thinkingBudget")
    level = tc.get("thinkingLevel")
    if level is not None and (not isinstance(level, str) or level.upper() not in _GEMINI_LEVELS):
        raise SimError("Invalid value at 'generation_config.thinking_config.thinking_level'",
                       param="thinkingConfig.thinkingLevel")
    if budget is not None and level is not None:
        raise SimError("thinking_budget and thinking_level are not supported together.",
                       param="thinkingConfig")
    enabled: bool | None = None
    if budget == 0:
        enabled = False
    elif (budget is not None and budget > 0) or level is not None or tc.get("includeThoughts"):
        enabled = True
    effort = _GEMINI_LEVELS[level.upper()] if isinstance(level, str) else None
    want = _reasoning_target(ctx, model, enabled, effort, budget if budget and budget > 0 else None,
                             "medium")
    chars = text_chars(contents) + text_chars(body.get("systemInstruction"))
    return _plan("gemini", model, stream, tokens_of_chars(chars), count, count, want, cap, ctx,
                 show_reasoning=bool(tc.get("includeThoughts")) and want > 0, effort=effort)
