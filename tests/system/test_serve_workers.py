"""``kgate serve --workers N`` (issue 18 item 3): several gateway processes behind one port, one store, one
audit chain each; budgets shared exactly; SIGTERM drains all, SIGHUP reloads all, a worker (or the embedded
Redis) that dies is started again, a worker that cannot start stops the whole."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from gatewayutil import KEYS, audit_records, policy_dict, wait_ready

from gateway.audit.verify import verify_main
from gateway.ledger.data_dir_lock import data_dir_owner
from gateway.ledger.redis_binary import free_port, free_ports

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")


def children(pid: int, what: str) -> list[int]:
    """The live children of ``pid`` whose command line holds ``what`` ("gateway": workers, "redis-server")."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    found = []
    for p in map(int, out.split()):
        try:
            cmd = cmdline(p)
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if what in cmd and state != "Z":
            found.append(p)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Supervisor:
    """``kgate serve --workers N`` as a process, on a policy of the test helpers (replica id ``gw``)."""

    def __init__(self, tmp_path: Path, *, workers: int = 2, store: str = "embedded", sim_url: str | None = None,
                 extra: tuple[str, ...] = ()):
        self.data = tmp_path / "data"
        pol = policy_dict(store, self.data, tight={"budgets": [{"metric": "requests", "window": "1h", "limit": 20}],
                                                   "description": "aaaa"})
        pol["server"]["replica_id"] = "gw"
        if sim_url:
            pol["upstreams"]["sim"]["base_url"] = sim_url
        self.policy = tmp_path / "policy.yaml"
        self.policy.write_text(yaml.safe_dump(pol))
        self.port, self.admin = free_port(), free_ports(workers)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "supervisor.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(self.policy), "--workers", str(workers),
             "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin}", *extra],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log.open("wb"),
            env={**os.environ, "KGATE_LOG_LEVEL": "INFO"}, start_new_session=True)  # a group of its own

    def workers(self) -> list[int]:
        return children(self.proc.pid, "gateway")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def ready(self, n: int = 2) -> None:
        await wait_ready(self.url + "/readyz", self.proc, timeout=60)
        for i in range(n):
            await wait_ready(f"http://127.0.0.1:{self.admin + i}/metrics", self.proc, timeout=60)

    def stop(self) -> None:
        pids = self.workers() + children(self.proc.pid, "redis-server") if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    made: list[Supervisor] = []

    def make(**kw: Any) -> Supervisor:
        made.append(Supervisor(tmp_path, **kw))
        return made[-1]

    yield make
    for sup in made:
        sup.stop()


@pytest.fixture
def slow_sim() -> Iterator[str]:
    """An upstream at 50 tokens per second: a 10-token answer takes 0.2 s, a 100-token stream 2 s."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "simulate", "--listen", f"127.0.0.1:{port}",
                             "--tokens-per-second", "50"], cwd=ROOT, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(wait_ready(url + "/_sim/health", proc))
    yield url
    proc.terminate()
    proc.wait(15)


async def chat(url: str, who: str = "tina", **extra: Any) -> int:
    body = {"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, **extra}
    # A connection per request: the kernel spreads new connections over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, \
            s.post(url + CHAT, json=body, headers={"Authorization": f"Bearer {KEYS[who]}"}) as r:
        await r.read()
        return r.status


async def until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := check():
            return got
        await asyncio.sleep(0.1)
    raise AssertionError(f"never: {what}")


def sighup_records(data: Path) -> set[str]:
    return {r["replica"] for r in audit_records(data / "audit", torn_ok=True)
            if r.get("decision") == "admin" and r.get("reason") == "policy.reload" and r.get("actor") == "sighup"}


async def test_two_workers_one_port_one_store_exact_budgets_reload_restart_drain(start, slow_sim: str) -> None:
    sup = start(sim_url=slow_sim)
    await sup.ready()
    assert len(sup.workers()) == 2
    [redis] = children(sup.proc.pid, "redis-server")  # the embedded store: the supervisor's, one for all
    owner = data_dir_owner(sup.data)
    assert owner is not None and owner["pid"] == sup.proc.pid and owner["socket"], owner
    for pid in sup.workers():  # its URL reaches the workers in their environment, not their command line
        assert "unix://" not in cmdline(pid)

    # One requests budget of 20, 40 requests at once over both workers: exactly 20 admitted.
    statuses = Counter(await asyncio.gather(*(chat(sup.url) for _ in range(40))))
    assert statuses == {200: 20, 429: 20}, statuses
    served = Counter(r["replica"] for r in audit_records(sup.data / "audit", torn_ok=True) if r.get("request_id"))
    assert set(served) == {"gw-w0", "gw-w1"} and sum(served.values()) == 40, served  # both got traffic

    # SIGHUP reloads both. The new file keeps the old one's size and mtime, so the workers' file watch does
    # not see it: only the signal can reload it.
    st = sup.policy.stat()
    new = sup.policy.with_suffix(".new")
    new.write_text(sup.policy.read_text().replace("description: aaaa", "description: bbbb"))
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, sup.policy)
    await asyncio.sleep(1.5)
    assert not sighup_records(sup.data)
    sup.proc.send_signal(signal.SIGHUP)
    await until(lambda: sighup_records(sup.data) == {"gw-w0", "gw-w1"}, "both workers reloaded on SIGHUP")

    # A worker that dies is started again, and logged; the port answers meanwhile (the other worker).
    victim = sup.workers()[0]
    os.kill(victim, signal.SIGKILL)
    # Reaped by the supervisor, so all its threads are gone and its listening socket with them (a main
    # thread shows as a zombie while the others still hold the socket: a connection queued there is reset).
    await until(lambda: f"(pid {victim}) exited with status -9" in sup.text(), "the supervisor saw it die")
    assert [await chat(sup.url, "alice") for _ in range(4)] == [200] * 4
    await until(lambda: len(sup.workers()) == 2 and victim not in sup.workers(), "the worker started again")
    await sup.ready()
    assert "exited with status -9" in sup.text() and "starting it again in 1 s" in sup.text()

    # The embedded Redis that dies is started again on the same socket; the workers reconnect.
    os.kill(redis, signal.SIGKILL)
    redis = (await until(lambda: [p for p in children(sup.proc.pid, "redis-server") if p != redis],
                         "the embedded Redis started again"))[0]

    async def serves() -> bool:
        return await chat(sup.url, "alice") == 200

    deadline = time.monotonic() + 20
    while not await serves():
        assert time.monotonic() < deadline, "requests never succeeded after the store came back"
        await asyncio.sleep(0.2)

    # SIGTERM drains: a stream in flight (2 s at 50 tokens/s) runs to its end, then all stop, Redis last.
    body = {"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "stream": True}
    async with aiohttp.ClientSession() as s, \
            s.post(sup.url + CHAT, json=body, headers={"Authorization": f"Bearer {KEYS['alice']}"}) as r:
        assert r.status == 200
        await r.content.readline()  # the stream has started
        sup.proc.send_signal(signal.SIGTERM)
        streamed = (await r.read()).decode()
    assert streamed.rstrip().endswith("data: [DONE]"), streamed[-300:]
    assert sup.proc.wait(60) == 0, sup.text()[-3000:]
    assert not sup.workers() and not alive(redis)
    assert not list(sup.data.glob("**/*.sock")), "the embedded Redis left its socket"
    assert data_dir_owner(sup.data) is None
    assert "stopped (every worker drained)" in sup.text() and "Traceback" not in sup.text()
    assert "second stop signal" not in sup.text()
    assert verify_main([str(sup.data / "audit")]) == 0  # a chain per replica, the killed one's too


async def test_workers_share_a_redis_url(start, redis_url: str) -> None:
    sup = start(store=redis_url)
    await sup.ready()
    assert not children(sup.proc.pid, "redis-server")
    statuses = Counter(await asyncio.gather(*(chat(sup.url) for _ in range(40))))
    assert statuses == {200: 20, 429: 20}, statuses
    # Ctrl-C on a terminal signals the whole process group: the workers (in their own sessions) get one
    # stop, through the supervisor, and drain once.
    os.killpg(sup.proc.pid, signal.SIGINT)
    assert sup.proc.wait(60) == 0, sup.text()[-3000:]
    assert "second stop signal" not in sup.text()


async def test_a_worker_that_cannot_start_stops_the_whole(start, tmp_path: Path) -> None:
    lock_dir = tmp_path / "data" / "audit" / "gw-w1"
    lock_dir.mkdir(parents=True)
    fd = os.open(lock_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" writes replica gw-w1's audit log
    try:
        sup = start()
        code = await asyncio.to_thread(sup.proc.wait, 60)
    finally:
        os.close(fd)
    text = sup.text()
    assert code == 1, text[-3000:]
    assert "another process is writing the audit log of replica 'gw-w1'" in text, text[-3000:]
    assert "worker 1 could not start (status 1): stopping the others" in text
    assert "Traceback" not in text and data_dir_owner(sup.data) is None


def test_refused_with_several_workers(tmp_path: Path) -> None:
    pol = policy_dict("embedded", tmp_path / "data")
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(pol))

    def serve(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)

    ports = ["--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}"]
    for plugin in (["--decision-listen", f"unix:{tmp_path}/d.sock"], ["--extproc-listen", "127.0.0.1:0"]):
        done = serve("--workers", "2", *ports, *plugin)
        assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
        assert "need one process" in done.stderr and "--workers 1" in done.stderr, done.stderr
    done = serve("--workers", "2", "--listen", "127.0.0.1:0", ports[2], ports[3])
    assert done.returncode == 1 and "needs a fixed port for clients" in done.stderr, done.stderr
    bad = serve("--workers", "0")
    assert bad.returncode == 2 and "at least 1" in bad.stderr
    assert not (tmp_path / "data" / "audit").exists()  # nothing started
