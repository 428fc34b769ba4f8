"""Responses adapter: parsing, rewriting, usage from bodies and typed event streams."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters.openai_responses import Responses
from gateway.engine.compute import ClampTarget, ComputeRequest, Usage
from gateway.engine.errors import BadRequest

PAYLOADS = Path(__file__).parents[1] / "payloads" / "openai"
A = Responses()


def req(prompt_tokens: int = 30) -> ComputeRequest:
    return replace(A.parse({"model": "m", "input": "hi"}, {}), prompt_tokens=prompt_tokens)


def load_json(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text())


def meter_run(data: bytes, cuts: list[int] | None = None, wants: bool = True) -> tuple[bytes, Usage, Any]:
    m = A.stream_meter(req(), wants)
    bounds = [0, *sorted(set(cuts or [])), len(data)]
    out = b"".join(m.feed(data[a:b]) for a, b in itertools.pairwise(bounds)) + m.close()
    return out, m.usage(), m


def test_parse() -> None:
    r = A.parse({"model": "o4", "input": [{"role": "user", "content": "x"}], "max_output_tokens": 2048,
                 "reasoning": {"effort": "minimal", "summary": "auto"}, "stream": True}, {})
    assert (r.api, r.model, r.samples, r.output_cap, r.effort, r.stream) == (
        "openai.responses", "o4", 1, 2048, "minimal", True)
    r = A.parse({"model": "o4", "input": "x", "n": 5}, {})
    assert (r.samples, r.output_cap, r.effort, r.stream) == (1, None, None, False)


BAD = [
    ({"input": "x"}, "model"),
    ({"model": "m"}, "input"),
    ({"model": "m", "input": 3}, "input"),
    ({"model": "m", "input": {"role": "user"}}, "input"),
    ({"model": "m", "input": "x", "max_output_tokens": 15}, "max_output_tokens"),
    ({"model": "m", "input": "x", "max_output_tokens": "100"}, "max_output_tokens"),
    ({"model": "m", "input": "x", "reasoning": "high"}, "reasoning"),
    ({"model": "m", "input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize(("body", "param"), BAD)
def test_parse_bad_input_names_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as exc:
        A.parse(body, {})
    assert exc.value.param == param


@pytest.mark.parametrize("body", [[{"model": "m"}], 0, "input", None])
def test_non_object_bodies(body: Any) -> None:
    with pytest.raises(BadRequest):
        A.parse(body, {})


def test_rewrite() -> None:
    body: dict[str, Any] = {"model": "m", "input": "x", "max_output_tokens": 9000,
                            "reasoning": {"effort": "high"}}
    r = A.parse(body, {})
    assert A.rewrite(body, r, ClampTarget(1, 4096, None, "medium")) == [
        "max_output_tokens=4096", "reasoning.effort=medium"]
    assert body["reasoning"] == {"effort": "medium"}
    body = {"model": "m", "input": "x", "reasoning": None}
    assert A.rewrite(body, A.parse(body, {}), ClampTarget(1, 512, None, "low")) == [
        "max_output_tokens=512", "reasoning.effort=low"]
    assert body["reasoning"] == {"effort": "low"}
    assert A.rewrite(body, A.parse(body, {}), ClampTarget(1, 8, None, None)) == ["max_output_tokens=16"]
    assert A.parse(body, {}).output_cap == 16  # the API minimum; never a body the upstream would refuse


def test_prepare_upstream_always_has_usage() -> None:
    body: dict[str, Any] = {"model": "p", "input": "x", "stream": True}
    assert A.prepare_upstream(body, "u", True) is True
    assert body == {"model": "u", "input": "x", "stream": True}


def test_usage_reasoning_and_incomplete() -> None:
    u = A.usage_from_json(load_json("responses_reasoning.json"), req())
    assert u == Usage(samples=1, prompt_tokens=37, reasoning_tokens=1024, output_tokens=162, cached_tokens=0)
    u = A.usage_from_json(load_json("responses_incomplete.json"), req())
    assert (u.prompt_tokens, u.reasoning_tokens, u.output_tokens, u.source) == (20, 400, 0, "upstream")


def test_usage_estimated_and_zero_reasoning_report() -> None:
    body = load_json("responses_reasoning.json")
    summary = body["output"][0]["summary"][0]["text"]
    body["usage"]["output_tokens_details"]["reasoning_tokens"] = 0  # Ollama reports 0 whatever happened
    u = A.usage_from_json(body, req())
    # the reasoning returned is a summary: the visible text is estimated, reasoning is the remainder
    visible = sum(-(-len(p["text"]) // 4) for item in body["output"] if item["type"] == "message"
                  for p in item["content"])
    assert (u.reasoning_tokens, u.output_tokens) == (1186 - visible, visible) and u.generated_tokens == 1186
    del body["usage"]
    u = A.usage_from_json(body, req())
    assert u == Usage(samples=1, prompt_tokens=30, reasoning_tokens=-(-len(summary) // 4),
                      output_tokens=3, source="estimated")
    odd_bodies: list[Any] = [[], None, {"output": "x", "usage": []},
                             {"output": [1, {"type": "message", "content": [2]}]}]
    for odd in odd_bodies:
        assert A.usage_from_json(odd, req()).source == "estimated"


def test_stream_completed_recorded() -> None:
    data = (PAYLOADS / "responses_stream_completed.sse").read_bytes()
    out, u, m = meter_run(data, wants=False)
    assert out == data  # nothing is ever stripped from a Responses stream
    assert u == Usage(samples=1, prompt_tokens=12, reasoning_tokens=0, output_tokens=2, cached_tokens=0)
    assert m.finished and m.error is None


def test_stream_failed_recorded() -> None:
    data = (PAYLOADS / "responses_stream_failed.sse").read_bytes()
    out, u, m = meter_run(data)
    assert out == data and m.finished
    assert m.error is not None and m.error["code"] == "rate_limit_exceeded"
    assert u == Usage(samples=1, prompt_tokens=30, reasoning_tokens=0, output_tokens=0, source="counted")


def test_stream_truncated_recorded_is_counted() -> None:
    data = (PAYLOADS / "responses_stream_truncated.sse").read_bytes()
    out, u, m = meter_run(data)
    assert out == data  # the partial last event is handed on at close, bytes unchanged
    assert not m.finished and m.error is None
    # Four summary deltas, and the fifth that was cut off mid-event: it was generated, so it counts.
    assert u == Usage(samples=1, prompt_tokens=30, reasoning_tokens=5, output_tokens=0, source="counted")


def test_stream_incomplete() -> None:
    data = (PAYLOADS / "responses_stream_incomplete.sse").read_bytes()
    out, u, m = meter_run(data)
    assert out == data and m.finished
    assert u == Usage(samples=1, prompt_tokens=52, reasoning_tokens=240, output_tokens=16, cached_tokens=0)
    # Cut before the final event: counted deltas (the empty delta is not a token).
    _, u, _ = meter_run(data[: data.index(b"event: response.incomplete")])
    assert (u.source, u.reasoning_tokens, u.output_tokens) == ("counted", 3, 3)


def test_stream_without_event_lines_counts_the_same() -> None:
    data = (PAYLOADS / "responses_stream_incomplete.sse").read_bytes()
    bare = b"".join(line + b"\n" for line in data.split(b"\n") if not line.startswith(b"event:"))
    cut = data.index(b"event: response.incomplete")
    assert meter_run(data[:cut])[1] == meter_run(bare[: bare.index(b'{"type":"response.incomplete"') - 6])[1]
    assert meter_run(bare)[1] == meter_run(data)[1]


def test_stream_error_event() -> None:
    data = (PAYLOADS / "responses_stream_error.sse").read_bytes()
    out, u, m = meter_run(data)
    assert out == data and not m.finished
    message = "The server had an error while processing your request."
    assert m.error == {"code": "server_error", "message": message, "param": None}
    assert (u.source, u.output_tokens) == ("counted", 2)
    nested = b'event: error\ndata: {"type":"error","error":{"type":"invalid_request_error","code":"x"}}\n\n'
    assert meter_run(nested)[2].error == {"type": "invalid_request_error", "code": "x"}


STREAMS = ["responses_stream_completed.sse", "responses_stream_failed.sse", "responses_stream_truncated.sse",
           "responses_stream_incomplete.sse", "responses_stream_error.sse"]


@pytest.mark.parametrize("name", STREAMS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_stream_split_anywhere(name: str, data: st.DataObject) -> None:
    raw = (PAYLOADS / name).read_bytes()
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(raw) - 1), max_size=25))
    out, usage, m = meter_run(raw, cuts)
    whole_out, whole_usage, whole = meter_run(raw)
    assert (out, usage, m.finished, m.error) == (whole_out, whole_usage, whole.finished, whole.error)
