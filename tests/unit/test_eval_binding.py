"""A policy bound to an evaluation certificate (gateway/evals/binding.py): what loads, what is refused and
why, and what the bound figures do to a tier's caps (gateway/engine/compute.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway.engine.compute import check_caps, clamp_target
from gateway.evals.binding import evaluation_coverage
from gateway.evals.signing import SigningKey, generate, sign_document
from gateway.policy.config import ConfigError, load_config

KEY = generate()


def certificate(key: SigningKey = KEY, **models: dict[str, Any]) -> dict[str, Any]:
    cert = {
        "type": "kgate-eval-certificate", "version": 1,
        "run": {"id": "ev_0123456789abcdef", "label": "uplift v1", "principal": "evals"},
        "models": models or {"m": {"upstream_models": ["m-upstream"], "requests": 3, "k_bound_max": 6.0,
                                   "samples_bound_max": 2, "reasoning_tokens_bound_max": 1500}},
    }
    return {"certificate": cert, "signature": sign_document(cert, key)}


def policy(tmp_path: Path, cert: dict[str, Any] | bytes, *, keys: list[str] | None = None,
           evaluated: dict[str, Any] | None = None, **model: Any) -> Path:
    (tmp_path / "certs").mkdir(exist_ok=True)
    (tmp_path / "certs" / "c.json").write_bytes(cert if isinstance(cert, bytes) else orjson.dumps(cert))
    doc = {
        "evaluations": {"public_keys": [KEY.public.text] if keys is None else keys},
        "upstreams": {"u": {"base_url": "simulator"}},
        "models": {"m": {"upstream": "u", "upstream_model": "m-upstream", "active_params": 1e9, "reasoning": True,
                         "reference_output_tokens": 100, "max_output_tokens": 4000,
                         "evaluated": evaluated or {"certificate": "certs/c.json"}, **model},
                   "other": {"upstream": "u", "active_params": 1e9}},
        "tiers": {"normal": {"max_k": 100, "on_exceed": "reject"},
                  "clamped": {"max_k": 100, "on_exceed": "clamp"},
                  "cleared": {"max_k": 100, "beyond_evaluated": True}},
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def refusal(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return "\n".join(err.value.errors)


def test_figures_come_from_the_certificate_and_join_the_policy_hash(tmp_path: Path) -> None:
    cfg = load_config(policy(tmp_path, certificate(), evaluated={"certificate": "certs/c.json",
                                                                 "limits": ["k", "samples", "reasoning_tokens"]}))
    m = cfg.models["m"]
    assert (m.evaluated_max_k, m.evaluated_max_samples, m.evaluated_max_reasoning_tokens) == (6.0, 2, 1500)
    assert "c.json" in (m.evaluated_source or "") and "ev_0123456789abcdef" in (m.evaluated_source or "")
    assert KEY.public.key_id in (m.evaluated_source or "")
    # Only K binds unless limits say more.
    (tmp_path / "k").mkdir()
    cfg_k = load_config(policy(tmp_path / "k", certificate()))
    assert cfg_k.models["m"].evaluated_max_samples is None and cfg_k.models["m"].evaluated_max_k == 6.0
    # Another certificate: another policy version, though the YAML is the same.
    other = certificate(m={"upstream_models": ["m-upstream"], "requests": 1, "k_bound_max": 3.0,
                           "samples_bound_max": 1, "reasoning_tokens_bound_max": 10})
    assert load_config(policy(tmp_path / "k", other)).version != cfg_k.version


@pytest.mark.parametrize(("change", "expected"), [
    ("untrusted", "none of the 1 trusted key"),
    ("edited", "altered after signing"),
    ("no_keys", "no trusted key to verify it with"),
    ("other_upstream", "serves it as 'm-upstream'"),
    ("no_requests", "served no request of model 'm'"),
    ("not_json", "not JSON"),
    ("wrong_type", "not a kgate-eval-certificate"),
    ("missing", "cannot read"),
])
def test_a_certificate_that_cannot_be_trusted_stops_the_policy(tmp_path: Path, change: str, expected: str) -> None:
    cert: dict[str, Any] | bytes = certificate()
    keys = None
    if change == "untrusted":
        cert = certificate(generate())
    elif change == "edited":
        assert isinstance(cert, dict)
        cert["certificate"]["models"]["m"]["k_bound_max"] = 60.0
    elif change == "no_keys":
        keys = []
    elif change == "other_upstream":
        cert = certificate(m={"upstream_models": ["m-other"], "requests": 3, "k_bound_max": 6.0})
    elif change == "no_requests":
        cert = certificate(other={"upstream_models": ["other"], "requests": 3, "k_bound_max": 6.0})
    elif change == "not_json":
        cert = b"{not json"
    elif change == "wrong_type":
        assert isinstance(cert, dict)
        cert = {**cert, "certificate": {**cert["certificate"], "type": "something-else"}}
    path = policy(tmp_path, cert, keys=keys)
    if change == "missing":
        (tmp_path / "certs" / "c.json").unlink()
    message = refusal(path)
    assert "models.m.evaluated.certificate" in message and expected in message, message


def test_figures_and_a_certificate_together_are_refused(tmp_path: Path) -> None:
    assert "not both" in refusal(policy(tmp_path, certificate(), evaluated_max_k=4))
    path = policy(tmp_path, certificate(), evaluated={"certificate": "certs/c.json", "limits": ["samples"]})
    assert "limits must include k" in refusal(path)


def test_evaluated_caps_refuse_or_clamp_unless_the_tier_is_cleared(tmp_path: Path) -> None:
    from gateway.adapters import adapter_for_path
    from gateway.engine.metering import parse_request

    cfg = load_config(policy(tmp_path, certificate(), evaluated={"certificate": "certs/c.json",
                                                                 "limits": ["k", "samples"]}))
    found = adapter_for_path("/v1/chat/completions")
    assert found is not None
    adapter, params = found
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3000, "n": 3}
    parsed = parse_request(cfg, adapter, params, orjson.dumps(body))
    model = cfg.models["m"]
    caps = {v.cap: v for v in check_caps(parsed.request, parsed.bound, cfg.tiers["normal"], model)}
    assert set(caps) == {"evaluated_max_samples", "evaluated_max_k"}
    assert "c.json" in caps["evaluated_max_k"].message() and "evaluated 6" in caps["evaluated_max_k"].message()
    assert check_caps(parsed.request, parsed.bound, cfg.tiers["cleared"], model) == []
    target = clamp_target(parsed.request, model, cfg.tiers["clamped"])
    assert target is not None and target.samples <= 2
    # The tier's own cap, when lower, is the tier's (named as such).
    low = cfg.tiers["normal"].model_copy(update={"max_k": 2.0})
    assert "max_k" in {v.cap for v in check_caps(parsed.request, parsed.bound, low, model)}


def test_policy_check_names_what_each_model_was_evaluated_under(tmp_path: Path) -> None:
    lines = evaluation_coverage(load_config(policy(tmp_path, certificate())))
    assert any(ln.startswith("model m: evaluated at K <= 6") and "cleared" in ln for ln in lines), lines
    assert any(ln.startswith("model other: no evaluated compute") and "normal" in ln for ln in lines), lines
