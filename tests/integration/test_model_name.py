"""Answers carry the model name the client asked for, not the upstream's (issue 14 item 5); the audit
record keeps the upstream's (``upstream_model``). The test policy maps ``dense`` to ``llama-sim-8b``."""

from __future__ import annotations

import asyncio

import anthropic
import openai
import orjson
from gatewayutil import KEYS, audit_records, make_config, running_gateway

from gateway.engine.model_names import Renamer

MSG = [{"role": "user", "content": "hi"}]


async def test_answers_name_the_public_model_and_the_record_the_upstream_one(tmp_path, redis_url):
    async with running_gateway(make_config(tmp_path, redis_url)) as g:
        oai = openai.AsyncOpenAI(base_url=g.url + "/v1", api_key=KEYS["alice"], max_retries=0)
        done = await oai.chat.completions.create(model="dense", messages=MSG, max_tokens=8)
        assert done.model == "dense"
        stream = await oai.chat.completions.create(model="dense", messages=MSG, max_tokens=8,
                                                   stream=True)
        assert {chunk.model async for chunk in stream} == {"dense"}
        text = await oai.completions.create(model="dense", prompt="hi", max_tokens=8)
        assert text.model == "dense"
        claude = anthropic.AsyncAnthropic(base_url=g.url, api_key=KEYS["alice"], max_retries=0)
        msg = await claude.messages.create(model="dense", max_tokens=8, messages=MSG)
        assert msg.model == "dense"
        async with claude.messages.stream(model="dense", max_tokens=8, messages=MSG) as s:
            final = await s.get_final_message()
        assert final.model == "dense"
        await asyncio.sleep(0.05)
        recs = [r for r in audit_records(g) if r.get("model") == "dense"]
        assert len(recs) == 5 and {r["upstream_model"] for r in recs} == {"llama-sim-8b"}


def test_the_renamer_handles_compact_and_spaced_json_and_leaves_other_text_alone():
    rename = Renamer("llama-sim-8b", 'pub"lic').body
    assert orjson.loads(rename(b'{"model":"llama-sim-8b","x":"llama-sim-8b"}')) == {
        "model": 'pub"lic', "x": "llama-sim-8b"}
    assert orjson.loads(rename(b'{"model": "llama-sim-8b", "modelVersion": "llama-sim-8b"}')) == {
        "model": 'pub"lic', "modelVersion": 'pub"lic'}
    assert rename(b'{"text": "no model here"}') == b'{"text": "no model here"}'


def test_a_stream_settles_on_the_spelling_of_its_first_event_that_names_the_model():
    rename = Renamer("up", "pub").stream()
    assert rename(b'data: {"x": 1}\n\n') == b'data: {"x": 1}\n\n'
    assert rename(b'data: {"model": "up"}\n\n') == b'data: {"model": "pub"}\n\n'
    assert rename(b'data: {"model": "up", "n": 2}\n\n') == b'data: {"model": "pub", "n": 2}\n\n'
