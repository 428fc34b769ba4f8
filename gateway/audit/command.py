"""What the ``kgate audit`` commands share: argument errors as one line, exit statuses, the audit config.

Each command (``verify``, ``report``) parses its own options (``kgate`` passes them through) and runs
under :func:`run_cli`: bad input (:class:`~gateway.engine.errors.UsageError`), an audit or an OS error is
one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gateway.audit.chain import AuditError
from gateway.engine.errors import UsageError
from gateway.policy.config import AuditConfig


class ArgParser(argparse.ArgumentParser):
    """argparse that reports bad input as one line instead of usage text and SystemExit."""

    def error(self, message: str) -> Any:
        raise UsageError(message)


def run_cli(prog: str, main: Any, args: list[str]) -> int:
    """``main(args)``'s exit status; bad input, an audit error or an OS error as one line and status 2."""
    try:
        return int(main(args))
    except (UsageError, AuditError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


def load_audit_config(path: str | None) -> AuditConfig:
    """The ``audit`` section of the given config, or of the default one when it exists (None otherwise)."""
    from gateway.policy.config import ConfigError, default_config_path, load_config

    cfg_path = Path(path) if path else default_config_path()
    if not path and not cfg_path.exists():
        return AuditConfig()
    try:
        return load_config(cfg_path).audit
    except ConfigError as exc:
        raise UsageError(f"cannot load config: {exc.errors[0]}") from None
