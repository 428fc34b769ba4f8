"""Legacy Completions adapter: prompt shapes, best_of, rewriting per prompt, usage and streams."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters.openai_completions import Completions, count_prompts
from gateway.engine.compute import ClampTarget, ComputeRequest, Usage
from gateway.engine.errors import BadRequest

PAYLOADS = Path(__file__).parents[1] / "payloads" / "openai"
A = Completions()


def parsed(body: dict[str, Any], prompt_tokens: int = 40) -> ComputeRequest:
    return replace(A.parse(body, {}), prompt_tokens=prompt_tokens)


def meter_run(data: bytes, wants: bool, r: ComputeRequest,
              cuts: list[int] | None = None) -> tuple[bytes, Usage]:
    m = A.stream_meter(r, wants)
    bounds = [0, *sorted(set(cuts or [])), len(data)]
    out = b"".join(m.feed(data[a:b]) for a, b in itertools.pairwise(bounds)) + m.close()
    return out, m.usage()


@pytest.mark.parametrize(("prompt", "n"), [
    ("once upon", 1), ("", 1), (["a", "b", "c"], 3), ([1, 2, 3], 1), ([[1, 2], [3]], 2), ([0], 1),
])
def test_prompt_shapes(prompt: Any, n: int) -> None:
    assert count_prompts(prompt) == n


def test_parse_samples_are_prompts_times_max_n_best_of() -> None:
    r = A.parse({"model": "m", "prompt": ["a", "b"], "n": 2, "best_of": 3, "max_tokens": 50}, {})
    assert (r.api, r.samples, r.prompts, r.output_cap, r.stream) == ("openai.completions", 6, 2, 50, False)
    r = A.parse({"model": "m", "prompt": [[1, 2], [3], [4]], "n": 2}, {})
    assert (r.samples, r.prompts) == (6, 3)


def test_parse_default_max_tokens_is_16() -> None:
    assert A.parse({"model": "m", "prompt": "x"}, {}).output_cap == 16


def test_parse_stream_with_n() -> None:
    r = A.parse({"model": "m", "prompt": "x", "n": 3, "stream": True}, {})
    assert (r.samples, r.stream) == (3, True)


BAD = [
    ({"prompt": "x"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": 5}, "prompt"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": {"text": "x"}}, "prompt"),
    ({"model": "m", "prompt": [1, "a"]}, "prompt"),
    ({"model": "m", "prompt": [[1], []]}, "prompt"),
    ({"model": "m", "prompt": [[-1]]}, "prompt"),
    ({"model": "m", "prompt": [True]}, "prompt"),
    ({"model": "m", "prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"model": "m", "prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    ({"model": "m", "prompt": "x", "best_of": "2"}, "best_of"),
    ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ({"model": "m", "prompt": "x", "n": 200}, "n"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"model": "m", "prompt": "x", "stream": 1}, "stream"),
    ({"model": "m", "prompt": "x", "stream_options": "usage"}, "stream_options"),
]


@pytest.mark.parametrize(("body", "param"), BAD)
def test_parse_bad_input_names_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as exc:
        A.parse(body, {})
    assert exc.value.param == param


@pytest.mark.parametrize("body", [[], 1.5, "prompt", None])
def test_non_object_bodies(body: Any) -> None:
    with pytest.raises(BadRequest):
        A.parse(body, {})


def test_rewrite_per_prompt() -> None:
    body = {"model": "m", "prompt": ["a", "b"], "n": 3, "best_of": 5, "max_tokens": 900}
    r = A.parse(body, {})
    changes = A.rewrite(body, r, ClampTarget(samples=4, output_cap=256, reasoning_budget=None, effort=None))
    assert changes == ["best_of=2", "n=2", "max_tokens=256"]
    assert (body["best_of"], body["n"], body["max_tokens"]) == (2, 2, 256)
    assert A.parse(body, {}).samples <= 4


def test_rewrite_without_best_of_and_default_cap() -> None:
    body = {"model": "m", "prompt": "a", "n": 6}
    assert A.rewrite(body, A.parse(body, {}), ClampTarget(3, 16, None, None)) == ["n=3", "max_tokens=16"]
    assert A.rewrite(body, A.parse(body, {}), ClampTarget(3, 16, None, None)) == []


def test_rewrite_cannot_drop_prompts() -> None:
    body = {"model": "m", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 16}
    assert A.rewrite(body, A.parse(body, {}), ClampTarget(2, 16, None, None)) == ["n=1"]
    assert A.parse(body, {}).samples == 3  # still above the target: the handler's re-check refuses it


def test_prepare_upstream() -> None:
    body: dict[str, Any] = {"model": "p", "prompt": "x", "stream": True}
    assert A.prepare_upstream(body, "u", True) is False
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "u"
    body = {"model": "p", "prompt": "x"}
    assert A.prepare_upstream(body, "u", False) is False and "stream_options" not in body


def test_usage_best_of_counts_generated_candidates() -> None:
    body = json.loads((PAYLOADS / "openai_completions_best_of.json").read_text())
    r = parsed({"model": "m", "prompt": ["a", "b"], "best_of": 3})
    u = A.usage_from_json(body, r)
    assert u == Usage(samples=6, prompt_tokens=14, reasoning_tokens=0, output_tokens=18)


def test_usage_estimated_without_usage() -> None:
    body = json.loads((PAYLOADS / "openai_completions_best_of.json").read_text())
    del body["usage"]
    u = A.usage_from_json(body, parsed({"model": "m", "prompt": ["a", "b"]}))
    assert (u.source, u.samples, u.prompt_tokens, u.output_tokens) == ("estimated", 2, 40, 4)
    assert A.usage_from_json([1], parsed({"model": "m", "prompt": "x"})).source == "estimated"


def test_stream_four_choices() -> None:
    data = (PAYLOADS / "openai_completions_stream.sse").read_bytes()
    r = parsed({"model": "m", "prompt": ["a", "b"], "n": 2, "stream": True})
    out, u = meter_run(data, True, r)
    assert out == data
    assert u == Usage(samples=4, prompt_tokens=14, reasoning_tokens=0, output_tokens=9)
    out, u = meter_run(data, False, r)
    assert b'"choices":[]' not in out and out.endswith(b"data: [DONE]\n\n")
    cut = data[: data.index(b"Berlin")]
    _, u = meter_run(cut, False, r)
    assert (u.source, u.samples, u.output_tokens, u.prompt_tokens) == ("counted", 4, 5, 40)


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=30), wants=st.booleans())
def test_stream_split_anywhere(cuts: list[int], wants: bool) -> None:
    data = (PAYLOADS / "openai_completions_stream.sse").read_bytes()
    r = parsed({"model": "m", "prompt": ["a", "b"], "n": 2, "stream": True})
    cuts = [c for c in cuts if c < len(data)]
    assert meter_run(data, wants, r, cuts) == meter_run(data, wants, r)
