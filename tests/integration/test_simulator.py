"""The upstream simulator, driven over real HTTP: each API, streamed and not, n > 1, reasoning, caps,
every fault kind, the control endpoints, and the official SDKs parsing what it sends."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from gateway.adapters.sse import SSEParser
from gateway.simulator.faults import parse_fault
from gateway.simulator.model import EFFORT_TOKENS, THINKING_BUDGET_FRACTION
from gateway.simulator.server import SimulatorOptions, run_simulator, start_simulator

V = 8  # visible tokens per sample in these tests
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Tell me a story about forty characters."}]  # 40 chars -> 10 tokens
MSGS: Any = USER  # the SDKs want their TypedDicts


@pytest.fixture
async def sim() -> AsyncIterator[str]:
    runner, url = await start_simulator(SimulatorOptions(output_tokens=V, seed=1))
    yield url
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


async def post(http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None,
               raw: bytes | None = None) -> tuple[int, Any, bytes]:
    data = raw if raw is not None else orjson.dumps(body)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with http.post(url, data=data, headers=hdrs) as r:
        return r.status, r.headers, await r.read()


def events(raw: bytes) -> list[tuple[str | None, Any]]:
    """(event name, JSON data) of each SSE event; ``[DONE]`` as ("done", None)."""
    p = SSEParser()
    out = [(e.event or ("done" if e.data == "[DONE]" else None), e.json()) for e in p.feed(raw)]
    out += [(e.event, e.json()) for e in p.flush()]
    return out


def reasoning_tokens(body: bytes) -> int:
    return int(orjson.loads(body)["usage"]["completion_tokens_details"]["reasoning_tokens"])


def chunks(raw: bytes) -> list[Any]:
    return [d for _, d in events(raw) if d is not None]


# ------------------------------------------------------------------------------------ chat completions
async def test_chat_n_counts_prompt_once_and_sums_choices(sim: str, http: aiohttp.ClientSession) -> None:
    st, h, b = await post(http, sim + CHAT, {"model": "gpt-4o", "messages": USER, "n": 3})
    assert st == 200 and h["content-type"].startswith("application/json")
    r = orjson.loads(b)
    assert r["object"] == "chat.completion" and len(r["choices"]) == 3
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] == "stop" for c in r["choices"])
    assert r["usage"]["prompt_tokens"] == 10
    assert r["usage"]["completion_tokens"] == 3 * V
    assert r["usage"]["total_tokens"] == 10 + 3 * V
    assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    assert "reasoning_content" not in r["choices"][0]["message"]


@pytest.mark.parametrize("model", ["o3-mini", "gpt-5", "deepseek-r1", "qwq-32b", "my-reasoner"])
async def test_chat_reasoning_model_by_name(sim: str, http: aiohttp.ClientSession, model: str) -> None:
    body = {"model": model, "messages": USER, "n": 2, "reasoning_effort": "low"}
    _, _, b = await post(http, sim + CHAT, body)
    u = orjson.loads(b)["usage"]
    assert u["completion_tokens_details"]["reasoning_tokens"] == 2 * EFFORT_TOKENS["low"]
    assert u["completion_tokens"] == 2 * (EFFORT_TOKENS["low"] + V)


async def test_chat_default_effort_and_thinking_switches(sim: str, http: aiohttp.ClientSession) -> None:
    _, _, b = await post(http, sim + CHAT, {"model": "o4-mini", "messages": USER})
    assert reasoning_tokens(b) == EFFORT_TOKENS["medium"]
    _, _, b = await post(http, sim + CHAT, {"model": "gpt-5.1", "messages": USER, "reasoning_effort": "none"})
    assert reasoning_tokens(b) == 0
    # a non-reasoning name still reasons when the request turns thinking on (DeepSeek / vLLM switches)
    _, _, b = await post(http, sim + CHAT, {"model": "deepseek-chat", "messages": USER,
                                            "thinking": {"type": "enabled"}, "reasoning_effort": "minimal"})
    assert reasoning_tokens(b) == 64
    _, _, b = await post(http, sim + CHAT, {"model": "qwen3", "messages": USER,
                                            "chat_template_kwargs": {"enable_thinking": True}})
    assert reasoning_tokens(b) == 1024
    _, _, b = await post(http, sim + CHAT, {"model": "deepseek-r1", "messages": USER,
                                            "thinking": {"type": "disabled"}})
    assert reasoning_tokens(b) == 0
    # the per-request override of reasoning tokens
    _, _, b = await post(http, sim + CHAT, {"model": "o3", "messages": USER}, {"x-sim-reasoning-tokens": "7"})
    assert orjson.loads(b)["usage"]["completion_tokens"] == 7 + V


async def test_chat_caps_count_reasoning_and_prefer_max_completion_tokens(
        sim: str, http: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-5", "messages": USER, "reasoning_effort": "minimal",
            "max_completion_tokens": 66, "max_tokens": 10_000}
    _, _, b = await post(http, sim + CHAT, body)
    r = orjson.loads(b)
    assert r["choices"][0]["finish_reason"] == "length"
    # reasoning stops early enough to leave the answer room (V = 8 of the 66)
    assert r["usage"]["completion_tokens"] == 66 and reasoning_tokens(b) == 58
    assert r["choices"][0]["message"]["content"].startswith(" The simulated")
    # forced reasoning that fills the cap: nothing visible is left
    _, _, b = await post(http, sim + CHAT, {**body, "max_completion_tokens": 50}, {"x-sim-reasoning-tokens": "64"})
    r = orjson.loads(b)
    assert r["usage"]["completion_tokens"] == 50 and r["choices"][0]["message"]["content"] == ""
    assert r["choices"][0]["finish_reason"] == "length"
    # max_tokens alone is the cap too
    _, _, b = await post(http, sim + CHAT, {"model": "gpt-4o", "messages": USER, "max_tokens": 3})
    assert orjson.loads(b)["usage"]["completion_tokens"] == 3


async def test_chat_stream_without_usage(sim: str, http: aiohttp.ClientSession) -> None:
    st, h, b = await post(http, sim + CHAT, {"model": "gpt-4o", "messages": USER, "n": 2, "stream": True})
    assert st == 200 and h["content-type"].startswith("text/event-stream")
    evs = events(b)
    assert evs[-1] == ("done", None)
    data = [d for _, d in evs[:-1]]
    assert all("usage" not in d for d in data) and all(d["choices"] for d in data)
    for i in (0, 1):
        mine = [d["choices"][0] for d in data if d["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        text = [c["delta"]["content"] for c in mine[1:] if c["delta"].get("content")]
        assert len(text) == V  # one token per chunk per choice
        assert mine[-1]["finish_reason"] == "stop"


async def test_chat_stream_include_usage(sim: str, http: aiohttp.ClientSession) -> None:
    _, _, b = await post(http, sim + CHAT, {"model": "o1", "messages": USER, "n": 2, "stream": True,
                                            "reasoning_effort": "minimal",
                                            "stream_options": {"include_usage": True}})
    data = chunks(b)
    assert all(d["usage"] is None for d in data[:-1])
    last = data[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2 * (64 + V)
    assert last["usage"]["completion_tokens_details"]["reasoning_tokens"] == 128
    assert last["usage"]["prompt_tokens"] == 10
    assert b.endswith(b"data: [DONE]\n\n")
    # OpenAI never streams reasoning text
    assert not any("reasoning" in c["delta"] or "reasoning_content" in c["delta"]
                   for d in data for c in d["choices"])


def test_cached_chat_bytes_match_the_dict() -> None:
    from gateway.simulator import wire
    from gateway.simulator.model import GenContext, plan_chat

    for flavor in ("openai", "vllm", "sglang", "deepseek"):
        plan = plan_chat({"model": "o3", "messages": USER, "n": 2, "reasoning_effort": "minimal"},
                         GenContext(output_tokens=V, flavor=flavor))
        for _ in range(2):  # the second comes from the cache
            fast, slow = orjson.loads(wire.chat_bytes(plan, flavor)), wire.chat_json(plan, flavor)
            assert fast.pop("id") != slow.pop("id")
            assert abs(fast.pop("created") - slow.pop("created")) <= 1
            assert fast == slow


# ------------------------------------------------------------------------------------------- flavours
async def test_vllm_continuous_usage_is_per_choice(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"model": "qwen3-think", "messages": USER, "n": 2, "stream": True, "reasoning_effort": "minimal",
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    _, _, b = await post(http, sim + CHAT, body, {"x-sim-flavor": "vllm"})
    data = chunks(b)
    content = [d for d in data if d["choices"]]
    assert all(d["usage"] is not None for d in content)
    assert max(d["usage"]["completion_tokens"] for d in content) == 64 + V  # one choice, not the total
    reasoning = [d for d in content if "reasoning" in d["choices"][0]["delta"]]
    assert len(reasoning) == 2 * 64
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == 2 * (64 + V)
    # vLLM errors: OpenAI shape with an integer code
    st, _, b = await post(http, sim + CHAT, None, {"x-sim-flavor": "vllm"}, raw=b"{")
    assert st == 400 and orjson.loads(b)["error"]["code"] == 400


async def test_sglang_usage_and_cap_precedence(http: aiohttp.ClientSession) -> None:
    runner, url = await start_simulator(SimulatorOptions(output_tokens=V, flavor="sglang"))
    try:
        body = {"model": "deepseek-r1", "messages": USER, "reasoning_effort": "minimal",
                "max_tokens": 70, "max_completion_tokens": 10}
        _, _, b = await post(http, url + CHAT, body)
        r = orjson.loads(b)
        assert r["usage"]["reasoning_tokens"] == 62 and "completion_tokens_details" not in r["usage"]
        assert r["usage"]["completion_tokens"] == 70  # max_tokens wins on SGLang
        assert r["choices"][0]["message"]["reasoning_content"].startswith(" Let me think")
        st, _, b = await post(http, url + CHAT, None, raw=b"nope")
        e = orjson.loads(b)
        assert st == 400 and e["object"] == "error" and e["code"] == 400
    finally:
        await runner.cleanup()


async def test_deepseek_usage(sim: str, http: aiohttp.ClientSession) -> None:
    _, _, b = await post(http, sim + CHAT, {"model": "deepseek-reasoner", "messages": USER,
                                            "reasoning_effort": "low"}, {"x-sim-flavor": "deepseek"})
    r = orjson.loads(b)
    u = r["usage"]
    assert u["prompt_cache_miss_tokens"] == 10 and u["prompt_cache_hit_tokens"] == 0
    assert u["completion_tokens_details"]["reasoning_tokens"] == 256 and u["completion_tokens"] == 256 + V
    assert len(r["choices"][0]["message"]["reasoning_content"].split()) == 256


# ---------------------------------------------------------------------------------- legacy completions
async def test_completions_prompts_times_n_and_default_cap(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"model": "davinci-002", "prompt": ["abcd", "abcdefgh", [1, 2, 3]], "n": 2}
    _, _, b = await post(http, sim + "/v1/completions", body, {"x-sim-output-tokens": "40"})
    r = orjson.loads(b)
    assert r["object"] == "text_completion" and len(r["choices"]) == 6
    assert r["usage"]["prompt_tokens"] == 1 + 2 + 3  # each prompt once, not per choice
    assert r["usage"]["completion_tokens"] == 6 * 16  # the API's default max_tokens
    assert all(c["finish_reason"] == "length" for c in r["choices"])


async def test_completions_best_of_counts_returned_choices(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "hello", "n": 2, "best_of": 5, "max_tokens": 100}
    _, _, b = await post(http, sim + "/v1/completions", body)
    r = orjson.loads(b)
    assert len(r["choices"]) == 2 and r["usage"]["completion_tokens"] == 2 * V
    async with http.get(sim + "/_sim/stats") as resp:
        tokens = (await resp.json())["tokens"]
    assert tokens["generated"] == 5 * V and tokens["reported_output"] == 2 * V
    st, _, b = await post(http, sim + "/v1/completions", {**body, "stream": True})
    assert st == 400 and orjson.loads(b)["error"]["param"] == "best_of"
    st, _, _ = await post(http, sim + "/v1/completions", {**body, "best_of": 1})
    assert st == 400  # best_of < n


async def test_completions_stream(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"model": "x", "prompt": ["a", "b"], "stream": True, "max_tokens": 5,
            "stream_options": {"include_usage": True}}
    _, _, b = await post(http, sim + "/v1/completions", body)
    data = chunks(b)
    assert all(d["object"] == "text_completion" for d in data)
    texts = [d["choices"][0]["text"] for d in data if d["choices"] and d["choices"][0]["text"]]
    assert len(texts) == 2 * 5
    assert data[-1]["usage"]["completion_tokens"] == 10 and data[-1]["usage"]["prompt_tokens"] == 2


# ------------------------------------------------------------------------------------------- responses
async def test_responses_json_and_incomplete(sim: str, http: aiohttp.ClientSession) -> None:
    _, _, b = await post(http, sim + "/v1/responses", {"model": "o3", "input": USER,
                                                      "reasoning": {"effort": "low"}})
    r = orjson.loads(b)
    assert r["object"] == "response" and r["status"] == "completed"
    assert [o["type"] for o in r["output"]] == ["reasoning", "message"]
    assert r["usage"]["output_tokens"] == 256 + V
    assert r["usage"]["output_tokens_details"]["reasoning_tokens"] == 256
    assert r["usage"]["input_tokens"] == 10
    _, _, b = await post(http, sim + "/v1/responses", {"model": "o3", "input": "hi", "max_output_tokens": 260,
                                                      "reasoning": {"effort": "low"}})
    r = orjson.loads(b)
    assert r["status"] == "incomplete" and r["incomplete_details"] == {"reason": "max_output_tokens"}
    assert r["usage"]["output_tokens"] == 260
    st, _, _ = await post(http, sim + "/v1/responses", {"model": "o3", "input": "hi", "max_output_tokens": 8})
    assert st == 400


async def test_responses_stream_events(sim: str, http: aiohttp.ClientSession) -> None:
    _, _, b = await post(http, sim + "/v1/responses", {"model": "gpt-4o", "input": "hi", "stream": True})
    evs = events(b)
    names = [n for n, _ in evs]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
    assert names.count("response.output_text.delta") == V
    assert all(d["type"] == n for n, d in evs)
    assert [d["sequence_number"] for _, d in evs] == list(range(len(evs)))
    assert evs[0][1]["response"]["usage"] is None
    assert evs[-1][1]["response"]["usage"]["output_tokens"] == V
    _, _, b = await post(http, sim + "/v1/responses", {"model": "gpt-5", "input": "hi", "stream": True,
                                                      "max_output_tokens": 1030})
    last_name, last = events(b)[-1]
    assert last_name == "response.incomplete" and last["response"]["usage"]["output_tokens"] == 1030


# -------------------------------------------------------------------------------------------- anthropic
async def test_messages_json_thinking(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"model": "claude-sonnet-4", "max_tokens": 4000, "messages": USER,
            "thinking": {"type": "enabled", "budget_tokens": 2000}}
    _, _, b = await post(http, sim + "/v1/messages", body)
    r = orjson.loads(b)
    thinking = int(2000 * THINKING_BUDGET_FRACTION)
    assert [c["type"] for c in r["content"]] == ["thinking", "text"] and r["stop_reason"] == "end_turn"
    assert r["usage"]["output_tokens"] == thinking + V  # thinking counted inside output_tokens
    assert r["usage"]["output_tokens_details"]["thinking_tokens"] == thinking
    assert r["usage"]["input_tokens"] == 10
    # no thinking for a plain model; the cap gives max_tokens
    body = {"model": "claude-haiku", "max_tokens": 5, "messages": USER}
    _, _, b = await post(http, sim + "/v1/messages", body)
    r = orjson.loads(b)
    assert r["usage"]["output_tokens"] == 5 and r["stop_reason"] == "max_tokens"
    assert [c["type"] for c in r["content"]] == ["text"]


async def test_messages_validation_errors_in_anthropic_shape(sim: str, http: aiohttp.ClientSession) -> None:
    st, _, b = await post(http, sim + "/v1/messages", {"model": "claude", "messages": USER})
    e = orjson.loads(b)
    assert st == 400 and e["type"] == "error" and e["error"]["type"] == "invalid_request_error"
    over = {"model": "claude", "messages": USER, "max_tokens": 1500,
            "thinking": {"type": "enabled", "budget_tokens": 2000}}
    st, _, _ = await post(http, sim + "/v1/messages", over)
    assert st == 400


async def test_messages_stream_cumulative_usage(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"model": "claude-opus-4", "max_tokens": 2048, "messages": USER, "stream": True,
            "thinking": {"type": "enabled", "budget_tokens": 1024}}
    _, _, b = await post(http, sim + "/v1/messages", body)
    evs = events(b)
    names = [n for n, _ in evs]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert evs[0][1]["message"]["usage"]["output_tokens"] == 1
    deltas = [d["delta"]["type"] for n, d in evs if n == "content_block_delta"]
    assert deltas.count("thinking_delta") == 768 and deltas.count("signature_delta") == 1
    assert deltas.count("text_delta") == V
    md = [d for n, d in evs if n == "message_delta"]
    assert len(md) == 1 and md[0]["usage"]["output_tokens"] == 768 + V
    assert md[0]["usage"]["output_tokens_details"]["thinking_tokens"] == 768
    # server tools: message_delta twice in a row, cumulative; the last one is the total
    _, _, b = await post(http, sim + "/v1/messages", body, {"x-sim-server-tools": "1"})
    md = [d for n, d in events(b) if n == "message_delta"]
    assert len(md) == 2 and md[0]["usage"]["output_tokens"] < md[1]["usage"]["output_tokens"] == 768 + V


# ---------------------------------------------------------------------------------------------- gemini
GEM = "/v1beta/models/gemini-2.5-flash:"


async def test_gemini_json_thoughts_outside_candidates(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": USER[0]["content"]}]}],
            "generationConfig": {"candidateCount": 2, "thinkingConfig": {"thinkingBudget": 400}}}
    _, _, b = await post(http, sim + GEM + "generateContent", body)
    r = orjson.loads(b)
    u = r["usageMetadata"]
    assert len(r["candidates"]) == 2 and r["candidates"][1]["finishReason"] == "STOP"
    assert u["candidatesTokenCount"] == 2 * V and u["thoughtsTokenCount"] == 2 * 300
    assert u["totalTokenCount"] == 10 + 2 * V + 600 and u["promptTokenCount"] == 10
    # thinking off; a cap with thoughts counted against it
    off = {**body, "generationConfig": {"thinkingConfig": {"thinkingBudget": 0}}}
    _, _, b = await post(http, sim + GEM + "generateContent", off)
    assert "thoughtsTokenCount" not in orjson.loads(b)["usageMetadata"]
    capped = {**body, "generationConfig": {"maxOutputTokens": 100, "thinkingConfig": {"thinkingBudget": 200}}}
    _, _, b = await post(http, sim + GEM + "generateContent", capped)
    r = orjson.loads(b)
    assert r["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert r["usageMetadata"]["thoughtsTokenCount"] == 100 - V  # the thoughts leave the answer room
    assert r["usageMetadata"]["candidatesTokenCount"] == V
    st, _, b = await post(http, sim + "/v1beta/models/gemini-2.5-flash:bogus", body)
    assert st == 404 and orjson.loads(b)["error"]["status"] == "NOT_FOUND"


async def test_gemini_stream_sse_cumulative(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"contents": [{"parts": [{"text": "hi"}]}],
            "generationConfig": {"thinkingConfig": {"includeThoughts": True, "thinkingLevel": "LOW"}}}
    st, h, b = await post(http, sim + GEM + "streamGenerateContent?alt=sse", body)
    assert st == 200 and h["content-type"].startswith("text/event-stream")
    data = chunks(b)
    assert all("usageMetadata" in d for d in data)
    thoughts = [d for d in data if d["candidates"][0]["content"]["parts"][0].get("thought")]
    assert len(thoughts) == 256
    last = data[-1]
    assert last["candidates"][0]["finishReason"] == "STOP"
    assert last["usageMetadata"]["candidatesTokenCount"] == V
    assert last["usageMetadata"]["thoughtsTokenCount"] == 256
    counts = [d["usageMetadata"]["totalTokenCount"] for d in data]
    assert counts == sorted(counts)  # cumulative


async def test_gemini_stream_json_array(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"candidateCount": 3}}
    st, h, b = await post(http, sim + "/v1beta/models/gemini-1.5-pro:streamGenerateContent", body)
    assert st == 200 and h["content-type"].startswith("application/json")
    arr = orjson.loads(b)
    assert isinstance(arr, list) and len(arr) == V
    assert len(arr[0]["candidates"]) == 3
    assert arr[-1]["usageMetadata"]["candidatesTokenCount"] == 3 * V


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("path", "check"), [
    (CHAT, lambda e: e["error"]["type"] == "invalid_request_error"),
    ("/v1/completions", lambda e: e["error"]["type"] == "invalid_request_error"),
    ("/v1/responses", lambda e: e["error"]["type"] == "invalid_request_error"),
    ("/v1/messages", lambda e: e["type"] == "error" and e["error"]["type"] == "invalid_request_error"),
    (GEM + "generateContent", lambda e: e["error"]["status"] == "INVALID_ARGUMENT"),
])
async def test_bad_json_is_400_in_api_shape(sim: str, http: aiohttp.ClientSession, path: str,
                                            check: Any) -> None:
    st, _, b = await post(http, sim + path, None, raw=b'{"model": ')
    assert st == 400 and check(orjson.loads(b))


async def test_unknown_path_and_bad_values(sim: str, http: aiohttp.ClientSession) -> None:
    st, _, b = await post(http, sim + "/v1/nope", {})
    assert st == 404 and "error" in orjson.loads(b)
    st, _, b = await post(http, sim + CHAT, {"model": "o3", "messages": USER, "reasoning_effort": "huge"})
    assert st == 400 and orjson.loads(b)["error"]["param"] == "reasoning_effort"
    st, _, _ = await post(http, sim + CHAT, {"model": "o3", "messages": USER, "n": 0})
    assert st == 400
    st, _, _ = await post(http, sim + CHAT, {"model": "o3", "messages": USER}, {"x-sim-flavor": "nope"})
    assert st == 400


# ---------------------------------------------------------------------------------------------- faults
def test_parse_fault() -> None:
    f = parse_fault("status=429,rate=0.5")
    assert (f.kind, f.status, f.rate, f.retry_after) == ("status", 429, 0.5, 1.0)
    f = parse_fault("midstream, after=3, path=/v1/messages")
    assert (f.kind, f.after, f.path) == ("midstream", 3, "/v1/messages")
    assert parse_fault("timeout,ms=250").ms == 250
    for bad in ("explode", "status=abc", "rate=2,reset", "reset,rate=1.5", "reset,colour=red", "rate=1"):
        with pytest.raises(ValueError):
            parse_fault(bad)


async def test_fault_status(sim: str, http: aiohttp.ClientSession) -> None:
    st, h, b = await post(http, sim + "/v1/messages", {}, {"x-sim-fault": "status=529"})
    assert st == 529 and orjson.loads(b)["error"]["type"] == "overloaded_error"
    st, h, b = await post(http, sim + CHAT, {}, {"x-sim-fault": "status=429"})
    assert st == 429 and h["Retry-After"] == "1" and orjson.loads(b)["error"]["type"] == "rate_limit_error"
    st, _, b = await post(http, sim + GEM + "generateContent", {}, {"x-sim-fault": "status=500"})
    assert st == 500 and orjson.loads(b)["error"]["status"] == "INTERNAL"
    ok = {"model": "m", "messages": USER}
    st, _, _ = await post(http, sim + CHAT, ok, {"x-sim-fault": "status=500,rate=0"})
    assert st == 200
    st, _, _ = await post(http, sim + CHAT, {"model": "m", "messages": USER}, {"x-sim-fault": "bogus"})
    assert st == 400


async def test_fault_timeout_hangs_up_after_limit(sim: str, http: aiohttp.ClientSession) -> None:
    t0 = time.monotonic()
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, sim + CHAT, {"model": "m", "messages": USER}, {"x-sim-fault": "timeout,ms=200"})
    assert time.monotonic() - t0 >= 0.19


async def test_fault_timeout_never_answers(sim: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
        with pytest.raises(asyncio.TimeoutError):
            await post(s, sim + CHAT, {"model": "m", "messages": USER}, {"x-sim-fault": "timeout"})
    # the simulator notices the client leaving and frees the handler (the fixture's cleanup stays fast)


async def test_fault_reset(sim: str, http: aiohttp.ClientSession) -> None:
    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        await post(http, sim + "/v1/messages", {}, {"x-sim-fault": "reset"})


async def test_fault_midstream(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"model": "m", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(sim + CHAT, json=body, headers={"x-sim-fault": "midstream,after=3"}) as r:
            assert r.status == 200
            async for piece in r.content.iter_any():
                got += piece
    assert len(chunks(got)) == 3 and b"[DONE]" not in got
    # a JSON body is cut short
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(http, sim + "/v1/messages", {"model": "c", "max_tokens": 10, "messages": USER},
                   {"x-sim-fault": "midstream"})


async def test_fault_malformed(sim: str, http: aiohttp.ClientSession) -> None:
    st, _, b = await post(http, sim + CHAT, {"model": "m", "messages": USER}, {"x-sim-fault": "malformed"})
    assert st == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(b)
    body = {"model": "m", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    _, _, b = await post(http, sim + CHAT, body, {"x-sim-fault": "malformed,after=2"})
    evs = events(b)
    assert evs[2] == (None, None)  # the broken line: not JSON
    assert evs[-1] == ("done", None) and evs[-2][1]["usage"]["completion_tokens"] == V  # the stream went on


async def test_server_faults_with_path_and_live_config(http: aiohttp.ClientSession) -> None:
    runner, url = await start_simulator(SimulatorOptions(faults=["status=503,path=/v1/messages"]))
    try:
        st, _, _ = await post(http, url + "/v1/messages", {})
        assert st == 503
        st, _, _ = await post(http, url + CHAT, {"model": "m", "messages": USER})
        assert st == 200
        st, _, _ = await post(http, url + "/v1/messages", {}, {"x-sim-fault": "none"})
        assert st == 400  # the header replaces the server's faults; then the empty body is refused
        async with http.post(url + "/_sim/config", json={"faults": ["status=502"], "output_tokens": 2}) as r:
            assert r.status == 200 and (await r.json())["faults"] == ["status=502"]
        st, _, _ = await post(http, url + CHAT, {"model": "m", "messages": USER})
        assert st == 502
        async with http.post(url + "/_sim/config", json={"faults": ["explode"]}) as r:
            assert r.status == 400
        async with http.get(url + "/_sim/stats") as r:
            assert (await r.json())["faults"] == {"status": 2}
        async with http.post(url + "/_sim/reset") as r:
            assert r.status == 200
        st, _, _ = await post(http, url + CHAT, {"model": "m", "messages": USER})
        assert st == 200
        st, _, _ = await post(http, url + "/v1/messages", {})
        assert st == 503  # the start options are back
    finally:
        await runner.cleanup()


# ----------------------------------------------------------------------------------- stats and timing
async def test_stats_record_what_was_forwarded(sim: str, http: aiohttp.ClientSession) -> None:
    await post(http, sim + CHAT, {"model": "upstream-model", "messages": USER},
               {"Authorization": "Bearer sk-upstream"})
    await post(http, sim + GEM + "generateContent?key=k", {"contents": [{"parts": [{"text": "x"}]}]})
    async with http.get(sim + "/_sim/stats") as r:
        s = await r.json()
    assert s["requests"] == {CHAT: 1, "/v1beta/models/gemini-2.5-flash:generateContent": 1}
    assert s["requests_total"] == 2 and s["tokens"]["visible"] == 2 * V
    first, last = s["recent_requests"]
    assert first["headers"]["authorization"] == "Bearer sk-upstream"
    assert first["body"]["model"] == "upstream-model"
    assert last == s["last_request"] and last["query"] == "key=k"
    async with http.post(sim + "/_sim/reset") as r:
        assert r.status == 200
    async with http.get(sim + "/_sim/stats") as r:
        s = await r.json()
    assert s["requests_total"] == 0 and s["last_request"] is None


async def test_latency_and_token_rate(http: aiohttp.ClientSession) -> None:
    opts = SimulatorOptions(latency_ms=100, tokens_per_second=200, output_tokens=10)
    runner, url = await start_simulator(opts)
    try:
        t0 = time.monotonic()
        async with http.post(url + CHAT, json={"model": "m", "messages": USER, "stream": True}) as r:
            await r.content.readany()
            first = time.monotonic() - t0
            await r.read()
        total = time.monotonic() - t0
        assert 0.09 <= first < 0.5
        assert total >= 0.1 + 10 / 200 - 0.01
        t0 = time.monotonic()
        await post(http, url + CHAT, {"model": "m", "messages": USER})
        assert time.monotonic() - t0 >= 0.1 + 10 / 200 - 0.01  # a JSON answer waits for its tokens too
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------------- official SDKs
async def test_openai_sdk_parses_everything(sim: str) -> None:
    client = AsyncOpenAI(base_url=sim + "/v1", api_key="sk-test", max_retries=0)
    r = await client.chat.completions.create(model="o3", messages=MSGS, n=2,
                                             reasoning_effort="low")
    assert r.usage is not None and r.usage.completion_tokens == 2 * (256 + V)
    assert r.usage.completion_tokens_details is not None
    assert r.usage.completion_tokens_details.reasoning_tokens == 512
    stream = await client.chat.completions.create(model="gpt-4o", messages=MSGS, n=2,
                                                  stream=True, stream_options={"include_usage": True})
    got = [c async for c in stream]
    assert got[-1].usage is not None and got[-1].usage.completion_tokens == 2 * V
    async with client.chat.completions.stream(model="gpt-4o", messages=MSGS,
                                              stream_options={"include_usage": True}) as s:
        final = await s.get_final_completion()
    assert final.choices[0].message.content is not None and len(final.choices[0].message.content.split()) == V
    c = await client.completions.create(model="x", prompt=["a", "b"], n=2, max_tokens=4)
    assert len(c.choices) == 4 and c.usage is not None and c.usage.completion_tokens == 16
    resp = await client.responses.create(model="gpt-5", input="hi", reasoning={"effort": "minimal"})
    assert resp.status == "completed" and len(resp.output_text.split()) == V
    assert resp.usage is not None and resp.usage.output_tokens_details.reasoning_tokens == 64
    async with client.responses.stream(model="gpt-5", input="hi", reasoning={"effort": "minimal"}) as rs:
        fr = await rs.get_final_response()
    assert fr.usage is not None and fr.usage.output_tokens == 64 + V
    # the stream helper only accepts response.completed (openai-python #3538), so read an
    # incomplete stream as raw events
    events_ = [e async for e in await client.responses.create(model="gpt-5", input="hi", stream=True,
                                                              max_output_tokens=1030)]
    assert events_[-1].type == "response.incomplete"
    assert events_[-1].response.usage is not None and events_[-1].response.usage.output_tokens == 1030


async def test_anthropic_sdk_parses_everything(sim: str) -> None:
    client = AsyncAnthropic(base_url=sim, api_key="sk-ant-test", max_retries=0)
    m = await client.messages.create(model="claude-sonnet-4", max_tokens=3000, messages=MSGS,
                                     thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in m.content] == ["thinking", "text"]
    assert m.usage.output_tokens == 768 + V
    async with client.messages.stream(model="claude-sonnet-4", max_tokens=3000, messages=MSGS,
                                      thinking={"type": "enabled", "budget_tokens": 1024},
                                      extra_headers={"x-sim-server-tools": "1"}) as s:
        texts = [t async for t in s.text_stream]
        final = await s.get_final_message()
    assert len(texts) == V and final.usage.output_tokens == 768 + V
    assert final.usage.output_tokens_details is not None
    assert final.usage.output_tokens_details.thinking_tokens == 768
    assert final.content[0].type == "thinking" and len(final.content[0].thinking.split()) == 768
    with pytest.raises(Exception) as err:
        await client.messages.create(model="c", max_tokens=10, messages=MSGS,
                                     extra_headers={"x-sim-fault": "status=429"})
    assert type(err.value).__name__ == "RateLimitError"


# ------------------------------------------------------------------------------------------ the command
def test_run_simulator_serves_and_exits_on_sigterm(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    code = ("import sys; from gateway.simulator.server import run_simulator, SimulatorOptions; "
            f"sys.exit(run_simulator('127.0.0.1:{port}', SimulatorOptions(output_tokens=3)))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        body = b""
        for _ in range(100):
            try:
                import urllib.request

                req = urllib.request.Request(f"http://127.0.0.1:{port}{CHAT}", method="POST",
                                             data=orjson.dumps({"model": "m", "messages": USER}))
                with urllib.request.urlopen(req, timeout=2) as r:
                    body = r.read()
                break
            except OSError:
                time.sleep(0.05)
        assert orjson.loads(body)["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        # the start-up line names the event loop: uvloop, a dependency where it exists
        assert proc.stderr is not None
        started = proc.stderr.read().decode()
        assert f"listening on http://127.0.0.1:{port}" in started
        assert f"event loop {'asyncio' if sys.platform == 'win32' else 'uvloop'}" in started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_simulator_rejects_bad_options() -> None:
    assert run_simulator("nonsense", SimulatorOptions()) == 2
    assert run_simulator("127.0.0.1:0", SimulatorOptions(flavor="bogus")) == 2
    assert run_simulator("127.0.0.1:0", SimulatorOptions(), workers=2) == 2
