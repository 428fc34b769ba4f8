"""``kgate serve --workers N``: N gateway processes on one host, sharing its client port (docs/design.md §8).

One Python process uses one core; this runs N of them behind one port, the kernel spreading connections
among them (``SO_REUSEPORT``). The parent is a supervisor that serves nothing itself:

- **One store.** With ``--store embedded`` the parent owns the data folder's lock and runs the embedded
  Redis (started again, with a back-off, if it dies; the workers spool meanwhile); the workers get its
  socket. With a Redis URL all use it. Budgets are shared exactly, as between replicas on separate hosts.
  The URL reaches the workers in their environment (``KGATE_STORE_URL``), not on their command lines.
- **One replica per worker.** Worker *i* is replica ``<replica>-w<i>`` in the audit log and the spool (a
  chain is per replica: two processes never write one).
- **Admin API per worker** on the admin port + *i*; its ``/metrics`` are its own process's (scrape every
  port). Changes through any of them reach all (the directory's invalidation channel), as between replicas.
- **Start-up**: each worker reports through a pipe once it listens. If a worker of the first start exits
  before that, the others are stopped and ``kgate serve`` exits 1 (the worker printed why, in one line).
- **Signals**: SIGTERM or SIGINT drains every worker (each within ``server.drain_seconds``; a second signal
  ends the drains), then stops the embedded Redis; the exit status is 0 when every worker drained cleanly.
  SIGHUP reloads every worker's policy. Workers run in their own session, so a Ctrl-C on the terminal
  reaches them once, through the parent; they get SIGTERM (and drain) if the parent dies.
- **A worker that dies** later is started again, after 1 s, doubling up to 30 s while it keeps dying within
  10 s of its start; it is logged each time, and the others serve meanwhile.
- The decision API and the Envoy processor are refused with several workers: a settle must reach the
  process that admitted its request, which a shared port cannot promise.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.policy.config import Config, parse_listen
from gateway.proxy.server import READY_FD_ENV, StartupError, _busy_line, _check_listen, _own_data_dir

log = logging.getLogger("kgate.workers")

RESTART_FIRST = 1.0  # seconds before a dead worker (or the embedded Redis) is started again
RESTART_MAX = 30.0
STABLE_AFTER = 10.0  # one that ran this long before dying is started again after RESTART_FIRST
TICK = 0.1  # seconds between looks at the children


def next_delay(last: float, ran: float) -> float:
    """Seconds before a child that died after running ``ran`` seconds is started again (``last``: the
    previous wait, 0 for none)."""
    return RESTART_FIRST if ran >= STABLE_AFTER or not last else min(last * 2, RESTART_MAX)


@dataclass
class Worker:
    index: int
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None  # None: stopped for good
    started: float = 0.0
    ready: bool = False  # listening (said so through the pipe)
    ever_ready: bool = False
    exit_code: int | None = None
    delay: float = 0.0  # the last wait before a start again
    due: float | None = None  # dead, to be started again then
    _pipe: int | None = None

    def start(self) -> None:
        self.close_pipe()
        r, w = os.pipe()
        parent = os.getpid()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, env={**self.env, READY_FD_ENV: str(w)},
                                         pass_fds=(w,), start_new_session=True,
                                         preexec_fn=lambda: _die_with_parent(parent))
        finally:
            os.close(w)
        os.set_blocking(r, False)
        self._pipe, self.started, self.ready, self.exit_code, self.due = r, time.monotonic(), False, None, None

    def poll_ready(self) -> None:
        if self._pipe is None:
            return
        with contextlib.suppress(BlockingIOError):
            if os.read(self._pipe, 16):
                self.ready = self.ever_ready = True
            self.close_pipe()  # said it, or closed it (exited) without saying it

    def close_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


def _die_with_parent(parent: int) -> None:
    """In a worker, before it runs: SIGTERM (a drain) when the supervisor dies, however it dies."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        os._exit(1)


def run_workers(args: argparse.Namespace, config: Config, config_path: str) -> int:
    """Supervise ``args.workers`` gateway processes; the exit status of ``kgate serve``."""
    n = args.workers
    listen = args.listen or config.server.listen
    admin_listen = args.admin_listen or config.server.admin_listen
    store = args.store or os.environ.get("KGATE_STORE_URL") or config.store.url
    replica = args.replica_id or config.server.replica_id or socket.gethostname()
    if args.decision_listen or config.decision.listen or args.extproc_listen or config.decision.extproc_listen:
        raise StartupError("the decision API and Envoy's processor need one process (a settle must reach the "
                           "kgate that admitted its request): run them with --workers 1")
    _parse(listen, "clients", "--listen HOST:PORT (server.listen)")
    ahost, aport = _parse(admin_listen, "the admin API", "--admin-listen HOST:PORT (server.admin_listen)")
    admin = [f"[{ahost}]:{aport + i}" if ":" in ahost else f"{ahost}:{aport + i}" for i in range(n)]
    _check_listen(listen, "clients", "--listen HOST:PORT (server.listen)")
    for i, addr in enumerate(admin):
        _check_listen(addr, f"the admin API of worker {i}", "--admin-listen HOST:PORT (worker i uses its port + i)")
    pending: list[int] = []  # signals, handled by the loop; installed before the store starts
    previous = {sig: signal.signal(sig, lambda s, _f: pending.append(s))
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    lock = embedded = None
    try:
        if store == "embedded":
            lock = _own_data_dir(config.store.data_dir, listen, admin_listen)
            embedded = _start_store(config)
            store = embedded.url
        env = {**os.environ, "KGATE_STORE_URL": store}
        base = [sys.executable, "-m", "gateway", "serve", "--config", config_path, "--listen", listen, "--reuse-port"]
        workers = [Worker(i, [*base, "--admin-listen", admin[i], "--replica-id", f"{replica}-w{i}"], env)
                   for i in range(n)]
        if any(s != signal.SIGHUP for s in pending):
            return 0  # stopped while the store started
        return _supervise(workers, pending, listen, embedded)
    finally:
        if embedded is not None:
            embedded.stop_sync()
        if lock is not None:
            lock.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _parse(value: str, what: str, change: str) -> tuple[str, int]:
    try:
        host, port = parse_listen(value)
    except ValueError as exc:
        raise StartupError(f"cannot listen for {what} on {value}: {exc}; change it with {change}") from None
    if port == 0:
        raise StartupError(f"--workers needs a fixed port for {what} (not {value}); set it with {change}")
    return host, port


def _start_store(config: Config) -> Any:
    from gateway.ledger.redis_server import RedisServer, RedisServerError

    try:  # joins the lock the parent holds (re-entrant within a process)
        return RedisServer(data_dir=config.store.data_dir, port=None).start_sync()
    except RedisServerError as exc:
        from gateway.ledger.data_dir_lock import DataDirBusy

        if isinstance(exc, DataDirBusy):
            raise StartupError(_busy_line(exc)) from None
        raise StartupError(f"embedded store: {str(exc).splitlines()[0]}") from None


def _supervise(workers: list[Worker], pending: list[int], listen: str, embedded: Any) -> int:
    stops = 0
    starting, failed = True, False  # starting: until every worker of the first start said it listens
    keep_store = _store_keeper(embedded) if embedded is not None else None
    try:
        for w in workers:
            w.start()
        log.info("kgate: starting %d workers on http://%s (pids %s)", len(workers), listen,
                 ", ".join(str(w.proc.pid) for w in workers if w.proc))
        while True:
            while pending:
                sig = pending.pop(0)
                if sig == signal.SIGHUP:
                    if not stops:
                        log.info("SIGHUP: reloading the policy of every worker")
                        for w in workers:
                            w.signal(signal.SIGHUP)
                    continue
                stops += 1
                log.info("stopping: draining the workers%s", " (again: ending the drains)" * (stops > 1))
                for w in workers:
                    w.signal(signal.SIGTERM)
                    if w.due is not None:
                        w.proc = None  # dead, waiting to start again: not any more
            for w in workers:
                w.poll_ready()
            if starting and all(w.ready for w in workers):
                starting = False
                log.info("kgate: %d workers ready on http://%s", len(workers), listen)
            for w in workers:
                code = w.proc.poll() if w.proc is not None else None
                if w.proc is None or code is None:
                    continue
                now = time.monotonic()
                if w.due is not None:  # dead, waiting
                    if now >= w.due:
                        log.info("starting worker %d again", w.index)
                        w.start()
                    continue
                w.poll_ready()  # a word said just before it exited
                w.exit_code, w.ready = code, False
                if stops:
                    w.proc = None
                elif starting and not w.ever_ready:
                    log.error("worker %d could not start (status %d): stopping the others", w.index, code)
                    w.proc, failed = None, True
                    pending.append(signal.SIGTERM)
                else:
                    w.delay = next_delay(w.delay, now - w.started)
                    w.due = now + w.delay
                    log.error("worker %d (pid %d) exited with status %d after %.1f s; starting it again in %g s",
                              w.index, w.proc.pid, code, now - w.started, w.delay)
            if stops and all(w.proc is None for w in workers):
                break
            if keep_store is not None and not stops:
                keep_store()
            time.sleep(TICK)
    finally:
        for w in workers:  # never leave a worker behind (an exception above)
            w.close_pipe()
            if w.proc is not None and w.proc.poll() is None:
                w.proc.terminate()
                w.proc.wait(60)
    # -SIGTERM: a worker stopped while it started, before its drain handler was in place (it served nothing).
    codes = {w.index: w.exit_code for w in workers if w.exit_code is not None}
    clean = not failed and all(c in (0, -signal.SIGTERM) for c in codes.values())
    log.info("stopped (%s)", "every worker drained" if clean else
             "exit statuses " + ", ".join(f"w{i}: {c}" for i, c in codes.items()))
    return 0 if clean else 1


def _store_keeper(embedded: Any) -> Callable[[], None]:
    """A look at the embedded Redis, for every tick: started again (with a back-off) when it has died."""
    from gateway.ledger.redis_server import RedisServerError

    since, delay, due = time.monotonic(), 0.0, None

    def look() -> None:
        nonlocal since, delay, due
        if embedded.running:
            return
        now = time.monotonic()
        if due is None:
            embedded.stop_sync()  # forget the dead process (the parent's lock on the folder stays)
            delay = next_delay(delay, now - since)
            due = now + delay
            log.error("the embedded Redis exited; starting it again in %g s (the workers spool usage "
                      "meanwhile; its log: %s)", delay, embedded.log_file)
        elif now >= due:
            since, due = now, None
            try:
                embedded.start_sync()
                log.info("the embedded Redis is running again (pid %s)", embedded.pid)
            except RedisServerError as exc:
                log.error("the embedded Redis did not start: %s", str(exc).splitlines()[0])

    return look
