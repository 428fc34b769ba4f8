"""A private ``redis-server`` process: the embedded store of ``kgate serve`` and the Redis of the tests.

:class:`RedisServer` starts the binary (:func:`gateway.ledger.redis_binary.find_redis_binary`) on a unix
socket (the embedded store) or on a loopback TCP port (tests, cluster nodes), in a data folder with
append-only persistence, waits until it answers ``PING``, and stops it with SIGTERM (Redis' graceful
shutdown: the AOF is flushed), SIGKILL after a timeout. :meth:`RedisServer.kill` is kill -9 on purpose;
:meth:`RedisServer.start` again restarts on the same port, socket and folder. Each operation has an async
form and a ``*_sync`` form for pytest fixtures.

On a unix socket only, the server holds its data folder's lock while it runs
(:class:`gateway.ledger.data_dir_lock.DataDirLock`): starting it over a folder another process owns
raises :class:`~gateway.ledger.data_dir_lock.DataDirBusy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from gateway.ledger.data_dir_lock import DataDirBusy, DataDirLock
from gateway.ledger.redis_binary import RedisServerError, find_redis_binary, free_port, redis_version

# DataDirBusy and RedisServerError are what RedisServer's methods raise: importable with it.
__all__ = ["DataDirBusy", "RedisServer", "RedisServerError"]


class RedisServer:
    """One ``redis-server`` process owned by this process.

    ``port``: None — listen on a unix socket only (``unix_socket``, default ``<data_dir>/redis.sock``);
    0 — a free loopback port; N — that port on ``host``. ``data_dir`` defaults to a fresh temporary folder
    that :meth:`cleanup` removes. ``extra_args`` are passed on, e.g. ``["--cluster-enabled", "yes"]``;
    ``config_file`` is passed first (Sentinel needs one: ``extra_args=["--sentinel"]``). On a unix socket
    only, the server holds the data folder's :class:`DataDirLock` while it runs; ``command`` names its
    owner in the lock file (what a second process is told runs there).
    """

    def __init__(self, *, binary: str | os.PathLike[str] | None = None, prefer: str | None = None,
                 data_dir: str | os.PathLike[str] | None = None, port: int | None = None,
                 host: str = "127.0.0.1", unix_socket: str | os.PathLike[str] | None = None,
                 appendonly: bool = True, extra_args: Sequence[str] = (), startup_timeout: float = 10.0,
                 stop_timeout: float = 10.0, config_file: str | os.PathLike[str] | None = None,
                 command: str | None = None):
        self.binary = find_redis_binary(binary if binary is not None else prefer)
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir if data_dir is not None else tempfile.mkdtemp(prefix="kgate-redis-"))
        self.host = host
        self.port = free_port() if port == 0 else port
        self.unix_socket = self._socket_path(unix_socket) if port is None else (
            Path(unix_socket) if unix_socket else None)
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self.config_file = Path(config_file).absolute() if config_file is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._short_dir: Path | None = None
        # The embedded store (a unix socket only) owns its folder for as long as it runs.
        self._lock = DataDirLock(self.data_dir, command=command) if port is None else None

    # ------------------------------------------------------------------ facts
    @property
    def version(self) -> str:
        return redis_version(self.binary)

    @property
    def url(self) -> str:
        """``redis://host:port`` for TCP, else ``unix:///path``."""
        if self.port is not None:
            return f"redis://{self.host}:{self.port}"
        return f"unix://{self.unix_socket}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    # ------------------------------------------------------------------ sync
    def start_sync(self) -> RedisServer:
        """Start (or restart after stop/kill, same port/socket/folder) and wait until it answers PING."""
        self._spawn()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self._ping_sync():
                return self
            time.sleep(0.01)
        self._abort("did not answer PING")
        raise AssertionError("unreachable")

    def stop_sync(self) -> None:
        """SIGTERM (graceful: AOF flushed), wait, SIGKILL after ``stop_timeout``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._forget(proc)
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._forget(proc)

    def kill_sync(self) -> None:
        """kill -9, on purpose (fault tests): nothing is flushed beyond what the AOF already has."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._forget(proc)

    def cleanup(self) -> None:
        """Stop, and remove the data folder if this object created it."""
        self.stop_sync()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if self._short_dir:
            shutil.rmtree(self._short_dir, ignore_errors=True)

    # ------------------------------------------------------------------ async
    async def start(self) -> RedisServer:
        self._spawn()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if await self._ping():
                return self
            await asyncio.sleep(0.01)
        self._abort("did not answer PING")
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._forget(proc)
            return
        proc.send_signal(signal.SIGTERM)
        if not await self._wait_exit(proc, self.stop_timeout):
            proc.kill()
            await self._wait_exit(proc, 5.0)
        self._forget(proc)

    async def kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            await self._wait_exit(proc, 5.0)
        self._forget(proc)

    async def restart(self) -> RedisServer:
        await self.stop()
        return await self.start()

    def __enter__(self) -> RedisServer:
        return self.start_sync()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()

    async def __aenter__(self) -> RedisServer:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
        self.cleanup()

    # ------------------------------------------------------------------ internals
    def _socket_path(self, requested: str | os.PathLike[str] | None) -> Path:
        path = Path(requested) if requested else self.data_dir / "redis.sock"
        if len(os.fsencode(path.absolute())) > 100:
            # sun_path holds ~107 bytes: a deep data folder gets its socket in a short temporary folder
            self._short_dir = Path(tempfile.mkdtemp(prefix="kgr-"))
            path = self._short_dir / "redis.sock"
        return path.absolute()

    def _command(self) -> list[str]:
        args = [str(self.binary)]
        if self.config_file is not None:
            args.append(str(self.config_file))  # must come first; Sentinel rewrites it
        args += ["--daemonize", "no", "--dir", str(self.data_dir.absolute()),
                "--logfile", str(self.log_file.absolute()), "--save", "",
                "--appendonly", "yes" if self.appendonly else "no"]
        if self.port is not None:
            args += ["--port", str(self.port), "--bind", self.host]
        else:
            args += ["--port", "0"]
        if self.unix_socket is not None:
            args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        return args + self.extra_args

    def _spawn(self) -> None:
        if self.running:
            raise RedisServerError(f"already running (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._lock is not None:
            # Before the socket or any file is touched: a live owner's socket must survive our attempt.
            self._lock.acquire().update(socket=str(self.unix_socket))
        if self.unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_socket.unlink()  # left by a kill -9
        try:
            self._proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
        except OSError as exc:
            if self._lock is not None:
                self._lock.release()
            raise RedisServerError(f"cannot run {self.binary}: {exc.strerror or exc}") from None

    def _forget(self, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        self._proc = None
        if self._lock is not None:
            self._lock.release()

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._abort(f"exited with status {self._proc.returncode}")

    def _abort(self, what: str) -> None:
        err = b""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            with contextlib.suppress(Exception):
                err = self._proc.communicate(timeout=5)[1] or b""
        self._proc = None
        if self._lock is not None:
            self._lock.release()
        try:
            tail = self.log_file.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            tail = []
        detail = "\n".join([*tail, err.decode(errors="replace").strip()]).strip()
        raise RedisServerError(f"{self.binary} {what}" + (f":\n{detail}" if detail else ""))

    def _ping_sync(self) -> bool:
        try:
            if self.port is not None:
                conn = socket.create_connection((self.host, self.port), timeout=1)
            else:
                conn = socket.socket(socket.AF_UNIX)
                conn.settimeout(1)
                conn.connect(str(self.unix_socket))
            with conn:
                conn.sendall(_PROBE)
                buf = b""
                while (answer := _parse_probe(buf)) is None:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return False
                    buf += chunk
                return answer == (True, self.pid)
        except OSError:
            return False

    async def _ping(self) -> bool:
        writer = None
        try:
            if self.port is not None:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            else:
                reader, writer = await asyncio.open_unix_connection(str(self.unix_socket))
            writer.write(_PROBE)
            buf = b""
            while (answer := _parse_probe(buf)) is None:
                chunk = await asyncio.wait_for(reader.read(65536), 1.0)
                if not chunk:
                    return False
                buf += chunk
            return answer == (True, self.pid)
        except (OSError, TimeoutError):
            return False
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    @staticmethod
    async def _wait_exit(proc: subprocess.Popen[bytes], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while proc.poll() is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True


# Readiness: PING answers +PONG (not -LOADING while the AOF is replayed), and INFO says the process
# answering is ours — not another server that already holds the port.
_PROBE = b"INFO server\r\nPING\r\n"


def _parse_probe(buf: bytes) -> tuple[bool, int | None] | None:
    """(PING answered PONG, process_id from INFO) once both replies are in ``buf``; None until then."""
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    pid = None
    if buf.startswith(b"$"):
        start = end + 2
        stop = start + int(buf[1:end])
        if len(buf) < stop + 2:
            return None
        m = re.search(rb"process_id:(\d+)", buf[start:stop])
        pid = int(m.group(1)) if m else None
        rest = buf[stop + 2:]
    else:
        rest = buf[end + 2:]  # an error reply to INFO
    if b"\r\n" not in rest:
        return None
    return rest.startswith(b"+PONG"), pid


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM it when this process dies, so no Redis outlives its owner."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
