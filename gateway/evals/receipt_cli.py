"""``kgate receipt verify`` and ``kgate receipt issue`` (docs/design.md §14)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from gateway.audit.chain import canonical, chain_hash
from gateway.audit.records import iter_records
from gateway.engine.errors import UsageError
from gateway.evals.cli import config_or_default, hmac_key, signing_key, trusted_keys
from gateway.evals.receipts import claims_of
from gateway.evals.receipts import issue as sign_receipt
from gateway.evals.signing import SigningError, verify_compact


def _records_of(request_id: str, paths: list[str]) -> list[dict[str, Any]]:
    return [rec for _, rec in iter_records(paths) if rec.get("request_id") == request_id]


def check_against_log(claims: dict[str, Any], paths: list[str], key: bytes | None) -> list[str]:
    """What is wrong between a receipt's claims and the audit record they name (empty: they agree)."""
    where = claims.get("audit") or {}
    found = [r for r in _records_of(str(claims.get("rid")), paths)
             if r.get("seq") == where.get("seq") and r.get("replica") == where.get("replica")]
    if not found:
        return [f"no audit record of request {claims.get('rid')!r} at {where.get('replica')}#{where.get('seq')} "
                f"under {', '.join(paths)}"]
    rec = found[-1]
    problems = []
    if rec.get("hash") != where.get("hash"):
        problems.append("the record's hash differs from the receipt's: the record was rewritten")
    elif rec.get("mac") and key is None:
        problems.append("the audit log is HMAC-keyed: set its key (audit.hmac_key_env) to check the record")
    elif chain_hash(str(rec.get("prev")), canonical(rec), key if rec.get("mac") else None) != rec.get("hash"):
        problems.append("the record does not match its own hash: it was edited after it was written")
    ours = claims_of(rec)
    for name in sorted(set(ours) | set(claims)):
        if ours.get(name) != claims.get(name):
            problems.append(f"{name}: receipt {claims.get(name)!r}, audit record {ours.get(name)!r}")
    return problems


def verify(args: argparse.Namespace) -> int:
    cfg = config_or_default(args.config)
    keys = trusted_keys(args.public_key, cfg)
    if not keys:
        raise UsageError("no trusted key: give --public-key (kgate eval pubkey prints it) or set "
                         "evaluations.public_keys in the config")
    token = sys.stdin.read().strip() if args.receipt == "-" else args.receipt
    try:
        claims, key = verify_compact(token, keys)
    except SigningError as exc:
        print(f"kgate: receipt invalid: {exc}", file=sys.stderr)
        return 1
    problems = check_against_log(claims, args.audit, hmac_key(cfg)) if args.audit else []
    sys.stdout.write(orjson.dumps(claims, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")
    for p in problems:
        print(f"kgate: receipt does not match the audit log: {p}", file=sys.stderr)
    if not problems:
        checked = " and matches its audit record" if args.audit else ""
        print(f"receipt OK: signed by key {key.key_id}{checked}", file=sys.stderr)
    return 1 if problems else 0


def issue(args: argparse.Namespace) -> int:
    cfg = config_or_default(args.config)
    key = signing_key(args.signing_key, cfg)
    paths = args.audit or [cfg.audit.dir if cfg is not None else ".kgate/audit"]
    charged = [r for r in _records_of(args.request_id, paths) if isinstance(r.get("usage"), dict)]
    if not charged:
        raise UsageError(f"no charged audit record of request {args.request_id!r} under {', '.join(paths)}")
    print(sign_receipt(key, charged[-1]))
    return 0
