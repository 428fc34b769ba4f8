"""The Anthropic Messages adapter against recorded payloads (tests/payloads/anthropic, see its README)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters.anthropic_messages import AnthropicMessages, AnthropicStreamMeter
from gateway.engine.compute import ClampTarget, ComputeRequest, Usage, UsageSource, admission_bound, clamp_target
from gateway.engine.errors import BadRequest, Forbidden
from gateway.policy.config import ModelConfig, TierConfig

PAYLOADS = Path(__file__).parents[1] / "payloads" / "anthropic"
A = AnthropicMessages()
PROMPT_ESTIMATE = 33  # what the handler would have estimated from the body size


def load(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def request(**kw: Any) -> ComputeRequest:
    base: dict[str, Any] = {"api": A.api, "model": "claude", "prompt_tokens": PROMPT_ESTIMATE}
    return ComputeRequest(**{**base, **kw})


def body(**kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": "claude-pub", "max_tokens": 4096,
                         "messages": [{"role": "user", "content": "hi"}]}
    b.update(kw)
    return {k: v for k, v in b.items() if v is not ...}


def run(pieces: list[bytes]) -> tuple[bytes, AnthropicStreamMeter]:
    meter = A.stream_meter(request(stream=True), True)
    assert isinstance(meter, AnthropicStreamMeter)
    out = b"".join(meter.feed(p) for p in pieces) + meter.close()
    return out, meter


def truncated_thinking() -> bytes:
    """The recorded thinking stream, cut before its message_delta (a dropped connection)."""
    data = load("dive_thinking.sse")
    return data[: data.index(b"event: message_delta")]


def data_only(data: bytes) -> bytes:
    """The same stream without ``event:`` lines (some proxies and recorders drop them)."""
    return b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"event:"))


# ------------------------------------------------------------------------------------------------ parse
def test_parse_plain_request() -> None:
    r = A.parse(body(), {})
    assert (r.api, r.model, r.samples, r.output_cap) == ("anthropic.messages", "claude-pub", 1, 4096)
    assert (r.thinking_budget, r.thinking_disabled, r.effort) == (None, False, None)
    assert (r.stream, r.prompt_tokens) == (False, 0)
    assert A.model_name(body(), {}) == "claude-pub"
    assert A.is_stream(body(stream=True), {}) is True


def test_parse_thinking_enabled() -> None:
    r = A.parse(body(max_tokens=8192, thinking={"type": "enabled", "budget_tokens": 2048}), {})
    assert (r.output_cap, r.thinking_budget, r.thinking_disabled) == (8192, 2048, False)


def test_parse_thinking_adaptive_with_effort() -> None:
    r = A.parse(body(thinking={"type": "adaptive"}, output_config={"effort": "high"}), {})
    assert (r.thinking_budget, r.thinking_disabled, r.effort) == (None, False, "high")


def test_parse_thinking_disabled() -> None:
    r = A.parse(body(thinking={"type": "disabled"}), {})
    assert (r.thinking_budget, r.thinking_disabled) == (None, True)


def test_parse_integral_float_max_tokens() -> None:
    assert A.parse(body(max_tokens=1024.0), {}).output_cap == 1024


BAD: list[tuple[Any, str | None]] = [
    ([], None),
    (3, None),
    ("text", None),
    (body(model=...), "model"),
    (body(model=5), "model"),
    (body(model=""), "model"),
    (body(max_tokens=...), "max_tokens"),
    (body(max_tokens=None), "max_tokens"),
    (body(max_tokens=0), "max_tokens"),
    (body(max_tokens="100"), "max_tokens"),
    (body(max_tokens=True), "max_tokens"),
    (body(max_tokens=10.5), "max_tokens"),
    (body(messages=...), "messages"),
    (body(messages={"role": "user"}), "messages"),
    (body(thinking="on"), "thinking"),
    (body(thinking={}), "thinking.type"),
    (body(thinking={"type": "maximal"}), "thinking.type"),
    (body(thinking={"type": "enabled"}), "thinking.budget_tokens"),
    (body(thinking={"type": "enabled", "budget_tokens": 512}), "thinking.budget_tokens"),
    (body(thinking={"type": "enabled", "budget_tokens": 4096}), "thinking.budget_tokens"),
    (body(thinking={"type": "enabled", "budget_tokens": "2048"}), "thinking.budget_tokens"),
    (body(output_config=["high"]), "output_config"),
    (body(output_config={"effort": "extreme"}), "output_config.effort"),
    (body(output_config={"effort": 3}), "output_config.effort"),
    (body(stream="yes"), "stream"),
]


@pytest.mark.parametrize(("bad", "param"), BAD)
def test_bad_input_is_a_bad_request_naming_the_param(bad: Any, param: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        A.model_name(bad, {})
        A.is_stream(bad, {})
        A.parse(bad, {})
    assert info.value.param == param
    assert info.value.status == 400


# ---------------------------------------------------------------------------------------------- rewrite
def target(cap: int, rb: int | None = None, effort: str | None = None) -> ClampTarget:
    return ClampTarget(samples=1, output_cap=cap, reasoning_budget=rb, effort=effort)


def test_rewrite_lowers_max_tokens() -> None:
    b = body(max_tokens=8192)
    assert A.rewrite(b, A.parse(b, {}), target(3584)) == ["max_tokens=3584"]
    assert b["max_tokens"] == 3584


def test_rewrite_lowers_thinking_budget() -> None:
    b = body(max_tokens=8192, thinking={"type": "enabled", "budget_tokens": 6000})
    assert A.rewrite(b, A.parse(b, {}), target(8192, rb=2000)) == ["thinking.budget_tokens=2000"]
    assert b["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    A.parse(b, {})  # still a valid request


def test_rewrite_below_anthropic_minimum_disables_thinking() -> None:
    b = body(max_tokens=8192, thinking={"type": "enabled", "budget_tokens": 6000})
    # "disabled" is no bound: the cap comes down to the reasoning the target allows.
    assert A.rewrite(b, A.parse(b, {}), target(8192, rb=500)) == ["max_tokens=500", "thinking=disabled"]
    assert b["thinking"] == {"type": "disabled"} and b["max_tokens"] == 500
    assert A.parse(b, {}).thinking_disabled


def test_rewrite_keeps_budget_below_max_tokens() -> None:
    b = body(max_tokens=8192, thinking={"type": "enabled", "budget_tokens": 6000})
    assert A.rewrite(b, A.parse(b, {}), target(3000)) == ["max_tokens=3000", "thinking.budget_tokens=2999"]
    assert A.parse(b, {}).thinking_budget == 2999
    b = body(max_tokens=8192, thinking={"type": "enabled", "budget_tokens": 6000})
    assert A.rewrite(b, A.parse(b, {}), target(1024)) == ["max_tokens=1024", "thinking=disabled"]


def test_rewrite_lowers_effort_and_keeps_the_rest_of_output_config() -> None:
    b = body(thinking={"type": "adaptive"}, output_config={"effort": "max", "format": {"type": "json"}})
    assert A.rewrite(b, A.parse(b, {}), target(4096, effort="high")) == ["output_config.effort=high"]
    assert b["output_config"] == {"effort": "high", "format": {"type": "json"}}


def test_rewrite_to_an_effort_anthropic_lacks_is_refused() -> None:
    b = body(output_config={"effort": "low"})
    with pytest.raises(Forbidden):
        A.rewrite(b, A.parse(b, {}), target(4096, effort="minimal"))


def test_rewrite_that_changes_nothing_says_so() -> None:
    b = body(thinking={"type": "enabled", "budget_tokens": 2048})
    before = copy.deepcopy(b)
    assert A.rewrite(b, A.parse(b, {}), target(4096, rb=2048)) == []
    assert b == before


MODEL = ModelConfig(upstream="u", active_params=1e10, reasoning=True, max_output_tokens=64000)


def test_clamp_target_and_rewrite_bring_the_bound_under_the_tier_cap() -> None:
    b = body(max_tokens=16000, thinking={"type": "enabled", "budget_tokens": 10000})
    req = A.parse(b, {})
    tier = TierConfig(max_k=4, on_exceed="clamp")
    t = clamp_target(req, MODEL, tier)
    assert t is not None
    assert A.rewrite(b, req, t) == ["thinking.budget_tokens=1536"]
    assert admission_bound(A.parse(b, {}), MODEL).k_max <= 4


def test_clamp_below_the_minimum_budget_turns_thinking_off() -> None:
    b = body(max_tokens=16000, thinking={"type": "enabled", "budget_tokens": 10000})
    req = A.parse(b, {})
    t = clamp_target(req, MODEL, TierConfig(max_k=2.5, on_exceed="clamp"))
    assert t is not None
    # Thinking off is a claim, not a bound: the cap itself comes down to what the tier's K allows.
    assert A.rewrite(b, req, t) == ["max_tokens=768", "thinking=disabled"]
    assert admission_bound(A.parse(b, {}), MODEL).k_max == pytest.approx(2.5)


# ------------------------------------------------------------------------------------ prepare, url path
def test_prepare_upstream_maps_the_model_and_needs_no_usage_injection() -> None:
    b = body(stream=True)
    assert A.prepare_upstream(b, "claude-sonnet-4-5-20250929", True) is True
    assert b["model"] == "claude-sonnet-4-5-20250929"
    assert A.upstream_url_path("claude-sonnet-4-5-20250929", {}, "") == "/v1/messages"
    assert A.upstream_url_path("m", {}, "beta=true") == "/v1/messages?beta=true"


# ------------------------------------------------------------------------------------ non-streamed usage
def usage_of(name: str, **kw: Any) -> Usage:
    return A.usage_from_json(orjson.loads(load(name)), request(**kw))


def test_json_usage_with_thinking_tokens() -> None:
    # Recorded: output_tokens 1699 of which thinking_tokens 139 (an adaptive, effort-high request).
    assert usage_of("vercel_opus5_thinking_tokens.json") == Usage(
        samples=1, prompt_tokens=51, reasoning_tokens=139, output_tokens=1560, source="upstream")


def test_json_usage_counts_cached_prompt_tokens() -> None:
    # No thinking_tokens: the visible text (82 chars, 21 tokens) is estimated, thinking is the remainder.
    assert usage_of("own_cache_thinking_response.json") == Usage(
        samples=1, prompt_tokens=386 + 1365, reasoning_tokens=765 - 21, output_tokens=21, source="upstream",
        cached_tokens=1365)


def test_json_usage_takes_redacted_thinking_as_the_remainder() -> None:
    # 45 visible chars -> 12 tokens; the rest of the 184 output tokens is the redacted thinking
    assert usage_of("own_redacted_thinking_response.json") == Usage(
        samples=1, prompt_tokens=92, reasoning_tokens=172, output_tokens=12, source="upstream")


def test_json_without_usage_is_estimated_from_the_text() -> None:
    # thinking 19 chars; text 37 chars + tool input {"q":"kgate"} 13 chars
    assert usage_of("own_no_usage_response.json") == Usage(
        samples=1, prompt_tokens=PROMPT_ESTIMATE, reasoning_tokens=5, output_tokens=13, source="estimated")


@pytest.mark.parametrize("doc", [orjson.loads(load("own_error_response.json")), [], None, 7, {"usage": "x"}])
def test_json_error_or_junk_is_estimated_as_nothing(doc: Any) -> None:
    assert A.usage_from_json(doc, request()) == Usage(
        samples=1, prompt_tokens=PROMPT_ESTIMATE, reasoning_tokens=0, output_tokens=0, source="estimated")


# ---------------------------------------------------------------------------------------------- streams
COUNTED: UsageSource = "counted"
STREAMS: dict[str, tuple[Usage, bool, dict[str, Any] | None]] = {
    # name: (usage, finished, error)
    "sdk_basic.sse": (Usage(1, 11, 0, 6), True, None),
    "sdk_server_tool_use.sse": (Usage(1, 42, 0, 40), True, None),
    "sdk_message_delta_fields.sse": (Usage(1, 40 + 12 + 7, 3, 5, cached_tokens=7), True, None),
    "sdk_missing_usage.sse": (Usage(1, 11 + 3 + 5, 0, 1, cached_tokens=5), True, None),
    # text 169 chars -> 43 visible tokens; thinking is the rest of the 104 output tokens
    "dive_thinking.sse": (Usage(1, 778, 61, 43), True, None),
    # redacted thinking: the visible text (14 tokens) is estimated, reasoning is the rest of 184
    "docs_redacted_thinking.sse": (Usage(1, 92, 170, 14), True, None),
    "vercel_message_delta_input_tokens.sse": (Usage(1, 61, 0, 2), True, None),
    "own_server_tools_multi_delta.sse": (Usage(1, 15665 + 1024, 0, 95, cached_tokens=1024), True, None),
    # 31 streamed chars before the error; the prompt side of message_start is kept
    "own_error_midstream.sse": (Usage(1, 12, 0, 8, COUNTED), False,
                                {"type": "overloaded_error", "message": "Overloaded"}),
}


def transcript(name: str) -> bytes:
    if name == "truncated":
        return truncated_thinking()
    if name.startswith("data-only:"):
        return data_only(load(name.partition(":")[2]))
    return load(name)


EXPECTED = {
    **STREAMS,
    "truncated": (Usage(1, 778, 56, 43, COUNTED), False, None),  # 223 thinking, 169 text chars
    "data-only:dive_thinking.sse": STREAMS["dive_thinking.sse"],
    "data-only:own_error_midstream.sse": STREAMS["own_error_midstream.sse"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stream_usage(name: str) -> None:
    data = transcript(name)
    out, meter = run([data])
    usage, finished, error = EXPECTED[name]
    assert meter.usage() == usage
    assert meter.finished is finished
    assert meter.error == error
    assert out == data  # every event forwarded, unchanged


def test_message_delta_usage_is_cumulative_last_wins() -> None:
    data = load("own_server_tools_multi_delta.sse")
    first_delta_end = data.index(b"event: content_block_start", data.index(b"event: message_delta"))
    meter = A.stream_meter(request(stream=True), True)
    meter.feed(data[:first_delta_end])
    assert meter.usage().output_tokens == 38
    meter.feed(data[first_delta_end:])
    meter.close()
    assert meter.usage().output_tokens == 95  # not 38 + 95


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(EXPECTED)), cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_split_points_change_nothing(name: str, cuts: list[int]) -> None:
    data = transcript(name)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    out, meter = run(pieces)
    usage, finished, error = EXPECTED[name]
    assert out == data
    assert (meter.usage(), meter.finished, meter.error) == (usage, finished, error)
