"""OpenAI Chat Completions — ``POST /v1/chat/completions`` (also vLLM, SGLang, DeepSeek, Ollama).

Compute fields: ``n`` (samples; the beam width under vLLM ``use_beam_search``; an older ``best_of`` in
a chat body raises it), ``max_completion_tokens`` (wins, as in vLLM) else ``max_tokens`` (per-sample
cap, reasoning included), ``reasoning_effort`` (a soft signal), and thinking switched off by DeepSeek's
``thinking: {"type": "disabled"}`` or Qwen-style ``chat_template_kwargs: {"enable_thinking": false}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.adapters.base import StreamMeter, as_ints, req_bool, req_int, req_obj, req_str, write_cap
from gateway.adapters.openai_common import (
    MAX_N,
    ChoiceStreamMeter,
    OpenAIAdapter,
    body_object,
    cap_field,
    effort_field,
    int_value,
    lower_cap,
    model_field,
    n_field,
    prepare_stream_usage,
    stream_field,
    text_tokens,
    usage_from_counts,
)
from gateway.engine.compute import Bound, ClampTarget, ComputeRequest, Usage
from gateway.engine.errors import BadRequest
from gateway.policy.config import EFFORT_ORDER

_CAP_FIELDS = ("max_completion_tokens", "max_tokens")
# The fields _thinking_disabled and _effort read: a body with none of them has neither.
_REASONING_FIELDS = frozenset({"thinking", "chat_template_kwargs", "reasoning_effort", "reasoning"})


class ChatCompletions(OpenAIAdapter):
    api = "openai.chat"
    upstream_path = "/v1/chat/completions"

    def parse(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> ComputeRequest:
        b = body_object(body)
        model = model_field(b)
        messages = b.get("messages")
        if messages is None:
            raise BadRequest("'messages' is required", param="messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array", param="messages")
        n = n_field(b)
        best_of = req_int(b, "best_of", minimum=1, maximum=MAX_N)
        req_bool(b, "use_beam_search")  # beam width is n: nothing more to count, but it must be a bool
        max_completion = cap_field(b, "max_completion_tokens")
        max_tokens = cap_field(b, "max_tokens")
        if _REASONING_FIELDS.isdisjoint(b):  # most requests: no field to read for thinking or effort
            thinking_disabled, effort = False, None
        else:
            thinking_disabled, effort = _thinking_disabled(b), _effort(b)
        return ComputeRequest(
            api=self.api,
            model=model,
            samples=max(n, best_of or 1),
            output_cap=max_completion if max_completion is not None else max_tokens,
            thinking_disabled=thinking_disabled,
            effort=effort,
            stream=stream_field(b),
        )

    def rewrite(self, body: dict[str, Any], req: ComputeRequest, target: ClampTarget) -> list[str]:
        changes: list[str] = []
        n = int_value(body, "n", 1)
        best_of = int_value(body, "best_of", 0)
        if best_of > target.samples:
            body["best_of"] = target.samples
            changes.append(f"best_of={target.samples}")
        if n > target.samples:
            body["n"] = target.samples
            changes.append(f"n={target.samples}")
        # The cap goes on the field the client used; both if it sent both (vLLM reads one, SGLang the other).
        used = [k for k in _CAP_FIELDS if body.get(k) is not None] or ["max_completion_tokens"]
        for key in used:
            change = lower_cap(body, key, target.output_cap)
            if change:
                changes.append(change)
        if target.effort is not None and target.effort != req.effort:
            body["reasoning_effort"] = target.effort
            changes.append(f"reasoning_effort={target.effort}")
            reasoning = body.get("reasoning")
            if isinstance(reasoning, dict) and reasoning.get("effort") is not None:  # SGLang's spelling
                body["reasoning"] = {**reasoning, "effort": target.effort}
                changes.append(f"reasoning.effort={target.effort}")
            kwargs = body.get("chat_template_kwargs")
            if isinstance(kwargs, dict) and kwargs.get("reasoning_effort") is not None:  # the template's
                body["chat_template_kwargs"] = {**kwargs, "reasoning_effort": target.effort}
                changes.append(f"chat_template_kwargs.reasoning_effort={target.effort}")
        return changes

    def write_bound(self, body: dict[str, Any], req: ComputeRequest, bound: Bound) -> list[str]:
        # max_completion_tokens always (vLLM reads it first); max_tokens too when the client sent it
        # (SGLang reads that one first): no field the upstream might read keeps a larger value.
        # Spelled out, not looped: this runs on every chat request.
        cap = bound.output_cap
        changes: list[str] = []
        change = write_cap(body, "max_completion_tokens", cap)
        if change:
            changes.append(change)
        if body.get("max_tokens") is not None:
            change = write_cap(body, "max_tokens", cap)
            if change:
                changes.append(change)
        if type(body.get("n")) is float or type(body.get("best_of")) is float:
            body.update(as_ints(body, ("n", "best_of")) or {})
        return changes

    def prepare_upstream(self, body: dict[str, Any], upstream_model: str, stream: bool) -> bool:
        return prepare_stream_usage(body, upstream_model, stream)

    def usage_from_json(self, body: Any, req: ComputeRequest) -> Usage:
        # One loop over the choices (usually one) rather than comprehensions: this runs on every JSON answer.
        n_choices = reasoning_est = 0
        messages: list[Mapping[str, Any]] = []
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
                            # reasoning_text, inlined (tests/unit/test_perf_finish.py); an empty text counts 0
                            r = message.get("reasoning_content") or message.get("reasoning")
                            if r:
                                reasoning_est += text_tokens(r)
        samples = n_choices or req.samples
        # has_counts(usage, "prompt_tokens", "completion_tokens", "total_tokens"), spelled out: every answer
        if isinstance(usage, dict) and (usage.get("prompt_tokens") is not None or usage.get("completion_tokens")
                                        is not None or usage.get("total_tokens") is not None):
            return usage_from_counts(usage, samples=samples, reasoning_estimate=reasoning_est,
                                     # only needed (and so only counted) when reasoning text came back
                                     visible_estimate=sum(_visible_tokens(m) for m in messages)
                                     if reasoning_est else None)
        return Usage(
            samples=max(samples, 1),
            prompt_tokens=req.prompt_tokens,
            reasoning_tokens=reasoning_est,
            output_tokens=sum(_visible_tokens(m) for m in messages),
            source="estimated",
        )

    def stream_meter(self, req: ComputeRequest, client_wants_usage: bool) -> StreamMeter:
        return ChoiceStreamMeter(req, client_wants_usage, _count_delta)


def _effort(b: Mapping[str, Any]) -> str | None:
    """``reasoning_effort``, SGLang's ``reasoning: {"effort": ...}``, or the chat template's own
    ``chat_template_kwargs.reasoning_effort`` (where vLLM, SGLang and llama.cpp put the top-level one); given
    several, the largest counts (a server reads one of them, and the tier's ``efforts`` must hold for
    whichever it is)."""
    top = effort_field(b, "reasoning_effort")
    reasoning = req_obj(b, "reasoning")
    nested = effort_field(reasoning, "effort", param="reasoning.effort") if reasoning is not None else None
    kwargs = b.get("chat_template_kwargs")
    if type(kwargs) is dict and kwargs.get("reasoning_effort") is not None:  # rare: off the common path
        found = [e for e in (top, nested, effort_field(kwargs, "reasoning_effort",
                                                       param="chat_template_kwargs.reasoning_effort"))
                 if e is not None]
        return max(found, key=EFFORT_ORDER.index)
    if top is None or nested is None:
        return top if nested is None else nested
    return max(top, nested, key=EFFORT_ORDER.index)


def _thinking_disabled(b: Mapping[str, Any]) -> bool:
    thinking = req_obj(b, "thinking")
    if thinking is not None:
        kind = req_str(thinking, "type", param="thinking.type")
        if kind == "disabled":
            return True
    kwargs = req_obj(b, "chat_template_kwargs")
    if kwargs is not None:
        # Qwen3 templates read enable_thinking; DeepSeek V3.1 templates read thinking.
        for key in ("enable_thinking", "thinking"):
            if kwargs.get(key) is False:
                return True
    return False


def _visible_tokens(message: Mapping[str, Any]) -> int:
    n = text_tokens(message.get("content")) + text_tokens(message.get("refusal"))
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                n += text_tokens(fn.get("arguments"))
    return n


def _count_delta(choice: Mapping[str, Any]) -> tuple[int, int]:
    """One visible and/or one reasoning token for a streamed chat chunk with non-empty text."""
    d = choice.get("delta")
    if type(d) is not dict:  # orjson's objects are exact dicts
        return 0, 0
    if d.get("reasoning_content") or d.get("reasoning"):
        return (1, 1) if (d.get("content") or d.get("refusal") or d.get("tool_calls")) else (0, 1)
    return (1, 0) if (d.get("content") or d.get("refusal") or d.get("tool_calls")) else (0, 0)
