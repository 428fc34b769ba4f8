"""Metering of provider quirks on recorded payloads (issue 13, item 7; tests/payloads/quirks/README.md).

Each quirk is metered three ways and must give the provider's true generated total every time: the
adapter's ``usage_from_json`` (JSON bodies), its stream meter fed in many different chunk splits (SSE
transcripts), and ``kgate meter`` on the same files.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway import cli
from gateway.engine.compute import ComputeRequest, Usage
from gateway.engine.metering import parse_request, resolve_path
from gateway.policy.config import load_config

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "policies" / "example.yaml"
QUIRKS = Path(__file__).parents[1] / "payloads" / "quirks"
PAYLOADS = Path(__file__).parents[1] / "payloads"

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def visible_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


SUMMARY_TEXT = orjson.loads((QUIRKS / "anthropic_summarized_thinking_response.json").read_bytes())["content"][1]["text"]
SUMMARY_V = visible_tokens(SUMMARY_TEXT)

# name: (API path, request body file, response file, (prompt, reasoning, visible), source)
CASES: dict[str, tuple[str, str, str, tuple[int, int, int], str]] = {
    # xAI: reasoning beside completion_tokens; total 135 = 32 + 9 + 94
    "xai-json": (CHAT, "xai_chat_request.json", "xai_chat_reasoning.json", (32, 94, 9), "upstream"),
    "xai-sse": (CHAT, "xai_chat_request.json", "xai_chat_stream.sse", (12, 386, 1), "upstream"),
    # Google's OpenAI-compatible endpoint: thoughts only in total_tokens (1051 - 8 - 14 = 1029)
    "google-compat-json": (CHAT, "google_openai_compat_request.json", "google_openai_compat_chat.json",
                           (8, 1029, 14), "upstream"),
    "google-compat-sse": (CHAT, "google_openai_compat_request.json", "google_openai_compat_stream.sse",
                          (8, 1029, 14), "upstream"),
    # Anthropic compaction: the compaction step (180,000 in, 3,500 out) is outside the top-level usage
    "compaction-json": (MESSAGES, "anthropic_compaction_request.json", "anthropic_compaction_response.json",
                        (23000 + 180000, 3500, 1000), "upstream"),
    "compaction-sse": (MESSAGES, "anthropic_compaction_request.json", "anthropic_compaction_stream.sse",
                       (23000 + 180000, 3500, 1000), "upstream"),
    # Claude 4 summarised thinking: 3,180 output tokens, a summary of a few dozen; R is the remainder
    "summarised-json": (MESSAGES, "anthropic_summarized_thinking_request.json",
                        "anthropic_summarized_thinking_response.json", (54, 3180 - SUMMARY_V, SUMMARY_V), "upstream"),
    "summarised-sse": (MESSAGES, "anthropic_summarized_thinking_request.json",
                       "anthropic_summarized_thinking_stream.sse", (54, 3180 - SUMMARY_V, SUMMARY_V), "upstream"),
    # redacted thinking (Anthropic docs' recorded stream and a body built from it): 184 output tokens
    "redacted-json": (MESSAGES, "anthropic_summarized_thinking_request.json",
                      "../anthropic/own_redacted_thinking_response.json", (92, 172, 12), "upstream"),
    "redacted-sse": (MESSAGES, "anthropic_summarized_thinking_request.json",
                     "../anthropic/docs_redacted_thinking.sse", (92, 170, 14), "upstream"),
    # OpenRouter: the usage chunk has a choice (empty delta, finish_reason null)
    "openrouter-sse": (CHAT, "openrouter_chat_request.json", "openrouter_chat_stream.sse", (1697, 0, 52),
                       "upstream"),
    # total_tokens cross-checks beyond the OpenAI chat family
    "gemini-total": ("/v1beta/models/reasoner-32b:generateContent", "gemini_request.json",
                     "gemini_total_beyond_parts.json", (7477, 11476 - 7477 - 2060, 2060), "upstream"),
    "responses-total": ("/v1/responses", "responses_request.json", "responses_total_beyond_parts.json",
                        (12, 845 - 12 - 21, 21), "upstream"),
}


def parsed(path: str, body_file: str) -> Any:
    adapter, params = resolve_path(path)
    return parse_request(load_config(str(POLICY)), adapter, params, (QUIRKS / body_file).read_bytes())


def splits(data: bytes) -> list[list[bytes]]:
    """The transcript whole, byte by byte, and cut at seeded random points."""
    out = [[data], [data[i:i + 1] for i in range(len(data))]]
    for seed in range(8):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(data)), k=min(12, len(data) - 1)))
        out.append([data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)])
    return out


def stream_usage(path: str, req: ComputeRequest, pieces: list[bytes], wants_usage: bool = True) -> tuple[Usage, bytes]:
    adapter, _ = resolve_path(path)
    meter = adapter.stream_meter(req, wants_usage)
    out = b"".join(meter.feed(p) for p in pieces) + meter.close()
    return meter.usage(), out


def check(usage: Usage, expected: tuple[int, int, int], source: str) -> None:
    assert (usage.prompt_tokens, usage.reasoning_tokens, usage.output_tokens) == expected
    assert usage.source == source


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_meters_the_true_total(name: str) -> None:
    path, body_file, response_file, expected, source = CASES[name]
    p = parsed(path, body_file)
    raw = (QUIRKS / response_file).read_bytes()
    if response_file.endswith(".json"):
        check(p.adapter.usage_from_json(orjson.loads(raw), p.request), expected, source)
        return
    for pieces in splits(raw):
        usage, out = stream_usage(path, p.request, pieces)
        assert out == raw  # metering never changes what the client receives
        check(usage, expected, source)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kgate_meter_gives_the_true_total(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path, body_file, response_file, (prompt, reasoning, visible), source = CASES[name]
    rc = cli.main(["meter", "--config", str(POLICY), "--path", path, "--body", str(QUIRKS / body_file),
                   "--response", str(QUIRKS / response_file)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["prompt_tokens"], out["reasoning_tokens"], out["output_tokens"]) == (prompt, reasoning, visible)
    assert out["generated_tokens"] == reasoning + visible and out["source"] == source


# ------------------------------------------------------------------------------------ finer points
def chat_usage(usage: dict[str, Any], **message: Any) -> Usage:
    p = parsed(CHAT, "xai_chat_request.json")
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok", **message}}], "usage": usage}
    return p.adapter.usage_from_json(body, p.request)


def test_reasoning_beside_or_inside_the_completion_and_the_total_cross_check() -> None:
    # grok-4-fast-reasoning: 279 + 89 + 6 = 374; reasoning is beside the completion, not inside it
    u = chat_usage({"prompt_tokens": 279, "completion_tokens": 89, "total_tokens": 374,
                    "completion_tokens_details": {"reasoning_tokens": 6}})
    assert (u.reasoning_tokens, u.output_tokens) == (6, 89)
    # OpenAI: reasoning inside the completion, the total adds up: nothing changes
    u = chat_usage({"prompt_tokens": 25, "completion_tokens": 600, "total_tokens": 625,
                    "completion_tokens_details": {"reasoning_tokens": 512}})
    assert (u.prompt_tokens, u.reasoning_tokens, u.output_tokens) == (25, 512, 88)
    # a total below the parts keeps the parts
    u = chat_usage({"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 20})
    assert (u.prompt_tokens, u.reasoning_tokens, u.output_tokens) == (100, 0, 50)


def test_reasoning_text_without_a_count_takes_the_remainder() -> None:
    # A server returning a short reasoning summary and only the completion total.
    u = chat_usage({"prompt_tokens": 10, "completion_tokens": 900, "total_tokens": 910},
                   content="x" * 40, reasoning_content="short summary")
    assert (u.reasoning_tokens, u.output_tokens) == (890, 10)


def test_gemini_total_cross_check_counts_the_tool_use_prompt_as_a_part() -> None:
    p = parsed("/v1beta/models/reasoner-32b:generateContent", "gemini_request.json")
    meta = {"promptTokenCount": 100, "toolUsePromptTokenCount": 40, "candidatesTokenCount": 10,
            "thoughtsTokenCount": 5, "totalTokenCount": 155}
    body = {"candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}], "usageMetadata": meta}
    u = p.adapter.usage_from_json(body, p.request)
    assert (u.prompt_tokens, u.reasoning_tokens, u.output_tokens) == (140, 5, 10)  # adds up: no excess
    meta["totalTokenCount"] = 455  # 300 generated that no part counts
    u = p.adapter.usage_from_json(body, p.request)
    assert (u.prompt_tokens, u.reasoning_tokens, u.output_tokens) == (140, 305, 10)


def test_compaction_with_several_message_iterations_counts_each_once() -> None:
    p = parsed(MESSAGES, "anthropic_compaction_request.json")
    usage = {"input_tokens": 21000, "output_tokens": 600, "iterations": [
        {"type": "message", "input_tokens": 1000, "output_tokens": 200},
        {"type": "compaction", "input_tokens": 150000, "output_tokens": 3000},
        {"type": "message", "input_tokens": 20000, "output_tokens": 400}]}
    u = p.adapter.usage_from_json({"content": [{"type": "text", "text": "done"}], "usage": usage}, p.request)
    assert (u.prompt_tokens, u.generated_tokens) == (21000 + 150000, 600 + 3000)


def test_openrouter_usage_chunk_is_stripped_when_the_client_did_not_ask() -> None:
    p = parsed(CHAT, "openrouter_chat_request.json")
    raw = (QUIRKS / "openrouter_chat_stream.sse").read_bytes()
    usage, out = stream_usage(CHAT, p.request, [raw], wants_usage=False)
    assert b'"usage"' not in out and out.endswith(b"data: [DONE]\n\n")
    assert usage.source == "upstream" and usage.generated_tokens == 52
    # Not the same as per-choice usage before the choice finished (vLLM continuous_usage_stats puts
    # usage on its first, role-only chunk): that is never taken as the request's usage.
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
         "usage": {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}},
        {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}],
         "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}},
        {"choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": None}],
         "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
    ]
    raw = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)  # cut before it finished
    usage, out = stream_usage(CHAT, p.request, [raw], wants_usage=False)
    assert out == raw and usage.source == "counted" and usage.generated_tokens == 2
