"""Running kgate as a process: ``kgate serve`` and ``kgate simulate`` (docs/design.md §8).

``serve`` listens for clients and, separately, for the admin API; SIGTERM (or SIGINT) drains: stop
accepting, let in-flight requests finish up to ``server.drain_seconds`` (a second signal ends the wait),
settle, flush the audit log, exit 0. SIGHUP reloads the policy (once started; ignored while draining).
``--workers N`` runs N of these under a supervisor (:mod:`gateway.proxy.workers`).

Expected failures at start-up (a bad policy, a busy port, no redis-server, a data folder another process
owns, an audit log another replica of the same id writes) print one line on stderr and exit non-zero,
never a traceback: :class:`StartupError` carries that line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.policy.config import default_config_path, load_config, parse_listen

if TYPE_CHECKING:
    from gateway.ledger.redis_server import DataDirLock
    from gateway.proxy.context import Gateway

log = logging.getLogger("kgate.server")
# Young-generation threshold 20,000 allocations instead of 700: a collection every few dozen requests, not
# every one or two; cycles (tracebacks of handled errors, mostly) live a little longer, nothing leaks.
GC_THRESHOLDS = (20_000, 20, 20)


def _setup_logging(tag: str | None = None) -> None:
    """Log lines on stderr; a worker of ``--workers N`` tags its own with its replica id."""
    who = f"[{tag}] " if tag else ""
    logging.basicConfig(level=os.environ.get("KGATE_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s", stream=sys.stderr)


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class StartupError(Exception):
    """An expected reason not to start, said in one line (what is wrong and what to do)."""


def cmd_serve(args: argparse.Namespace) -> int:
    """``kgate serve``: 0 after a drain; 1 with one line on stderr when it cannot start."""
    reuse_port = bool(getattr(args, "reuse_port", False))  # a worker of --workers N (gateway/proxy/workers.py)
    _setup_logging(getattr(args, "replica_id", None) if reuse_port else None)
    config_path = args.config or default_config_path()
    config = load_config(config_path)  # a ConfigError is printed by the CLI, one line per problem
    listen = args.listen or config.server.listen
    admin_listen = args.admin_listen or config.server.admin_listen
    store = args.store or os.environ.get("KGATE_STORE_URL") or config.store.url
    replica = getattr(args, "replica_id", None)
    lock = None
    try:
        if getattr(args, "workers", 1) > 1:
            from gateway.proxy.workers import run_workers

            return run_workers(args, config, str(config_path))
        if store == "embedded":
            lock = _own_data_dir(config.store.data_dir, listen, admin_listen)
        # Before anything starts: a busy port says which one it is, with nothing else on the terminal.
        if not reuse_port:  # a worker: the supervisor checked the port, and its siblings may hold it already
            _check_listen(listen, "clients", "--listen HOST:PORT (server.listen)")
        _check_listen(admin_listen, "the admin API", "--admin-listen HOST:PORT (server.admin_listen)")
        decision = tuple(getattr(args, "decision_listen", None) or config.decision.listen)
        extproc = getattr(args, "extproc_listen", None) or config.decision.extproc_listen
        _use_uvloop()
        return asyncio.run(serve(config_path, listen, admin_listen, store, replica=replica,
                                 decision_listen=decision, extproc_listen=extproc, reuse_port=reuse_port))
    except StartupError as exc:
        print(f"kgate: cannot start: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the same kinds, raised while the app starts (its store, its audit log)
        line = _startup_failure(exc, config.store.data_dir)
        if line is None:
            raise
        print(f"kgate: cannot start: {line}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()


def _check_listen(value: str, what: str, change: str) -> None:
    """A well-formed HOST:PORT that can be bound now (the real bind comes once the app has started; a
    port taken in between still fails in one line, in :func:`_bind`)."""
    try:
        host, port = parse_listen(value)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (ValueError, OSError) as exc:
        raise StartupError(f"cannot listen for {what} on {value}: {exc}; change it with {change}") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the real listener binds
            try:
                probe.bind(addr)
            except OSError as exc:
                raise StartupError(_bind_line(exc, what, value, change)) from None


def _bind_line(exc: OSError, what: str, listen: str, change: str) -> str:
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    port = " (the admin port)" if what == "the admin API" else ""
    return f"cannot listen for {what} on {listen}{port}: {reason}; choose another with {change}"


def _own_data_dir(data_dir: str, listen: str, admin_listen: str) -> DataDirLock:
    """The embedded store's folder, locked for this process before anything starts (its Redis joins the
    lock), so that a second ``kgate serve`` here stops before touching the first one's socket or files."""
    from gateway.ledger.data_dir_lock import DataDirBusy, DataDirLock
    from gateway.ledger.redis_binary import RedisServerError, find_redis_binary

    try:
        find_redis_binary()  # no redis-server: say what to install before anything starts
        return DataDirLock(data_dir, command="kgate serve", listen=listen, admin_listen=admin_listen).acquire()
    except RedisServerError as exc:
        if isinstance(exc, DataDirBusy):
            raise StartupError(_busy_line(exc)) from None
        raise StartupError(f"embedded store: {exc}") from None
    except OSError as exc:
        raise StartupError(f"store.data_dir {data_dir}: {exc.strerror or exc}") from None


def _busy_line(exc: Any) -> str:
    sock = exc.owner.get("socket")
    share = f"--store unix://{sock}" if sock else "--store pointing at its store"
    return (f"{exc}; to run another replica on this host give it its own --replica-id (server.replica_id), "
            f"ports, and {share} to share its ledger, or its own store.data_dir for a separate one")


def _startup_failure(exc: BaseException, data_dir: str) -> str | None:
    """The one line for an expected start-up failure raised inside the app; None for anything else."""
    from gateway.audit.log import AuditError
    from gateway.ledger.data_dir_lock import DataDirBusy
    from gateway.ledger.redis_binary import RedisServerError

    if isinstance(exc, DataDirBusy):
        return _busy_line(exc)
    if isinstance(exc, RedisServerError):
        lines = str(exc).splitlines()
        more = f" (more in {Path(data_dir) / 'redis.log'})" if len(lines) > 1 else ""
        return f"embedded store: {lines[0].rstrip(':')}{more}"
    if isinstance(exc, AuditError):
        return f"{exc} (--replica-id or server.replica_id)"
    if isinstance(exc, StartupError):
        return str(exc)
    return None


def _settle_heap() -> None:
    """After start-up: move what start-up built (the policy, the app, imported modules) out of the cyclic
    garbage collector's sight, and let it run less often. A request allocates hundreds of short-lived
    objects, nearly all freed by reference counting; with the default thresholds a full collection over
    every long-lived object ran every few hundred requests."""
    gc.collect()
    gc.freeze()  # (a frozen object in a reference cycle is never freed: the first policy reload may leave
    # the start-up configuration behind, once)
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(config_path: object, listen: str, admin_listen: str, store: str, *,
                replica: str | None = None, decision_listen: tuple[str, ...] = (),
                extproc_listen: str | None = None, reuse_port: bool = False) -> int:
    """Run until SIGTERM or SIGINT, then drain; returns the exit code (0 after a drain)."""
    from gateway.admin.api import create_admin_app, reload_policy
    from gateway.decision.listeners import PluginListeners, start_plugins
    from gateway.proxy.app import create_app
    from gateway.proxy.client_limits import GatewayRunner
    from gateway.proxy.context import ENGINE, GATEWAY

    # Signals first: a SIGTERM that arrives while the store or the listeners start up is a request to
    # stop once started, not a reason to die without cleaning up (the default action).
    stop = asyncio.Event()
    force = asyncio.Event()
    hup = asyncio.Event()  # a SIGHUP while starting: reload once started (the file may have changed since)
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        if stop.is_set():
            force.set()  # a second signal: stop waiting for the requests in flight
            log.warning("second stop signal: ending the drain now")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, hup.set)  # never the default action (which ends the process)

    config = load_config(config_path)  # type: ignore[arg-type]
    app = create_app(config, store_url=store, replica=replica)
    gw = app[GATEWAY]
    # The drain has already waited for the requests in flight: what is left when it ends gets a moment more,
    # then is cancelled (and settles what it generated).
    runner = GatewayRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)  # + header timeout
    admin_runner = web.AppRunner(create_admin_app(app, config_path), access_log=None, handle_signals=False)
    plugins: PluginListeners | None = None
    try:
        await runner.setup()
        host, port = parse_listen(listen)
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True, reuse_port=reuse_port or None)
        await _bind(site, "clients", listen, "--listen HOST:PORT (server.listen)")
        await admin_runner.setup()
        ahost, aport = parse_listen(admin_listen)
        await _bind(web.TCPSite(admin_runner, ahost, aport, reuse_address=True), "the admin API", admin_listen,
                    "--admin-listen HOST:PORT (server.admin_listen)")
        if decision_listen or extproc_listen:
            plugins = await start_plugins(app[ENGINE], config.decision, decision_listen, extproc_listen)
            log.info("kgate decision API on %s", ", ".join(plugins.addresses))
        log.info("kgate listening on http://%s (admin on http://%s), store %s, policy %s (sha256 %s), "
                 "event loop %s", listen, admin_listen, "embedded" if store == "embedded" else store.split("@")[-1],
                 config_path, config.version[:12], type(loop).__module__.split(".")[0])
        reloads: set[asyncio.Task[object]] = set()  # the loop keeps only weak references to its tasks

        def on_sighup() -> None:
            if stop.is_set():
                log.warning("SIGHUP while draining: the policy is not reloaded")
                return
            task = loop.create_task(reload_policy(app, config_path, actor="sighup"), name="kgate-sighup-reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        if hup.is_set():
            on_sighup()
        _notify_ready()
        _settle_heap()
        await stop.wait()
        await drain(gw, site, force)
        if plugins is not None:  # admitted requests a plugin still has to settle: as long as the drain allows
            await plugins.close(grace=config.server.drain_seconds)
    finally:
        # Close in order: the admin API, then the app (its cleanup_ctx settles nothing new, stops the spool,
        # flushes and closes the audit log, then the store). Also after a failed start.
        if plugins is not None:
            await plugins.close()
        await admin_runner.cleanup()
        await runner.cleanup()
    log.info("stopped")
    return 0


READY_FD_ENV = "KGATE_READY_FD"  # set by the supervisor of --workers N for each worker


def _notify_ready() -> None:
    """A worker of ``--workers N`` tells its supervisor that it listens: one byte on the pipe it was given."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is not None:
        with contextlib.suppress(OSError, ValueError):
            os.write(int(fd), b"1")
            os.close(int(fd))


async def _bind(site: web.BaseSite, what: str, listen: str, change: str) -> None:
    """Start listening; a port that cannot be had is a :class:`StartupError` naming which one and how to
    choose another."""
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(_bind_line(exc, what, listen, change)) from None


async def drain(gw: Gateway, site: web.BaseSite, force: asyncio.Event) -> None:
    """Refuse new work, and let what is in flight finish, up to ``server.drain_seconds``.

    New connections are refused (the listener closes); a request on a connection kept alive is answered
    503 ``shutting_down`` in its API's shape. Streams in flight run to their end and settle. Requests still
    running when the period ends (or on a second signal) are cancelled here, and waited for: their handlers
    settle what was generated, as for a client that went away, while the store and the audit log are still
    open. (The runner's own cleanup would cancel them without waiting, and close the store under them.)
    """
    gw.draining = True
    log.info("draining: %d requests in flight", gw.inflight)
    await site.stop()
    deadline = time.monotonic() + gw.config.server.drain_seconds
    while gw.inflight > 0 and time.monotonic() < deadline and not force.is_set():  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    pending = [t for t in gw.handlers if not t.done()]
    if pending:
        log.warning("drain ended with %d requests in flight: cancelled, they settle what they generated",
                    len(pending))
        for t in pending:
            t.cancel()
        _, stuck = await asyncio.wait(pending, timeout=CANCEL_GRACE)
        if stuck:
            log.error("%d requests did not finish settling; their holds expire with their leases", len(stuck))
    # Settles that a cancellation interrupted finish in tasks of their own: the app's cleanup waits for
    # them before it closes the store.


CANCEL_GRACE = 5.0  # seconds for cancelled requests to settle (a store call or two, an audit write)


def cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.simulator.server import SimulatorOptions, run_simulator

    _setup_logging()
    parse_listen(args.listen)
    opts = SimulatorOptions(latency_ms=args.latency_ms, tokens_per_second=args.tokens_per_second,
                            output_tokens=args.output_tokens, faults=list(args.fault), flavor=args.flavor)
    return run_simulator(args.listen, opts, workers=args.workers)
