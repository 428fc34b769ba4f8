"""Issue 13, the request side: what kgate forwards is what its bound assumed (items 3, 4, 6, 10).

Every test runs the real gateway against a recording upstream that, like a provider ignoring every claim,
spends the whole output cap it was sent (and 30,000 tokens per sample when it was sent none), then asserts
on what was forwarded, what was refused (in the API's own error shape, naming the field), and what was
charged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from gatewayutil import KEYS, audit_records, running_gateway
from recording_upstream import RecordingUpstream, config_with_upstream, spend_cap

MSG = [{"role": "user", "content": "hi"}]
ALICE = {"Authorization": f"Bearer {KEYS['alice']}"}  # tier basic: reject over caps, efforts up to high
VERA = {"Authorization": f"Bearer {KEYS['vera']}", "x-api-key": KEYS["vera"]}  # tier vetted: K up to 1024
CLAMPED = "x-kgate-clamped"


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as s, s.post(url, data=orjson.dumps(body),
                                                     headers={**ALICE, **(headers or {})}) as r:
        raw = await r.read()
        return r.status, dict(r.headers), orjson.loads(raw) if raw else None


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    return audit_records(tmp_path / "data" / "audit")


def gemini_error(doc: Any) -> str:
    assert set(doc["error"]) == {"code", "message", "status"}, doc
    return str(doc["error"]["message"])


# ------------------------------------------------------------------------- item 3: the cap always goes
async def test_chat_without_a_cap_is_forwarded_with_the_model_cap(redis_url: str, tmp_path: Path) -> None:
    """No max_tokens: the provider would generate 30,000 where the bound assumed the model's 1,024."""
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=KEYS["alice"], max_retries=0)
            raw = await client.chat.completions.with_raw_response.create(model="dense", messages=MSG)
            assert CLAMPED not in raw.headers  # a routine write, not a clamp
            reply = raw.parse()
    sent = up.requests[-1].body
    assert sent["max_completion_tokens"] == 1024 and "max_tokens" not in sent
    assert reply.usage is not None and reply.usage.completion_tokens == 1024
    (rec,) = audit(tmp_path)
    assert rec["usage"]["generated_tokens"] <= rec["bound"]["generated_tokens_max"] == 1024
    assert rec["decision"] == "allowed" and rec["clamped"] == []


async def test_chat_cap_above_the_model_max_is_lowered_in_every_cap_field(redis_url: str, tmp_path: Path) -> None:
    """max_tokens 30,000 on a 1,024-token model: both fields carry 1,024 (SGLang reads one, vLLM the other)."""
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            status, headers, _ = await post(g.url + "/v1/chat/completions",
                                            {"model": "dense", "messages": MSG, "max_tokens": 30000})
    assert status == 200
    sent = up.requests[-1].body
    assert (sent["max_tokens"], sent["max_completion_tokens"]) == (1024, 1024)
    assert headers[CLAMPED] == "max_tokens=1024"
    (rec,) = audit(tmp_path)
    assert rec["decision"] == "clamped" and rec["usage"]["generated_tokens"] == 1024


@pytest.mark.parametrize(("path", "body", "field", "cap"), [
    ("/v1/completions", {"model": "dense", "prompt": "hi"}, ("max_tokens",), 16),  # the API's default
    ("/v1/completions", {"model": "dense", "prompt": "hi", "max_tokens": 30000}, ("max_tokens",), 1024),
    ("/v1/responses", {"model": "dense", "input": "hi"}, ("max_output_tokens",), 1024),
    ("/v1/messages", {"model": "reasoner", "max_tokens": 30000, "messages": MSG}, ("max_tokens",), 8192),
    ("/v1beta/models/dense:generateContent", {"contents": [{"parts": [{"text": "hi"}]}]},
     ("generationConfig", "maxOutputTokens"), 1024),
    ("/v1beta/models/dense:generateContent",
     {"contents": [{"parts": [{"text": "hi"}]}], "generation_config": {"max_output_tokens": 30000, "seed": 1}},
     ("generation_config", "max_output_tokens"), 1024),
])
async def test_every_api_forwards_the_cap_the_bound_assumed(redis_url: str, tmp_path: Path, path: str,
                                                            body: dict[str, Any], field: tuple[str, ...],
                                                            cap: int) -> None:
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            status, _, reply = await post(g.url + path, body, {"x-goog-api-key": KEYS["alice"], **VERA})
    assert status == 200, reply
    value: Any = up.requests[-1].body
    for key in field:
        value = value[key]
    assert value == cap
    (rec,) = audit(tmp_path)
    assert rec["bound"]["output_cap"] == cap
    assert rec["usage"]["generated_tokens"] <= rec["bound"]["generated_tokens_max"]


async def test_anthropic_thinking_budget_follows_a_lowered_cap(redis_url: str, tmp_path: Path) -> None:
    """max_tokens 30,000 with budget_tokens 20,000 on an 8,192 model: the budget must stay below the cap
    (Anthropic refuses budget_tokens >= max_tokens)."""
    body = {"model": "reasoner", "max_tokens": 30000, "messages": MSG,
            "thinking": {"type": "enabled", "budget_tokens": 20000}}
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            status, headers, _ = await post(g.url + "/v1/messages", body, VERA)
    assert status == 200
    sent = up.requests[-1].body
    assert sent["max_tokens"] == 8192 and sent["thinking"] == {"type": "enabled", "budget_tokens": 8191}
    assert headers[CLAMPED] == "max_tokens=8192, thinking.budget_tokens=8191"


# ------------------------------------------------------------------------------- item 10: integers
async def test_integral_floats_are_forwarded_as_integers(redis_url: str, tmp_path: Path) -> None:
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            status, _, _ = await post(g.url + "/v1/chat/completions",
                                      {"model": "dense", "messages": MSG, "n": 2.0, "max_tokens": 8.0})
            assert status == 200
            status, _, _ = await post(g.url + "/v1beta/models/dense:generateContent",
                                      {"contents": [{"parts": [{"text": "hi"}]}],
                                       "generationConfig": {"candidateCount": 2.0}},
                                      {"x-goog-api-key": KEYS["alice"]})
            assert status == 200
    chat, gemini = (r.body for r in up.requests)
    assert type(chat["n"]) is int and chat["n"] == 2 and type(chat["max_tokens"]) is int
    assert type(gemini["generationConfig"]["candidateCount"]) is int
    assert b'"n":2,' in up.requests[0].raw or b'"n":2}' in up.requests[0].raw


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": "dense", "prompt": "hi", "best_of": 129, "max_tokens": 1}, "best_of"),
    ("/v1/chat/completions", {"model": "dense", "messages": MSG, "best_of": 10**6, "max_tokens": 1}, "best_of"),
])
async def test_best_of_has_an_upper_limit(redis_url: str, tmp_path: Path, path: str, body: dict[str, Any],
                                          param: str) -> None:
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url, basic={"max_samples": None})) as g:
            status, _, reply = await post(g.url + path, body)
    assert status == 400 and reply["error"]["param"] == param and "at most 128" in reply["error"]["message"]
    assert up.requests == []


async def test_candidate_count_has_an_upper_limit(redis_url: str, tmp_path: Path) -> None:
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            status, _, reply = await post(g.url + "/v1beta/models/dense:generateContent",
                                          {"contents": [], "generationConfig": {"candidateCount": 9}},
                                          {"x-goog-api-key": KEYS["alice"]})
    assert status == 400 and "candidateCount" in gemini_error(reply)
    assert up.requests == []


# ------------------------------------------------------------------- item 4: fields that change compute
@pytest.mark.parametrize("query", ["fields=candidates", "%24fields=candidates", "alt=proto", "$alt=media"])
async def test_gemini_parameters_that_hide_usage_are_refused(redis_url: str, tmp_path: Path, query: str) -> None:
    """``fields`` drops usageMetadata, ``alt=proto`` re-encodes it: refused in every mode, naming it."""
    async with RecordingUpstream(spend_cap()) as up:
        cfg = config_with_upstream(tmp_path, redis_url, up.url, basic={"unknown_fields": "forward"})
        async with running_gateway(cfg) as g:
            status, _, reply = await post(g.url + f"/v1beta/models/dense:generateContent?{query}",
                                          {"contents": [{"parts": [{"text": "hi"}]}]},
                                          {"x-goog-api-key": KEYS["alice"]})
    assert status == 400, reply
    assert ("fields" if "fields" in query else "alt") in gemini_error(reply)
    assert up.requests == []


async def test_responses_background_is_refused(redis_url: str, tmp_path: Path) -> None:
    """The answer of a background response arrives through another call: it would settle at zero."""
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            client = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=KEYS["alice"], max_retries=0)
            with pytest.raises(openai.BadRequestError) as info:
                await client.responses.create(model="dense", input="hi", background=True)
            status, _, _ = await post(g.url + "/v1/responses", {"model": "dense", "input": "hi", "background": False})
    assert info.value.param == "background" and "background" in info.value.message
    assert status == 200 and len(up.requests) == 1


async def test_prompt_embeds_are_refused_unless_allowed_and_then_counted(redis_url: str, tmp_path: Path) -> None:
    """vLLM ``prompt_embeds`` beside ``prompt`` is one more prompt: more samples than ``prompt`` says."""
    body = {"model": "dense", "prompt": "hi", "prompt_embeds": "AAAA", "max_tokens": 8}
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            status, _, reply = await post(g.url + "/v1/completions", body)
        assert status == 400 and reply["error"]["param"] == "prompt_embeds"
        assert "prompt_embeds" in reply["error"]["message"] and up.requests == []
        cfg = config_with_upstream(tmp_path, redis_url, up.url, basic={"allow_fields": ["prompt_embeds"]})
        async with running_gateway(cfg) as g:
            status, headers, reply = await post(g.url + "/v1/completions", body)
    assert status == 200, reply
    assert float(headers["x-kgate-k-max"]) == 2.0  # two prompts, one sample each
    assert up.requests[-1].body["prompt_embeds"] == "AAAA"


async def test_sglang_nested_reasoning_effort_is_checked_against_the_tier(redis_url: str, tmp_path: Path) -> None:
    body = {"model": "reasoner", "messages": MSG, "max_tokens": 64, "reasoning": {"effort": "high"}}
    async with RecordingUpstream(spend_cap()) as up:
        cfg = config_with_upstream(tmp_path, redis_url, up.url, basic={"efforts": ["none", "low"]})
        async with running_gateway(cfg) as g:
            status, _, reply = await post(g.url + "/v1/chat/completions", body)
            assert status == 403 and "high" in reply["error"]["message"], reply
            status, _, reply = await post(g.url + "/v1/chat/completions", {**body, "reasoning": {"effort": "low"}})
            assert status == 200, reply
            # Given both spellings, the larger one is checked (a server reads one or the other).
            status, _, _ = await post(g.url + "/v1/chat/completions", {**body, "reasoning_effort": "low"})
            assert status == 403
    assert len(up.requests) == 1


@pytest.mark.parametrize(("field", "value"), [("priority", -100), ("lora_path", "big-adapter"),
                                              ("kv_transfer_params", {"x": 1})])
async def test_unknown_fields_are_refused_by_default(redis_url: str, tmp_path: Path, field: str, value: Any) -> None:
    body = {"model": "dense", "messages": MSG, "max_tokens": 8, field: value}
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            status, _, reply = await post(g.url + "/v1/chat/completions", body)
            assert status == 400 and reply["error"]["param"] == field and field in reply["error"]["message"]
            assert reply["error"]["code"] == "unknown_field" and up.requests == []
        cfg = config_with_upstream(tmp_path, redis_url, up.url, basic={"allow_fields": [field]})
        async with running_gateway(cfg) as g:
            status, _, _ = await post(g.url + "/v1/chat/completions", body)
            assert status == 200 and up.requests[-1].body[field] == value
        cfg = config_with_upstream(tmp_path, redis_url, up.url, basic={"unknown_fields": "forward"})
        async with running_gateway(cfg) as g:
            status, _, _ = await post(g.url + "/v1/chat/completions", body)
            assert status == 200 and len(up.requests) == 2


async def test_shadow_mode_forwards_unknown_fields_and_records_would_deny(redis_url: str, tmp_path: Path) -> None:
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            status, _, _ = await post(g.url + "/v1/chat/completions",
                                      {"model": "dense", "messages": MSG, "max_tokens": 8, "priority": -5},
                                      {"Authorization": f"Bearer {KEYS['sam']}"})
    assert status == 200 and up.requests[-1].body["priority"] == -5
    (rec,) = audit(tmp_path)
    assert rec["would_deny"] is True and rec["rule"] == "unknown_field" and "priority" in rec["reason"]


async def test_beta_headers_need_the_tier_to_allow_them(redis_url: str, tmp_path: Path) -> None:
    body = {"model": "dense", "max_tokens": 8, "messages": MSG}
    beta = {"x-api-key": KEYS["alice"], "anthropic-beta": "files-api-2025-04-14"}
    async with RecordingUpstream(spend_cap()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            # The real SDK's request (anthropic-version, x-stainless-* headers, common fields) passes ...
            client = anthropic.AsyncAnthropic(base_url=g.url, api_key=KEYS["alice"], max_retries=0)
            reply = await client.messages.create(model="dense", max_tokens=8, messages=MSG,  # type: ignore[arg-type]
                                                 system="be brief", metadata={"user_id": "u1"},
                                                 stop_sequences=["x"], cache_control={"type": "ephemeral"})
            assert reply.usage.output_tokens == 8 and up.requests.pop().body["system"] == "be brief"
            # ... a beta header does not.
            status, _, reply = await post(g.url + "/v1/messages", body, beta)
            assert status == 400 and reply["type"] == "error" and "anthropic-beta" in reply["error"]["message"]
            assert up.requests == []
        cfg = config_with_upstream(tmp_path, redis_url, up.url,
                                   basic={"allow_fields": ["anthropic-beta=files-api-2025-04-14"]})
        async with running_gateway(cfg) as g:
            status, _, _ = await post(g.url + "/v1/messages", body, beta)
            assert status == 200 and up.requests[-1].headers["anthropic-beta"] == "files-api-2025-04-14"
            other = {**beta, "anthropic-beta": "files-api-2025-04-14,context-1m-2025-08-07"}
            status, _, reply = await post(g.url + "/v1/messages", body, other)
            assert status == 400 and "context-1m-2025-08-07" in reply["error"]["message"]
        cfg = config_with_upstream(tmp_path, redis_url, up.url, basic={"allow_fields": ["anthropic-beta"]})
        async with running_gateway(cfg) as g:
            status, _, _ = await post(g.url + "/v1/messages", body, other)
            assert status == 200
    assert len(up.requests) == 2


# ------------------------------------------------------------------------- item 6: provider context
CONTEXT_CASES = [
    ("/v1/chat/completions", {"model": "dense", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "https://example.com/huge.png"}}]}]},
     "messages[0].content[1].image_url"),
    ("/v1/responses", {"model": "dense", "input": "go on", "previous_response_id": "resp_123",
                       "max_output_tokens": 16}, "previous_response_id"),
    ("/v1/responses", {"model": "dense", "max_output_tokens": 16, "input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file-abc"}]}]}, "input[0].content[0].file_id"),
    ("/v1/messages", {"model": "dense", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "file_01"}}]}]}, "messages[0].content[0].source"),
    ("/v1beta/models/dense:generateContent", {"contents": [{"parts": [{"text": "hi"}]}],
                                              "cachedContent": "cachedContents/abc"}, "cachedContent"),
    ("/v1beta/models/dense:generateContent", {"contents": [{"parts": [
        {"fileData": {"fileUri": "https://generativelanguage.googleapis.com/v1beta/files/x"}}]}]},
     "contents[0].parts[0].fileData"),
]


@pytest.mark.parametrize(("path", "body", "field"), CONTEXT_CASES)
async def test_provider_context_is_refused_when_the_tier_disallows_it(redis_url: str, tmp_path: Path, path: str,
                                                                      body: dict[str, Any], field: str) -> None:
    headers = {"x-api-key": KEYS["alice"], "x-goog-api-key": KEYS["alice"]}
    async with RecordingUpstream(spend_cap()) as up:
        cfg = config_with_upstream(tmp_path, redis_url, up.url, basic={"allow_provider_context": False})
        async with running_gateway(cfg) as g:
            status, _, reply = await post(g.url + path, body, headers)
        assert status == 403, reply
        message = gemini_error(reply) if path.startswith("/v1beta") else reply["error"]["message"]
        assert field in message
        if path.startswith("/v1/") and not path.startswith("/v1/messages"):
            assert reply["error"]["param"] == field
        assert up.requests == []
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:  # the default: allowed
            status, _, reply = await post(g.url + path, body, headers)
        assert status == 200, reply


async def test_provider_context_is_priced_into_the_prompt_estimate(redis_url: str, tmp_path: Path) -> None:
    """100,000 prompt tokens per reference: max_flops sees them before the request is sent."""
    body = {"model": "dense", "input": "go on", "previous_response_id": "resp_123", "max_output_tokens": 16}
    async with RecordingUpstream(spend_cap()) as up:
        cfg = config_with_upstream(tmp_path, redis_url, up.url, basic={"max_flops": 1e13},
                                   models={"dense": {"provider_context_prompt_tokens": 100_000}})
        async with running_gateway(cfg) as g:
            status, _, reply = await post(g.url + "/v1/responses", body)
            assert status == 403 and "flops" in reply["error"]["message"].lower(), reply
            del body["previous_response_id"]
            status, _, _ = await post(g.url + "/v1/responses", body)
            assert status == 200
    prompts = [r["bound"]["prompt_tokens"] for r in audit(tmp_path)]
    assert prompts[0] > 100_000 > prompts[1]
    assert len(up.requests) == 1
