"""What a new deployer trips over (issue 14): one owner per embedded store, and start-up errors that teach.

Every test runs real ``python -m gateway`` processes on free loopback ports in a fresh folder with the
example policy, as a new user would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from gatewayutil import wait_ready

from gateway.ledger.redis_binary import free_port

ROOT = Path(__file__).resolve().parents[2]
DEMO_KEY = "kgate-demo-key"
CHAT = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "hi"}]}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KGATE_")}
    return {**env, **extra}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A fresh folder holding the example policy, as after a clone."""
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    return tmp_path


def _kgate(work: Path, *args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=work, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout, check=False)


def _serve(work: Path, port: int, admin: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}",
                             "--admin-listen", f"127.0.0.1:{admin}", *extra], cwd=work, env=_env(),
                            stderr=subprocess.PIPE)


def _stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    return err.decode(errors="replace")


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The failure's stderr, asserted to be one line, no traceback, with a non-zero exit."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


async def _chat(url: str, key: str) -> int:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", json=CHAT,
                                                    headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


# ------------------------------------------------------------------------------- one owner per store
async def test_a_second_serve_on_the_same_data_dir_fails_fast_and_leaves_the_first_alone(work: Path):
    port, admin = free_port(), free_port()
    first = _serve(work, port, admin)
    url = f"http://127.0.0.1:{port}"
    second_replica = None
    try:
        await wait_ready(url + "/readyz", first)
        sock = work / ".kgate" / "redis.sock"
        inode = sock.stat().st_ino

        # A second gateway on the same folder: one line naming the owner and how to run a second replica.
        busy = _kgate(work, "serve", "--listen", f"127.0.0.1:{free_port()}",
                      "--admin-listen", f"127.0.0.1:{free_port()}", timeout=30)
        line = _one_line(busy)
        assert f"in use by kgate serve (pid {first.pid}" in line
        assert f"--store unix://{sock}" in line and "--replica-id" in line and "store.data_dir" in line
        # ... and the first one's socket, store and readiness are untouched.
        assert sock.exists() and sock.stat().st_ino == inode
        await wait_ready(url + "/readyz", first, timeout=5)

        # The admin CLI talks to the running gateway's store: a key it issues works there at once.
        created = _kgate(work, "keys", "create", "--principal", "zed", "--org", "acme", "--tier", "standard")
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip()
        assert await _chat(url, key) == 200
        assert sock.stat().st_ino == inode  # no private Redis replaced the socket

        # The documented way to a second replica on this host: its own id and ports, the first one's store.
        port2 = free_port()
        second_replica = _serve(work, port2, free_port(), "--replica-id", "second", "--store", f"unix://{sock}")
        await wait_ready(f"http://127.0.0.1:{port2}/readyz", second_replica)
        assert await _chat(f"http://127.0.0.1:{port2}", key) == 200
        assert (work / ".kgate" / "audit" / "second").is_dir()
    finally:
        errs = [_stop(p) for p in (second_replica, first) if p is not None]
    assert first.returncode == 0 and "Traceback" not in "".join(errs), errs


def test_the_admin_cli_without_a_gateway_serves_the_folder_itself_under_the_lock(work: Path):
    created = _kgate(work, "keys", "create", "--principal", "zed", "--org", "acme", "--tier", "standard")
    assert created.returncode == 0, created.stderr
    listed = _kgate(work, "keys", "list", "--principal", "zed")
    assert listed.returncode == 0 and '"principal": "zed"' in listed.stdout, listed.stderr
    assert (work / ".kgate" / "kgate.lock").exists()


# ------------------------------------------------------------------------------- errors that teach
@pytest.fixture
def listening() -> Iterator[int]:
    """A loopback port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_busy_client_port_names_it_and_the_flag(work: Path, listening: int):
    line = _one_line(_kgate(work, "serve", "--listen", f"127.0.0.1:{listening}",
                            "--admin-listen", f"127.0.0.1:{free_port()}"))
    assert f"clients on 127.0.0.1:{listening}" in line and "address already in use" in line
    assert "--listen" in line and "server.listen" in line


def test_a_busy_admin_port_says_it_is_the_admin_port_and_how_to_change_it(work: Path, listening: int):
    line = _one_line(_kgate(work, "serve", "--listen", f"127.0.0.1:{free_port()}",
                            "--admin-listen", f"127.0.0.1:{listening}"))
    assert "admin port" in line and f"127.0.0.1:{listening}" in line and "address already in use" in line
    assert "--admin-listen" in line and "server.admin_listen" in line
    assert not (work / ".kgate" / "audit").exists(), "nothing was started"


def test_no_redis_server_says_what_to_install(work: Path):
    env = _env(KGATE_REDIS_SERVER=str(work / "no-such-redis-server"))
    line = _one_line(_kgate(work, "serve", "--listen", f"127.0.0.1:{free_port()}",
                            "--admin-listen", f"127.0.0.1:{free_port()}", env=env))
    assert "install redis-server" in line and "pip install 'kgate[embedded]'" in line
    # the admin CLI, which would start the embedded store itself, says the same
    line = _one_line(_kgate(work, "keys", "list", env=env))
    assert "pip install 'kgate[embedded]'" in line


def test_a_bad_policy_file_is_one_line(work: Path):
    bad = work / "bad.yaml"
    bad.write_text((work / "policies" / "example.yaml").read_text().replace("  listen:", "  lisen:", 1))
    line = _one_line(_kgate(work, "serve", "--config", str(bad)))
    assert "bad.yaml" in line and "lisen" in line


def test_a_malformed_listen_address_is_one_line(work: Path):
    line = _one_line(_kgate(work, "serve", "--listen", "8080"))
    assert "HOST:PORT" in line and "--listen" in line


async def test_the_docker_images_default_command_works_without_a_store_url(work: Path):
    """The image's CMD (the example policy, embedded store, no KGATE_STORE_URL) serves out of the box:
    the image carries a redis-server for it."""
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    installs = [ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#") and "install" in ln]
    assert any("redis-server" in ln for ln in installs), "the image installs redis-server"
    cmd = next(ln for ln in dockerfile.splitlines() if ln.startswith("CMD"))
    assert "--store" not in cmd and "/etc/kgate/kgate.yaml" in cmd
    (work / "etc").mkdir()
    shutil.copy(work / "policies" / "example.yaml", work / "etc" / "kgate.yaml")
    state = work / "var-lib-kgate"  # the image's WORKDIR
    state.mkdir()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(work / "etc" / "kgate.yaml"),  # noqa: ASYNC220
                             "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}"],
                            cwd=state, env=_env(), stderr=subprocess.PIPE)
    try:
        await wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        assert await _chat(f"http://127.0.0.1:{port}", DEMO_KEY) == 200
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err[-2000:]


# ------------------------------------------------------------------------------- audit verify, no path
async def _write_audit(work: Path, hmac_key: bytes | None) -> None:
    from gateway.audit.log import AuditLog

    log = AuditLog(work / ".kgate" / "audit", "r1", hmac_key=hmac_key)
    await log.start()
    for i in range(3):
        await log.write({"request_id": f"req-{i}", "decision": "allowed", "principal": "demo"})
    await log.close()


async def test_audit_verify_without_a_path_works_with_the_example_policy_and_no_hmac_key(work: Path):
    """The example policy names KGATE_AUDIT_HMAC_KEY, optional: unset, the gateway writes plain chains and
    `kgate audit verify` (default: the configured audit dir) verifies them."""
    await _write_audit(work, None)
    result = _kgate(work, "audit", "verify")
    assert result.returncode == 0, result.stderr
    assert "ok: 3 records, 1 replicas" in result.stdout


async def test_audit_verify_without_the_key_of_hmac_records_names_the_problem(work: Path):
    await _write_audit(work, b"secret")
    result = _kgate(work, "audit", "verify")
    assert result.returncode == 1 and "hmac-key-needed" in result.stdout, result
    ok = _kgate(work, "audit", "verify", env=_env(KGATE_AUDIT_HMAC_KEY="secret"))
    assert ok.returncode == 0 and "ok: 3 records" in ok.stdout, ok
    # a variable named on the command line must be set
    named = _kgate(work, "audit", "verify", "--hmac-key-env", "NO_SUCH_VARIABLE")
    assert named.returncode == 2 and "NO_SUCH_VARIABLE" in _one_line(named)


# ------------------------------------------------------------------------------- the README's demo
async def test_the_readmes_first_request_answers_with_visible_content(work: Path):
    """The README's curl: clamped to two samples of 1,024 tokens at medium effort; the simulated model
    reasons within that, and leaves room for an answer the client can see."""
    import openai

    port = free_port()
    proc = _serve(work, port, free_port())
    try:
        await wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=DEMO_KEY, max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="reasoner-32b", messages=[{"role": "user", "content": "hi"}], n=4, reasoning_effort="high")
        assert raw.headers["x-kgate-clamped"] == "n=2, max_completion_tokens=1024, reasoning_effort=medium"
        resp = raw.parse()
        assert len(resp.choices) == 2 and all(c.message.content for c in resp.choices)
        assert resp.usage is not None and resp.usage.completion_tokens_details is not None
        assert 0 < resp.usage.completion_tokens_details.reasoning_tokens < resp.usage.completion_tokens
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err[-2000:]
