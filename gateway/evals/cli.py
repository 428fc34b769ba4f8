"""``kgate eval ...``: evaluation runs from the command line (docs/design.md §14; parsers in
gateway.evals.commands). Store operations go through :func:`gateway.admin.cli._run`, like ``kgate keys``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from gateway.admin.cli import ACTOR, _run
from gateway.engine.errors import UsageError
from gateway.evals import ops
from gateway.evals.signing import PublicKey, SigningError, SigningKey, generate, load_public_key, load_signing_key
from gateway.policy.config import Config, ConfigError, default_config_path, load_config
from gateway.proxy.context import Gateway


def config_or_default(path: str | None) -> Config | None:
    """The config named, or the default one when it exists (None otherwise)."""
    p = Path(path) if path else default_config_path()
    if not path and not p.exists():
        return None
    return load_config(p)


def signing_key(path: str | None, cfg: Config | None) -> SigningKey:
    """``--signing-key``, else the config's evaluations.signing_key_file, else its environment variable."""
    ev = cfg.evaluations if cfg is not None else None
    try:
        return load_signing_key(path or (ev.signing_key_file if ev else None),
                                ev.signing_key_env if ev else "KGATE_EVAL_SIGNING_KEY")
    except SigningError as exc:
        raise UsageError(str(exc)) from None


def trusted_keys(given: list[str] | None, cfg: Config | None) -> list[PublicKey]:
    texts = list(given or ()) or list(cfg.evaluations.public_keys if cfg is not None else ())
    try:
        return [load_public_key(t, f"public key {i + 1}") for i, t in enumerate(texts)]
    except SigningError as exc:
        raise UsageError(str(exc)) from None


def hmac_key(cfg: Config | None) -> bytes | None:
    name = cfg.audit.hmac_key_env if cfg is not None else None
    return os.environ.get(name, "").encode() or None if name else None


# --------------------------------------------------------------------------------------- run commands
def start(args: argparse.Namespace) -> int:
    return _run(args, lambda gw: ops.start(gw, ACTOR, args.principal, args.label, args.models, args.key_id))


async def _certify(gw: Gateway, args: argparse.Namespace, key: SigningKey, ignore_in_flight: bool) -> dict[str, Any]:
    audit = args.audit or [gw.config.audit.dir]
    wait = args.wait if args.wait is not None else gw.config.evaluations.finish_wait_seconds
    doc = await ops.certify(gw, ACTOR, args.run, key, audit, wait_seconds=wait, ignore_in_flight=ignore_in_flight)
    out = Path(args.out or f"eval-{args.run}.json")
    await asyncio.to_thread(out.write_bytes, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    cert = doc["certificate"]
    figures = cert.get("figures", {})
    print(f"certificate of run {args.run} written to {out}", file=sys.stderr)
    return {"run": args.run, "certificate": str(out), "requests": figures.get("requests"),
            "k_max": figures.get("k", {}).get("max"), "flops_total": figures.get("flops", {}).get("total"),
            "segments": len(cert.get("audit", {}).get("segments", []))}


def finish(args: argparse.Namespace) -> int:
    key = signing_key(args.signing_key, config_or_default(args.config))

    async def op(gw: Gateway) -> Any:
        await ops.finish(gw, ACTOR, args.run)
        return await _certify(gw, args, key, False)

    return _run(args, op)


def certify(args: argparse.Namespace) -> int:
    key = signing_key(args.signing_key, config_or_default(args.config))
    return _run(args, lambda gw: _certify(gw, args, key, args.ignore_in_flight))


def list_runs(args: argparse.Namespace) -> int:
    return _run(args, ops.every)


def show(args: argparse.Namespace) -> int:
    return _run(args, lambda gw: ops.describe(gw, args.run))


# ------------------------------------------------------------------------------------ key commands
def pubkey(args: argparse.Namespace) -> int:
    key = signing_key(args.signing_key, config_or_default(args.config))
    print(key.public.text)
    print(f"key id {key.public.key_id}", file=sys.stderr)
    return 0


def keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"{out} exists; not overwriting a signing key")
    key = generate()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.pem())
    print(key.public.text)
    print(f"signing key written to {out} (mode 0600); key id {key.public.key_id}. Put the public key above in "
          "evaluations.public_keys of the policies that bind to its certificates.", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------- verify
def verify(args: argparse.Namespace) -> int:
    from gateway.evals.certificate import CertificateError, format_check, load_certificate, verify_certificate

    try:
        cfg = config_or_default(args.config)
    except ConfigError:
        if args.config:
            raise
        cfg = None
    keys = trusted_keys(args.public_key, cfg)
    try:
        doc = load_certificate(args.certificate)
        check = verify_certificate(doc, keys, [Path(p) for p in args.audit] if args.audit else None, hmac_key(cfg))
    except CertificateError as exc:
        raise UsageError(str(exc)) from None
    print(format_check(check))
    return 0 if check.ok else 1
