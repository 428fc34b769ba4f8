"""`kgate estimate` and `kgate meter` (docs/design.md §9): one JSON object on stdout; exit 2 and one line on bad input.

Run as a user would: `python -m gateway ...` in a subprocess, on the example policy and on recorded
payloads that kgate did not write (see tests/payloads/*/README.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "policies" / "example.yaml"
PAYLOADS = Path(__file__).parents[1] / "payloads"
ESTIMATE_KEYS = {"samples", "prompt_tokens", "output_cap", "reasoning_budget", "generated_tokens_max", "k_max",
                 "flops_max", "model", "api"}
M = [{"role": "user", "content": "hello"}]
METER_KEYS = {"samples", "prompt_tokens", "reasoning_tokens", "output_tokens", "generated_tokens", "k", "flops",
              "source", "model", "api"}


def kgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def write(tmp: Path, name: str, obj: object) -> str:
    p = tmp / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def estimate(tmp: Path, path: str, body: object) -> dict:
    r = kgate("estimate", "--config", str(POLICY), "--path", path, "--body", write(tmp, "req.json", body))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == ESTIMATE_KEYS
    return out


def meter(tmp: Path, path: str, body: object, response: Path | str) -> dict:
    resp = str(response) if isinstance(response, Path) else write(tmp, "resp.txt", response)
    r = kgate("meter", "--config", str(POLICY), "--path", path, "--body", write(tmp, "req.json", body),
              "--response", resp)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == METER_KEYS
    return out


# --------------------------------------------------------------------------------------------- estimate
def test_estimate_best_of_n_on_a_dense_model(tmp_path):
    body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}], "n": 8, "max_tokens": 300}
    out = estimate(tmp_path, "/v1/chat/completions", body)
    assert out["samples"] == 8 and out["output_cap"] == 300 and out["reasoning_budget"] == 0
    assert out["k_max"] == 8 and out["generated_tokens_max"] == 2400
    raw = len(json.dumps(body).encode())
    assert out["prompt_tokens"] == math.ceil(raw / 3)
    # 2·N·(P + G) + attention (n_layers 32, d_attn 4096)
    p, g, s, nd = out["prompt_tokens"], 2400, 8, 32 * 4096
    expected = 2 * 8e9 * (p + g) + nd * p * p + s * 2 * nd * (p * 300 + 300 * 300 / 2)
    assert out["flops_max"] == pytest.approx(expected)
    assert out["model"] == "llama-3.1-8b" and out["api"] == "openai.chat"


def test_estimate_reasoning_model_bounds(tmp_path):
    body = {"model": "reasoner-32b", "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 9216, "reasoning_effort": "high"}
    out = estimate(tmp_path, "/v1/chat/completions", body)
    assert out["reasoning_budget"] == 9216 and out["k_max"] == pytest.approx(1 + 9216 / 1024)


def test_estimate_anthropic_thinking_and_disabled(tmp_path):
    body = {"model": "reasoner-32b", "max_tokens": 8000, "messages": [{"role": "user", "content": "x"}],
            "thinking": {"type": "enabled", "budget_tokens": 2048}}
    assert estimate(tmp_path, "/v1/messages", body)["k_max"] == pytest.approx(3.0)
    body["thinking"] = {"type": "disabled"}  # a claim a model may ignore: the cap (8000) bounds reasoning
    assert estimate(tmp_path, "/v1/messages", body)["k_max"] == pytest.approx(1 + 8000 / 1024)


def test_estimate_gemini_candidates_and_budget(tmp_path):
    body = {"contents": [{"parts": [{"text": "x"}]}],
            "generationConfig": {"candidateCount": 3, "maxOutputTokens": 4096,
                                 "thinkingConfig": {"thinkingBudget": 1024}}}
    out = estimate(tmp_path, "/v1beta/models/deepseek-r1-moe:generateContent", body)
    # thinkingBudget is a guide the model may overshoot: maxOutputTokens bounds the thoughts.
    assert out["samples"] == 3 and out["reasoning_budget"] == 4096
    assert out["k_max"] == pytest.approx(3 * (1 + 4096 / 1024))
    assert out["api"] == "gemini"


def test_estimate_legacy_completions_list_prompt_best_of(tmp_path):
    body = {"model": "llama-3.1-8b", "prompt": ["a", "b", "c"], "n": 2, "best_of": 4}
    out = estimate(tmp_path, "/v1/completions", body)
    assert out["samples"] == 12 and out["output_cap"] == 16  # the API's default max_tokens


# ----------------------------------------------------------------------------------------------- meter
def test_meter_json_with_reasoning(tmp_path):
    body = {"model": "reasoner-32b", "messages": [{"role": "user", "content": "x"}], "n": 2}
    resp = {"id": "x", "object": "chat.completion", "choices": [{"index": 0}, {"index": 1}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 9000,
                      "completion_tokens_details": {"reasoning_tokens": 7000}}}
    out = meter(tmp_path, "/v1/chat/completions", body, json.dumps(resp))
    assert out["reasoning_tokens"] == 7000 and out["output_tokens"] == 2000 and out["generated_tokens"] == 9000
    assert out["k"] == pytest.approx(9000 / max(2000 / 2, 1024))
    assert out["source"] == "upstream"


@pytest.mark.parametrize("path,body,payload,expect", [
    ("/v1/chat/completions", {"model": "reasoner-32b", "messages": M}, "openai/openai_chat_o3mini.json",
     {"reasoning_tokens": 64, "source": "upstream"}),
    ("/v1/chat/completions", {"model": "deepseek-r1-moe", "messages": M, "stream": True},
     "openai/sglang_chat_stream.sse", {"source": "upstream"}),
    ("/v1/chat/completions", {"model": "llama-3.1-8b", "messages": M, "stream": True},
     "openai/vllm_chat_stream_no_usage.sse", {"source": "counted"}),
    ("/v1/responses", {"model": "reasoner-32b", "input": "x", "stream": True},
     "openai/responses_stream_completed.sse", {"source": "upstream"}),
    ("/v1/messages", {"model": "reasoner-32b", "max_tokens": 16000, "messages": M, "stream": True},
     "anthropic/dive_thinking.sse", {"source": "upstream"}),
    ("/v1beta/models/deepseek-r1-moe:streamGenerateContent?alt=sse", {"contents": []},
     "gemini/vercel_reasoning_alt_sse.sse", {"source": "upstream"}),
    ("/v1beta/models/deepseek-r1-moe:generateContent", {"contents": []},
     "gemini/vercel_reasoning_response.json", {"source": "upstream"}),
])
def test_meter_recorded_payloads_we_did_not_write(tmp_path, path, body, payload, expect):
    out = meter(tmp_path, path, body, PAYLOADS / payload)
    for k, v in expect.items():
        assert out[k] == v, out
    assert out["generated_tokens"] == out["reasoning_tokens"] + out["output_tokens"]
    assert out["generated_tokens"] > 0 and out["flops"] > 0 and out["k"] > 0


def test_meter_gemini_counts_thoughts_outside_candidates(tmp_path):
    resp = {"candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 100, "thoughtsTokenCount": 900,
                              "totalTokenCount": 1010}}
    out = meter(tmp_path, "/v1beta/models/reasoner-32b:generateContent", {"contents": []}, json.dumps(resp))
    assert out["reasoning_tokens"] == 900 and out["output_tokens"] == 100 and out["generated_tokens"] == 1000


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("path,body,needle", [
    ("/v1/chat/completions", "{not json", "not valid JSON"),
    ("/v1/chat/completions", {"model": "llama-3.1-8b", "messages": M, "n": 0}, "'n'"),
    ("/v1/chat/completions", {"model": "llama-3.1-8b", "messages": M, "n": -3}, "'n'"),
    ("/v1/chat/completions", {"model": "llama-3.1-8b", "messages": M, "n": "two"}, "'n'"),
    ("/v1/chat/completions", {"model": "llama-3.1-8b", "messages": M, "max_tokens": -1}, "max_tokens"),
    ("/v1/messages", {"model": "reasoner-32b", "max_tokens": -5, "messages": M}, "max_tokens"),
    ("/v1/chat/completions", {"model": "nope", "messages": M}, "unknown model"),
    ("/v1/nowhere", {"model": "llama-3.1-8b"}, "unknown API path"),
    ("/v1/chat/completions", [1, 2], "JSON object"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, path, body, needle):
    r = kgate("estimate", "--config", str(POLICY), "--path", path, "--body", write(tmp_path, "b.json", body))
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr


def test_meter_bad_response_exits_2(tmp_path):
    body = write(tmp_path, "b.json", {"model": "llama-3.1-8b", "messages": M})
    r = kgate("meter", "--config", str(POLICY), "--path", "/v1/chat/completions", "--body", body,
              "--response", write(tmp_path, "r.txt", "<html>oops</html>"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    r = kgate("meter", "--config", str(POLICY), "--path", "/v1/chat/completions", "--body", body,
              "--response", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "cannot read" in r.stderr
