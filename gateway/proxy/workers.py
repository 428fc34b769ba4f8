"""``kgate serve --workers N``: N gateway processes on one host, sharing its client port (docs/design.md §8).

One Python process uses one core; this runs N of them behind one port, the kernel spreading connections
among them (``SO_REUSEPORT``). The parent is a supervisor that serves nothing itself:

- **One store.** With ``--store embedded`` the parent starts the embedded Redis (and owns the data folder's
  lock, as a single ``kgate serve`` would) and gives every worker its socket; with a Redis URL, all use it.
  Budgets are shared exactly, as between replicas on separate hosts.
- **One replica per worker.** Worker *i* is replica ``<replica>-w<i>`` in the audit log and the spool (a
  chain is per replica: two processes must never write one).
- **Admin API per worker**: worker *i* serves it on the admin port + *i* (its ``/metrics`` are its own
  process's; scrape every port). A change made through any of them reaches all (the directory's
  invalidation channel), as between replicas.
- **Signals**: SIGTERM or SIGINT drains every worker (each within ``server.drain_seconds``; a second signal
  ends the drains), then stops the embedded Redis; the exit status is 0 when every worker drained cleanly.
  SIGHUP reloads every worker's policy.
- **A worker that dies** is started again, after 1 s, doubling up to 30 s while it keeps dying within 10 s of
  its start; it is logged each time.
- The decision API and the Envoy processor are refused with several workers: a settle must reach the
  process that admitted its request, which a shared port cannot promise.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.policy.config import Config, parse_listen

log = logging.getLogger("kgate.workers")

RESTART_FIRST = 1.0  # seconds before a dead worker is started again
RESTART_MAX = 30.0
STABLE_AFTER = 10.0  # a worker that ran this long before dying is restarted after RESTART_FIRST again


@dataclass
class Worker:
    index: int
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = RESTART_FIRST
    restart_at: float | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()
        self.restart_at = None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


def worker_argv(args: argparse.Namespace, config_path: str, listen: str, admin_listen: str, store: str,
                replica: str, i: int) -> list[str]:
    host, port = parse_listen(admin_listen)
    admin_host = f"[{host}]" if ":" in host else host
    return [sys.executable, "-m", "gateway", "serve", "--config", config_path, "--listen", listen,
            "--admin-listen", f"{admin_host}:{port + i}", "--store", store, "--replica-id", f"{replica}-w{i}",
            "--reuse-port"]


def run_workers(args: argparse.Namespace, config: Config, config_path: str) -> int:
    """Supervise ``args.workers`` gateway processes; the exit status of ``kgate serve``."""
    from gateway.proxy.server import StartupError, _check_listen

    n = args.workers
    listen = args.listen or config.server.listen
    admin_listen = args.admin_listen or config.server.admin_listen
    store = args.store or os.environ.get("KGATE_STORE_URL") or config.store.url
    replica = args.replica_id or config.server.replica_id or _hostname()
    if getattr(args, "decision_listen", None) or config.decision.listen or \
            getattr(args, "extproc_listen", None) or config.decision.extproc_listen:
        raise StartupError("the decision API and Envoy's processor need one process (a settle must reach the "
                           "kgate that admitted its request): run them with --workers 1")
    _check_listen(listen, "clients", "--listen HOST:PORT (server.listen)")
    host, port = parse_listen(admin_listen)
    for i in range(n):
        _check_listen(f"{host}:{port + i}" if ":" not in host else f"[{host}]:{port + i}",
                      f"the admin API of worker {i}", "--admin-listen HOST:PORT (worker i uses its port + i)")
    embedded = None
    if store == "embedded":
        embedded = _start_store(config, n)
        store = embedded.url
    workers = [Worker(i, worker_argv(args, str(config_path), listen, admin_listen, store, replica, i))
               for i in range(n)]
    try:
        return _supervise(workers, listen)
    finally:
        if embedded is not None:
            embedded.stop_sync()


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _start_store(config: Config, n: int) -> Any:
    from gateway.ledger.redis_binary import RedisServerError
    from gateway.ledger.redis_server import RedisServer
    from gateway.proxy.server import StartupError, _busy_line

    try:
        server = RedisServer(data_dir=Path(config.store.data_dir), port=None,
                             command=f"kgate serve --workers {n}")
        return server.start_sync()
    except RedisServerError as exc:
        from gateway.ledger.data_dir_lock import DataDirBusy

        if isinstance(exc, DataDirBusy):
            raise StartupError(_busy_line(exc)) from None
        raise StartupError(f"embedded store: {str(exc).splitlines()[0]}") from None


def _supervise(workers: list[Worker], listen: str) -> int:
    stopping = {"signals": 0}
    pending: list[int] = []

    def on_signal(sig: int, _frame: Any) -> None:
        pending.append(sig)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        for w in workers:
            w.start()
        log.info("kgate: %d workers on http://%s (pids %s)", len(workers), listen,
                 ", ".join(str(w.proc.pid) for w in workers if w.proc))
        while True:
            while pending:
                sig = pending.pop(0)
                if sig == signal.SIGHUP:
                    log.info("reloading the policy of every worker")
                    for w in workers:
                        w.signal(signal.SIGHUP)
                    continue
                stopping["signals"] += 1
                log.info("stopping: draining %d workers%s", len(workers),
                         " (second signal: ending the drains)" if stopping["signals"] > 1 else "")
                for w in workers:
                    w.signal(signal.SIGTERM)
            now = time.monotonic()
            alive = 0
            for w in workers:
                if w.proc is None:
                    continue
                code = w.proc.poll()
                if code is None:
                    alive += 1
                    continue
                if w.restart_at is None:
                    w.exit_codes.append(code)
                    if stopping["signals"]:
                        w.proc = None
                        continue
                    ran = now - w.started
                    w.backoff = RESTART_FIRST if ran >= STABLE_AFTER else min(w.backoff * 2, RESTART_MAX)
                    w.restart_at = now + (RESTART_FIRST if ran >= STABLE_AFTER else w.backoff)
                    log.error("worker %d (pid %d) exited with status %d after %.1f s; starting it again in %.0f s",
                              w.index, w.proc.pid, code, ran, w.restart_at - now)
                    alive += 1
                elif now >= w.restart_at:
                    w.restarts += 1
                    w.start()
                    alive += 1
                else:
                    alive += 1
            if stopping["signals"] and alive == 0:
                break
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for w in workers:  # never leave a worker behind (an exception above)
            if w.proc is not None and w.proc.poll() is None:
                w.proc.terminate()
                w.proc.wait(30)
    # -SIGTERM: a worker stopped while it started, before its drain handler was in place (it served nothing).
    clean = all(w.exit_codes and w.exit_codes[-1] in (0, -signal.SIGTERM) for w in workers)
    log.info("stopped (%s)", "every worker drained" if clean else
             "exit statuses " + ", ".join(f"w{w.index}: {w.exit_codes[-1:]}" for w in workers))
    return 0 if clean else 1
