"""A real nginx with kgate's Lua plugin (deploy/nginx/), for tests: the shipped example configuration with
its addresses replaced, started in a temporary prefix and stopped afterwards.

Skips (``pytest.skip``) when nginx, lua-nginx-module or lua-cjson is missing.
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
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.ledger.redis_binary import free_port

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "deploy" / "nginx"
EXAMPLE = PLUGIN_DIR / "nginx.conf"
MODULES = Path("/usr/lib/nginx/modules")
CJSON = (Path("/usr/lib/x86_64-linux-gnu/lua/5.1/cjson.so"), Path("/usr/local/lib/lua/5.1/cjson.so"),
         Path("/usr/lib/aarch64-linux-gnu/lua/5.1/cjson.so"), Path("/usr/local/openresty/lualib/cjson.so"))


def _missing(reason: str) -> None:
    """Skip, or fail where CI promised the real nginx (``KGATE_REQUIRE_NGINX=1``, set by .ci/run)."""
    if os.environ.get("KGATE_REQUIRE_NGINX") == "1":
        pytest.fail(f"KGATE_REQUIRE_NGINX=1 but {reason}")
    pytest.skip(reason)


def nginx_binary() -> str:
    """nginx with lua-nginx-module and lua-cjson, else the test is skipped with the reason."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if binary is None:
        _missing("nginx is not installed (apt-get install nginx libnginx-mod-http-lua lua-cjson)")
    for mod in ("ndk_http_module.so", "ngx_http_lua_module.so"):
        if not (MODULES / mod).exists():
            _missing(f"{MODULES / mod} is missing (apt-get install libnginx-mod-http-lua)")
    if not any(p.exists() for p in CJSON):
        _missing("lua-cjson is not installed (apt-get install lua-cjson)")
    return binary


def _lua(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(prefix: Path, *, port: int, upstream: str, decision: str, reuseport: bool = False,
                  workers: int | None = None, log_level: str = "info", **options: Any) -> str:
    """The example configuration (deploy/nginx/nginx.conf) for a test: its listener, upstream, decision API,
    package path and plugin ``options`` replaced (each replacement must apply: the example is what is tested).
    The access log names the worker (``PID STATUS REQUEST-ID``); ``reuseport`` gives each worker its own
    listening socket, so the kernel spreads connections over both. ``workers`` replaces the example's
    ``worker_processes``; ``log_level`` is the error log's (``info``: the plugin's per-request lines too)."""
    text = EXAMPLE.read_text()

    def sub(old: str, new: str) -> None:
        nonlocal text
        assert old in text, f"deploy/nginx/nginx.conf no longer contains {old!r}"
        text = text.replace(old, new)

    sub("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{port}{' reuseport' if reuseport else ''};")
    sub("access_log logs/access.log;", "log_format kgate_test '$pid $status $sent_http_x_kgate_request_id';\n"
        "    access_log logs/access.log kgate_test;")
    sub("upstream simulator {\n        server 127.0.0.1:9000;", f"upstream sim {{\n        server {upstream};")
    sub('lua_package_path "/opt/kgate/deploy/nginx/?.lua;;";', f'lua_package_path "{PLUGIN_DIR}/?.lua;;";')
    sub('decision = "unix:/run/kgate/decision.sock",', f"decision = {_lua(decision)},")
    for key, value in options.items():  # an option the example sets is replaced, any other added
        line = re.compile(rf"^(\s*){key} = [^\n]*?,", re.M)
        if line.search(text):
            setting = f"{key} = {_lua(value)},"
            text = line.sub(lambda m, new=setting: m.group(1) + new, text, count=1)
        else:
            sub(f"decision = {_lua(decision)},", f"decision = {_lua(decision)},\n            {key} = {_lua(value)},")
    sub("error_log logs/error.log warn;", f"error_log logs/error.log {log_level};")
    if workers is not None:
        sub("worker_processes 2;", f"worker_processes {workers};")
    if os.geteuid() == 0:  # workers as root: they reach the test's socket, created 0660 by root
        text = "user root;\n" + text
    return text


def render_plain_config(*, port: int, upstream: str, workers: int) -> str:
    """nginx alone, a plain reverse proxy to ``upstream`` (HOST:PORT) with the example's proxy settings (keep-alive
    upstream, no buffering) and access log, and no plugin: the baseline the plugin's cost is measured against."""
    return f"""{"user root;" if os.geteuid() == 0 else ""}
worker_processes {workers};
pid logs/nginx.pid;
error_log logs/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    log_format kgate_test '$pid $status $sent_http_x_kgate_request_id';
    access_log logs/access.log kgate_test;
    client_body_temp_path body_temp;
    proxy_temp_path proxy_temp;
    fastcgi_temp_path fastcgi_temp;
    uwsgi_temp_path uwsgi_temp;
    scgi_temp_path scgi_temp;
    upstream sim {{
        server {upstream};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 1m;
        client_body_buffer_size 1m;
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_next_upstream off;
            proxy_connect_timeout 5s;
            proxy_read_timeout 300s;
            gzip off;
        }}
    }}
}}
"""


def start_nginx(prefix: Path, text: str, port: int) -> subprocess.Popen[bytes]:
    """nginx with configuration ``text`` (listening on ``port``) in ``prefix``, checked with ``nginx -t`` and
    started in the foreground; returns once it listens. Stop it with :func:`stop`."""
    proc = _launch(nginx_binary(), prefix, text)
    try:
        _wait_port(port, proc, prefix)
    except BaseException:
        stop(proc)
        raise
    return proc


@dataclass
class Nginx:
    """A running nginx: ``url`` its listener, ``prefix`` its folder (``logs/error.log``)."""

    url: str
    prefix: Path
    proc: subprocess.Popen[bytes]

    @property
    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def lua_errors(self) -> list[str]:
        """Error-log lines that mean the plugin or nginx broke (a Lua error, an alert), not a request's fate."""
        bad = ("runtime error", "lua entry thread aborted", "[alert]", "[crit]", "[emerg]", "stack traceback",
               "kgate: settle of", "cannot start the settle", "lua tcp socket", "global variable")
        return [line for line in self.error_log.splitlines() if any(b in line for b in bad)]

    def access_log(self) -> list[tuple[int, int, str]]:
        """(worker pid, status, x-kgate-request-id or "-") of each request logged so far."""
        path = self.prefix / "logs" / "access.log"
        rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
        return [(int(r[0]), int(r[1]), r[2]) for r in rows if len(r) == 3]


def _wait_port(port: int, proc: subprocess.Popen[bytes], prefix: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (prefix / "logs" / "error.log")
            raise AssertionError("nginx exited at start: " + (log.read_text()[-3000:] if log.exists() else ""))
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise AssertionError(f"nginx did not listen on {port} within {timeout} s")


@contextlib.asynccontextmanager
async def running_nginx(prefix: Path, *, upstream: str, decision: str, reuseport: bool = False,
                        **options: Any) -> AsyncIterator[Nginx]:
    """nginx with the example configuration in ``prefix``: ``upstream`` (HOST:PORT) is the upstream ``sim`` (the
    test policy's name for the simulator),
    ``decision`` kgate's decision API (``unix:/path`` or HOST:PORT), ``options`` more plugin options.
    Started and stopped off the event loop: a kgate in the test's loop answers the settles nginx sends while
    it stops (a worker finishes its settles before it exits)."""
    binary = nginx_binary()
    proc, port = await asyncio.to_thread(_start, binary, prefix, upstream, decision, reuseport, options)
    try:
        await asyncio.to_thread(_wait_port, port, proc, prefix)
        yield Nginx(f"http://127.0.0.1:{port}", prefix, proc)
    finally:
        await asyncio.to_thread(stop, proc)


def _start(binary: str, prefix: Path, upstream: str, decision: str, reuseport: bool,
           options: dict[str, Any]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    text = render_config(prefix, port=port, upstream=upstream, decision=decision, reuseport=reuseport, **options)
    return _launch(binary, prefix, text), port


def _launch(binary: str, prefix: Path, text: str) -> subprocess.Popen[bytes]:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "logs").mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    test = subprocess.run([binary, "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert test.returncode == 0, test.stderr
    proc = subprocess.Popen([binary, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """A graceful stop (SIGQUIT: workers finish their requests and timers), then SIGKILL if it takes too long."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the master and its workers
            proc.wait(5)
