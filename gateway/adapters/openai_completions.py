"""OpenAI legacy Completions — ``POST /v1/completions``.

Compute fields: ``prompt`` (a string, a list of strings, one prompt of token ids, or a list of
token-id lists: each prompt is generated for separately), ``n`` and ``best_of`` (server-side candidates,
at least ``n``; OpenAI refuses ``best_of`` with ``stream``), and ``max_tokens`` (16 when absent, the
API's documented default). Samples = prompts * max(n, best_of).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.adapters.base import StreamMeter, as_ints, req_int, write_cap
from gateway.adapters.openai_common import (
    MAX_N,
    ChoiceStreamMeter,
    OpenAIAdapter,
    body_object,
    cap_field,
    effort_field,
    has_counts,
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

DEFAULT_MAX_TOKENS = 16


class Completions(OpenAIAdapter):
    api = "openai.completions"
    upstream_path = "/v1/completions"

    def parse(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> ComputeRequest:
        b = body_object(body)
        model = model_field(b)
        prompts = _prompts(b)
        n = n_field(b)
        best_of = req_int(b, "best_of", minimum=1, maximum=MAX_N)
        stream = stream_field(b)
        if best_of is not None:
            if best_of < n:
                raise BadRequest(f"'best_of' ({best_of}) must be at least 'n' ({n})", param="best_of")
            if best_of > 1 and stream:
                raise BadRequest("'best_of' greater than 1 cannot be streamed", param="best_of")
        max_tokens = cap_field(b, "max_tokens")
        return ComputeRequest(
            api=self.api,
            model=model,
            samples=prompts * max(n, best_of or 1),
            output_cap=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            effort=effort_field(b, "reasoning_effort"),
            stream=stream,
            prompts=prompts,
        )

    def rewrite(self, body: dict[str, Any], req: ComputeRequest, target: ClampTarget) -> list[str]:
        changes: list[str] = []
        # Prompts cannot be dropped: one sample each is the least this request can ask for (the
        # handler re-checks the rewritten request and refuses it if that is still too much).
        per_prompt = max(target.samples // max(req.prompts, 1), 1)
        n = int_value(body, "n", 1)
        best_of = int_value(body, "best_of", 0)
        if best_of > per_prompt:
            body["best_of"] = per_prompt
            changes.append(f"best_of={per_prompt}")
        if n > per_prompt:  # n never above best_of: best_of is already at most per_prompt
            body["n"] = per_prompt
            changes.append(f"n={per_prompt}")
        change = lower_cap(body, "max_tokens", target.output_cap)
        if change:
            changes.append(change)
        if target.effort is not None and target.effort != req.effort and "reasoning_effort" in body:
            body["reasoning_effort"] = target.effort
            changes.append(f"reasoning_effort={target.effort}")
        return changes

    def write_bound(self, body: dict[str, Any], req: ComputeRequest, bound: Bound) -> list[str]:
        # Written even when the client sent none: the API's default is 16, but vLLM's is "as many as fit".
        change = write_cap(body, "max_tokens", bound.output_cap)
        ints = as_ints(body, ("n", "best_of"))
        if ints is not None:
            body.update(ints)
        return [change] if change else []

    def prepare_upstream(self, body: dict[str, Any], upstream_model: str, stream: bool) -> bool:
        return prepare_stream_usage(body, upstream_model, stream)

    def usage_from_json(self, body: Any, req: ComputeRequest) -> Usage:
        choices = body.get("choices") if isinstance(body, dict) else None
        choices = [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
        samples = max(len(choices), req.samples)  # best_of candidates are generated but not returned
        usage = body.get("usage") if isinstance(body, dict) else None
        if has_counts(usage, "prompt_tokens", "completion_tokens", "total_tokens"):
            assert isinstance(usage, dict)
            return usage_from_counts(usage, samples=samples)
        texts = [c.get("text") for c in choices]
        return Usage(
            samples=max(samples, 1),
            prompt_tokens=req.prompt_tokens,
            reasoning_tokens=0,
            output_tokens=sum(text_tokens(t) for t in texts),
            source="estimated",
        )

    def stream_meter(self, req: ComputeRequest, client_wants_usage: bool) -> StreamMeter:
        return ChoiceStreamMeter(req, client_wants_usage, _count_text, samples_floor=req.samples)


def _prompts(b: Mapping[str, Any]) -> int:
    """Prompts generated for: ``prompt``'s, plus vLLM's ``prompt_embeds`` (one base64 tensor or a list;
    beside ``prompt`` each is one more prompt, so one more set of samples the bound must count)."""
    embeds = b.get("prompt_embeds")
    if embeds is None:
        return count_prompts(b.get("prompt"))
    if isinstance(embeds, str) and embeds:
        extra = 1
    elif isinstance(embeds, list) and embeds and all(isinstance(e, str) and e for e in embeds):
        extra = len(embeds)
    else:
        raise BadRequest("'prompt_embeds' must be a base64 string or a non-empty array of them",
                         param="prompt_embeds")
    return extra + (count_prompts(b["prompt"]) if b.get("prompt") is not None else 0)


def count_prompts(prompt: Any) -> int:
    """How many prompts ``prompt`` holds: a string or token ids: 1; a list of strings or token lists: len."""
    if prompt is None:
        raise BadRequest("'prompt' is required", param="prompt")
    if isinstance(prompt, str):
        return 1
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest("'prompt' must be a string, an array of strings or an array of token arrays",
                         param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return len(prompt)
    if all(_is_token(t) for t in prompt):
        return 1
    if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in prompt):
        return len(prompt)
    raise BadRequest("'prompt' must be a string, an array of strings, an array of token ids or an array "
                     "of non-empty token-id arrays, not a mix", param="prompt")


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _count_text(choice: Mapping[str, Any]) -> tuple[int, int]:
    return (1 if choice.get("text") else 0), 0
