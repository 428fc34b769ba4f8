"""Signed receipts: one answer's compute, verifiable offline (docs/design.md §14).

A tier with ``receipts: true`` gets, with each answer, a compact JWS (``alg: EdDSA``, ``typ:
kgate-receipt``) signed with ``evaluations``' signing key. Its claims are the answer's request id, model,
measured K, FLOPs, samples and tokens, the admission bound's K, the policy's sha256, and where its audit
record sits: replica, sequence number and hash. Anyone with the public key can check the receipt (``kgate
receipt verify``, or any JOSE library); an auditor with the log can also check that the record it names
exists, is intact and says the same.

Where it travels: the ``x-kgate-receipt`` header of a unary answer (the record is written before the
answer's head leaves); for an SSE stream, whose head left before its compute was known, an SSE comment
line ``: x-kgate-receipt <token>`` after the last event, which SSE clients skip. Gemini's JSON-array
streams (no ``alt=sse``) carry none; ``kgate receipt issue`` makes one from the audit log afterwards.
"""

from __future__ import annotations

import math
import os
from typing import Any

from gateway.evals.signing import SigningError, SigningKey, load_signing_key
from gateway.policy.config import Config

HEADER = "x-kgate-receipt"
CLAIM_USAGE = ("samples", "prompt_tokens", "reasoning_tokens", "output_tokens", "k", "flops", "source")


def wants_signer(config: Config) -> bool:
    return any(t.receipts for t in config.tiers.values()) or bool(config.evaluations.signing_key_file)


def load_signer(config: Config) -> SigningKey | None:
    """The key receipts are signed with, when a tier asks for receipts (or a key file is configured);
    raises :class:`SigningError` naming what is missing."""
    if not wants_signer(config):
        return None
    ev = config.evaluations
    tiers = ", ".join(sorted(n for n, t in config.tiers.items() if t.receipts)) or "none"
    if not ev.signing_key_file and not os.environ.get(ev.signing_key_env):
        raise SigningError(f"tiers with receipts ({tiers}) need a signing key: set evaluations.signing_key_file "
                           f"or ${ev.signing_key_env} (kgate eval keygen makes one)")
    try:
        return load_signing_key(ev.signing_key_file, ev.signing_key_env)
    except SigningError as exc:
        raise SigningError(f"receipts (tiers: {tiers}): {exc}") from None


def claims_of(record: dict[str, Any]) -> dict[str, Any]:
    """The claims of an answer's receipt, from its audit record as written (with ``seq`` and ``hash``)."""
    usage = record.get("usage") or {}
    bound = record.get("bound") or {}
    ts = record.get("ts")
    out: dict[str, Any] = {
        "iss": "kgate",
        "rid": record.get("request_id"),
        "iat": int(ts) if isinstance(ts, (int, float)) and math.isfinite(ts) else None,
        "model": record.get("model"),
        "upstream_model": record.get("upstream_model"),
        "decision": record.get("decision"),
        **{name: usage.get(name) for name in CLAIM_USAGE},
        "k_bound": bound.get("k_max"),
        "policy_sha256": record.get("policy_sha256"),
        "audit": {"replica": record.get("replica"), "seq": record.get("seq"), "hash": record.get("hash")},
    }
    if record.get("eval"):
        out["eval"] = record["eval"]
    return out


def issue(key: SigningKey, record: dict[str, Any]) -> str:
    from gateway.evals.signing import sign_compact

    return sign_compact(claims_of(record), key)


def sse_comment(token: str) -> bytes:
    """The receipt as an SSE comment line (ignored by SSE parsers, readable by whoever looks for it)."""
    return f": {HEADER} {token}\n\n".encode("ascii")
