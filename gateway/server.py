"""Running kgate as a process: ``kgate serve`` and ``kgate simulate`` (DESIGN §6).

``serve`` listens for clients and, separately, for the admin API; SIGTERM (or SIGINT) drains: stop
accepting, let in-flight requests finish up to ``server.drain_seconds`` (a second signal ends the wait),
settle, flush the audit log, exit 0. SIGHUP reloads the policy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from aiohttp import web

from .config import ConfigError, default_config_path, load_config, parse_listen

if TYPE_CHECKING:
    from .context import Gateway

log = logging.getLogger("kgate.server")
# Young-generation threshold 20,000 allocations instead of 700: a collection every few dozen requests, not
# every one or two; cycles (tracebacks of handled errors, mostly) live a little longer, nothing leaks.
GC_THRESHOLDS = (20_000, 20, 20)


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("KGATE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging()
    config_path = args.config or default_config_path()
    config = load_config(config_path)
    listen = args.listen or config.server.listen
    admin_listen = args.admin_listen or config.server.admin_listen
    parse_listen(listen)
    parse_listen(admin_listen)
    store = args.store or os.environ.get("KGATE_STORE_URL") or config.store.url
    _use_uvloop()
    try:
        return asyncio.run(serve(config_path, listen, admin_listen, store))
    except ConfigError:
        raise
    except OSError as exc:
        print(f"kgate: cannot start: {exc}", file=sys.stderr)
        return 1


def _settle_heap() -> None:
    """After start-up: move what start-up built (the policy, the app, imported modules) out of the cyclic
    garbage collector's sight, and let it run less often. A request allocates hundreds of short-lived
    objects, nearly all freed by reference counting; with the default thresholds a full collection over
    every long-lived object ran every few hundred requests."""
    gc.collect()
    gc.freeze()  # (a frozen object in a reference cycle is never freed: the first policy reload may leave
    # the start-up configuration behind, once)
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(config_path: object, listen: str, admin_listen: str, store: str) -> int:
    """Run until SIGTERM or SIGINT, then drain; returns the exit code (0 after a drain)."""
    from .admin import create_admin_app, reload_policy
    from .app import create_app
    from .context import GATEWAY

    # Signals first: a SIGTERM that arrives while the store or the listeners start up is a request to
    # stop once started, not a reason to die without cleaning up (the default action).
    stop = asyncio.Event()
    force = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        if stop.is_set():
            force.set()  # a second signal: stop waiting for the requests in flight
            log.warning("second stop signal: ending the drain now")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)

    config = load_config(config_path)  # type: ignore[arg-type]
    app = create_app(config, store_url=store)
    gw = app[GATEWAY]
    # The drain has already waited for the requests in flight: what is left when it ends gets a moment more,
    # then is cancelled (and settles what it generated).
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    admin_runner = web.AppRunner(create_admin_app(app, config_path), access_log=None, handle_signals=False)
    try:
        await runner.setup()
        host, port = parse_listen(listen)
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        await admin_runner.setup()
        ahost, aport = parse_listen(admin_listen)
        await web.TCPSite(admin_runner, ahost, aport, reuse_address=True).start()
        log.info("kgate listening on http://%s (admin on http://%s), store %s, policy %s (sha256 %s), "
                 "event loop %s", listen, admin_listen, "embedded" if store == "embedded" else store.split("@")[-1],
                 config_path, config.version[:12], type(loop).__module__.split(".")[0])
        reloads: set[asyncio.Task[object]] = set()  # the loop keeps only weak references to its tasks

        def on_sighup() -> None:
            task = loop.create_task(reload_policy(app, config_path, actor="sighup"), name="kgate-sighup-reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        _settle_heap()
        await stop.wait()
        loop.remove_signal_handler(signal.SIGHUP)
        await drain(gw, site, force)
    finally:
        # Close in order: the admin API, then the app (its cleanup_ctx settles nothing new, stops the spool,
        # flushes and closes the audit log, then the store). Also after a failed start.
        await admin_runner.cleanup()
        await runner.cleanup()
    log.info("stopped")
    return 0


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
    from .simulator import SimulatorOptions, run_simulator

    _setup_logging()
    parse_listen(args.listen)
    opts = SimulatorOptions(latency_ms=args.latency_ms, tokens_per_second=args.tokens_per_second,
                            output_tokens=args.output_tokens, faults=list(args.fault), flavor=args.flavor)
    return run_simulator(args.listen, opts, workers=args.workers)
