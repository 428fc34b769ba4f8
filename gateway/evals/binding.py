"""A policy bound to evaluation certificates: ``models.M.evaluated: {certificate: FILE}`` (docs/design.md §14).

At load, each named certificate is read, its signature checked against ``evaluations.public_keys``, and its
figures for the model copied into the model's ``evaluated_max_k`` (and, when ``limits`` lists them,
``evaluated_max_samples`` and ``evaluated_max_reasoning_tokens``). Which figure: the largest admission
*bound* the run's requests of that model had, because the bound is what a request is checked against before
any compute is spent — a request no larger than an evaluated one then fits, and nothing larger does. The
certificate's bytes join the policy's sha256, so every audit record names the certificate in force too.

Anything wrong is a :class:`~gateway.policy.config.ConfigError` line naming the file, the key path and
the problem: a policy that claims an evaluation it cannot prove must not load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from gateway.evals.signing import PublicKey, SigningError, load_public_key, verify_document
from gateway.policy.config import Config, ConfigError, ModelConfig

CERT_TYPE = "kgate-eval-certificate"


def bind_certificates(config: Config, label: str, digest: Any) -> Config:
    """``config`` with every certificate-bound model's evaluated figures filled in (``digest``, the policy
    files' running sha256, takes each certificate's bytes too)."""
    errors: list[str] = []
    keys: list[PublicKey] = []
    for i, text in enumerate(config.evaluations.public_keys):
        try:
            keys.append(load_public_key(text, f"evaluations.public_keys.{i}"))
        except SigningError as exc:
            errors.append(f"{label}: {exc}")
    models = dict(config.models)
    for name, model in config.models.items():
        if model.evaluated is None:
            continue
        where = f"{label}: models.{name}.evaluated.certificate"
        if not keys and not errors:
            errors.append(f"{where}: no trusted key to verify it with: set evaluations.public_keys "
                          "(kgate eval pubkey prints the signing key's)")
            continue
        path = Path(model.evaluated.certificate)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            errors.append(f"{where}: cannot read {path}: {exc.strerror or exc}")
            continue
        try:
            models[name] = _bound_model(name, model, raw, keys, path)
        except (SigningError, ValueError) as exc:
            errors.append(f"{where}: {path.name}: {exc}")
            continue
        digest.update(raw)
    if errors:
        raise ConfigError(errors)
    return config.model_copy(update={"models": models, "version": digest.hexdigest()})


def _bound_model(name: str, model: ModelConfig, raw: bytes, keys: list[PublicKey], path: Path) -> ModelConfig:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON (expected a certificate written by kgate eval finish)") from None
    cert = doc.get("certificate") if isinstance(doc, dict) else None
    if not isinstance(cert, dict) or cert.get("type") != CERT_TYPE:
        raise ValueError(f"not a {CERT_TYPE} document")
    if cert.get("version") != 1:
        raise ValueError(f"certificate version {cert.get('version')!r} is not one this kgate reads (1)")
    signer = verify_document(cert, doc.get("signature"), keys)
    figures = (cert.get("models") or {}).get(name)
    run = cert.get("run") or {}
    if not isinstance(figures, dict) or not figures.get("requests"):
        covered = ", ".join(sorted(cert.get("models") or {})) or "no model"
        raise ValueError(f"the evaluation run {run.get('id')!r} served no request of model {name!r} (it covers "
                         f"{covered})")
    served = model.upstream_model or name
    evaluated_as = figures.get("upstream_models") or []
    if served not in evaluated_as:
        raise ValueError(f"the run evaluated {name!r} as upstream model(s) {', '.join(map(str, evaluated_as))}, "
                         f"but this policy serves it as {served!r}: the certificate is about another model")
    assert model.evaluated is not None
    limits = model.evaluated.limits
    update: dict[str, Any] = {
        "evaluated_max_k": _positive(figures, "k_bound_max"),
        "evaluated_source": f"certificate {path.name} (run {run.get('id')}, {run.get('label')!r}, "
                            f"key {signer.key_id})",
    }
    if "samples" in limits:
        update["evaluated_max_samples"] = int(_positive(figures, "samples_bound_max"))
    if "reasoning_tokens" in limits:
        update["evaluated_max_reasoning_tokens"] = int(_number(figures, "reasoning_tokens_bound_max"))
    return model.model_copy(update=update)


def _number(figures: dict[str, Any], key: str) -> float:
    v = figures.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"models figure {key!r} is missing or not a number")
    return float(v)


def _positive(figures: dict[str, Any], key: str) -> float:
    v = _number(figures, key)
    if v <= 0:
        raise ValueError(f"models figure {key!r} is not positive")
    return v


def evaluation_coverage(config: Config) -> list[str]:
    """One line per model: what it was evaluated under, and which tiers are served beyond any evaluation
    (``kgate policy check`` prints them)."""
    lines = []
    for name, model in sorted(config.models.items()):
        tiers = [t for t, tier in sorted(config.tiers.items()) if tier.models == "*" or name in tier.models]
        if model.evaluated_max_k is None:
            beyond = ", ".join(tiers) or "no tier"
            lines.append(f"model {name}: no evaluated compute (evaluated_max_k or evaluated.certificate): served "
                         f"beyond any evaluation to {beyond}")
            continue
        figures = [f"K <= {model.evaluated_max_k:g}"]
        if model.evaluated_max_samples is not None:
            figures.append(f"samples <= {model.evaluated_max_samples}")
        if model.evaluated_max_reasoning_tokens is not None:
            figures.append(f"reasoning tokens <= {model.evaluated_max_reasoning_tokens}")
        source = model.evaluated_source or "typed into the policy"
        beyond_tiers = [t for t in tiers if config.tiers[t].beyond_evaluated]
        tail = (f"served beyond it to {', '.join(beyond_tiers)} (beyond_evaluated)" if beyond_tiers
                else "no tier is served beyond it")
        lines.append(f"model {name}: evaluated at {', '.join(figures)} ({source}); {tail}")
    return lines
