"""The Gemini adapter against recorded payloads (tests/payloads/gemini, see its README)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters import gemini
from gateway.adapters.gemini import GeminiGenerateContent, GeminiStreamMeter
from gateway.engine.compute import ClampTarget, ComputeRequest, Usage, UsageSource, clamp_target
from gateway.engine.errors import BadRequest, Forbidden
from gateway.policy.config import ModelConfig, TierConfig

PAYLOADS = Path(__file__).parents[1] / "payloads" / "gemini"
G = GeminiGenerateContent()
PROMPT_ESTIMATE = 33
GENERATE = {"model": "gemini-pub", "method": "generateContent", "alt": ""}
STREAM_SSE = {"model": "gemini-pub", "method": "streamGenerateContent", "alt": "sse"}


def load(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def request(**kw: Any) -> ComputeRequest:
    base: dict[str, Any] = {"api": G.api, "model": "gemini-pub", "prompt_tokens": PROMPT_ESTIMATE}
    return ComputeRequest(**{**base, **kw})


def body(gen: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], **kw}
    if gen is not None:
        b["generationConfig"] = gen
    return b


def run(pieces: list[bytes], samples: int = 1) -> tuple[bytes, GeminiStreamMeter]:
    meter = G.stream_meter(request(stream=True, samples=samples), True)
    assert isinstance(meter, GeminiStreamMeter)
    out = b"".join(meter.feed(p) for p in pieces) + meter.close()
    return out, meter


# ------------------------------------------------------------------------------------------------ parse
def test_parse_defaults_from_the_path() -> None:
    r = G.parse(body(), GENERATE)
    assert (r.api, r.model, r.samples, r.output_cap, r.stream) == ("gemini", "gemini-pub", 1, None, False)
    assert (r.thinking_budget, r.thinking_disabled, r.effort, r.prompt_tokens) == (None, False, None, 0)
    assert G.model_name(body(), GENERATE) == "gemini-pub"
    assert G.is_stream(body(), STREAM_SSE) is True
    assert G.parse(body(), STREAM_SSE).stream is True


def test_parse_candidates_and_cap() -> None:
    r = G.parse(body({"candidateCount": 3, "maxOutputTokens": 2048}), GENERATE)
    assert (r.samples, r.output_cap) == (3, 2048)


@pytest.mark.parametrize(("tc", "expected"), [
    ({"thinkingBudget": 0}, (None, True, None)),
    ({"thinkingBudget": -1}, (None, False, None)),
    ({"thinkingBudget": 4096, "includeThoughts": True}, (4096, False, None)),
    ({"thinkingLevel": "low"}, (None, False, "low")),
    ({"thinkingLevel": "HIGH"}, (None, False, "high")),
    ({"includeThoughts": True}, (None, False, None)),
])
def test_parse_thinking_config(tc: dict[str, Any], expected: tuple[Any, ...]) -> None:
    r = G.parse(body({"thinkingConfig": tc}), GENERATE)
    assert (r.thinking_budget, r.thinking_disabled, r.effort) == expected


def test_parse_snake_case() -> None:
    b = {"contents": [], "generation_config": {"candidate_count": 2, "max_output_tokens": 900,
                                               "thinking_config": {"thinking_budget": 1500}}}
    r = G.parse(b, GENERATE)
    assert (r.samples, r.output_cap, r.thinking_budget) == (2, 900, 1500)
    mixed = {"contents": [], "generationConfig": {"thinking_config": {"thinking_level": "Medium"}}}
    r = G.parse(mixed, GENERATE)
    assert r.effort == "medium"


TC = "generationConfig.thinkingConfig."
BAD: list[tuple[Any, str | None]] = [
    ([], None),
    (3, None),
    ({}, "contents"),
    (body(contents="hi"), "contents"),
    ({"contents": [], "generationConfig": [1]}, "generationConfig"),
    ({"contents": [], "generationConfig": {}, "generation_config": {}}, "generationConfig"),
    (body({"candidateCount": 0}), "generationConfig.candidateCount"),
    (body({"candidateCount": "2"}), "generationConfig.candidateCount"),
    (body({"candidateCount": 1.5}), "generationConfig.candidateCount"),
    ({"contents": [], "generation_config": {"candidate_count": 0}}, "generation_config.candidate_count"),
    (body({"maxOutputTokens": 0}), "generationConfig.maxOutputTokens"),
    (body({"maxOutputTokens": False}), "generationConfig.maxOutputTokens"),
    (body({"thinkingConfig": "on"}), "generationConfig.thinkingConfig"),
    (body({"thinkingConfig": {"thinkingBudget": -2}}), TC + "thinkingBudget"),
    (body({"thinkingConfig": {"thinkingBudget": "1024"}}), TC + "thinkingBudget"),
    (body({"thinkingConfig": {"thinkingLevel": "EXTREME"}}), TC + "thinkingLevel"),
    (body({"thinkingConfig": {"thinkingLevel": 3}}), TC + "thinkingLevel"),
    (body({"thinkingConfig": {"thinkingBudget": 1024, "thinkingLevel": "LOW"}}), TC + "thinkingLevel"),
]


@pytest.mark.parametrize(("bad", "param"), BAD)
def test_bad_input_is_a_bad_request_naming_the_param(bad: Any, param: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        G.parse(bad, GENERATE)
    assert info.value.param == param
    assert info.value.status == 400


def test_model_missing_from_the_path() -> None:
    with pytest.raises(BadRequest) as info:
        G.model_name(body(), {"method": "generateContent"})
    assert info.value.param == "model"


# ---------------------------------------------------------------------------------------------- rewrite
def target(samples: int = 1, cap: int = 4096, rb: int | None = None,
           effort: str | None = None) -> ClampTarget:
    return ClampTarget(samples=samples, output_cap=cap, reasoning_budget=rb, effort=effort)


def test_rewrite_lowers_candidates_and_cap() -> None:
    b = body({"candidateCount": 4, "maxOutputTokens": 8192, "temperature": 0.5})
    assert G.rewrite(b, G.parse(b, GENERATE), target(2, 3000)) == ["candidateCount=2", "maxOutputTokens=3000"]
    assert b["generationConfig"] == {"candidateCount": 2, "maxOutputTokens": 3000, "temperature": 0.5}


def test_rewrite_writes_the_cap_the_bound_assumed() -> None:
    b = body()
    assert G.rewrite(b, G.parse(b, GENERATE), target(1, 4096)) == ["maxOutputTokens=4096"]
    assert G.parse(b, GENERATE).output_cap == 4096


def test_rewrite_lowers_thinking_budget() -> None:
    b = body({"maxOutputTokens": 4096, "thinkingConfig": {"thinkingBudget": 8192, "includeThoughts": True}})
    assert G.rewrite(b, G.parse(b, GENERATE), target(1, 4096, rb=1024)) == ["thinkingBudget=1024"]
    assert b["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 1024, "includeThoughts": True}


def test_rewrite_lowers_thinking_level() -> None:
    b = body({"maxOutputTokens": 4096, "thinkingConfig": {"thinkingLevel": "high"}})
    assert G.rewrite(b, G.parse(b, GENERATE), target(1, 4096, effort="low")) == ["thinkingLevel=LOW"]
    assert G.parse(b, GENERATE).effort == "low"


def test_rewrite_keeps_the_clients_snake_case() -> None:
    b = {"contents": [],
         "generation_config": {"candidate_count": 3, "thinking_config": {"thinking_budget": 9000}}}
    changes = G.rewrite(b, G.parse(b, GENERATE), target(1, 2048, rb=512))
    assert changes == ["candidateCount=1", "maxOutputTokens=2048", "thinkingBudget=512"]
    assert b == {"contents": [], "generation_config": {"candidate_count": 1, "max_output_tokens": 2048,
                                                       "thinking_config": {"thinking_budget": 512}}}


def test_rewrite_to_a_level_gemini_lacks_is_refused() -> None:
    b = body({"thinkingConfig": {"thinkingLevel": "LOW"}})
    with pytest.raises(Forbidden):
        G.rewrite(b, G.parse(b, GENERATE), target(effort="none"))


def test_rewrite_that_changes_nothing_says_so() -> None:
    b = body({"candidateCount": 2, "maxOutputTokens": 1000})
    before = copy.deepcopy(b)
    assert G.rewrite(b, G.parse(b, GENERATE), target(2, 1000)) == []
    assert b == before


def test_clamp_target_and_rewrite_fit_the_tier() -> None:
    model = ModelConfig(upstream="u", active_params=1e10, reasoning=True, max_output_tokens=8192)
    b = body({"candidateCount": 8, "maxOutputTokens": 8192})
    req = G.parse(b, GENERATE)
    t = clamp_target(req, model, TierConfig(max_samples=2, on_exceed="clamp"))
    assert t is not None
    assert G.rewrite(b, req, t) == ["candidateCount=2"]


# ------------------------------------------------------------------------------------ prepare, url path
def test_prepare_upstream_leaves_the_body() -> None:
    b = body({"candidateCount": 2})
    before = copy.deepcopy(b)
    assert G.prepare_upstream(b, "gemini-2.5-flash", True) is True
    assert b == before


@pytest.mark.parametrize(("upstream", "params", "query", "path"), [
    ("gemini-2.5-flash", STREAM_SSE, "alt=sse&key=SECRET",
     "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"),
    ("gemini-2.5-flash", GENERATE, "key=SECRET", "/v1beta/models/gemini-2.5-flash:generateContent"),
    ("models/gemini-2.5-pro", GENERATE, "", "/v1beta/models/gemini-2.5-pro:generateContent"),
    ("gemini-2.5-pro", {"model": "x"}, "$alt=json&keys=1",
     "/v1beta/models/gemini-2.5-pro:generateContent?$alt=json&keys=1"),
])
def test_upstream_url_path(upstream: str, params: dict[str, str], query: str, path: str) -> None:
    assert G.upstream_url_path(upstream, params, query) == path


def test_upstream_url_path_refuses_an_unknown_method() -> None:
    with pytest.raises(BadRequest):
        G.upstream_url_path("m", {"model": "m", "method": "countTokens"}, "")


# ------------------------------------------------------------------------------------ non-streamed usage
def usage_of(name: str, **kw: Any) -> Usage:
    return G.usage_from_json(orjson.loads(load(name)), request(**kw))


def test_json_usage_thoughts_are_outside_candidates() -> None:
    assert usage_of("vercel_reasoning_response.json") == Usage(1, 9, 282, 29)


def test_json_usage_tool_use_prompt_counts_as_prompt() -> None:
    assert usage_of("vercel_tool_use_usage_response.json") == Usage(1, 55 + 89, 56, 51)


def test_json_usage_several_candidates() -> None:
    assert usage_of("own_candidates2_response.json", samples=2) == Usage(2, 20, 310, 58)


def test_json_error_body_is_estimated_as_nothing() -> None:
    assert usage_of("vercel_error_response.json", samples=3) == Usage(3, PROMPT_ESTIMATE, 0, 0, "estimated")


def test_json_without_usage_is_estimated_from_parts() -> None:
    doc = orjson.loads(load("own_candidates2_response.json"))
    del doc["usageMetadata"]
    thoughts = len("**Comparing options** I weigh A against B.") + len("**Second view** B looks cheaper.")
    text = len("Answer A: take the first option, it is simpler to run.") + len(
        "Answer B: take the second option, it costs less.")
    assert G.usage_from_json(doc, request(samples=2)) == Usage(
        2, PROMPT_ESTIMATE, math.ceil(thoughts / 4), math.ceil(text / 4), "estimated")


def test_json_array_body_takes_the_last_usage() -> None:
    doc = orjson.loads(load("vercel_reasoning_json_array.json"))
    assert G.usage_from_json(doc, request()) == Usage(1, 9, 256, 29)


# ---------------------------------------------------------------------------------------------- streams
def synthetic_array() -> bytes:
    """A JSON-array stream whose strings hold brackets, quotes and escapes (the splitter must not care)."""
    tricky = 'quote " backslash \\ brackets ]} [{ unicode é \u2028 end\\'
    chunks = [
        {"candidates": [{"content": {"parts": [{"text": tricky}], "role": "model"}, "index": 0}],
         "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 11}},
        {"candidates": [{"content": {"parts": [{"text": "]\"}"}], "role": "model"}, "finishReason": "STOP"}],
         "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 13, "thoughtsTokenCount": 2}},
    ]
    elements = ",\r\n".join(json.dumps(c, indent=1, ensure_ascii=False) for c in chunks)
    return ("\r\n[" + elements + "]\n").encode()


COUNTED: UsageSource = "counted"
UNAVAILABLE = {"code": 503, "message": "The model is overloaded. Please try again later.",
               "status": "UNAVAILABLE"}
THOUGHT = len("**Planning** Count the letters one by one.")
EXPECTED: dict[str, tuple[int, Usage, bool, dict[str, Any] | None]] = {
    # name: (requested samples, usage, finished, error)
    "vercel_reasoning_alt_sse.sse": (1, Usage(1, 9, 256, 29), True, None),  # CRLF framed
    "vercel_reasoning_json_array.json": (1, Usage(1, 9, 256, 29), True, None),
    "vercel_usage_raw_live.sse": (1, Usage(1, 12 + 65, 89, 71, cached_tokens=4), False, None),
    "louter_function_call.sse": (1, Usage(1, 83, 104, 14), True, None),
    "louter_long_first5_truncated.sse": (1, Usage(1, 4, 2042, 245), False, None),
    "own_candidates2_alt_sse.sse": (2, Usage(2, 20, 310, 58), True, None),
    "own_thoughts_no_usage_truncated.sse": (
        1, Usage(1, PROMPT_ESTIMATE, math.ceil(THOUGHT / 4), math.ceil(len("There are three r's") / 4),
                 COUNTED), False, None),
    "own_error_midstream_alt_sse.sse": (1, Usage(1, 7, 40, 6), False, UNAVAILABLE),
    "own_error_json_array.json": (1, Usage(1, 7, 40, 6), False, UNAVAILABLE),
    "synthetic-array": (1, Usage(1, 5, 2, 13), True, None),
}


def transcript(name: str) -> bytes:
    return synthetic_array() if name == "synthetic-array" else load(name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stream_usage(name: str) -> None:
    data = transcript(name)
    samples, usage, finished, error = EXPECTED[name]
    out, meter = run([data], samples)
    assert meter.usage() == usage
    assert meter.finished is finished
    assert meter.error == error
    assert out == data  # every byte forwarded, unchanged (CRLF included)


def test_several_candidates_finish_only_when_all_have() -> None:
    data = load("own_candidates2_alt_sse.sse")
    last = data.rindex(b"data: ")
    meter = G.stream_meter(request(stream=True, samples=2), True)
    meter.feed(data[:last])
    assert not meter.finished  # candidate 1 has finished, candidate 0 has not
    assert meter.usage().output_tokens == 50
    meter.feed(data[last:])
    assert meter.finished


def test_sse_stream_that_ends_cleanly_after_a_finish_reason_is_finished() -> None:
    data = load("own_candidates2_alt_sse.sse")
    _, meter = run([data[: data.rindex(b"data: ")]], samples=2)
    assert meter.finished


def test_an_oversized_array_element_is_passed_on_unmetered(monkeypatch: pytest.MonkeyPatch) -> None:
    data = load("vercel_reasoning_json_array.json")
    monkeypatch.setattr(gemini, "MAX_ELEMENT_BYTES", 1200)  # the last element carries a long signature
    out, meter = run([data])
    assert out == data
    assert meter.usage() == Usage(1, 9, 256, 29)  # from the elements before it
    assert meter.finished  # the array still closed


def test_white_space_only_is_returned_at_close() -> None:
    meter = G.stream_meter(request(stream=True), True)
    assert meter.feed(b"\r\n ") == b""
    assert meter.close() == b"\r\n "
    assert meter.usage() == Usage(1, PROMPT_ESTIMATE, 0, 0, COUNTED)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(sorted(EXPECTED)), cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_split_points_change_nothing(name: str, cuts: list[int]) -> None:
    data = transcript(name)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    samples, usage, finished, error = EXPECTED[name]
    out, meter = run(pieces, samples)
    assert out == data
    assert (meter.usage(), meter.finished, meter.error) == (usage, finished, error)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0), min_size=1, max_size=60))
def test_crlf_split_between_cr_and_lf_keeps_the_events(cuts: list[int]) -> None:
    data = load("vercel_reasoning_alt_sse.sse")
    crs = [i + 1 for i in range(len(data)) if data[i:i + 1] == b"\r"]  # cut right after each CR
    points = sorted({crs[c % len(crs)] for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    out, meter = run(pieces)
    assert out == data
    assert meter.usage() == Usage(1, 9, 256, 29) and meter.finished
