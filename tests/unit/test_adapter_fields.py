"""The request side of the adapters (issue 13): the field tables, the screen, and the cap every forwarded
body carries, without a gateway."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from gateway.adapters import ADAPTERS
from gateway.adapters.fields import TABLES, Screen, check_fields, gated_headers, screen_body, unknown_params
from gateway.engine.compute import admission_bound
from gateway.engine.errors import BadRequest, Forbidden
from gateway.policy.config import ModelConfig, TierConfig

MODEL = ModelConfig(upstream="u", active_params=1e9, max_output_tokens=1024)
MSG = [{"role": "user", "content": "hi"}]


def forwarded(api: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """What write_bound makes of ``body`` (the client's body is checked to be left exactly as it was)."""
    adapter = ADAPTERS[api]
    params = {"model": "m", "method": "generateContent"}
    before = copy.deepcopy(body)
    req = adapter.parse(body, params)
    out = dict(body)
    changes = adapter.write_bound(out, req, admission_bound(req, MODEL))
    assert body == before, "the client's body (nested objects too) must stay as it was sent"
    return out, changes


@pytest.mark.parametrize(("api", "body", "expect", "changes"), [
    ("openai.chat", {"model": "m", "messages": MSG}, {"max_completion_tokens": 1024}, []),
    ("openai.chat", {"model": "m", "messages": MSG, "max_tokens": 5000, "n": 2.0},
     {"max_tokens": 1024, "max_completion_tokens": 1024, "n": 2}, ["max_tokens=1024"]),
    ("openai.chat", {"model": "m", "messages": MSG, "max_completion_tokens": 10, "max_tokens": None},
     {"max_completion_tokens": 10, "max_tokens": None}, []),
    ("openai.completions", {"model": "m", "prompt": "x", "best_of": 3.0}, {"max_tokens": 16, "best_of": 3}, []),
    ("openai.responses", {"model": "m", "input": "x", "max_output_tokens": 9999},
     {"max_output_tokens": 1024}, ["max_output_tokens=1024"]),
    ("anthropic.messages", {"model": "m", "messages": MSG, "max_tokens": 3000.0,
                            "thinking": {"type": "enabled", "budget_tokens": 2000.0}},
     {"max_tokens": 1024, "thinking": {"type": "disabled"}}, ["max_tokens=1024", "thinking=disabled"]),
    ("gemini", {"contents": [], "generation_config": {"candidate_count": 2.0,
                                                       "thinking_config": {"thinking_budget": 8.0}}},
     {"generation_config": {"candidate_count": 2, "max_output_tokens": 1024,
                            "thinking_config": {"thinking_budget": 8}}}, []),
])
def test_write_bound_writes_the_cap_and_integers_without_touching_the_client_body(
        api: str, body: dict[str, Any], expect: dict[str, Any], changes: list[str]) -> None:
    out, got = forwarded(api, body)
    for key, value in expect.items():
        assert out[key] == value and type(out[key]) is type(value), (key, out[key])
    assert got == changes
    orjson.dumps(out)  # still JSON


def test_responses_cannot_carry_a_cap_below_its_minimum() -> None:
    small = ModelConfig(upstream="u", active_params=1e9, max_output_tokens=8)
    req = ADAPTERS["openai.responses"].parse({"model": "m", "input": "x"}, {})
    with pytest.raises(BadRequest) as info:
        ADAPTERS["openai.responses"].write_bound({}, req, admission_bound(req, small))
    assert info.value.param == "max_output_tokens"


def test_chat_reads_sglang_nested_effort_and_the_larger_of_two() -> None:
    chat = ADAPTERS["openai.chat"]
    assert chat.parse({"model": "m", "messages": MSG, "reasoning": {"effort": "high"}}, {}).effort == "high"
    both = {"model": "m", "messages": MSG, "reasoning": {"effort": "high"}, "reasoning_effort": "low"}
    assert chat.parse(both, {}).effort == "high"
    with pytest.raises(BadRequest) as info:
        chat.parse({"model": "m", "messages": MSG, "reasoning": {"effort": "huge"}}, {})
    assert info.value.param == "reasoning.effort"


def test_completions_count_prompt_embeds_as_prompts() -> None:
    comp = ADAPTERS["openai.completions"]
    assert comp.parse({"model": "m", "prompt": "x", "prompt_embeds": ["a", "b"], "n": 2}, {}).samples == 6
    assert comp.parse({"model": "m", "prompt_embeds": "a"}, {}).samples == 1
    with pytest.raises(BadRequest):
        comp.parse({"model": "m", "prompt": "x", "prompt_embeds": [1]}, {})


def test_the_tables_are_disjoint() -> None:
    """Each field has one class; prompt_embeds is metered but passes only when a tier names it."""
    assert "prompt_embeds" not in TABLES["openai.completions"].known
    for api, table in TABLES.items():
        assert not table.compute & table.harmless, api
        assert not table.context & (table.compute | table.harmless), api


def test_screen_finds_unknown_fields_and_provider_context() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "HTTPS://x/y.png"}},
        {"type": "file", "file": {"file_id": "file-1"}}]}], "priority": 1, "temperature": 0}
    assert screen_body("openai.chat", body) == Screen(
        ("priority",), ("messages[0].content[1].image_url", "messages[0].content[2].file.file_id"))
    gem = {"contents": [], "generation_config": {"routing_config": {}, "thinking_config": {"x": 1}},
           "cached_content": "c/1", "system_instruction": {}}
    assert screen_body("gemini", gem) == Screen(
        ("generation_config.routing_config", "generation_config.thinking_config.x"), ("cached_content",))
    assert screen_body("openai.responses", {"model": "m", "input": [{"type": "item_reference", "id": "i"}]}
                       ).context == ("input[0]",)
    with pytest.raises(BadRequest):
        screen_body("openai.responses", {"model": "m", "input": "x", "background": True})


def test_query_parameters_and_beta_headers() -> None:
    assert unknown_params("gemini", "alt=sse&key=k&%24key=k&prettyPrint=false&x=1") == ["x"]
    for q in ("fields=a", "$fields=a", "alt=proto", "%24alt=media", "callback=f"):
        with pytest.raises(BadRequest):
            unknown_params("gemini", q)
    assert unknown_params("openai.chat", "api-version=1&fields=a") == ["fields"]
    assert gated_headers({"anthropic-beta": "a, b", "openai-beta": "assistants=v2"}) == [
        "anthropic-beta=a", "anthropic-beta=b", "openai-beta=assistants=v2"]


def test_check_fields_applies_the_tier_policy() -> None:
    screen = Screen(("priority",), ("previous_response_id",))
    with pytest.raises(BadRequest) as bad:
        check_fields("openai.responses", screen, TierConfig(), "", {})
    assert bad.value.param == "priority"
    allowed = TierConfig(allow_fields=["priority"], allow_provider_context=False)
    with pytest.raises(Forbidden) as forbidden:
        check_fields("openai.responses", screen, allowed, "", {})
    assert forbidden.value.param == "previous_response_id"
    shadow = check_fields("openai.responses", screen, TierConfig(mode="shadow"), "", {})
    assert shadow is not None and shadow.rule == "unknown_field"
    assert check_fields("openai.responses", screen, TierConfig(unknown_fields="forward"), "", {}) is None
