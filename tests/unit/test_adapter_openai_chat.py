"""Chat Completions adapter: parsing, rewriting, usage from bodies and streams (recorded payloads)."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.adapters.openai_chat import ChatCompletions
from gateway.engine.compute import ClampTarget, ComputeRequest, Usage
from gateway.engine.errors import BadRequest

PAYLOADS = Path(__file__).parents[1] / "payloads" / "openai"
A = ChatCompletions()
MSGS = [{"role": "user", "content": "hi"}]


def load_json(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text())


def load_sse(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def req(body: dict[str, Any] | None = None, prompt_tokens: int = 50) -> ComputeRequest:
    return replace(A.parse(body or {"model": "m", "messages": MSGS}, {}), prompt_tokens=prompt_tokens)


def meter_run(data: bytes, wants: bool, cuts: list[int] | None = None,
              r: ComputeRequest | None = None) -> tuple[bytes, Usage, Any]:
    m = A.stream_meter(r or req(), wants)
    bounds = [0, *sorted(set(cuts or [])), len(data)]
    out = b"".join(m.feed(data[a:b]) for a, b in itertools.pairwise(bounds)) + m.close()
    return out, m.usage(), m


def usage_event(data: bytes) -> bytes:
    """The raw bytes of the final ``choices: []`` usage event in a transcript."""
    events = data.split(b"\n\n")
    hits = [e for e in events if b'"choices":[]' in e and b'"usage":{' in e]
    assert len(hits) == 1
    return hits[0] + b"\n\n"


# ------------------------------------------------------------------------------------------- parse
def test_parse_basic_fields() -> None:
    r = A.parse({"model": "gpt", "messages": MSGS, "n": 4, "max_completion_tokens": 300, "max_tokens": 900,
                 "reasoning_effort": "high", "stream": True, "stream_options": {"include_usage": True}}, {})
    assert (r.api, r.model, r.samples, r.output_cap, r.effort, r.stream) == (
        "openai.chat", "gpt", 4, 300, "high", True)
    assert r.prompt_tokens == 0 and not r.thinking_disabled


def test_parse_defaults_and_max_tokens() -> None:
    r = A.parse({"model": "gpt", "messages": MSGS, "max_tokens": 64}, {})
    assert (r.samples, r.output_cap, r.effort, r.stream) == (1, 64, None, False)
    assert A.parse({"model": "gpt", "messages": MSGS}, {}).output_cap is None


def test_parse_vllm_beam_search_and_old_best_of() -> None:
    assert A.parse({"model": "m", "messages": MSGS, "n": 3, "use_beam_search": True}, {}).samples == 3
    assert A.parse({"model": "m", "messages": MSGS, "n": 2, "best_of": 5}, {}).samples == 5


@pytest.mark.parametrize("extra", [
    {"thinking": {"type": "disabled"}},
    {"chat_template_kwargs": {"enable_thinking": False}},
    {"chat_template_kwargs": {"thinking": False}},
])
def test_parse_thinking_disabled(extra: dict[str, Any]) -> None:
    assert A.parse({"model": "m", "messages": MSGS, **extra}, {}).thinking_disabled


@pytest.mark.parametrize("extra", [
    {"thinking": {"type": "enabled"}},
    {"chat_template_kwargs": {"enable_thinking": True}},
    {"chat_template_kwargs": {}},
])
def test_parse_thinking_enabled(extra: dict[str, Any]) -> None:
    assert not A.parse({"model": "m", "messages": MSGS, **extra}, {}).thinking_disabled


BAD = [
    ({"messages": MSGS}, "model"),
    ({"model": 7, "messages": MSGS}, "model"),
    ({"model": "", "messages": MSGS}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": MSGS, "n": "2"}, "n"),
    ({"model": "m", "messages": MSGS, "n": 0}, "n"),
    ({"model": "m", "messages": MSGS, "n": 129}, "n"),
    ({"model": "m", "messages": MSGS, "n": 1.5}, "n"),
    ({"model": "m", "messages": MSGS, "n": True}, "n"),
    ({"model": "m", "messages": MSGS, "best_of": 0}, "best_of"),
    ({"model": "m", "messages": MSGS, "use_beam_search": "yes"}, "use_beam_search"),
    ({"model": "m", "messages": MSGS, "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": MSGS, "max_tokens": -5}, "max_tokens"),
    ({"model": "m", "messages": MSGS, "max_completion_tokens": "100"}, "max_completion_tokens"),
    ({"model": "m", "messages": MSGS, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "m", "messages": MSGS, "reasoning_effort": "ultra"}, "reasoning_effort"),
    ({"model": "m", "messages": MSGS, "reasoning_effort": 3}, "reasoning_effort"),
    ({"model": "m", "messages": MSGS, "stream": "true"}, "stream"),
    ({"model": "m", "messages": MSGS, "stream_options": []}, "stream_options"),
    ({"model": "m", "messages": MSGS, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ({"model": "m", "messages": MSGS, "thinking": "off"}, "thinking"),
    ({"model": "m", "messages": MSGS, "thinking": {"type": 0}}, "thinking.type"),
    ({"model": "m", "messages": MSGS, "chat_template_kwargs": [1]}, "chat_template_kwargs"),
]


@pytest.mark.parametrize(("body", "param"), BAD)
def test_parse_bad_input_names_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as exc:
        A.parse(body, {})
    assert exc.value.param == param
    assert exc.value.message


@pytest.mark.parametrize("body", [[], [{"model": "m"}], 3, "text", None, True])
def test_non_object_bodies_are_bad_requests(body: Any) -> None:
    for call in (A.parse, A.model_name, A.is_stream):
        with pytest.raises(BadRequest):
            call(body, {})


def test_model_name_and_is_stream() -> None:
    assert A.model_name({"model": "x"}, {}) == "x"
    assert A.is_stream({"model": "x", "stream": True}, {}) is True
    assert A.is_stream({"model": "x"}, {}) is False


# ------------------------------------------------------------------------------------------ rewrite
def test_rewrite_lowers_n_and_the_field_the_client_used() -> None:
    body = {"model": "m", "messages": MSGS, "n": 8, "max_completion_tokens": 8000, "reasoning_effort": "high"}
    r = A.parse(body, {})
    changes = A.rewrite(body, r, ClampTarget(samples=2, output_cap=3584, reasoning_budget=None, effort="low"))
    assert changes == ["n=2", "max_completion_tokens=3584", "reasoning_effort=low"]
    assert (body["n"], body["max_completion_tokens"], body["reasoning_effort"]) == (2, 3584, "low")
    assert "max_tokens" not in body


def test_rewrite_uses_max_tokens_when_that_is_what_the_client_sent() -> None:
    body = {"model": "m", "messages": MSGS, "max_tokens": 5000}
    assert A.rewrite(body, A.parse(body, {}), ClampTarget(1, 1000, None, None)) == ["max_tokens=1000"]
    assert "max_completion_tokens" not in body


def test_rewrite_both_caps_when_both_sent_and_default_field_when_none() -> None:
    body = {"model": "m", "messages": MSGS, "max_tokens": 5000, "max_completion_tokens": 800}
    assert A.rewrite(body, A.parse(body, {}), ClampTarget(1, 1000, None, None)) == ["max_tokens=1000"]
    body = {"model": "m", "messages": MSGS}
    changes = A.rewrite(body, A.parse(body, {}), ClampTarget(1, 1000, None, None))
    assert changes == ["max_completion_tokens=1000"]


def test_rewrite_lists_only_changes() -> None:
    body = {"model": "m", "messages": MSGS, "n": 2, "max_completion_tokens": 100, "reasoning_effort": "low"}
    before = copy.deepcopy(body)
    assert A.rewrite(body, A.parse(body, {}), ClampTarget(4, 200, None, "low")) == []
    assert body == before


def test_rewrite_old_best_of() -> None:
    body = {"model": "m", "messages": MSGS, "n": 2, "best_of": 6, "max_tokens": 10}
    assert A.rewrite(body, A.parse(body, {}), ClampTarget(3, 10, None, None)) == ["best_of=3"]


# --------------------------------------------------------------------------------- prepare_upstream
def test_prepare_upstream_injects_usage_and_remembers_the_client() -> None:
    body: dict[str, Any] = {"model": "public", "messages": MSGS, "stream": True}
    assert A.prepare_upstream(body, "upstream-id", True) is False
    assert body["model"] == "upstream-id" and body["stream_options"] == {"include_usage": True}

    body = {"model": "p", "stream": True, "stream_options": {"include_usage": True}}
    assert A.prepare_upstream(body, "u", True) is True
    assert body["stream_options"] == {"include_usage": True}

    body = {"model": "p", "stream": True,
            "stream_options": {"include_usage": False, "continuous_usage_stats": True}}
    assert A.prepare_upstream(body, "u", True) is False
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_prepare_upstream_leaves_non_streams_alone() -> None:
    body: dict[str, Any] = {"model": "p", "messages": MSGS}
    assert A.prepare_upstream(body, "u", False) is False
    assert body == {"model": "u", "messages": MSGS}


# ------------------------------------------------------------------------------------ usage (JSON)
def test_usage_openai_o3mini_recorded() -> None:
    u = A.usage_from_json(load_json("openai_chat_o3mini.json"), req())
    assert u == Usage(samples=1, prompt_tokens=7, reasoning_tokens=64, output_tokens=23, source="upstream")


def test_usage_n2_sums_choices() -> None:
    r = req({"model": "m", "messages": MSGS, "n": 2})
    u = A.usage_from_json(load_json("openai_chat_n2_reasoning.json"), r)
    assert (u.samples, u.prompt_tokens, u.reasoning_tokens, u.output_tokens) == (2, 25, 576, 124)


def test_usage_deepseek_recorded_and_cache_hits() -> None:
    body = load_json("deepseek_chat_reasoning.json")
    u = A.usage_from_json(body, req())
    assert (u.prompt_tokens, u.reasoning_tokens, u.output_tokens, u.cached_tokens) == (97, 113, 18, 0)
    body["usage"].pop("prompt_tokens_details")
    body["usage"]["prompt_cache_hit_tokens"] = 64
    assert A.usage_from_json(body, req()).cached_tokens == 64


def test_usage_sglang_top_level_reasoning() -> None:
    u = A.usage_from_json(load_json("sglang_chat_reasoning.json"), req())
    assert (u.prompt_tokens, u.reasoning_tokens, u.output_tokens, u.source) == (31, 388, 24, "upstream")


def test_usage_vllm_reasoning_text_without_a_count_is_estimated_within_completion() -> None:
    body = load_json("vllm_chat_gptoss_reasoning.json")
    content = body["choices"][0]["message"]["content"]
    u = A.usage_from_json(body, req())
    assert u.source == "upstream" and u.prompt_tokens == 77
    # the visible part is estimated from its text, reasoning is the remainder of the completion
    assert u.output_tokens == -(-len(content) // 4)
    assert u.generated_tokens == 61  # the total stays the server's


def test_usage_missing_is_estimated_from_text() -> None:
    body = load_json("deepseek_chat_reasoning.json")
    del body["usage"]
    msg = body["choices"][0]["message"]
    u = A.usage_from_json(body, req())
    assert u.source == "estimated" and u.prompt_tokens == 50 and u.samples == 1
    assert u.output_tokens == -(-len(msg["content"]) // 4)
    assert u.reasoning_tokens == -(-len(msg["reasoning_content"]) // 4)


@pytest.mark.parametrize("body", [[], 3, "x", None, {"choices": "x", "usage": "y"}, {"choices": [1, None]}])
def test_usage_odd_bodies_never_raise(body: Any) -> None:
    u = A.usage_from_json(body, req({"model": "m", "messages": MSGS, "n": 3}))
    assert u.source == "estimated" and u.samples == 3 and u.generated_tokens == 0


def test_usage_odd_values() -> None:
    body = {"choices": [{"message": {"content": "x"}}],
            "usage": {"prompt_tokens": None, "completion_tokens": "12", "completion_tokens_details": None}}
    u = A.usage_from_json(body, req())
    assert (u.prompt_tokens, u.reasoning_tokens, u.output_tokens) == (0, 0, 12)
    body = {"usage": {"prompt_tokens": 5, "total_tokens": 30}}  # only the total
    assert A.usage_from_json(body, req()).output_tokens == 25
    body = {"usage": {"prompt_tokens": 5, "completion_tokens": 10,
                      "completion_tokens_details": {"reasoning_tokens": 40}}}
    u = A.usage_from_json(body, req())
    # more reasoning than completion: it cannot be inside it, so it is beside it (xAI's convention)
    assert (u.reasoning_tokens, u.output_tokens) == (40, 10)


# ----------------------------------------------------------------------------------- stream meters
def test_stream_openai_n2_usage_chunk_kept_when_asked() -> None:
    data = load_sse("openai_chat_stream_n2_reasoning.sse")
    out, u, m = meter_run(data, True)
    assert out == data
    assert u == Usage(samples=2, prompt_tokens=25, reasoning_tokens=512, output_tokens=88, cached_tokens=0)
    assert m.finished and m.error is None


def test_stream_openai_n2_usage_chunk_stripped_when_not_asked() -> None:
    data = load_sse("openai_chat_stream_n2_reasoning.sse")
    out, u, _ = meter_run(data, False)
    assert out == data.replace(usage_event(data), b"")
    assert b'"choices":[]' not in out and out.endswith(b"data: [DONE]\n\n")
    assert u.source == "upstream" and u.generated_tokens == 600


def test_stream_truncated_without_usage_is_counted() -> None:
    data = load_sse("openai_chat_stream_n2_reasoning.sse")
    cut = data[: data.index(b'"finish_reason":"stop"')]
    out, u, m = meter_run(cut, False)
    assert out == cut and not m.finished
    # 5 + 4 content chunks, the cut one (choice 0 "" finish) not counted; prompt from the estimate
    assert u == Usage(samples=2, prompt_tokens=50, reasoning_tokens=0, output_tokens=9, source="counted")


def test_stream_deepseek_usage_on_finish_chunk_recorded() -> None:
    data = load_sse("deepseek_chat_stream_usage_on_finish.sse")
    out, u, m = meter_run(data, False)
    assert out == data  # per-choice usage is not the injected chunk: nothing stripped
    assert u == Usage(samples=1, prompt_tokens=88, reasoning_tokens=4, output_tokens=0, source="upstream")
    assert m.finished


def test_stream_sglang_recorded_byte_exact() -> None:
    data = load_sse("sglang_chat_stream.sse")
    published = "8cb30eef9d133bdc6bfe812772dc4a62336d2827caea843546cbeff3f004c42c"  # nearai/docs
    assert hashlib.sha256(data).hexdigest() == published
    out, u, _ = meter_run(data, True)
    assert out == data
    assert u == Usage(samples=1, prompt_tokens=18, reasoning_tokens=0, output_tokens=4)
    out, _, _ = meter_run(data, False)
    assert out == data.replace(usage_event(data), b"")


def test_stream_ollama_recorded() -> None:
    _out, u, _ = meter_run(load_sse("ollama_chat_stream.sse"), True)
    assert (u.prompt_tokens, u.reasoning_tokens, u.output_tokens, u.source) == (17, 0, 40, "upstream")


def test_stream_vllm_without_usage_is_counted() -> None:
    data = load_sse("vllm_chat_stream_no_usage.sse")
    out, u, m = meter_run(data, False)
    assert out == data and m.finished
    assert u == Usage(samples=1, prompt_tokens=50, reasoning_tokens=0, output_tokens=9, source="counted")


def test_stream_vllm_continuous_usage_is_per_choice() -> None:
    data = load_sse("vllm_chat_stream_continuous.sse")
    _, u, _ = meter_run(data, True)
    assert u == Usage(samples=2, prompt_tokens=20, reasoning_tokens=6, output_tokens=3)

    # Without the final chunk the choices' own finishing usage is summed (the prompt once, not twice)...
    no_final = data.replace(usage_event(data), b"")
    _, u, _ = meter_run(no_final, False)
    assert u == Usage(samples=2, prompt_tokens=20, reasoning_tokens=6, output_tokens=3, source="upstream")

    # ...and the same figures are only "counted" when the stream did not end properly.
    _, u, _ = meter_run(no_final.replace(b"data: [DONE]\n\n", b""), False)
    assert u.source == "counted" and u.generated_tokens == 9

    # Cut before the last choice finished: the per-choice usage so far, never a request total.
    cut = data[: data.rindex(b'"finish_reason":"stop"')]
    _, u, _ = meter_run(cut, False)
    assert u.source == "counted" and u.prompt_tokens == 20
    assert (u.reasoning_tokens, u.output_tokens) == (6, 2)  # choice 0: 3 + "4"; choice 1: 3 + "Four"


def test_stream_vllm_error_then_done() -> None:
    data = load_sse("vllm_chat_stream_error.sse")
    out, u, m = meter_run(data, False)
    assert out == data
    assert m.finished and m.error is not None and m.error["code"] == 400
    assert "maximum model length" in m.error["message"]
    assert u.source == "counted" and u.output_tokens == 2 and u.prompt_tokens == 20


def test_stream_flat_error_and_garbage_are_forwarded() -> None:
    data = (b': keep-alive\n\ndata: {"object":"error","message":"boom","code":500}\n\n'
            b"data: not json\n\ndata: [1,2]\n\nevent: ping\n\n")
    out, u, m = meter_run(data, False)
    assert out == data and m.error == {"message": "boom", "code": 500}
    assert u.source == "counted" and u.generated_tokens == 0 and u.samples == 1


def test_stream_counts_reasoning_and_tool_call_deltas() -> None:
    chunks = [{"index": 0, "delta": {"reasoning_content": "hm"}}, {"index": 0, "delta": {"reasoning": "so"}},
              {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}},
              {"index": 0, "delta": {"content": ""}}, {"index": 1, "delta": {"content": "x"}}]
    data = b"".join(b"data: " + json.dumps({"choices": [c]}).encode() + b"\n\n" for c in chunks)
    _, u, _ = meter_run(data, False)
    assert (u.samples, u.reasoning_tokens, u.output_tokens) == (2, 2, 2)


TRANSCRIPTS = ["openai_chat_stream_n2_reasoning.sse", "deepseek_chat_stream_usage_on_finish.sse",
               "sglang_chat_stream.sse", "ollama_chat_stream.sse", "vllm_chat_stream_no_usage.sse",
               "vllm_chat_stream_continuous.sse", "vllm_chat_stream_error.sse"]


@pytest.mark.parametrize("name", TRANSCRIPTS)
@pytest.mark.parametrize("wants", [True, False])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stream_split_anywhere_same_result(name: str, wants: bool, data: st.DataObject) -> None:
    raw = load_sse(name)
    whole_out, whole_usage, _ = meter_run(raw, wants)
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(raw) - 1), max_size=25))
    out, usage, _ = meter_run(raw, wants, cuts)
    assert out == whole_out
    assert usage == whole_usage
    # Also byte by byte on a prefix: the worst case for the buffering.
    cut_at = data.draw(st.integers(min_value=0, max_value=len(raw)))
    part = raw[:cut_at]
    assert meter_run(part, wants, list(range(1, len(part))))[:2] == meter_run(part, wants)[:2]


def test_rewrite_float_n_is_still_lowered() -> None:
    body = {"model": "m", "messages": MSGS, "n": 8.0, "max_tokens": 10}
    assert A.parse(body, {}).samples == 8
    assert A.rewrite(body, A.parse(body, {}), ClampTarget(2, 10, None, None)) == ["n=2"]
