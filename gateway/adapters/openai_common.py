"""What the three OpenAI wire formats share: request checks, usage extraction and the choice stream meter.

Usage follows the OpenAI family's conventions (WIRE-FORMATS.md): ``completion_tokens`` includes
reasoning (OpenAI, vLLM, DeepSeek, SGLang); the reasoning share is in
``completion_tokens_details.reasoning_tokens``, or at the top of ``usage`` on SGLang; cached prompt
tokens are in ``prompt_tokens_details.cached_tokens`` or DeepSeek's ``prompt_cache_hit_tokens``.

When a server reports no reasoning split but did return reasoning text (SGLang without its reasoning
counter, Ollama), the split is estimated: the visible part from the visible text, reasoning the
remainder of ``completion_tokens``; the totals stay the server's own. xAI reports reasoning beside
``completion_tokens`` rather than inside it, and ``total_tokens`` is a cross-check: whatever it holds
beyond the parts is generation the parts left out (Google's OpenAI-compatible endpoint), charged as
reasoning (see :func:`usage_from_counts`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from gateway.adapters.base import USAGE_CEILING, Adapter, StreamMeter, nonneg, req_bool, req_int, req_obj, req_str
from gateway.adapters.sse import SSEEvent
from gateway.engine.compute import ComputeRequest, Usage, UsageSource
from gateway.engine.errors import BadRequest
from gateway.policy.config import EFFORT_ORDER

MAX_N = 128  # the OpenAI limit on ``n``


# ------------------------------------------------------------------------------------------ requests
def body_object(body: Any) -> Mapping[str, Any]:
    """The request body as a JSON object (a list, a number or a string is a bad request)."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def model_field(body: Any) -> str:
    model = req_str(body_object(body), "model", required=True)
    assert model is not None  # required=True raised otherwise
    if not model:
        raise BadRequest("'model' must not be empty", param="model")
    return model


def stream_field(body: Any) -> bool:
    """``stream`` (a bool), with ``stream_options`` checked to be an object when present."""
    b = body_object(body)
    stream = req_bool(b, "stream")
    options = req_obj(b, "stream_options")
    if options is not None:
        req_bool(options, "include_usage", param="stream_options.include_usage")
    return stream


class OpenAIAdapter(Adapter):
    """What the three OpenAI APIs share: the model and the stream flag are body fields; errors in OpenAI shape."""

    shape = "openai"

    def model_name(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> str:
        return model_field(body)

    def is_stream(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> bool:
        return stream_field(body)


def effort_field(body: Mapping[str, Any], key: str, param: str | None = None) -> str | None:
    return req_str(body, key, choices=EFFORT_ORDER, param=param)


def cap_field(body: Mapping[str, Any], key: str, minimum: int = 1) -> int | None:
    """An output cap: an integer of at least ``minimum`` (zero or negative caps are refused)."""
    return req_int(body, key, minimum=minimum)


def n_field(body: Mapping[str, Any]) -> int:
    n = req_int(body, "n", default=1, minimum=1, maximum=MAX_N)
    assert n is not None
    return n


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return type(v).__name__


def prepare_stream_usage(body: dict[str, Any], upstream_model: str, stream: bool) -> bool:
    """Map the model; on a stream, make ``stream_options.include_usage`` true (other options kept).

    Returns whether the client itself asked for the usage chunk.
    """
    body["model"] = upstream_model
    options = body.get("stream_options")
    wanted = isinstance(options, dict) and options.get("include_usage") is True
    if stream:
        merged = dict(options) if isinstance(options, dict) else {}
        merged["include_usage"] = True
        body["stream_options"] = merged
    return wanted


def int_value(body: Mapping[str, Any], key: str, default: int) -> int:
    """An integer field already validated by ``parse`` (which accepts 2.0 for 2), else ``default``."""
    v = body.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return int(v)
    return default


def lower_cap(body: dict[str, Any], key: str, cap: int) -> str | None:
    """Set ``body[key]`` to ``cap`` unless it is already at or below it; the change as ``key=value``."""
    cur = body.get(key)
    if isinstance(cur, (int, float)) and not isinstance(cur, bool) and cur <= cap:
        return None
    body[key] = cap
    return f"{key}={cap}"


# --------------------------------------------------------------------------------------------- usage
def text_tokens(text: Any) -> int:
    """A token estimate for returned text: ceil(characters / 4)."""
    if isinstance(text, str) and text:
        return (len(text) + 3) // 4
    return 0


def reasoning_text(obj: Mapping[str, Any]) -> Any:
    """The reasoning text of a message or delta (``reasoning_content``, or vLLM's newer ``reasoning``)."""
    r = obj.get("reasoning_content")
    return r if r else obj.get("reasoning")


def usage_from_counts(u: Mapping[str, Any], *, samples: int, reasoning_estimate: int = 0,
                      visible_estimate: int | None = None, source: UsageSource = "upstream",
                      prompt_key: str = "prompt_tokens", completion_key: str = "completion_tokens",
                      details_key: str = "completion_tokens_details") -> Usage:
    """A :class:`Usage` from an OpenAI-style usage object (Chat/Completions keys by default).

    - Reasoning is inside the completion count (OpenAI, vLLM, DeepSeek, SGLang) unless the figures
      say otherwise: xAI reports ``reasoning_tokens`` beside ``completion_tokens`` (its
      ``total_tokens`` is prompt + completion + reasoning), told apart by a reasoning count above the
      completion or a total that adds up only that way.
    - When the server reports no reasoning count but reasoning was returned (``reasoning_estimate``
      > 0, from its text or counted chunks), the split is estimated: with ``visible_estimate`` (from
      the visible text) reasoning is the remainder of the completion, which stays right when the
      returned reasoning is a summary; without it, the reasoning estimate itself, capped.
    - ``total_tokens`` is a cross-check: what it holds beyond prompt + generated is generation the
      parts left out (Google's OpenAI-compatible endpoint counts thoughts only there), so it is
      added to reasoning. A smaller total changes nothing.
    """
    # nonneg's first case (a plain int in range) inlined for the counts of every answer: a call each
    # otherwise. tests/unit/test_perf_finish.py holds this function to its plain form.
    v = u.get(prompt_key)
    prompt = v if type(v) is int and 0 < v <= USAGE_CEILING else nonneg(v)
    v = u.get("total_tokens")
    total = v if type(v) is int and 0 < v <= USAGE_CEILING else nonneg(v)
    v = u.get(completion_key)
    if v is not None:
        completion = v if type(v) is int and 0 < v <= USAGE_CEILING else nonneg(v)
    else:  # some servers send only the total
        completion = max(total - prompt, 0)
    reasoning = reported_reasoning(u, details_key)
    if reasoning:
        if reasoning_outside(prompt, completion, reasoning, total):
            visible = completion
        else:
            reasoning = min(reasoning, completion)
            visible = completion - reasoning
    else:  # the usual answer: no reasoning reported, none returned (split_reasoning's 0, without the call)
        reasoning = split_reasoning(completion, reasoning_estimate, visible_estimate) if reasoning_estimate > 0 else 0
        visible = completion - reasoning
    hidden = total - (prompt + reasoning + visible)
    if hidden > 0:
        reasoning += hidden
    # Positional, in Usage's field order (samples, prompt, reasoning, output, source, cached): a class
    # called with keywords has them packed into a dict for its __init__, on every answer.
    return Usage(samples if samples >= 1 else 1, prompt, reasoning, visible, source, cached_tokens(u))


def reported_reasoning(u: Mapping[str, Any], details_key: str = "completion_tokens_details") -> int:
    """The reasoning count a server reported: under ``details_key``, or at the top of usage (SGLang)."""
    details = u.get(details_key)
    reasoning = nonneg(details.get("reasoning_tokens")) if isinstance(details, dict) else 0
    if reasoning:
        return reasoning
    v = u.get("reasoning_tokens")
    return 0 if v is None else nonneg(v)  # usually absent: nonneg(None)'s 0 without the call


def reasoning_outside(prompt: int, completion: int, reasoning: int, total: int) -> bool:
    """Whether a reported reasoning count lies outside the completion count (xAI's convention).

    A reasoning count above the completion cannot be inside it; otherwise only a total equal to
    prompt + completion + reasoning (and not to prompt + completion) says so.
    """
    if reasoning > completion:
        return True
    return reasoning > 0 and total == prompt + completion + reasoning


def split_reasoning(generated: int, reasoning_estimate: int, visible_estimate: int | None) -> int:
    """The reasoning share of ``generated`` when only the total is reported.

    No reasoning returned: none. Else, with an estimate of the visible part, the remainder (the
    returned reasoning may be a summary or redacted, far shorter than what was generated); without
    one, the reasoning estimate. Never more than ``generated``.
    """
    if reasoning_estimate <= 0:
        return 0
    if visible_estimate is not None:
        return max(generated - visible_estimate, 0)
    return min(reasoning_estimate, generated)


def cached_tokens(u: Mapping[str, Any]) -> int:
    """Cached prompt tokens: ``prompt_tokens_details`` (Chat), ``input_tokens_details`` (Responses), else
    DeepSeek's ``prompt_cache_hit_tokens``. (Spelled out, not a loop over the two keys: every answer.)"""
    d = u.get("prompt_tokens_details")
    if isinstance(d, dict) and d.get("cached_tokens"):
        return nonneg(d.get("cached_tokens"))
    d = u.get("input_tokens_details")
    if isinstance(d, dict) and d.get("cached_tokens"):
        return nonneg(d.get("cached_tokens"))
    v = u.get("prompt_cache_hit_tokens")  # DeepSeek
    return 0 if v is None else nonneg(v)


def has_counts(u: Any, *keys: str) -> bool:
    """Whether ``u`` is a usage object carrying at least one of ``keys``."""
    if isinstance(u, dict):
        for k in keys:  # a loop, not any(<generator>): on every answer's path
            if u.get(k) is not None:
                return True
    return False


# ------------------------------------------------------------------------------------- stream meter
class _Choice:
    """What one choice index streamed: chunks counted, and its own usage when the server sent one."""

    __slots__ = ("finished", "reasoning", "usage", "usage_final", "visible")

    def __init__(self) -> None:
        self.visible = 0
        self.reasoning = 0
        self.finished = False  # a chunk of this choice carried a finish_reason
        self.usage: dict[str, Any] | None = None  # the latest per-choice usage
        self.usage_final = False  # that usage came on the choice's finishing chunk: it is complete


# (visible, reasoning) chunks a streamed choice carries; each non-empty text field counts as one token.
ChoiceCounter = Callable[[Mapping[str, Any]], tuple[int, int]]


class ChoiceStreamMeter(StreamMeter):
    """Meters Chat Completions / legacy Completions streams (``data:`` JSON chunks with ``choices``).

    - A chunk with ``"choices": []`` and a usage object is the request's usage (source ``upstream``);
      it is forwarded only when the client asked for streamed usage. So is OpenRouter's trailing
      chunk: usage beside choices that have already finished and now carry an empty delta and
      ``finish_reason: null``.
    - Usage beside non-empty choices is per choice: vLLM's ``continuous_usage_stats`` (cumulative for
      that choice), or the usage DeepSeek, llama.cpp and older vLLM put on a choice's finishing chunk.
      Never taken as the request total; when the ``choices: []`` chunk never comes, the choices' own
      usage is summed (prompt counted once) — ``upstream`` when every choice finished with one and
      the stream ended, else ``counted``.
    - Otherwise streamed tokens are counted per choice, one per chunk with non-empty text.
    - ``data: [DONE]`` sets ``finished``; ``data: {"error": ...}`` (vLLM, SGLang) sets ``error``.
    """

    def __init__(self, req: ComputeRequest, client_wants_usage: bool, count: ChoiceCounter,
                 samples_floor: int = 0):
        super().__init__(req, client_wants_usage)
        self._count = count
        self._samples_floor = samples_floor
        self._choices: dict[int, _Choice] = {}
        self._final: dict[str, Any] | None = None

    def on_event(self, ev: SSEEvent) -> bool:
        # On every chunk of every chat stream: exact type checks (orjson makes exact dicts, lists and ints,
        # so ``type(x) is dict`` says what ``isinstance`` would), locals, and the usage cases off the loop.
        data = ev.data
        if not data or data[0] != "{":
            if data is not None and data.strip() == "[DONE]":
                self.finished = True
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if type(obj) is not dict:
            return True
        choices = obj.get("choices")
        if not choices:
            return self._no_choices(obj)
        if type(choices) is not list:
            return True
        usage = obj.get("usage")
        if type(usage) is dict:
            if self._trailing_usage(choices):
                self._final = usage  # OpenRouter's usage chunk: the request's, though it has a choice
                return self.client_wants_usage
        else:
            usage = None
        count = self._count
        states = self._choices
        for c in choices:
            if type(c) is not dict:
                continue
            idx = c.get("index", 0)
            if type(idx) is not int:
                idx = 0
            st = states.get(idx)
            if st is None:
                st = states[idx] = _Choice()
            v, r = count(c)
            if v:
                st.visible += v
            if r:
                st.reasoning += r
            finishing = c.get("finish_reason") is not None
            if finishing:
                st.finished = True
            if usage is not None:
                st.usage = usage
                st.usage_final = finishing
        return True

    def _no_choices(self, obj: dict[str, Any]) -> bool:
        """A chunk without choices: the request's usage chunk, an error, or nothing to meter."""
        usage = obj.get("usage")
        if isinstance(usage, dict):  # the request's usage chunk
            self._final = usage
            return self.client_wants_usage
        err = obj.get("error")
        if isinstance(err, dict):
            self.error = err
        elif err is not None:
            self.error = {"message": str(err)}
        elif obj.get("object") == "error":
            self.error = _flat_error(obj)
        return True

    def _trailing_usage(self, choices: list[Any]) -> bool:
        """Whether a chunk with ``usage`` beside non-empty ``choices`` is the request's usage chunk.

        OpenRouter sends its usage after each choice has finished, on a chunk whose choices carry an
        empty delta and ``finish_reason: null``. Per-choice usage (vLLM continuous stats, DeepSeek's
        finishing chunk) comes on a chunk with text or with the finish_reason itself, or before the
        choice finished, so it never matches.
        """
        for c in choices:
            if not isinstance(c, dict) or c.get("finish_reason") is not None or self._count(c) != (0, 0):
                return False
            idx = c.get("index", 0)
            st = self._choices.get(idx) if isinstance(idx, int) and not isinstance(idx, bool) else None
            if st is None or not st.finished:
                return False
        return True

    def usage(self) -> Usage:
        req = self.req
        seen = len(self._choices)
        samples = max(seen or req.samples, self._samples_floor)
        counted_r = sum(c.reasoning for c in self._choices.values())
        if self._final is not None:
            counted_v = sum(c.visible for c in self._choices.values())
            return usage_from_counts(self._final, samples=samples, reasoning_estimate=counted_r,
                                     visible_estimate=counted_v)
        per_choice = [c for c in self._choices.values() if c.usage is not None]
        if per_choice:
            return self._from_choice_usage(samples)
        return Usage(
            samples=max(samples, 1),
            prompt_tokens=req.prompt_tokens,
            reasoning_tokens=counted_r,
            output_tokens=sum(c.visible for c in self._choices.values()),
            source="counted",
        )

    def _from_choice_usage(self, samples: int) -> Usage:
        prompt = 0
        cached = 0
        reasoning = visible = 0
        complete = self.finished
        for c in self._choices.values():
            if c.usage is None:
                complete = False
                reasoning += c.reasoning
                visible += c.visible
                continue
            u = usage_from_counts(c.usage, samples=1, reasoning_estimate=c.reasoning, visible_estimate=c.visible)
            prompt = max(prompt, u.prompt_tokens)  # each choice reports the whole (shared) prompt
            cached = max(cached, u.cached_tokens)
            gen = u.generated_tokens
            if not c.usage_final:
                complete = False
                gen = max(gen, c.visible + c.reasoning)  # chunks may have come after the last usage
            r = min(u.reasoning_tokens, gen)
            reasoning += r
            visible += gen - r
        return Usage(
            samples=max(samples, 1),
            prompt_tokens=prompt or self.req.prompt_tokens,
            reasoning_tokens=reasoning,
            output_tokens=visible,
            source="upstream" if complete else "counted",
            cached_tokens=cached,
        )


def _flat_error(obj: Mapping[str, Any]) -> dict[str, Any]:
    """An error sent flat (``{"object": "error", "message", "code"}``, older vLLM/SGLang)."""
    return {k: obj[k] for k in ("message", "type", "param", "code") if k in obj}
