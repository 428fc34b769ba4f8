"""The fast path (gateway/proxy/fastpath.py): the same answers as aiohttp's server, request by request, and
every request it does not take handed to aiohttp on the same connection with nothing lost.

Two gateways run side by side on one Redis, one with ``server.fast_path`` (the default) and one without;
raw sockets send each request byte for byte to both, and the answers are compared: status, header names,
body. The hostile and unusual requests (smuggling attempts, folded headers, HTTP/1.0, a query string,
``Expect``, oversized bodies, streams) must get exactly aiohttp's answer from the fast-path gateway too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from gatewayutil import KEYS, audit_records, make_config, running_gateway
from recording_upstream import Recorded, RecordingUpstream, config_with_upstream, stream_events

from gateway.proxy.fastpath import WAIT_FOR_WHOLE

CHAT = {"model": "dense", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
LIMIT = 10.0  # seconds: far above anything here; only a hung connection reaches it


def post(body: bytes | dict[str, Any], *, key: str | None = KEYS["alice"], path: str = "/v1/chat/completions",
         extra: str = "", length: int | None = None, version: str = "HTTP/1.1") -> bytes:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    cl = len(data) if length is None else length
    return (f"POST {path} {version}\r\nHost: kgate\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {cl}\r\n{extra}\r\n").encode() + data


class Conn:
    """A raw HTTP/1.1 client connection that reads answers one by one (length-delimited or chunked)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        async with asyncio.timeout(LIMIT):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
            if headers.get("transfer-encoding") == "chunked":
                body = b""
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                    chunk = await self.reader.readexactly(size + 2)
                    if size == 0:
                        break
                    body += chunk[:-2]
            else:
                body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def closed(self) -> bool:
        """Whether the server closes the connection (EOF) within the limit."""
        try:
            async with asyncio.timeout(LIMIT):
                return await self.reader.read(1) == b""
        except (TimeoutError, ConnectionError):
            return False


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[Conn]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield Conn(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def one(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    async with connect(url) as c:
        await c.send(data)
        return await c.answer()


@contextlib.asynccontextmanager
async def two_gateways(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[Any, Any]]:
    for sub in ("fast", "slow"):
        (tmp_path / sub).mkdir(parents=True)
    fast_cfg = make_config(tmp_path / "fast", redis_url)
    slow_cfg = make_config(tmp_path / "slow", redis_url, server={"fast_path": False})
    assert fast_cfg.server.fast_path and not slow_cfg.server.fast_path
    async with running_gateway(fast_cfg) as fast, running_gateway(slow_cfg) as slow:
        yield fast, slow


def _shape(status: int, headers: dict[str, str], body: bytes) -> tuple[Any, ...]:
    """What must match between the two servers: status, header names (less the server's own Date and
    Server), and the body — an error's type and code, an answer's keys."""
    names = frozenset(headers) - {"date", "server"}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return status, names, body.split(b"\n")[0][:40]
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return status, names, doc["error"].get("type"), doc["error"].get("code")
    return status, names, sorted(doc) if isinstance(doc, dict) else type(doc).__name__


REQUESTS: dict[str, bytes] = {
    "ok": post(CHAT),
    "bad key": post(CHAT, key="nope"),
    "no key": post(CHAT, key=None),
    "not json": post(b"{nope"),
    "empty body": post(b""),
    "not an object": post(b"[1, 2]"),
    "over the tier's samples": post({**CHAT, "n": 8}),
    "unknown model": post({**CHAT, "model": "nope"}),
    "bad max_tokens": post({**CHAT, "max_tokens": "many"}),
    "bad stream flag": post({**CHAT, "stream": "yes"}),
    "body over max_body_bytes": post({**CHAT, "pad": "x" * 70_000}),
    "a stream": post({**CHAT, "stream": True}),
    "anthropic": post({"model": "dense", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
                      path="/v1/messages"),
    # Not the fast path's: handed to aiohttp, which answers as it always did.
    "query string": post(CHAT, path="/v1/chat/completions?x=1"),
    "encoded slash": post(CHAT, path="/v1/chat%2Fcompletions"),
    "HTTP/1.0": post(CHAT, version="HTTP/1.0"),
    "expect 100-continue": post(CHAT, extra="Expect: 100-continue\r\n"),
    "CL and TE (smuggling)": post(CHAT, extra="Transfer-Encoding: chunked\r\n"),
    "two Content-Lengths": post(CHAT, extra=f"Content-Length: {len(orjson.dumps(CHAT)) + 5}\r\n"),
    "obs-fold": post(CHAT, extra="X-Folded: a\r\n b\r\n"),
    "space before colon": post(CHAT, extra="X-Bad : 1\r\n"),
    "lower-case method": post(CHAT).replace(b"POST", b"post", 1),
    "GET on an API route": b"GET /v1/chat/completions HTTP/1.1\r\nHost: kgate\r\n\r\n",
    "health": b"GET /healthz HTTP/1.1\r\nHost: kgate\r\n\r\n",
    "unknown path": post(CHAT, path="/v1/nothing"),
    "gemini": post({"contents": [{"parts": [{"text": "hi"}]}]}, path="/v1beta/models/dense:generateContent",
                   extra=f"x-goog-api-key: {KEYS['alice']}\r\n", key=None),
}


async def test_every_request_gets_the_same_answer_with_and_without_the_fast_path(redis_url: str,
                                                                                tmp_path: Path) -> None:
    async with two_gateways(tmp_path, redis_url) as (fast, slow):
        for name, data in REQUESTS.items():
            got = _shape(*await one(fast.url, data))
            want = _shape(*await one(slow.url, data))
            assert got == want, f"{name}: fast path {got} != aiohttp {want}"
        # The expected answers, so that "the same" is not "the same breakage".
        assert (await one(fast.url, REQUESTS["ok"]))[0] == 200
        assert (await one(fast.url, REQUESTS["anthropic"]))[0] == 200
        assert (await one(fast.url, REQUESTS["bad key"]))[0] == 401
        assert (await one(fast.url, REQUESTS["not json"]))[0] == 400
        assert (await one(fast.url, REQUESTS["body over max_body_bytes"]))[0] == 413
        assert (await one(fast.url, REQUESTS["CL and TE (smuggling)"]))[0] == 400
        status, headers, body = await one(fast.url, REQUESTS["a stream"])
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        assert body.rstrip().endswith(b"data: [DONE]")


async def test_a_success_is_charged_and_recorded_alike_on_both(redis_url: str, tmp_path: Path) -> None:
    async with two_gateways(tmp_path, redis_url) as (fast, slow):
        answers = [await one(g.url, REQUESTS["ok"]) for g in (fast, slow)]
        ids = [a[1]["x-kgate-request-id"] for a in answers]
        records = [next(r for r in audit_records(g) if r.get("request_id") == rid) for g, rid in zip(
            (fast, slow), ids, strict=True)]
        a, b = records
        assert set(a) == set(b)
        for field in ("decision", "status", "principal", "tier", "model", "api", "bound", "usage", "clamped"):
            assert a.get(field) == b.get(field), field
        assert a["decision"] == "allowed" and a["status"] == 200
        assert answers[0][1]["x-kgate-k"] == answers[1][1]["x-kgate-k"]


async def test_one_connection_serves_fast_and_handed_off_requests_in_order(redis_url: str,
                                                                          tmp_path: Path) -> None:
    """Keep-alive across both servers: fast requests, then one aiohttp must take, then more (aiohttp's from
    then on), all answered in order on one connection; and pipelined requests in one write."""
    async with two_gateways(tmp_path, redis_url) as (fast, _slow), connect(fast.url) as c:
        sequence = [REQUESTS["ok"], REQUESTS["not json"], REQUESTS["ok"], REQUESTS["health"], REQUESTS["ok"],
                    REQUESTS["a stream"], REQUESTS["ok"]]
        statuses = []
        for data in sequence:
            await c.send(data)
            statuses.append((await c.answer())[0])
        assert statuses == [200, 400, 200, 200, 200, 200, 200]
    async with two_gateways(tmp_path / "2", redis_url) as (fast, _slow), connect(fast.url) as c:
        await c.send(REQUESTS["ok"] * 3 + REQUESTS["bad key"] + REQUESTS["ok"])
        answers = [await c.answer() for _ in range(5)]
        assert [a[0] for a in answers] == [200, 200, 200, 401, 200]
        ids = [a[1]["x-kgate-request-id"] for a in answers]
        assert ids == sorted(ids) and len(set(ids)) == 5  # answered in the order sent
        await c.send(REQUESTS["ok"] + REQUESTS["health"] + REQUESTS["ok"])  # pipelined across the hand-off
        assert [(await c.answer())[0] for _ in range(3)] == [200, 200, 200]


async def test_a_request_in_pieces_is_served_and_a_slow_one_goes_to_aiohttp(redis_url: str, tmp_path: Path) -> None:
    data = REQUESTS["ok"]
    head_end = data.index(b"\r\n\r\n") + 4
    async with two_gateways(tmp_path, redis_url) as (fast, _slow):
        for pause in (0.05, WAIT_FOR_WHOLE + 0.5):
            for cut in (10, head_end, head_end + 5):
                async with connect(fast.url) as c:
                    await c.send(data[:cut])
                    await asyncio.sleep(pause)
                    await c.send(data[cut:])
                    assert (await c.answer())[0] == 200, (pause, cut)
                    await c.send(data)  # and the connection goes on
                    assert (await c.answer())[0] == 200


async def test_connection_close_is_honoured(redis_url: str, tmp_path: Path) -> None:
    async with two_gateways(tmp_path, redis_url) as (fast, _slow), connect(fast.url) as c:
        await c.send(post(CHAT, extra="Connection: close\r\n"))
        status, headers, _ = await c.answer()
        assert status == 200 and headers.get("connection") == "close"
        assert await c.closed()


async def test_a_client_gone_before_its_answer_is_still_charged_and_recorded(redis_url: str,
                                                                            tmp_path: Path) -> None:
    """As with aiohttp's default: the unary request runs to its end; its answer goes nowhere."""
    async with two_gateways(tmp_path, redis_url) as (fast, _slow):
        before = len(audit_records(fast))
        async with connect(fast.url) as c:
            await c.send(REQUESTS["ok"])
        async with asyncio.timeout(LIMIT):
            while len(audit_records(fast)) == before:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        rec = audit_records(fast)[-1]
        assert rec["decision"] == "allowed" and rec["status"] == 200


async def test_a_connection_that_says_nothing_gets_the_header_timeout(redis_url: str, tmp_path: Path) -> None:
    cfg = make_config(tmp_path, redis_url, server={"header_timeout_seconds": 0.5, "keepalive_timeout_seconds": 0.8})
    async with running_gateway(cfg) as g:
        async with connect(g.url) as c:
            status, headers, _ = await c.answer()
            assert status == 408 and headers.get("connection") == "close"
            assert await c.closed()
        async with connect(g.url) as c:  # kept alive after an answer, then idle: closed without a word
            await c.send(REQUESTS["ok"])
            assert (await c.answer())[0] == 200
            assert await c.closed()


@pytest.mark.parametrize("fast_path", [True, False])
async def test_the_setting_chooses_the_server(redis_url: str, tmp_path: Path, fast_path: bool) -> None:
    cfg = make_config(tmp_path, redis_url, server={"fast_path": fast_path})
    async with running_gateway(cfg) as g:
        status, headers, _ = await one(g.url, REQUESTS["ok"])
        assert status == 200
        # aiohttp names itself; the fast path does not (the one visible difference in its answers)
        assert ("server" in headers) is (not fast_path)


async def test_requests_cut_anywhere_across_reads_are_all_answered_in_order(redis_url: str, tmp_path: Path) -> None:
    """A pipelined byte stream of fast and handed-off requests, cut at random places into reads: every
    request answered once, in order, with its own status (seeded: the same cuts every run)."""
    import random

    rng = random.Random(18)
    kinds = ["ok", "bad key", "not json", "ok", "anthropic", "ok"]
    want = {"ok": 200, "bad key": 401, "not json": 400, "anthropic": 200, "health": 200}
    async with two_gateways(tmp_path, redis_url) as (fast, _slow):
        for trial in range(6):
            seq = [rng.choice(kinds) for _ in range(5)] + (["health", "ok"] if trial % 2 else ["ok"])
            data = b"".join(REQUESTS[k] for k in seq)
            cuts = sorted(rng.sample(range(1, len(data)), 6))
            async with connect(fast.url) as c:
                last = 0
                for cut in [*cuts, len(data)]:
                    await c.send(data[last:cut])
                    last = cut
                    await asyncio.sleep(rng.choice((0, 0, 0.01)))
                got = [(await c.answer())[0] for _ in seq]
            assert got == [want[k] for k in seq], (trial, seq, cuts)


def _events(body: bytes) -> list[Any]:
    """A stream's events: each ``data:`` payload decoded (``[DONE]`` kept as it is)."""
    out: list[Any] = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            out.append(payload.decode() if payload == b"[DONE]" else orjson.loads(payload))
    return out


ANTHROPIC_STREAM = post({"model": "dense", "max_tokens": 16, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]}, path="/v1/messages")


async def test_streams_are_served_on_the_fast_path_as_aiohttp_serves_them(redis_url: str, tmp_path: Path) -> None:
    """A stream is relayed by the fast path itself (chunked on its transport): the same head, the same events
    and the same record as aiohttp's; the connection stays on the fast path for what follows."""
    async with two_gateways(tmp_path, redis_url) as (fast, slow):
        for data in (REQUESTS["a stream"], ANTHROPIC_STREAM):
            got, want = await one(fast.url, data), await one(slow.url, data)
            assert got[0] == want[0] == 200
            assert set(got[1]) - {"date"} == set(want[1]) - {"date", "server"}
            assert got[1]["transfer-encoding"] == "chunked" and "server" not in got[1]
            events, expected = _events(got[2]), _events(want[2])
            assert len(events) == len(expected) > 2
            assert [sorted(e) if isinstance(e, dict) else e for e in events] == \
                [sorted(e) if isinstance(e, dict) else e for e in expected]
            records = [next(r for r in audit_records(g) if r.get("request_id") == a[1]["x-kgate-request-id"])
                       for g, a in ((fast, got), (slow, want))]
            for field in ("decision", "status", "principal", "tier", "model", "api", "bound", "usage"):
                assert records[0].get(field) == records[1].get(field), field
            assert records[0]["decision"] == "allowed" and records[0]["usage"] is not None
        # Streams and unary answers alternate on one connection, then arrive pipelined in one write; no
        # answer is aiohttp's (the connection was never handed off).
        async with connect(fast.url) as c:
            sequence = [REQUESTS["a stream"], REQUESTS["ok"], ANTHROPIC_STREAM, REQUESTS["a stream"],
                        REQUESTS["bad key"], REQUESTS["ok"]]
            for data in sequence:
                await c.send(data)
                status, headers, _ = await c.answer()
                assert status in (200, 401) and "server" not in headers
            await c.send(b"".join(sequence))
            answers = [await c.answer() for _ in sequence]
            assert [a[0] for a in answers] == [200, 200, 200, 200, 401, 200]
            assert all("server" not in a[1] for a in answers)
            assert _events(answers[0][2])[-1] == "[DONE]"


async def test_a_stream_with_connection_close_ends_and_closes(redis_url: str, tmp_path: Path) -> None:
    async with two_gateways(tmp_path, redis_url) as (fast, _slow), connect(fast.url) as c:
        await c.send(post({**CHAT, "stream": True}, extra="Connection: close\r\n"))
        status, headers, body = await c.answer()
        assert status == 200 and headers.get("connection") == "close" and "server" not in headers
        assert _events(body)[-1] == "[DONE]"
        assert await c.closed()


async def test_a_client_gone_mid_stream_on_the_fast_path_is_charged_and_recorded(redis_url: str,
                                                                              tmp_path: Path) -> None:
    """The client reads the head and leaves: the stream is read on for its usage, charged, and recorded as a
    disconnect (as aiohttp's server does it; tests/integration/test_bypass_stream.py has the reasoning case)."""
    slow_stream = post({**CHAT, "stream": True, "max_tokens": 400})
    async with two_gateways(tmp_path, redis_url) as (fast, _slow):
        async with aiohttp.ClientSession() as s:  # 40 tokens at 100 a second: the client leaves long before
            async with s.post(fast.sim_url + "/_sim/config", json={"tokens_per_second": 100, "output_tokens": 40}) as r:
                assert r.status == 200
        async with connect(fast.url) as c:
            await c.send(slow_stream)
            async with asyncio.timeout(LIMIT):
                head = await c.reader.readuntil(b"\r\n\r\n")
        rid = next(line.split(b": ", 1)[1].decode() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"x-kgate-request-id"))
        async with asyncio.timeout(LIMIT):
            while not [r for r in audit_records(fast) if r.get("request_id") == rid]:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        rec = next(r for r in audit_records(fast) if r.get("request_id") == rid)
        assert rec["status"] == 200 and rec["decision"] == "partial" and "client disconnected" in rec["reason"]
        assert rec["usage"]["output_tokens"] == 40  # read on to the end for its usage: all of it is charged


async def test_a_stream_shows_its_head_before_its_first_slow_event(redis_url: str, tmp_path: Path) -> None:
    """The fast path sends a stream's head with its first chunk when both are here, but never waits for a
    chunk to send it: an upstream that sends its head, then thinks for 2 s, has its head shown at once."""

    async def thinks_first(request: web.Request, rec: Recorded) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(2.0)
        for ev in stream_events("openai.chat", "m", reasoning=5, visible_chunks=2):
            await resp.write(ev)
        await resp.write_eof()
        return resp

    async with RecordingUpstream(thinks_first) as up:
        cfg = config_with_upstream(tmp_path, redis_url, up.url)
        async with running_gateway(cfg) as g, connect(g.url) as c:
            await c.send(post({**CHAT, "stream": True}))
            async with asyncio.timeout(LIMIT):
                head = await c.reader.readuntil(b"\r\n\r\n")
                headed = asyncio.get_running_loop().time()
                assert head.startswith(b"HTTP/1.1 200") and b"\r\nServer: " not in head
                rest = await c.reader.readuntil(b"\r\n0\r\n\r\n")
                ended = asyncio.get_running_loop().time()
    assert b"data: [DONE]" in rest
    assert ended - headed > 1.0  # the head came while the upstream was still thinking


async def test_a_failure_after_a_stream_started_cuts_it_off_without_a_second_answer(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a stream's head is out, no other answer can follow on the connection: a failure after it (here
    one injected into the engine's stream settlement) ends the connection, never a 500 written into the
    chunked body (which a client would read as the next response); the next connection is served."""
    from gateway.engine.errors import InternalError
    from gateway.engine.flow import Engine

    real = Engine.finish_stream
    calls: list[int] = []

    async def failing(self: Engine, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:  # the first stream only
            raise InternalError("injected after the stream started")
        await real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "finish_stream", failing)
    async with two_gateways(tmp_path, redis_url) as (fast, _slow):
        async with connect(fast.url) as c:
            await c.send(post({**CHAT, "stream": True}) + REQUESTS["ok"])  # and one pipelined behind it
            async with asyncio.timeout(LIMIT):
                head = await c.reader.readuntil(b"\r\n\r\n")
                rest = await c.reader.read()  # to the connection's end
        assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
        assert b"HTTP/1.1" not in rest and not rest.endswith(b"0\r\n\r\n")  # cut off: no end, no second answer
        rid = next(line.split(b": ", 1)[1].decode() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"x-kgate-request-id"))
        rec = next(r for r in audit_records(fast) if r.get("request_id") == rid)  # recorded all the same
        assert rec["decision"] == "failed" and rec["status"] == 500
        assert (await one(fast.url, post({**CHAT, "stream": True})))[0] == 200
