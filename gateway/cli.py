"""The ``kgate`` command line (docs/design.md §9). Command names and options are contracts: keep them stable.

Each command is a small function; the work lives in the module of its concept. Errors are one line on
stderr and exit 2 (bad input) or 1 (a check failed) — never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import orjson

from gateway.engine.errors import GatewayError, UsageError
from gateway.policy.config import ConfigError, default_config_path, load_config

AUDIT_COMMANDS = ("verify", "report", "reconcile")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _emit(obj: Any) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")


def _read_file(path: str, what: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None


def _load(config: str | None) -> Any:
    return load_config(config or default_config_path())


# ---------------------------------------------------------------------------------- estimate and meter
def cmd_estimate(args: argparse.Namespace) -> int:
    from gateway.engine.metering import estimate_dict, parse_request, resolve_path

    config = _load(args.config)
    adapter, params = resolve_path(args.path)
    parsed = parse_request(config, adapter, params, _read_file(args.body, "request body"))
    _emit(estimate_dict(parsed))
    return 0


def cmd_meter(args: argparse.Namespace) -> int:
    """``kgate meter``: from a request body and the upstream's answer, or (``--request-id``) from the
    audit record of a request the gateway served, which carries what it charged."""
    from gateway.engine.metering import meter_dict, meter_response, parse_request, resolve_path

    if args.request_id:
        from gateway.audit.records import charged_usage

        _emit(charged_usage(args.request_id, args.audit, args.config))
        return 0
    missing = [f"--{n}" for n in ("path", "body", "response") if not getattr(args, n)]
    if missing:
        raise UsageError(f"meter needs {', '.join(missing)} (or --request-id ID to read what the gateway charged)")
    config = _load(args.config)
    adapter, params = resolve_path(args.path)
    parsed = parse_request(config, adapter, params, _read_file(args.body, "request body"))
    measured = meter_response(parsed, _read_file(args.response, "response"))
    _emit(meter_dict(parsed, measured))
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    failed = False
    for f in args.files:
        try:
            cfg = load_config(f)
        except ConfigError as exc:
            failed = True
            for line in exc.errors:
                print(line)
            continue
        print(f"{f}: ok ({len(cfg.models)} models, {len(cfg.tiers)} tiers, policy sha256 {cfg.version[:12]})",
              file=sys.stderr)
        from gateway.evals.binding import evaluation_coverage

        for line in evaluation_coverage(cfg):
            print(f"{f}: {line}", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kgate", description="Meter and limit inference-time compute per caller of a model API.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("serve", help="run the gateway")
    s.add_argument("--config", help="policy/config YAML (default: policies/example.yaml; env KGATE_CONFIG)")
    s.add_argument("--listen", help="HOST:PORT for clients (default from config)")
    s.add_argument("--admin-listen", help="HOST:PORT for the admin API (default from config)")
    s.add_argument("--store", help="'embedded' (default) or a Redis URL (env KGATE_STORE_URL)")
    s.add_argument("--replica-id", help="this replica's id in the audit log and spool (default: "
                   "server.replica_id, else the host name); each replica on one host needs its own")
    s.add_argument("--decision-listen", action="append", metavar="ADDR",
                   help="serve the decision API for gateway plugins on HOST:PORT or unix:/path (repeatable; "
                        "default from decision.listen)")
    s.add_argument("--extproc-listen", metavar="ADDR",
                   help="serve Envoy's external processor (gRPC) on HOST:PORT (default decision.extproc_listen)")
    s.add_argument("--workers", type=_positive_int, default=1,
                   help="gateway processes sharing the client port (default 1); worker i is replica <id>-w<i> "
                        "and serves the admin API on the admin port + i")
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a worker of --workers N
    s.set_defaults(func=_lazy("gateway.proxy.server", "cmd_serve"))

    s = sub.add_parser(
        "simulate", help="run the upstream model-server simulator",
        description="A fake model server speaking the OpenAI (chat, completions, responses), Anthropic and "
                    "Gemini APIs, with each provider's usage quirks. Control endpoints: GET /_sim/stats, "
                    "POST /_sim/reset, POST /_sim/config, GET /_sim/health. Per request, x-sim-* headers "
                    "override the options (x-sim-fault, x-sim-flavor, x-sim-output-tokens, "
                    "x-sim-reasoning-tokens).",
        epilog="Fault SPEC: a kind and comma-separated key=value options. Kinds: status=N (answer N; "
               "with 429 also retry_after=S), timeout (accept, never answer; ms=N hangs up after N ms), reset "
               "(TCP reset before any response), midstream,after=N (drop the connection after N stream "
               "events; a JSON body is cut in half), malformed,after=N (a broken SSE line after N events; a "
               "JSON body that does not parse). Every kind takes rate=P (default 1) and path=PREFIX. "
               "Example: --fault status=500,rate=0.1 --fault midstream,after=3,path=/v1/messages")
    s.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT (default %(default)s)")
    s.add_argument("--latency-ms", type=float, default=0.0, help="wait before the first byte of every answer")
    s.add_argument("--tokens-per-second", type=float, default=0.0,
                   help="generation speed per sample, streamed or not (default 0: no waiting)")
    s.add_argument("--output-tokens", type=int, default=64,
                   help="visible tokens per sample, capped by the request's own limit (default %(default)s)")
    s.add_argument("--fault", action="append", default=[], metavar="SPEC",
                   help="inject a fault (repeatable; the SPEC format is below)")
    s.add_argument("--flavor", default="openai", choices=["openai", "vllm", "sglang", "deepseek"],
                   help="which OpenAI-compatible server to mimic on the OpenAI paths (default %(default)s)")
    s.add_argument("--workers", type=int, default=1,
                   help="processes sharing the port (SO_REUSEPORT; default %(default)s)")
    s.set_defaults(func=_lazy("gateway.proxy.server", "cmd_simulate"))

    for name, func, metered in (("estimate", cmd_estimate, False), ("meter", cmd_meter, True)):
        s = sub.add_parser(name, help=f"{name} the compute of one request (one JSON object on stdout)")
        s.add_argument("--config", help="policy/config YAML (default: the example policy)")
        # meter: --path, --body and --response, or --request-id alone
        s.add_argument("--path", required=not metered, help="the API path, e.g. /v1/chat/completions")
        s.add_argument("--body", required=not metered, help="the request body (a JSON file, or - for stdin)")
        if metered:
            s.add_argument("--response", help="the response: a JSON body or a raw SSE transcript")
            s.add_argument("--request-id", help="instead: what the gateway charged the request with this id "
                           "(its x-kgate-request-id), read from its audit record")
            s.add_argument("--audit", metavar="DIR", help="with --request-id: the audit files or directory "
                           "(default: the config's audit.dir)")
        s.set_defaults(func=func)

    pol = sub.add_parser("policy", help="policy files").add_subparsers(dest="policy_cmd", required=True,
                                                                       parser_class=_Parser)
    s = pol.add_parser("check", help="validate policy files")
    s.add_argument("files", nargs="+")
    s.set_defaults(func=cmd_policy_check)

    _admin_commands(sub)

    audit = sub.add_parser("audit", help="audit log tools").add_subparsers(dest="audit_cmd", required=True,
                                                                         parser_class=_Parser)
    for name in AUDIT_COMMANDS:
        s = audit.add_parser(name, add_help=False, help=f"audit {name}")
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=_passthrough(name))
    return p


def _admin_commands(sub: Any) -> None:
    """Principals, keys, grants and usage: the same operations as the admin API, run against the store."""
    common = _Parser(add_help=False)
    common.add_argument("--config", help="policy/config YAML (for the store URL and tiers)")
    common.add_argument("--store", help="Redis URL (default: the config's store; 'embedded' uses its socket)")

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_cmd", required=True, parser_class=_Parser)
    s = keys.add_parser("create", parents=[common], help="issue a key (printed once)")
    s.add_argument("--principal", required=True)
    s.add_argument("--org", required=True)
    s.add_argument("--tier", required=True)
    s.set_defaults(func=_lazy("gateway.admin.cli", "keys_create"))
    s = keys.add_parser("revoke", parents=[common], help="revoke a key by its id")
    s.add_argument("key_id")
    s.set_defaults(func=_lazy("gateway.admin.cli", "keys_revoke"))
    s = keys.add_parser("list", parents=[common], help="list keys (ids only)")
    s.add_argument("--principal")
    s.set_defaults(func=_lazy("gateway.admin.cli", "keys_list"))

    pr = sub.add_parser("principals", help="principals").add_subparsers(dest="principals_cmd", required=True,
                                                                       parser_class=_Parser)
    s = pr.add_parser("set-tier", parents=[common], help="assign a principal's tier")
    s.add_argument("principal")
    s.add_argument("tier")
    s.set_defaults(func=_lazy("gateway.admin.cli", "principals_set_tier"))
    s = pr.add_parser("list", parents=[common], help="list principals")
    s.set_defaults(func=_lazy("gateway.admin.cli", "principals_list"))

    gr = sub.add_parser("grants", help="time-bound elevation to a tier").add_subparsers(
        dest="grants_cmd", required=True, parser_class=_Parser)
    s = gr.add_parser("add", parents=[common], help="grant a tier for a time")
    s.add_argument("--principal", required=True)
    s.add_argument("--tier", required=True)
    s.add_argument("--duration", required=True, help="e.g. 30m, 12h, 7d")
    s.add_argument("--approver", required=True)
    s.add_argument("--reason", required=True)
    s.set_defaults(func=_lazy("gateway.admin.cli", "grants_add"))
    s = gr.add_parser("list", parents=[common], help="list grants")
    s.add_argument("--principal")
    s.set_defaults(func=_lazy("gateway.admin.cli", "grants_list"))
    s = gr.add_parser("revoke", parents=[common], help="revoke a grant")
    s.add_argument("grant_id")
    s.set_defaults(func=_lazy("gateway.admin.cli", "grants_revoke"))

    ov = sub.add_parser("overrides", help="per-principal budget limits").add_subparsers(
        dest="overrides_cmd", required=True, parser_class=_Parser)
    s = ov.add_parser("set", parents=[common], help="a principal's own limit for one budget (by label)")
    s.add_argument("principal")
    s.add_argument("budget", help="the budget's label, e.g. principal:requests:1d")
    s.add_argument("limit", type=float)
    s.set_defaults(func=_lazy("gateway.admin.cli", "overrides_set"))
    s = ov.add_parser("delete", parents=[common], help="back to the tier's limit for one budget")
    s.add_argument("principal")
    s.add_argument("budget")
    s.set_defaults(func=_lazy("gateway.admin.cli", "overrides_delete"))

    s = sub.add_parser("usage", parents=[common], help="a principal's usage and remaining budget")
    s.add_argument("principal")
    s.set_defaults(func=_lazy("gateway.admin.cli", "usage"))

    from gateway.evals.commands import add_parsers as add_eval_parsers

    add_eval_parsers(sub, common, _Parser, _lazy)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """Import a command's module only when it runs (keeps `kgate estimate` fast and light)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        func: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), name)
        return func(args)

    return run


def _passthrough(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        mod = importlib.import_module(f"gateway.audit.{name}")  # verify, report, reconcile
        func: Callable[[list[str]], int] = getattr(mod, f"{name}_main")
        return func(list(args.rest))

    return run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if len(argv) >= 2 and argv[0] == "audit" and argv[1] in AUDIT_COMMANDS:
        # The audit tools parse their own options (argparse cannot pass options through REMAINDER).
        args = argparse.Namespace(func=lambda _a: _passthrough(argv[1])(argparse.Namespace(rest=argv[2:])))
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"kgate: {line}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"kgate: {exc.message}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"kgate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
