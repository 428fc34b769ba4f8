"""The ``kgate eval`` and ``kgate receipt`` command lines (their parsers; the work is in gateway.evals.cli)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Lazy = Callable[[str, str], Callable[[argparse.Namespace], int]]


def add_parsers(sub: Any, common: argparse.ArgumentParser, parser_class: type[argparse.ArgumentParser],
                lazy: Lazy) -> None:
    def run(name: str) -> Callable[[argparse.Namespace], int]:
        return lazy("gateway.evals.cli", name)

    ev = sub.add_parser("eval", help="evaluation runs and their compute certificates").add_subparsers(
        dest="eval_cmd", required=True, parser_class=parser_class)
    s = ev.add_parser("start", parents=[common], help="open a run: tag a principal's requests until finish")
    s.add_argument("--principal", required=True)
    s.add_argument("--model", action="append", required=True, dest="models",
                   help="a model the run evaluates (repeat for several)")
    s.add_argument("--label", required=True, help='what is evaluated, e.g. "cyber-uplift v3"')
    s.add_argument("--key-id", help="tag only the requests made with this key of the principal")
    s.set_defaults(func=run("start"))

    signing = argparse.ArgumentParser(add_help=False)
    signing.add_argument("--signing-key", help="Ed25519 private key (PEM); default: $KGATE_EVAL_SIGNING_KEY "
                                               "or evaluations.signing_key_file")
    signing.add_argument("--audit", action="append", help="audit directory to read (repeat for several; "
                                                          "default: the config's audit.dir)")
    signing.add_argument("--out", help="where to write the certificate (default: eval-<run>.json)")
    signing.add_argument("--wait", type=float, help="seconds to wait for the run's requests still in flight "
                                                    "(default: evaluations.finish_wait_seconds)")
    s = ev.add_parser("finish", parents=[common, signing], help="close a run and write its signed certificate")
    s.add_argument("run")
    s.set_defaults(func=run("finish"))
    s = ev.add_parser("certify", parents=[common, signing], help="(re)write the certificate of a finished run")
    s.add_argument("run")
    s.add_argument("--ignore-in-flight", action="store_true",
                   help="certify although some requests are still in flight (they are listed as uncovered)")
    s.set_defaults(func=run("certify"))
    s = ev.add_parser("list", parents=[common], help="every run")
    s.set_defaults(func=run("list_runs"))
    s = ev.add_parser("show", parents=[common], help="one run, and how many of its requests are in flight")
    s.add_argument("run")
    s.set_defaults(func=run("show"))
    s = ev.add_parser("verify", help="check a certificate's signature and, with --audit, every figure")
    s.add_argument("certificate")
    s.add_argument("--audit", action="append", help="audit directory the certificate's records are in")
    s.add_argument("--public-key", action="append", help="trusted key (ed25519:... or a file); default: "
                                                         "the config's evaluations.public_keys")
    s.add_argument("--config", help="config for evaluations.public_keys and audit.hmac_key_env")
    s.set_defaults(func=run("verify"))
    s = ev.add_parser("pubkey", help="print the signing key's public key (ed25519:...)")
    s.add_argument("--signing-key", help="Ed25519 private key (PEM); default: $KGATE_EVAL_SIGNING_KEY")
    s.add_argument("--config", help="config for evaluations.signing_key_file")
    s.set_defaults(func=run("pubkey"))
    s = ev.add_parser("keygen", help="make a new Ed25519 signing key (PEM, mode 0600)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=run("keygen"))

    rc = sub.add_parser("receipt", help="signed per-answer compute receipts").add_subparsers(
        dest="receipt_cmd", required=True, parser_class=parser_class)
    s = rc.add_parser("verify", help="check a receipt (x-kgate-receipt) and, with --audit, its record")
    s.add_argument("receipt", help="the token, or - to read it from stdin")
    s.add_argument("--public-key", action="append", help="trusted key (ed25519:... or a file)")
    s.add_argument("--audit", action="append", help="audit directory holding the answer's record")
    s.add_argument("--config", help="config for evaluations.public_keys and audit.hmac_key_env")
    s.set_defaults(func=lazy("gateway.evals.receipt_cli", "verify"))
    s = rc.add_parser("issue", help="a receipt for a served request, from its audit record")
    s.add_argument("request_id")
    s.add_argument("--audit", action="append", help="audit directory (default: the config's audit.dir)")
    s.add_argument("--signing-key", help="Ed25519 private key (PEM); default: $KGATE_EVAL_SIGNING_KEY")
    s.add_argument("--config", help="config for audit.dir and evaluations.signing_key_file")
    s.set_defaults(func=lazy("gateway.evals.receipt_cli", "issue"))
