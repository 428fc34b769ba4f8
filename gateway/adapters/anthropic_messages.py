"""Anthropic Messages, ``POST /v1/messages`` (WIRE-FORMATS "Anthropic Messages").

Compute lives in ``max_tokens`` (one sample, thinking included), ``thinking`` (an explicit
``budget_tokens``, ``adaptive`` or ``disabled``) and ``output_config.effort`` (a soft signal).
Usage: the prompt is ``input_tokens`` + ``cache_creation_input_tokens`` + ``cache_read_input_tokens``;
``output_tokens`` includes thinking, split out by ``output_tokens_details.thinking_tokens`` where the
server sends it; elsewhere the visible part is estimated from the text and thinking is the remainder
(returned thinking may be redacted or summarised). ``usage.iterations`` (compaction, server-side
loops) adds the steps the top-level figures leave out. In a stream, ``message_delta.usage`` is
cumulative: the last one wins; ``message_start`` gives only the input side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from gateway.adapters.base import (
    Adapter,
    SSEEvent,
    StreamMeter,
    json_size,
    nonneg,
    req_bool,
    req_int,
    req_obj,
    req_str,
    write_cap,
)
from gateway.engine.compute import Bound, ClampTarget, ComputeRequest, Usage
from gateway.engine.errors import BadRequest, Forbidden

EFFORTS: tuple[str, ...] = ("low", "medium", "high", "xhigh", "max")
THINKING_TYPES: tuple[str, ...] = ("enabled", "adaptive", "disabled")
MIN_THINKING_BUDGET = 1024  # Anthropic refuses a smaller budget_tokens
CHARS_PER_TOKEN = 4  # the estimate used when no usage says better


def estimate_tokens(chars: int) -> int:
    """Tokens for ``chars`` characters of generated text: ceil(chars / 4)."""
    return math.ceil(chars / CHARS_PER_TOKEN) if chars > 0 else 0


def request_object(body: Any) -> Mapping[str, Any]:
    """The request body as an object (a JSON list or number is a BadRequest, not a TypeError)."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


class AnthropicMessages(Adapter):
    """The Anthropic Messages API: one sample per request, thinking inside ``max_tokens``."""

    api = "anthropic.messages"
    shape = "anthropic"
    upstream_path = "/v1/messages"

    def model_name(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> str:
        model = req_str(request_object(body), "model", required=True)
        if not model:
            raise BadRequest("'model' must not be empty", param="model")
        return model

    def is_stream(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> bool:
        return req_bool(request_object(body), "stream")

    def parse(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> ComputeRequest:
        body = request_object(body)
        model = self.model_name(body, path_params)
        max_tokens = req_int(body, "max_tokens", minimum=1)
        if max_tokens is None:
            raise BadRequest("'max_tokens' is required", param="max_tokens")
        if not isinstance(body.get("messages"), list):
            got = "missing" if body.get("messages") is None else type(body["messages"]).__name__
            raise BadRequest(f"'messages' must be a list, got {got}", param="messages")
        budget, disabled = _thinking(body, max_tokens)
        effort = None
        output_config = req_obj(body, "output_config")
        if output_config is not None:
            effort = req_str(output_config, "effort", choices=EFFORTS, param="output_config.effort")
        return ComputeRequest(
            api=self.api,
            model=model,
            samples=1,
            output_cap=max_tokens,
            thinking_budget=budget,
            thinking_disabled=disabled,
            effort=effort,
            stream=req_bool(body, "stream"),
        )

    def rewrite(self, body: dict[str, Any], req: ComputeRequest, target: ClampTarget) -> list[str]:
        changes: list[str] = []
        if body.get("max_tokens") != target.output_cap:
            body["max_tokens"] = target.output_cap
            changes.append(f"max_tokens={target.output_cap}")
        max_tokens = int(body["max_tokens"])
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            old = nonneg(thinking.get("budget_tokens"))
            new = old if target.reasoning_budget is None else target.reasoning_budget
            new = min(new, max_tokens - 1)  # Anthropic: budget_tokens < max_tokens
            if new < MIN_THINKING_BUDGET:
                # Below Anthropic's minimum the only smaller budget it accepts is none at all. "Disabled" is a
                # claim a model may ignore, not a bound: the cap comes down to the budget the tier allows.
                body["thinking"] = {"type": "disabled"}
                cap = max_tokens if target.reasoning_budget is None else max(target.reasoning_budget, 1)
                if max_tokens > cap:
                    body["max_tokens"] = cap
                    changes = [c for c in changes if not c.startswith("max_tokens=")]
                    changes.append(f"max_tokens={cap}")
                changes.append("thinking=disabled")
            elif new != old:
                body["thinking"] = {**thinking, "budget_tokens": new}
                changes.append(f"thinking.budget_tokens={new}")
        if target.effort is not None and target.effort != req.effort:
            if target.effort not in EFFORTS:
                raise Forbidden(f"the tier allows reasoning efforts this API cannot express "
                                f"(lowest is {EFFORTS[0]!r}, the tier needs {target.effort!r})")
            config = body.get("output_config")
            body["output_config"] = {**(config if isinstance(config, dict) else {}), "effort": target.effort}
            changes.append(f"output_config.effort={target.effort}")
        return changes

    def write_bound(self, body: dict[str, Any], req: ComputeRequest, bound: Bound) -> list[str]:
        cap = bound.output_cap
        change = write_cap(body, "max_tokens", cap)
        changes = [change] if change else []
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            budget = int(nonneg(thinking.get("budget_tokens")))
            if budget >= cap:  # Anthropic refuses budget_tokens >= max_tokens
                if cap - 1 < MIN_THINKING_BUDGET:  # and one below its minimum: none is the only smaller
                    body["thinking"] = {"type": "disabled"}
                    changes.append("thinking=disabled")
                else:
                    body["thinking"] = {**thinking, "budget_tokens": cap - 1}
                    changes.append(f"thinking.budget_tokens={cap - 1}")
            elif type(thinking.get("budget_tokens")) is float:
                body["thinking"] = {**thinking, "budget_tokens": budget}
        return changes

    def prepare_upstream(self, body: dict[str, Any], upstream_model: str, stream: bool) -> bool:
        body["model"] = upstream_model
        return True  # Anthropic streams always carry usage: nothing to inject, nothing to strip

    def usage_from_json(self, body: Any, req: ComputeRequest) -> Usage:
        thinking_chars, text_chars = _content_chars(body.get("content") if isinstance(body, dict) else None)
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict) or ("output_tokens" not in usage and "input_tokens" not in usage):
            return Usage(samples=1, prompt_tokens=req.prompt_tokens,
                         reasoning_tokens=estimate_tokens(thinking_chars),
                         output_tokens=estimate_tokens(text_chars), source="estimated")
        tally = _Tally()
        tally.take(usage)
        return tally.usage(text_chars, _has_thinking(body.get("content")))

    def stream_meter(self, req: ComputeRequest, client_wants_usage: bool) -> StreamMeter:
        return AnthropicStreamMeter(req, client_wants_usage)


def _thinking(body: Mapping[str, Any], max_tokens: int) -> tuple[int | None, bool]:
    """(explicit thinking budget, thinking disabled) from ``thinking``, validated as Anthropic does."""
    thinking = req_obj(body, "thinking")
    if thinking is None:
        # Not given: newer models may think adaptively by default, so the bound is max_tokens.
        return None, False
    kind = req_str(thinking, "type", required=True, choices=THINKING_TYPES, param="thinking.type")
    if kind == "disabled":
        return None, True
    if kind == "adaptive":
        return None, False
    budget = req_int(thinking, "budget_tokens", minimum=MIN_THINKING_BUDGET, param="thinking.budget_tokens")
    if budget is None:
        raise BadRequest("'thinking.budget_tokens' is required when thinking is enabled",
                         param="thinking.budget_tokens")
    if budget >= max_tokens:
        raise BadRequest(f"'max_tokens' ({max_tokens}) must be greater than "
                         f"'thinking.budget_tokens' ({budget})", param="thinking.budget_tokens")
    return budget, False


def _content_chars(content: Any) -> tuple[int, int]:
    """(thinking characters, visible characters) of a message's content blocks."""
    thinking = visible = 0
    if not isinstance(content, list):
        return 0, 0
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "thinking":
            thinking += _strlen(block.get("thinking"))
        elif kind == "redacted_thinking":
            thinking += _strlen(block.get("data"))  # encrypted, but it stands for reasoning all the same
        elif kind == "text":
            visible += _strlen(block.get("text"))
        elif kind in ("tool_use", "server_tool_use") and block.get("input") is not None:
            visible += json_size(block["input"])
    return thinking, visible


def _strlen(x: Any) -> int:
    return len(x) if isinstance(x, str) else 0


# The iterations the top-level usage figures cover (a fallback hop stands in for a message one); every
# other iteration (compaction, advisor, any new kind) is work the top level leaves out.
TOP_LEVEL_ITERATIONS = frozenset({"message", "fallback_message"})
THINKING_BLOCKS = frozenset({"thinking", "redacted_thinking"})


class _Tally:
    """Usage figures as Anthropic reports them, cumulative: a later report replaces an earlier one.

    ``usage.iterations`` (compaction, server-side sampling loops) lists every sampling step; the
    top-level figures cover only the ``message`` steps, so the others are added on top. The message
    steps are never added twice: the top-level figures and their sum are the same count, the larger wins.
    """

    __slots__ = ("cache_creation", "cache_read", "extra_cache_read", "extra_input", "extra_output", "input",
                 "output", "thinking", "top_input", "top_output")

    def __init__(self) -> None:
        self.input = self.cache_creation = self.cache_read = self.output = 0
        self.thinking: int | None = None
        self.top_input = self.top_output = 0  # summed over the iterations the top level covers
        self.extra_input = self.extra_output = self.extra_cache_read = 0  # the iterations it leaves out

    def take(self, usage: Mapping[str, Any], *, output: bool = True) -> None:
        """Take one usage report; ``output=False`` for ``message_start`` (only its input side is final)."""
        iterations = usage.get("iterations") if output else None
        if isinstance(iterations, list):
            # Input figures beside an iteration list describe those iterations: take them as they are,
            # not the max with message_start's (which may count a step the iterations list apart).
            self.input = nonneg(usage.get("input_tokens")) or self.input
            self.cache_creation = nonneg(usage.get("cache_creation_input_tokens")) or self.cache_creation
            self.cache_read = nonneg(usage.get("cache_read_input_tokens")) or self.cache_read
            self._iterations(iterations)
        else:
            # Input figures only grow (server tools add input); a 0 some proxies write is not a reset.
            self.input = max(self.input, nonneg(usage.get("input_tokens")))
            self.cache_creation = max(self.cache_creation, nonneg(usage.get("cache_creation_input_tokens")))
            self.cache_read = max(self.cache_read, nonneg(usage.get("cache_read_input_tokens")))
        if not output:
            return
        if "output_tokens" in usage:
            self.output = nonneg(usage.get("output_tokens"))
        details = usage.get("output_tokens_details")
        if isinstance(details, dict) and details.get("thinking_tokens") is not None:
            self.thinking = nonneg(details["thinking_tokens"])

    def _iterations(self, iterations: list[Any]) -> None:
        """Sum the iteration list (cumulative in a stream: the latest list replaces the earlier one)."""
        self.top_input = self.top_output = self.extra_input = self.extra_output = self.extra_cache_read = 0
        for it in iterations:
            if not isinstance(it, dict):
                continue
            read = nonneg(it.get("cache_read_input_tokens"))
            inp = nonneg(it.get("input_tokens")) + nonneg(it.get("cache_creation_input_tokens")) + read
            out = nonneg(it.get("output_tokens"))
            if it.get("type") in TOP_LEVEL_ITERATIONS:
                self.top_input += inp
                self.top_output += out
            else:
                self.extra_input += inp
                self.extra_output += out
                self.extra_cache_read += read

    @property
    def prompt(self) -> int:
        return max(self.input + self.cache_creation + self.cache_read, self.top_input) + self.extra_input

    def usage(self, text_chars: int, thinking_seen: bool) -> Usage:
        """The upstream usage, all iterations included.

        The thinking share is ``thinking_tokens`` where reported. Else, when the response thought, it
        is what ``output_tokens`` holds beyond the visible text: the thinking returned may be redacted
        or a summary far shorter than what was generated, so its own length says little. Iterations
        the top level leaves out (compaction summaries, advisors) are work beyond the answer: reasoning.
        """
        output = max(self.output, self.top_output)
        if self.thinking is not None:
            reasoning = min(self.thinking, output)
        elif thinking_seen:
            reasoning = max(output - estimate_tokens(text_chars), 0)
        else:
            reasoning = 0
        return Usage(samples=1, prompt_tokens=self.prompt, reasoning_tokens=reasoning + self.extra_output,
                     output_tokens=output - reasoning, source="upstream",
                     cached_tokens=self.cache_read + self.extra_cache_read)


def _has_thinking(content: Any) -> bool:
    """Whether a message's content holds a thinking block (full, summarised, omitted or redacted)."""
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") in THINKING_BLOCKS for b in content)


class AnthropicStreamMeter(StreamMeter):
    """Meters an Anthropic SSE stream; every event is forwarded unchanged.

    ``message_start`` gives the input side, each ``message_delta`` the cumulative usage (the last wins);
    thinking and text deltas are counted for the split of ``output_tokens`` and for streams that end
    before any ``message_delta`` (``source: counted``).
    """

    def __init__(self, req: ComputeRequest, client_wants_usage: bool):
        super().__init__(req, client_wants_usage)
        self._tally = _Tally()
        self._started = False  # message_start carried usage (the input side)
        self._final = False  # a message_delta carried usage
        self._thinking_chars = 0
        self._text_chars = 0
        self._thinking_seen = False  # a thinking or redacted_thinking block started

    def on_event(self, ev: SSEEvent) -> bool:
        kind = ev.event
        doc: Any = None
        if kind is None or kind == "message":  # data-only transcripts: the type is in the JSON
            doc = ev.json()
            kind = doc.get("type") if isinstance(doc, dict) else None
        if kind == "content_block_delta":
            # The bulk of the stream: signatures are large and count for nothing, skip their JSON.
            if ev.data and '"signature_delta"' not in ev.data:
                self._count_delta(doc if doc is not None else ev.json())
        elif kind == "message_delta":
            doc = doc if doc is not None else ev.json()
            usage = doc.get("usage") if isinstance(doc, dict) else None
            if isinstance(usage, dict):
                self._tally.take(usage)
                self._final = True
        elif kind == "message_start":
            doc = doc if doc is not None else ev.json()
            message = doc.get("message") if isinstance(doc, dict) else None
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._tally.take(usage, output=False)
                self._started = True
        elif kind == "content_block_start":
            doc = doc if doc is not None else ev.json()
            block = doc.get("content_block") if isinstance(doc, dict) else None
            thinking, visible = _content_chars([block])
            self._thinking_seen = self._thinking_seen or _has_thinking([block])
            self._thinking_chars += thinking
            self._text_chars += visible
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            doc = doc if doc is not None else ev.json()
            err = doc.get("error") if isinstance(doc, dict) else None
            self.error = err if isinstance(err, dict) else {"message": ev.data or ""}
        return True

    def _count_delta(self, doc: Any) -> None:
        delta = doc.get("delta") if isinstance(doc, dict) else None
        if not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta":
            self._text_chars += _strlen(delta.get("text"))
        elif kind == "thinking_delta":
            self._thinking_chars += _strlen(delta.get("thinking"))
        elif kind == "input_json_delta":
            self._text_chars += _strlen(delta.get("partial_json"))  # tool input is generated output too

    def usage(self) -> Usage:
        if self._final:
            return self._tally.usage(self._text_chars, self._thinking_seen or self._thinking_chars > 0)
        # No message_delta: the output was never reported. Count it; the input side of message_start
        # is still the provider's own figure.
        prompt = self._tally.prompt if self._started else self.req.prompt_tokens
        return Usage(samples=1, prompt_tokens=prompt, reasoning_tokens=estimate_tokens(self._thinking_chars),
                     output_tokens=estimate_tokens(self._text_chars), source="counted",
                     cached_tokens=self._tally.cache_read)
