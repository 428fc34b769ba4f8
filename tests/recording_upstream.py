"""A recording upstream for the bypass tests: a loopback model server that keeps every request it was
sent and answers the way a given provider (or a hostile one) behaves.

Unlike the simulator, which behaves like a well-mannered provider, each test here scripts what the
provider does with the request it *actually received* — spend the whole output cap kgate forwarded
whatever the body claims about reasoning, keep generating after the client left, hang, answer with a
200 MB body — and then asserts on what kgate forwarded and charged.

    async with RecordingUpstream(spend_cap()) as up:
        cfg = config_with_upstream(tmp_path, redis_url, up.url)
        ...
        assert up.requests[-1].body["max_completion_tokens"] == 4096
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiohttp import web
from gatewayutil import policy_dict

from gateway.policy.config import Config, load_config


@dataclass
class Recorded:
    """One request as the upstream received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw: bytes

    @property
    def body(self) -> Any:
        return orjson.loads(self.raw) if self.raw else None

    @property
    def api(self) -> str:
        return api_of(self.path)


Behaviour = Callable[[web.Request, Recorded], Awaitable[web.StreamResponse]]


@dataclass
class RecordingUpstream:
    """An aiohttp server on 127.0.0.1 that records requests and answers with ``behaviour``."""

    behaviour: Behaviour
    requests: list[Recorded] = field(default_factory=list)
    url: str = ""
    finished: list[str] = field(default_factory=list)  # request paths whose answer ran to its end
    cancelled: list[str] = field(default_factory=list)  # answers cut because kgate went away
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> RecordingUpstream:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = Recorded(request.method, request.path, dict(request.query), dict(request.headers),
                       await request.read())
        self.requests.append(rec)
        try:
            resp = await self.behaviour(request, rec)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled.append(rec.path)
            raise
        self.finished.append(rec.path)
        return resp

    async def wait_finished(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` answers ran to their end (or were cut), at most ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while len(self.finished) + len(self.cancelled) < count:  # noqa: ASYNC110 (polled state, no event)
                await asyncio.sleep(0.02)


def api_of(path: str) -> str:
    if path.endswith("/chat/completions"):
        return "openai.chat"
    if path.endswith("/completions"):
        return "openai.completions"
    if path.endswith("/responses"):
        return "openai.responses"
    if path.endswith("/messages"):
        return "anthropic.messages"
    return "gemini"


# ------------------------------------------------------------------------------------ what was asked
def forwarded_cap(rec: Recorded) -> int | None:
    """The per-sample output cap the forwarded body carries, in its API's own field."""
    b = rec.body or {}
    api = rec.api
    if api == "openai.chat":
        # vLLM reads max_completion_tokens first, SGLang max_tokens: a provider honours the larger.
        caps = [b[k] for k in ("max_completion_tokens", "max_tokens") if isinstance(b.get(k), int)]
        return max(caps) if caps else None
    if api in ("openai.completions", "anthropic.messages"):
        return b.get("max_tokens")
    if api == "openai.responses":
        return b.get("max_output_tokens")
    gen = b.get("generationConfig") or b.get("generation_config") or {}
    return gen.get("maxOutputTokens", gen.get("max_output_tokens"))


def forwarded_samples(rec: Recorded) -> int:
    b = rec.body or {}
    if rec.api in ("openai.chat", "openai.completions"):
        return max(int(b.get("n") or 1), int(b.get("best_of") or 1))
    if rec.api == "gemini":
        gen = b.get("generationConfig") or {}
        return int(gen.get("candidateCount") or 1)
    return 1


# ------------------------------------------------------------------------------------- answers
def usage_doc(api: str, prompt: int, reasoning: int, visible: int) -> dict[str, Any]:
    """A provider's usage object for ``api``: reasoning inside the output count except for Gemini."""
    out = reasoning + visible
    if api in ("openai.chat", "openai.completions"):
        return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out,
                "completion_tokens_details": {"reasoning_tokens": reasoning}}
    if api == "openai.responses":
        return {"input_tokens": prompt, "output_tokens": out, "total_tokens": prompt + out,
                "output_tokens_details": {"reasoning_tokens": reasoning}}
    if api == "anthropic.messages":
        return {"input_tokens": prompt, "output_tokens": out}
    return {"promptTokenCount": prompt, "candidatesTokenCount": visible, "thoughtsTokenCount": reasoning,
            "totalTokenCount": prompt + out}


def json_answer(api: str, model: str, prompt: int, reasoning: int, visible: int, samples: int = 1) -> dict[str, Any]:
    usage = usage_doc(api, prompt, reasoning, visible)
    text = "ok " * max(1, visible // max(samples, 1))
    if api == "openai.chat":
        return {"id": "chatcmpl-rec", "object": "chat.completion", "model": model, "usage": usage,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length"} for i in range(samples)]}
    if api == "openai.completions":
        return {"id": "cmpl-rec", "object": "text_completion", "model": model, "usage": usage,
                "choices": [{"index": i, "text": text, "finish_reason": "length"} for i in range(samples)]}
    if api == "openai.responses":
        return {"id": "resp_rec", "object": "response", "status": "completed", "model": model, "usage": usage,
                "output": [{"type": "message", "role": "assistant",
                            "content": [{"type": "output_text", "text": text}]}]}
    if api == "anthropic.messages":
        return {"id": "msg_rec", "type": "message", "role": "assistant", "model": model, "usage": usage,
                "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens"}
    return {"candidates": [{"index": i, "content": {"role": "model", "parts": [{"text": text}]},
                            "finishReason": "MAX_TOKENS"} for i in range(samples)],
            "usageMetadata": usage, "modelVersion": model}


def spend_cap(reasoning_share: float = 1.0, prompt: int = 10) -> Behaviour:
    """A provider that ignores every claim about reasoning and spends the whole forwarded output cap
    (per sample), ``reasoning_share`` of it hidden; a request with no cap gets ``NO_CAP_SPEND``."""

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        cap = forwarded_cap(rec)
        per_sample = NO_CAP_SPEND if cap is None else int(cap)
        s = forwarded_samples(rec)
        reasoning = int(per_sample * reasoning_share) * s
        visible = per_sample * s - reasoning
        model = (rec.body or {}).get("model", "m")
        doc = json_answer(rec.api, model, prompt, reasoning, visible, s)
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    return answer


NO_CAP_SPEND = 30_000  # what a provider generates when nothing caps it (the observed figure)


# --------------------------------------------------------------------------------------- config
def config_with_upstream(tmp_path: Path, store_url: str, base_url: str, *, server: Mapping[str, Any] | None = None,
                         upstream: Mapping[str, Any] | None = None, models: Mapping[str, Any] | None = None,
                         **tier_overrides: Any) -> Config:
    """The test policy of :mod:`tests.gatewayutil` with its upstream ``sim`` pointing at ``base_url``."""
    doc = policy_dict(store_url, tmp_path / "data", dict(server or {}), **tier_overrides)
    doc["upstreams"]["sim"] = {"base_url": base_url, "read_timeout_seconds": 10, "total_timeout_seconds": 20,
                               **(upstream or {})}
    for name, over in (models or {}).items():
        doc["models"][name] = {**doc["models"].get(name, {}), **over}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(path)


@contextlib.asynccontextmanager
async def recording(behaviour: Behaviour) -> AsyncIterator[RecordingUpstream]:
    async with RecordingUpstream(behaviour) as up:
        yield up


# --------------------------------------------------------------------------------------------- streams
def _sse(event: str | None, doc: Any) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(doc) + b"\n\n"


def stream_events(api: str, model: str, *, reasoning: int, visible_chunks: int,
                  with_usage: bool = True, prompt: int = 10) -> list[bytes]:
    """A provider's stream for ``api``: ``visible_chunks`` one-token text events, then (``with_usage``) the
    usage with ``reasoning`` hidden reasoning tokens — the shapes of WIRE-FORMATS.md, reasoning never shown."""
    usage = usage_doc(api, prompt, reasoning, visible_chunks)
    ev: list[bytes] = []
    if api == "openai.chat":
        for _ in range(visible_chunks):
            ev.append(_sse(None, {"object": "chat.completion.chunk", "model": model,
                                  "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]}))
        ev.append(_sse(None, {"object": "chat.completion.chunk", "model": model,
                              "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        if with_usage:
            ev.append(_sse(None, {"object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}))
        ev.append(b"data: [DONE]\n\n")
    elif api == "openai.responses":
        ev.append(_sse("response.created", {"type": "response.created", "response": {"model": model}}))
        for _ in range(visible_chunks):
            ev.append(_sse("response.output_text.delta", {"type": "response.output_text.delta", "delta": "tok "}))
        done: dict[str, Any] = {"model": model, "status": "completed"}
        if with_usage:
            done["usage"] = usage
        ev.append(_sse("response.completed", {"type": "response.completed", "response": done}))
    elif api == "anthropic.messages":
        ev.append(_sse("message_start", {"type": "message_start", "message": {
            "model": model, "usage": {"input_tokens": prompt, "output_tokens": 1}}}))
        ev.append(_sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}}))
        for _ in range(visible_chunks):
            ev.append(_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": "tok "}}))
        ev.append(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        if with_usage:
            ev.append(_sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                             "usage": {"output_tokens": reasoning + visible_chunks}}))
        ev.append(_sse("message_stop", {"type": "message_stop"}))
    else:
        raise ValueError(f"no stream shape for {api}")
    return ev


def stream(*, reasoning: int = 5000, visible_chunks: int = 20, delay: float = 0.02, with_usage: bool = True,
           hold_before_usage: float = 0.0) -> Behaviour:
    """A streaming provider: text events ``delay`` s apart, the usage (if ``with_usage``) at the end after
    ``hold_before_usage`` s more — it keeps generating whether or not anyone still reads."""

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        model = (rec.body or {}).get("model", "m")
        events = stream_events(rec.api, model, reasoning=reasoning, visible_chunks=visible_chunks,
                               with_usage=with_usage)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i, ev in enumerate(events):
            if i == len(events) - 2 and hold_before_usage:
                await asyncio.sleep(hold_before_usage)
            await resp.write(ev)
            await asyncio.sleep(delay)
        await resp.write_eof()
        return resp

    return answer


def hang(seconds: float = 30.0, then: Behaviour | None = None) -> Behaviour:
    """A provider that accepts the request and takes ``seconds`` before answering (with ``then``)."""

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await (then or spend_cap())(request, rec)

    return answer


def huge_answer(size: int, *, chunked: bool = False, status: int = 200, chunk: int = 64 * 1024) -> Behaviour:
    """A provider whose JSON answer is ``size`` bytes (a 200 MB answer took the gateway to 1.84 GB): with a
    Content-Length, or ``chunked`` without one, written ``chunk`` bytes at a time (each write waits for the
    reader, so a gateway that stops reading cuts the answer short: see ``cancelled``)."""

    async def answer(request: web.Request, rec: Recorded) -> web.StreamResponse:
        head, tail = b'{"id":"chatcmpl-huge","object":"chat.completion","pad":"', b'"}'
        pad = size - len(head) - len(tail)
        if not chunked:
            return web.Response(status=status, body=head + b"x" * pad + tail, content_type="application/json")
        resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            await resp.write(head)
            block = b"x" * chunk
            for _ in range(pad // chunk):
                await resp.write(block)
            await resp.write(b"x" * (pad % chunk) + tail)
            await resp.write_eof()
        except ConnectionError as exc:  # aiohttp's "Connection lost": recorded as cut (see _handle)
            raise ConnectionResetError(str(exc)) from exc
        return resp

    return answer
