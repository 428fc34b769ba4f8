"""The simulator as an aiohttp application: its routes, handlers, per-request knobs and statistics.

It serves ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/responses``, ``/v1/messages`` and
``/v1beta/models/{model}:generateContent`` / ``:streamGenerateContent`` (``?alt=sse`` for SSE, else a
streamed JSON array), generating deterministic text and usage with each provider's quirks
(:mod:`gateway.simulator.model` decides the token counts, :mod:`gateway.simulator.wire` spells them,
:mod:`gateway.simulator.faults` breaks them on request).

Per-request knobs, as headers (tests use them to be deterministic):

- ``x-sim-fault: SPEC[;SPEC...]`` — faults for this request instead of the server's (``none``: no fault);
- ``x-sim-flavor: openai|vllm|sglang|deepseek`` — which OpenAI-compatible server to mimic;
- ``x-sim-output-tokens: N`` — visible tokens per sample; ``x-sim-reasoning-tokens: N`` — reasoning
  tokens per sample for a reasoning request (instead of the effort table);
- ``x-sim-server-tools: 1`` — Anthropic streams repeat ``message_delta`` (cumulative usage).

Control endpoints: ``GET /_sim/stats`` (requests by path, faults, token totals, the last requests'
headers and bodies), ``POST /_sim/reset`` (clear stats, restore the start options), ``POST /_sim/config``
(change ``latency_ms``, ``tokens_per_second``, ``output_tokens``, ``flavor``, ``faults`` live — for
tests whose gateway does not forward ``x-sim-*`` headers), ``GET /_sim/health``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.simulator import wire
from gateway.simulator.faults import (
    MALFORMED_JSON,
    MALFORMED_SSE,
    Fault,
    broken_json,
    drop,
    hang_up,
    header_faults,
    parse_fault,
)
from gateway.simulator.model import (
    FLAVORS,
    REASONING_MARKERS,
    GenContext,
    Plan,
    SimError,
    plan_chat,
    plan_completions,
    plan_gemini,
    plan_messages,
    plan_responses,
)


@dataclass
class SimulatorOptions:
    """How the simulated upstream behaves. ``faults`` are SPEC strings (:mod:`gateway.simulator.faults`)."""

    latency_ms: float = 0  # before the first byte of every answer
    tokens_per_second: float = 0  # per sample, for streams and non-streamed answers; 0: no waiting
    output_tokens: int = 64  # visible tokens per sample before the output cap
    faults: list[str] = field(default_factory=list)
    flavor: str = "openai"  # openai | vllm | sglang | deepseek (OpenAI-compatible APIs)
    reasoning_markers: tuple[str, ...] = REASONING_MARKERS
    workers: int = 1  # run_simulator only: processes sharing the port (SO_REUSEPORT)
    seed: int | None = None  # for the fault dice

    def validate(self) -> None:
        if self.flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}, got {self.flavor!r}")
        if self.output_tokens < 0 or self.latency_ms < 0 or self.tokens_per_second < 0:
            raise ValueError("output_tokens, latency_ms and tokens_per_second must not be negative")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        for spec in self.faults:
            parse_fault(spec)


# ------------------------------------------------------------------------------------------------- stats
class Stats:
    """What the simulator saw: kept cheap on the hot path (references, counters), shaped on demand."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.recent: deque[tuple[str, str, str, CIMultiDictProxy[str], bytes]] = deque(maxlen=32)

    def add_plan(self, p: Plan) -> None:
        t = self.tokens
        t["prompt"] += p.prompt_tokens
        t["reasoning"] += p.generated * p.reasoning
        t["visible"] += p.generated * p.visible
        t["generated"] += p.generated_tokens
        t["reported_output"] += p.reported_output

    def as_json(self) -> dict[str, Any]:
        recent = [_request_json(*r) for r in self.recent]
        return {
            "requests": dict(self.requests), "requests_total": sum(self.requests.values()),
            "faults": dict(self.faults),
            "tokens": {k: self.tokens.get(k, 0)
                       for k in ("prompt", "reasoning", "visible", "generated", "reported_output")},
            "last_request": recent[-1] if recent else None, "recent_requests": recent,
        }


def _request_json(method: str, path: str, query: str, headers: CIMultiDictProxy[str], body: bytes) -> Any:
    try:
        parsed: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = body.decode("utf-8", "replace")
    return {"method": method, "path": path, "query": query,
            "headers": {k.lower(): v for k, v in headers.items()}, "body": parsed}


# ------------------------------------------------------------------------------------------------- app
_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"

Planner = Callable[[Any, GenContext], Plan]
_PLANNERS: dict[str, Planner] = {"chat": plan_chat, "completions": plan_completions,
                                 "responses": plan_responses, "messages": plan_messages}
_RENDERERS: dict[str, Callable[[Plan, str], dict[str, Any]]] = {
    "completions": wire.completions_json, "responses": lambda p, _: wire.responses_json(p),
    "messages": lambda p, _: wire.messages_json(p), "gemini": lambda p, _: wire.gemini_json(p)}


class _Simulator:
    """The handlers and their state. One per app."""

    def __init__(self, opts: SimulatorOptions):
        opts.validate()
        self.start_opts = opts
        self.stats = Stats()
        self.rng = random.Random(opts.seed)
        self.configure(dataclasses.replace(opts, faults=list(opts.faults)))

    def configure(self, opts: SimulatorOptions) -> None:
        opts.validate()
        self.opts = opts
        self.faults = tuple(parse_fault(s) for s in opts.faults)
        self.latency = opts.latency_ms / 1000
        self.per_token = 1 / opts.tokens_per_second if opts.tokens_per_second > 0 else 0.0
        self.default_ctx = {f: GenContext(output_tokens=opts.output_tokens, flavor=f,
                                          markers=opts.reasoning_markers) for f in FLAVORS}

    # ---------------------------------------------------------------- per-request context and faults
    def _context(self, h: CIMultiDictProxy[str]) -> GenContext:
        flavor = h.get("x-sim-flavor")
        out = h.get("x-sim-output-tokens")
        reason = h.get("x-sim-reasoning-tokens")
        tools = h.get("x-sim-server-tools")
        if flavor is None and out is None and reason is None and tools is None:
            return self.default_ctx[self.opts.flavor]
        if flavor is not None and flavor not in FLAVORS:
            raise SimError(f"x-sim-flavor must be one of {', '.join(FLAVORS)}")
        try:
            return GenContext(output_tokens=max(0, int(out)) if out is not None else self.opts.output_tokens,
                              reasoning_tokens=max(0, int(reason)) if reason is not None else None,
                              flavor=flavor or self.opts.flavor, markers=self.opts.reasoning_markers,
                              server_tools=tools not in (None, "", "0", "false"))
        except ValueError:
            raise SimError("x-sim-output-tokens and x-sim-reasoning-tokens must be integers") from None

    def _fault(self, request: web.Request, path: str) -> Fault | None:
        value = request.headers.get("x-sim-fault")
        faults = self.faults if value is None else header_faults(value)
        for f in faults:
            if f.path and not path.startswith(f.path):
                continue
            if f.rate >= 1 or self.rng.random() < f.rate:
                self.stats.faults[f.kind] += 1
                return f
        return None

    # --------------------------------------------------------------------------------------- handlers
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "responses")

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "messages")

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["target"].rpartition(":")
        if action not in ("generateContent", "streamGenerateContent") or not model:
            return self._error("gemini", "openai", 404, f"Method not found: {action}")
        return await self._serve(request, "gemini", model, action == "streamGenerateContent")

    async def _serve(self, request: web.Request, api: str, model: str = "",
                     gemini_stream: bool = False) -> web.StreamResponse:
        """Read, record, maybe fail, plan, answer: the hot path, kept short."""
        path = request.path
        body = await request.read()
        self.stats.requests[path] += 1
        self.stats.recent.append((request.method, path, request.query_string, request.headers, body))
        shape = "anthropic" if api == "messages" else "gemini" if api == "gemini" else "openai"
        flavor = self.opts.flavor
        try:
            ctx = self._context(request.headers)
            flavor = ctx.flavor
            fault = self._fault(request, path) if self.faults or "x-sim-fault" in request.headers else None
        except (SimError, ValueError) as e:
            return self._error(shape, flavor, 400, getattr(e, "message", str(e)))
        if fault is not None and fault.kind in ("timeout", "reset"):
            return await drop(request, fault)
        if self.latency:
            await asyncio.sleep(self.latency)
        if fault is not None and fault.kind == "status":
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
            return self._error(shape, flavor, fault.status, f"Simulated upstream error ({fault.status}).",
                               headers=headers)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            return self._error(shape, flavor, 400, f"We could not parse the JSON body of your request. ({e})")
        try:
            if api == "gemini":
                plan = plan_gemini(data, model, gemini_stream, ctx)
            else:
                plan = _PLANNERS[api](data, ctx)
        except SimError as e:
            return self._error(shape, flavor, e.status, e.message, e.param)
        self.stats.add_plan(plan)
        if plan.stream:
            return await self._stream(request, plan, ctx, fault)
        raw = wire.chat_bytes(plan, flavor) if api == "chat" else orjson.dumps(_RENDERERS[api](plan, flavor))
        if self.per_token:  # samples decode in parallel: the answer takes one sample's tokens
            await asyncio.sleep(plan.output_tokens * self.per_token)
        if fault is not None:
            return await broken_json(request, raw, fault)
        return web.Response(body=raw, content_type=_JSON)

    def _error(self, shape: str, flavor: str, status: int, message: str, param: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
        body = orjson.dumps(wire.error_body(shape, flavor, status, message, param))
        return web.Response(status=status, body=body, content_type=_JSON, headers=headers)

    # ------------------------------------------------------------------------------------- streaming
    async def _stream(self, request: web.Request, plan: Plan, ctx: GenContext,
                      fault: Fault | None) -> web.StreamResponse:
        frames: Iterator[wire.Frame]
        content_type = _SSE
        if plan.api in ("chat", "completions"):
            frames = wire.openai_stream(plan, ctx.flavor)
        elif plan.api == "responses":
            frames = wire.responses_stream(plan)
        elif plan.api == "messages":
            frames = wire.messages_stream(plan, ctx.server_tools)
        elif request.query.get("alt") == "sse":
            frames = _gemini_sse(wire.gemini_stream(plan))
        else:
            frames, content_type = _gemini_array(wire.gemini_stream(plan)), _JSON
        resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        cut = fault.after if fault is not None and fault.kind == "midstream" else -1
        bad = fault.after if fault is not None and fault.kind == "malformed" else -1
        broken = MALFORMED_JSON if content_type == _JSON else MALFORMED_SSE
        loop = asyncio.get_running_loop()
        buf = bytearray()
        events = 0
        try:
            await resp.prepare(request)
            due = loop.time()
            if cut == 0:
                await hang_up(request)
                return resp
            for item in frames:
                if isinstance(item, int):
                    if self.per_token:
                        if buf:
                            await resp.write(bytes(buf))
                            buf.clear()
                        due += item * self.per_token
                        delay = due - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    continue
                buf += item
                events += 1
                if events == bad:
                    buf += broken
                if events == cut:
                    await resp.write(bytes(buf))
                    await hang_up(request)
                    return resp
                if len(buf) >= 65536:
                    await resp.write(bytes(buf))
                    buf.clear()
            await resp.write(bytes(buf))
            await resp.write_eof()
        except ConnectionError:
            pass  # the client left; nothing more to send
        return resp

    # ---------------------------------------------------------------------------------------- control
    async def stats_handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_json(), dumps=lambda o: orjson.dumps(o).decode())

    async def reset_handler(self, request: web.Request) -> web.Response:
        self.stats = Stats()
        self.configure(dataclasses.replace(self.start_opts, faults=list(self.start_opts.faults)))
        return web.json_response({"ok": True})

    async def config_handler(self, request: web.Request) -> web.Response:
        try:
            data = orjson.loads(await request.read() or b"{}")
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            allowed = {"latency_ms", "tokens_per_second", "output_tokens", "flavor", "faults"}
            unknown = set(data) - allowed
            if unknown:
                raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
            self.configure(dataclasses.replace(self.opts, **data))
        except (ValueError, TypeError) as e:
            return self._error("openai", "openai", 400, str(e))
        o = self.opts
        return web.json_response({"latency_ms": o.latency_ms, "tokens_per_second": o.tokens_per_second,
                                  "output_tokens": o.output_tokens, "flavor": o.flavor, "faults": o.faults})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def not_found(self, request: web.Request) -> web.Response:
        shape = wire.error_shape(request.path)
        return self._error(shape, self.opts.flavor, 404, f"Unknown path {request.path}")


def _gemini_sse(frames: Iterator[wire.Frame]) -> Iterator[wire.Frame]:
    for f in frames:
        yield f if isinstance(f, int) else b"data: " + f + b"\r\n\r\n"


def _gemini_array(frames: Iterator[wire.Frame]) -> Iterator[wire.Frame]:
    """Gemini's streamed JSON array: ``[{...}`` then ``,\\r\\n{...}`` per chunk and a closing ``]``."""
    first = True
    for f in frames:
        if isinstance(f, int):
            yield f
            continue
        yield (b"[" if first else b",\r\n") + f
        first = False
    yield b"]" if not first else b"[]"


# ----------------------------------------------------------------------------------------- the app
SIM_KEY = web.AppKey("simulator", _Simulator)


def create_simulator_app(opts: SimulatorOptions) -> web.Application:
    """The simulator as an aiohttp application (no middleware: the hot path stays lean)."""
    sim = _Simulator(opts)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIM_KEY] = sim
    r = app.router
    r.add_post("/v1/chat/completions", sim.chat)
    r.add_post("/v1/completions", sim.completions)
    r.add_post("/v1/responses", sim.responses)
    r.add_post("/v1/messages", sim.messages)
    r.add_post("/v1beta/models/{target}", sim.gemini)
    r.add_get("/_sim/stats", sim.stats_handler)
    r.add_post("/_sim/reset", sim.reset_handler)
    r.add_post("/_sim/config", sim.config_handler)
    r.add_get("/_sim/health", sim.health)
    r.add_route("*", "/{tail:.*}", sim.not_found)
    return app
