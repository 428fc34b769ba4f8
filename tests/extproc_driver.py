"""Plays Envoy's ext_proc HTTP filter against kgate's external processor: there is no Envoy binary here.

:class:`EnvoyDriver` takes an HTTP request and does what Envoy does with the processing mode of
``deploy/envoy/envoy.yaml`` (request headers SEND, request body BUFFERED, response headers SEND, response
body STREAMED, trailers SKIP, ``allow_mode_override``): it opens one ``Process`` stream (with the token as
gRPC metadata), sends ``request_headers`` (pseudo-headers ``:method``, ``:path``, ``:authority``,
``:scheme`` first; ``end_of_stream`` when there is no body; the ``source.address`` attribute) and the
whole body, and applies the answers' mutations with Envoy's rules: removals before sets; ``raw_value`` or
``value`` by the runtime feature ``send_header_raw_value`` (``raw``); the routing headers and
``x-envoy-*`` left alone; a buffered body's ``content-length`` checked against the new body;
``clear_route_cache`` re-running the route. It routes by ``x-kgate-upstream`` to a cluster, sends the
mutated request upstream (aiohttp), then ``response_headers`` and the body chunk by chunk as it arrives
(or whole, when the processor's ``mode_override`` asks for BUFFERED), each answer's body mutation building
what the client receives. Every answer must be the one the protocol expects for the message sent (else
``AssertionError``, as Envoy counts a spurious message). ``disconnect_after=N`` cancels the stream after N
response chunks, as Envoy does when the client leaves; ``response_trailers`` ends the answer with trailers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import grpc.aio
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

ROUTING = frozenset({"host", ":authority", ":method", ":scheme"})  # HeaderMutationRules: not without allow_all_routing
Mode = processing_mode_pb2.ProcessingMode


@dataclass
class Seen:
    """What reached the upstream, and what it answered (before any mutation)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0
    answer: bytes = b""


@dataclass
class Answer:
    """What the client receives."""

    status: int
    headers: dict[str, str]
    body: bytes
    immediate: bool = False  # an ImmediateResponse (Envoy's local reply)
    details: str = ""
    reset: bool = False  # the stream was reset after the response began (the client left, or a late reply)
    upstream: Seen | None = None
    grpc_code: Any = None  # the processor's gRPC error: Envoy (failure_mode_allow false) answers 500
    buffered: bool = False  # the response body went to the processor whole (mode_override honoured)
    replies: list[str] = field(default_factory=list)

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.body)


class EnvoyDriver:
    def __init__(self, target: str, clusters: dict[str, str], *, token: str | None = None, raw: bool = True,
                 allow_mode_override: bool = True, source: str | None = "127.0.0.1:40000"):
        self.target, self.clusters, self.token = target, clusters, token
        self.raw, self.allow_mode_override = raw, allow_mode_override
        self.source = source  # the client's address: the source.address attribute (request_attributes)

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"", *,
                      disconnect_after: int | None = None,
                      response_trailers: dict[str, str] | None = None) -> Answer:
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        async with grpc.aio.insecure_channel(self.target) as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process(metadata=metadata)
            try:
                return await self._exchange(call, method, path, headers, body, disconnect_after, response_trailers)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                # The processor's stream failed (a refusal, kgate going away): failing closed, Envoy answers
                # 500 — or resets the client's stream if the response had begun (not told apart here).
                code = await call.code()
                return Answer(500, {}, b"", immediate=True, grpc_code=code,
                              details=f"ext_proc_error_gRPC_error_{code.value[0]}{{{await call.details()}}}")

    async def handshake(self) -> Any:
        """Open a stream with the token, send nothing, close it: the processor's gRPC status (OK, or its refusal).
        A refusal seen through :meth:`request` may instead read INTERNAL: grpc-python's client replaces the
        server's status with INTERNAL when a write loses the race with the server's early close."""
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else None
        async with grpc.aio.insecure_channel(self.target) as channel:
            call = pb_grpc.ExternalProcessorStub(channel).Process(metadata=metadata)
            await call.done_writing()
            return await call.code()

    # ------------------------------------------------------------------------------------------- steps
    async def _exchange(self, call: Any, method: str, path: str, client: dict[str, str], body: bytes,
                        disconnect_after: int | None, trailers: dict[str, str] | None) -> Answer:
        replies: list[str] = []

        async def ask(kind: str, msg: Any) -> Any:
            await call.write(msg if isinstance(msg, pb.ProcessingRequest) else pb.ProcessingRequest(**{kind: msg}))
            reply = await call.read()
            assert reply is not grpc.aio.EOF, f"the processor closed the stream instead of answering {kind}"
            got = reply.WhichOneof("response")
            replies.append(got)
            assert got in (kind, "immediate_response"), f"spurious answer {got} to {kind}"
            return reply

        req = {":method": method, ":path": path, ":authority": "kgate.test", ":scheme": "http",
               **{k.lower(): v for k, v in client.items()}}
        if body:
            req["content-length"] = str(len(body))
        route = self._route(req)
        first = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=self._map(req), end_of_stream=not body))
        if self.source is not None:  # as Envoy sends request_attributes: under the filter's name, first message only
            first.attributes["envoy.filters.http.ext_proc"].fields["source.address"].string_value = self.source
        reply = await ask("request_headers", first)
        if reply.HasField("immediate_response"):
            return self._immediate(reply.immediate_response, replies)
        common = reply.request_headers.response
        self._apply(req, common.header_mutation)
        if common.clear_route_cache and common.HasField("header_mutation"):
            route = self._route(req)
        if common.status == pb.CommonResponse.CONTINUE_AND_REPLACE:
            if common.HasField("body_mutation"):
                req.pop("content-length", None)
                body = self._body(body, common.body_mutation)
        elif body:
            reply = await ask("request_body", pb.HttpBody(body=body, end_of_stream=True))
            if reply.HasField("immediate_response"):
                return self._immediate(reply.immediate_response, replies)
            common = reply.request_body.response
            self._apply(req, common.header_mutation)
            if common.HasField("body_mutation"):
                body = self._body(body, common.body_mutation)
                length = req.get("content-length")
                assert length is None or int(length) == len(body), \
                    f"mismatch between content length ({length}) and the mutated body ({len(body)})"
            if common.clear_route_cache and common.HasField("header_mutation"):
                route = self._route(req)
        if route is None:
            await call.done_writing()
            return Answer(404, {}, b"no route (the request carries no x-kgate-upstream)", replies=replies)

        seen = Seen(req[":method"], req[":path"], {k: v for k, v in req.items() if not k.startswith(":")}, body)
        send = {k: v for k, v in seen.headers.items()
                if k not in ("host", "content-length", "transfer-encoding", "x-kgate-upstream")}
        async with aiohttp.ClientSession(auto_decompress=False) as s, \
                s.request(seen.method, route + seen.path, data=body, headers=send) as r:
            seen.status = r.status
            resp = {":status": str(r.status)}
            for k, v in r.headers.items():
                if k.lower() not in ("transfer-encoding", "connection"):
                    key = k.lower()
                    resp[key] = f"{resp[key]}, {v}" if key in resp else v
            no_body = r.content_length == 0
            reply = await ask("response_headers", pb.HttpHeaders(headers=self._map(resp), end_of_stream=no_body))
            if reply.HasField("immediate_response"):
                seen.answer = await r.read()
                return self._immediate(reply.immediate_response, replies, seen)
            self._apply(resp, reply.response_headers.response.header_mutation)
            buffered = (self.allow_mode_override and reply.HasField("mode_override")
                        and reply.mode_override.response_body_mode == Mode.BUFFERED)
            out = Answer(int(resp.pop(":status")), resp, b"", upstream=seen, buffered=buffered, replies=replies)
            if no_body:
                return await self._close(call, out)
            if buffered:
                seen.answer = await r.read()
                reply = await ask("response_body", pb.HttpBody(body=seen.answer, end_of_stream=True))
                if reply.HasField("immediate_response"):
                    return self._immediate(reply.immediate_response, replies, seen)
                common = reply.response_body.response
                self._apply(resp, common.header_mutation)
                out.body = self._body(seen.answer, common.body_mutation)
                length = resp.get("content-length")
                assert length is None or int(length) == len(out.body), \
                    f"mismatch between content length ({length}) and the mutated body ({len(out.body)})"
                return await self._close(call, out)
            chunks = 0
            async for data in r.content.iter_any():
                seen.answer += data
                if not await self._chunk(ask, out, data, False):
                    return out
                chunks += 1
                if disconnect_after is not None and chunks >= disconnect_after:
                    call.cancel()  # the client left: Envoy resets the upstream request and the ext_proc stream
                    out.reset = True
                    return out
            if trailers is None:
                if not await self._chunk(ask, out, b"", True):
                    return out
            else:
                await ask("response_trailers", pb.HttpTrailers(trailers=self._map(trailers)))
            return await self._close(call, out)

    async def _chunk(self, ask: Any, out: Answer, data: bytes, eos: bool) -> bool:
        reply = await ask("response_body", pb.HttpBody(body=data, end_of_stream=eos))
        if reply.HasField("immediate_response"):  # the response has begun: Envoy resets the stream
            out.reset = True
            out.details = reply.immediate_response.details
            return False
        out.body += self._body(data, reply.response_body.response.body_mutation)
        return True

    async def _close(self, call: Any, out: Answer) -> Answer:
        """Envoy closes the stream after the last answer; the processor must end it cleanly."""
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF, "the processor answered after the last message"
        code = await call.code()
        assert code == grpc.StatusCode.OK, code
        return out

    # ------------------------------------------------------------------------------------ Envoy's rules
    def _route(self, headers: dict[str, str]) -> str | None:
        return self.clusters.get(headers.get("x-kgate-upstream", ""))

    def _map(self, headers: dict[str, str]) -> Any:
        from envoy.config.core.v3 import base_pb2

        if self.raw:
            items = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
        else:
            items = [base_pb2.HeaderValue(key=k, value=v) for k, v in headers.items()]
        return base_pb2.HeaderMap(headers=items)

    def _apply(self, headers: dict[str, str], mutation: Any) -> None:
        from envoy.config.core.v3 import base_pb2

        act = base_pb2.HeaderValueOption
        for name in mutation.remove_headers:
            n = name.lower()
            if not (n.startswith(":") or n == "host"):  # system headers are never removed
                headers.pop(n, None)
        for opt in mutation.set_headers:
            h = opt.header
            assert not (h.value and h.raw_value), "only one of value or raw_value may be set"
            key, value = h.key.lower(), (h.raw_value.decode() if self.raw else h.value)
            if key in ROUTING or key.startswith("x-envoy"):
                continue  # ignored by the default mutation rules
            action = opt.append_action
            if action == act.APPEND_IF_EXISTS_OR_ADD and not (opt.HasField("append") and opt.append.value):
                action = act.OVERWRITE_IF_EXISTS_OR_ADD  # ext_proc's default: a set overwrites
            if action == act.APPEND_IF_EXISTS_OR_ADD:
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            elif action == act.ADD_IF_ABSENT:
                headers.setdefault(key, value)
            elif action == act.OVERWRITE_IF_EXISTS:
                if key in headers:
                    headers[key] = value
            else:
                headers[key] = value

    @staticmethod
    def _body(body: bytes, mutation: Any) -> bytes:
        which = mutation.WhichOneof("mutation")
        if which == "body":
            return bytes(mutation.body)
        if which == "clear_body" and mutation.clear_body:
            return b""
        assert which is None, f"body mutation {which} is for FULL_DUPLEX_STREAMED/GRPC modes only"
        return body

    def _immediate(self, imm: Any, replies: list[str], seen: Seen | None = None) -> Answer:
        headers: dict[str, str] = {}
        self._apply(headers, imm.headers)
        code = imm.status.code if imm.HasField("status") else 500
        return Answer(code if code >= 200 else 500, headers, bytes(imm.body), immediate=True,
                      details=imm.details, upstream=seen, replies=replies)

