"""``kgate simulate``: a fake upstream model server speaking the five wire formats (docs/design.md §8, §9).

It is what kgate's tests, demo and benchmarks sit in front of — not a mock of kgate. This module runs it:
:func:`start_simulator` in the caller's event loop (tests, ``kgate serve --simulate``),
:func:`run_simulator` as a process until a signal, with ``workers`` processes sharing one port. What it
answers is :mod:`gateway.simulator.app` (routes, knobs, control endpoints); its faults are
:mod:`gateway.simulator.faults`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.simulator.app import SimulatorOptions, create_simulator_app

__all__ = ["SimulatorOptions", "run_simulator", "start_simulator"]


async def _listen(opts: SimulatorOptions, host: str, port: int, **site: Any) -> tuple[web.AppRunner, web.TCPSite]:
    """The simulator's app set up and listening on ``host:port`` (``site``: options of the TCP site)."""
    runner = web.AppRunner(create_simulator_app(opts), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    tcp = web.TCPSite(runner, host, port, **site)
    await tcp.start()
    return runner, tcp


async def start_simulator(opts: SimulatorOptions, host: str = "127.0.0.1",
                          port: int = 0) -> tuple[web.AppRunner, str]:
    """Start the simulator on ``host:port`` (0: a free port); returns the runner (call
    ``await runner.cleanup()``) and the base URL, e.g. ``http://127.0.0.1:41234`` (append ``/v1`` for
    the OpenAI and Anthropic SDKs' ``base_url``)."""
    runner, site = await _listen(opts, host, port, backlog=1024)
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound}"


def _parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


async def _serve_until_signal(host: str, port: int, opts: SimulatorOptions, reuse_port: bool) -> None:
    runner, _ = await _listen(opts, host, port, backlog=2048, reuse_port=reuse_port or None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop_kind = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"kgate simulate: listening on http://{host}:{port} (pid {os.getpid()}, event loop {loop_kind})",
          file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _run_loop(host: str, port: int, opts: SimulatorOptions, reuse_port: bool) -> None:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve_until_signal(host, port, opts, reuse_port))


def run_simulator(listen: str, opts: SimulatorOptions, workers: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM (``kgate simulate``); 0 on a clean exit, 2 on bad options.

    With ``workers`` (default ``opts.workers``) above 1, that many processes share the port through
    SO_REUSEPORT; each keeps its own ``/_sim/stats`` and ``/_sim/config``.
    """
    if workers is not None:
        opts = dataclasses.replace(opts, workers=workers)
    try:
        host, port = _parse_listen(listen)
        opts.validate()
        if opts.workers > 1 and port == 0:
            raise ValueError("--workers needs a fixed port")
    except ValueError as e:
        print(f"kgate simulate: {e}", file=sys.stderr)
        return 2
    if opts.workers == 1:
        _run_loop(host, port, opts, False)
        return 0
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_run_loop, args=(host, port, opts, True), daemon=True)
             for _ in range(opts.workers)]
    for p in procs:
        p.start()

    def stop(signum: int, frame: Any) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for p in procs:
        p.join()
    return 0 if all(p.exitcode == 0 for p in procs) else 1
