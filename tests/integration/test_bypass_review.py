"""Issue 13, reviewed as an attacker: ways around the limit that the first pass left open.

Each test failed on the code it was written against (see docs/threat-model.md, the rows that name this
file) and runs the real gateway against a recording upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from gatewayutil import KEYS, running_gateway
from recording_upstream import Recorded, RecordingUpstream, config_with_upstream, json_answer, spend_cap

MSG = [{"role": "user", "content": "hi"}]
ALICE = {"Authorization": f"Bearer {KEYS['alice']}", "x-api-key": KEYS["alice"],
         "x-goog-api-key": KEYS["alice"]}  # tier basic: reject over caps
CAROL = {"Authorization": f"Bearer {KEYS['carol']}"}  # tier clamp: efforts up to medium


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as s, s.post(url, data=orjson.dumps(body), headers=headers or ALICE) as r:
        raw = await r.read()
        try:
            doc = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            doc = raw
        return r.status, dict(r.headers), doc


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for f in sorted((tmp_path / "data" / "audit").rglob("*.jsonl"))
            for line in f.read_bytes().splitlines()]


# ------------------------------------------------------- an answer kgate cannot read is still work done
def sse_for_a_unary_call() -> Any:
    """A provider that answers ``generateContent?alt=sse`` (or an ``Accept`` it was forwarded) in SSE: the
    whole answer, its usage inside, but not the JSON body kgate's JSON path reads."""

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        doc = json_answer("gemini", "m", 10, 900, 124)
        return web.Response(body=b"data: " + orjson.dumps(doc) + b"\r\n\r\n", content_type="text/event-stream")

    return answer


async def test_a_2xx_answer_kgate_cannot_parse_is_charged_its_bound(redis_url: str, tmp_path: Path) -> None:
    """The provider generated (and billed) the answer; kgate could not read it and answered 502. It used to
    release the hold — so every request shaped to produce an unreadable answer was free compute."""
    body = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 1024}}
    async with RecordingUpstream(sse_for_a_unary_call()) as up:
        async with running_gateway(config_with_upstream(tmp_path, redis_url, up.url)) as g:
            status, _, reply = await post(g.url + "/v1beta/models/reasoner:generateContent?alt=sse", body)
    assert status == 502, reply
    assert up.requests[-1].query.get("alt") == "sse"
    (rec,) = audit(tmp_path)
    assert rec["usage"] is not None, rec
    assert rec["usage"]["source"] == "bound"
    assert rec["usage"]["generated_tokens"] == rec["bound"]["generated_tokens_max"] == 1024
    assert rec["decision"] == "partial" and "admission bound" in rec["reason"]


# ------------------------------------------------------ server-side tools bring provider-held context
SERVER_TOOL_CASES = [
    ("/v1/responses", {"model": "dense", "input": "what is new", "max_output_tokens": 16,
                       "tools": [{"type": "function", "name": "f", "parameters": {}}, {"type": "web_search"}]},
     "tools[1]"),
    ("/v1/responses", {"model": "dense", "input": "summarise my files", "max_output_tokens": 16,
                       "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0]"),
    ("/v1/messages", {"model": "dense", "max_tokens": 8, "messages": MSG,
                      "tools": [{"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 50}]}, "tools[0]"),
    ("/v1beta/models/dense:generateContent", {"contents": [{"parts": [{"text": "read https://example.com"}]}],
                                              "tools": [{"urlContext": {}}]}, "tools[0].urlContext"),
    ("/v1beta/models/dense:generateContent", {"contents": [{"parts": [{"text": "news?"}]}],
                                              "tools": [{"google_search": {}}]}, "tools[0].google_search"),
]


@pytest.mark.parametrize(("path", "body", "field"), SERVER_TOOL_CASES)
async def test_server_side_tools_are_provider_context(redis_url: str, tmp_path: Path, path: str,
                                                      body: dict[str, Any], field: str) -> None:
    """A tool the provider runs itself (a web search, a page fetch, a vector store) adds to the prompt what
    the body's size cannot show, like ``web_search_options`` in Chat (already context): a tier that refuses
    provider-held context must refuse it too, and a model's ``provider_context_prompt_tokens`` price it."""
    async with RecordingUpstream(spend_cap()) as up:
        cfg = config_with_upstream(tmp_path, redis_url, up.url, basic={"allow_provider_context": False})
        async with running_gateway(cfg) as g:
            status, _, reply = await post(g.url + path, body)
            assert status == 403, reply
            assert field in orjson.dumps(reply).decode()
            assert up.requests == []
            # Tools the client runs (functions) are not context.
            client_tools: dict[str, Any] = {
                "/v1/responses": {"tools": [{"type": "function", "name": "f", "parameters": {}}]},
                "/v1/messages": {"tools": [{"name": "f", "input_schema": {"type": "object"}},
                                           {"type": "bash_20250124", "name": "bash"}]},
            }.get(path, {"tools": [{"functionDeclarations": [{"name": "f"}]}]})
            status, _, reply = await post(g.url + path, {**body, **client_tools})
            assert status == 200, reply
        cfg = config_with_upstream(tmp_path, redis_url, up.url,
                                   models={"dense": {"provider_context_prompt_tokens": 50_000}})
        async with running_gateway(cfg) as g:  # the default tier allows it, priced into the prompt estimate
            status, _, reply = await post(g.url + path, body)
            assert status == 200, reply
    assert audit(tmp_path)[-1]["bound"]["prompt_tokens"] > 50_000


# ----------------------------------------------- the effort a chat template reads is checked like the rest
async def test_chat_template_kwargs_reasoning_effort_is_checked_against_the_tier(redis_url: str,
                                                                                 tmp_path: Path) -> None:
    """vLLM (``build_chat_params``), SGLang and llama.cpp hand the effort to the chat template as
    ``chat_template_kwargs.reasoning_effort``; sent there directly it bypassed the tier's ``efforts``."""
    body = {"model": "reasoner", "messages": MSG, "max_tokens": 64,
            "chat_template_kwargs": {"reasoning_effort": "high"}}
    async with RecordingUpstream(spend_cap()) as up:
        cfg = config_with_upstream(tmp_path, redis_url, up.url, basic={"efforts": ["none", "low"]})
        async with running_gateway(cfg) as g:
            status, _, reply = await post(g.url + "/v1/chat/completions", body)
            assert status == 403 and "high" in reply["error"]["message"], reply
            assert up.requests == []
            ok = {**body, "chat_template_kwargs": {"reasoning_effort": "low", "enable_thinking": True}}
            status, _, reply = await post(g.url + "/v1/chat/completions", ok)
            assert status == 200, reply
            # Given several spellings, the largest is checked (a server reads one or another).
            status, _, _ = await post(g.url + "/v1/chat/completions", {**body, "reasoning_effort": "low"})
            assert status == 403
            # A clamp tier lowers it where the template reads it.
            status, headers, reply = await post(g.url + "/v1/chat/completions", body, CAROL)
            assert status == 200, reply
    sent = up.requests[-1].body
    assert sent["chat_template_kwargs"]["reasoning_effort"] == "medium"
    assert "chat_template_kwargs.reasoning_effort=medium" in headers["x-kgate-clamped"]
