"""OpenAI Responses — ``POST /v1/responses``.

No ``n`` (one sample); ``max_output_tokens`` (at least 16) bounds visible and reasoning tokens;
``reasoning.effort`` is a soft signal. Usage (``input_tokens``, ``output_tokens`` including
reasoning, ``output_tokens_details.reasoning_tokens``) arrives in the body, or in a stream inside the
``response`` object of the final ``response.completed`` / ``response.incomplete`` / ``response.failed``
event — always, so the client never needs anything stripped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.adapters.base import StreamMeter, nonneg, req_obj, write_cap
from gateway.adapters.openai_common import (
    OpenAIAdapter,
    body_object,
    cap_field,
    effort_field,
    has_counts,
    lower_cap,
    model_field,
    stream_field,
    text_tokens,
    usage_from_counts,
)
from gateway.adapters.sse import SSEEvent
from gateway.engine.compute import Bound, ClampTarget, ComputeRequest, Usage
from gateway.engine.errors import BadRequest

MIN_OUTPUT_TOKENS = 16  # the API refuses a smaller max_output_tokens

_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_VISIBLE_DELTAS = frozenset({"response.output_text.delta", "response.refusal.delta",
                             "response.function_call_arguments.delta"})
_REASONING_DELTAS = frozenset({"response.reasoning_text.delta", "response.reasoning_summary_text.delta"})


class Responses(OpenAIAdapter):
    api = "openai.responses"
    upstream_path = "/v1/responses"

    def parse(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> ComputeRequest:
        b = body_object(body)
        model = model_field(b)
        inp = b.get("input")
        if inp is None:
            raise BadRequest("'input' is required", param="input")
        if not isinstance(inp, (str, list)):
            raise BadRequest("'input' must be a string or an array of input items", param="input")
        reasoning = req_obj(b, "reasoning")
        return ComputeRequest(
            api=self.api,
            model=model,
            samples=1,
            output_cap=cap_field(b, "max_output_tokens", minimum=MIN_OUTPUT_TOKENS),
            effort=effort_field(reasoning, "effort", param="reasoning.effort") if reasoning else None,
            stream=stream_field(b),
        )

    def rewrite(self, body: dict[str, Any], req: ComputeRequest, target: ClampTarget) -> list[str]:
        changes: list[str] = []
        # Never below the API's minimum (the upstream would refuse it); the handler re-checks the
        # rewritten request against the tier and refuses it if 16 tokens are still too many.
        change = lower_cap(body, "max_output_tokens", max(target.output_cap, MIN_OUTPUT_TOKENS))
        if change:
            changes.append(change)
        if target.effort is not None and target.effort != req.effort:
            reasoning = body.get("reasoning")
            if not isinstance(reasoning, dict):
                reasoning = body["reasoning"] = {}
            reasoning["effort"] = target.effort
            changes.append(f"reasoning.effort={target.effort}")
        return changes

    def write_bound(self, body: dict[str, Any], req: ComputeRequest, bound: Bound) -> list[str]:
        if bound.output_cap < MIN_OUTPUT_TOKENS:
            # The API refuses a smaller max_output_tokens, and a larger one would exceed the bound.
            raise BadRequest(f"this model's output cap ({bound.output_cap} tokens) is below the Responses "
                             f"API's minimum max_output_tokens of {MIN_OUTPUT_TOKENS}; kgate cannot forward "
                             f"a cap the API accepts", param="max_output_tokens")
        change = write_cap(body, "max_output_tokens", bound.output_cap)
        return [change] if change else []

    def prepare_upstream(self, body: dict[str, Any], upstream_model: str, stream: bool) -> bool:
        body["model"] = upstream_model
        return True  # the final event carries usage whatever the client asked

    def usage_from_json(self, body: Any, req: ComputeRequest) -> Usage:
        visible, reasoning = _output_text_tokens(body.get("output") if isinstance(body, dict) else None)
        usage = body.get("usage") if isinstance(body, dict) else None
        if has_counts(usage, "input_tokens", "output_tokens", "total_tokens"):
            assert isinstance(usage, dict)
            return _usage(usage, reasoning, visible)
        return Usage(samples=1, prompt_tokens=req.prompt_tokens, reasoning_tokens=reasoning,
                     output_tokens=visible, source="estimated")

    def stream_meter(self, req: ComputeRequest, client_wants_usage: bool) -> StreamMeter:
        return ResponsesStreamMeter(req, client_wants_usage)


class ResponsesStreamMeter(StreamMeter):
    """Meters a Responses stream: typed events, usage in the final event's ``response`` object.

    Only the final events and ``error`` events are decoded; deltas are recognised by their event
    name (or the leading ``"type"`` of their data) and counted one token each for the fallback.
    """

    def __init__(self, req: ComputeRequest, client_wants_usage: bool):
        super().__init__(req, client_wants_usage)
        self._usage: dict[str, Any] | None = None
        self._visible = 0
        self._reasoning = 0

    def on_event(self, ev: SSEEvent) -> bool:
        data = ev.data
        if not data:
            return True
        kind = ev.event or _leading_type(data)
        if kind in _VISIBLE_DELTAS:
            self._visible += _non_empty_delta(data)
        elif kind in _REASONING_DELTAS:
            self._reasoning += _non_empty_delta(data)
        elif kind in _FINAL_EVENTS or kind == "error" or kind is None:
            self._decoded(data)
        return True

    def _decoded(self, data: str) -> None:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        kind = obj.get("type")
        if kind in _FINAL_EVENTS:
            self.finished = True
            response = obj.get("response")
            if isinstance(response, dict):
                if isinstance(response.get("usage"), dict):
                    self._usage = response["usage"]
                if kind == "response.failed" and isinstance(response.get("error"), dict):
                    self.error = response["error"]
        elif kind == "error":
            err = obj.get("error")
            self.error = err if isinstance(err, dict) else {
                k: obj[k] for k in ("code", "message", "param") if k in obj}
        elif kind in _VISIBLE_DELTAS and obj.get("delta"):
            self._visible += 1
        elif kind in _REASONING_DELTAS and obj.get("delta"):
            self._reasoning += 1

    def usage(self) -> Usage:
        if has_counts(self._usage, "input_tokens", "output_tokens", "total_tokens"):
            assert self._usage is not None
            return _usage(self._usage, self._reasoning, self._visible)
        return Usage(samples=1, prompt_tokens=self.req.prompt_tokens, reasoning_tokens=self._reasoning,
                     output_tokens=self._visible, source="counted")


def _usage(u: dict[str, Any], reasoning_estimate: int, visible_estimate: int) -> Usage:
    """Responses usage: ``input_tokens``/``output_tokens``, with the OpenAI family's cross-checks."""
    return usage_from_counts(u, samples=1, reasoning_estimate=reasoning_estimate,
                             visible_estimate=visible_estimate, prompt_key="input_tokens",
                             completion_key="output_tokens", details_key="output_tokens_details")


def _non_empty_delta(data: str) -> int:
    """1 unless the event's delta is the empty string (checked without decoding the event)."""
    return 0 if ('"delta":""' in data or '"delta": ""' in data) else 1


def _leading_type(data: str) -> str | None:
    """The event type when the data opens with it (OpenAI writes ``{"type":"…",`` first); else None."""
    if data.startswith('{"type":"'):
        end = data.find('"', 9)
        if end > 9:
            return data[9:end]
    return None


def _output_text_tokens(output: Any) -> tuple[int, int]:
    """(visible, reasoning) token estimates from a response's ``output`` items."""
    visible = reasoning = 0
    if not isinstance(output, list):
        return 0, 0
    for item in output:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "reasoning":
            for key in ("content", "summary"):
                parts = item.get(key)
                if isinstance(parts, list):
                    reasoning += sum(text_tokens(p.get("text")) for p in parts if isinstance(p, dict))
        elif kind == "message":
            parts = item.get("content")
            if isinstance(parts, list):
                visible += sum(text_tokens(p.get("text") or p.get("refusal"))
                               for p in parts if isinstance(p, dict))
        elif kind == "function_call":
            visible += text_tokens(item.get("arguments"))
    return visible, nonneg(reasoning)
