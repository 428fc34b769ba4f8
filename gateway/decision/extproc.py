"""Envoy's external processor (``envoy.service.ext_proc.v3.ExternalProcessor/Process``) over the decision service.

``kgate serve --extproc-listen HOST:PORT`` (``decision.extproc_listen``) serves it; ``deploy/envoy/envoy.yaml``
is an Envoy configuration for it. Envoy opens one bidirectional gRPC stream per HTTP request and, with the
processing mode that configuration sets (request headers SEND, request body BUFFERED, response headers
SEND, response body STREAMED, trailers SKIP), the stream goes:

1. ``request_headers`` → remembered (method, ``:path``, headers), answered with an empty ``HeadersResponse``;
   headers with ``end_of_stream`` (no body) are admitted at once with an empty body;
2. ``request_body`` (the whole body) → :meth:`DecisionService.admit`. A :class:`Deny` is answered as an
   ``ImmediateResponse`` in the client's API shape. An :class:`Allow` is a ``BodyResponse``
   (``CONTINUE_AND_REPLACE``) whose header mutation removes the client's credentials, sets the upstream's
   headers, ``:path``, ``content-length`` and ``x-kgate-upstream`` (the upstream's name: Envoy's routes pick
   the cluster by it, hence ``clear_route_cache``), and whose body mutation is kgate's body;
3. ``response_headers`` → kgate's response headers added. An error status settles the request at once
   (nothing is charged) and, where the proxy would answer its own error instead (5xx, or 401/403/407 from
   the upstream: its message may quote the gateway's key), so does this, as an ``ImmediateResponse``; a
   504 (Envoy's route timeout, most likely) is charged as the proxy's own timeout is. A unary answer asks
   for its body whole (``mode_override`` to BUFFERED, honoured where the filter has ``allow_mode_override``)
   so that ``x-kgate-k`` and ``x-kgate-flops`` can still be set;
4. ``response_body`` chunks → :meth:`DecisionService.settle` in order; a stream's chunk is replaced by what
   the meter passes on (the usage event kgate added stripped, the model renamed); a unary body is held (each
   chunk cleared) and released whole, renamed, with the last one; the last chunk settles the request.

A stream that ends, or is cancelled, before the last chunk settles the request as ``client_disconnected``
(charged by what was metered, or by ``on_missing_usage``), or ``not_sent`` when kgate's answer to the
request body never went out. With a token (``decision.token_env``), every stream must carry gRPC metadata
``authorization: Bearer <token>`` (Envoy's ``grpc_service.initial_metadata``); without one, only loopback
and Unix sockets are served — the header mutations carry the upstream's own credentials. The client's
address (for ``server.trusted_identity_sources``) is Envoy's ``source.address`` attribute, else unknown.
Message construction and header parsing: :mod:`gateway.decision.extproc_wire`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import stat
from typing import Any

import orjson

from gateway.decision.extproc_wire import Wire, load, read_headers
from gateway.decision.listeners import is_loopback
from gateway.decision.service import AdmitInput, Allow, DecisionService, Settled, SettleInput, UnknownRequest
from gateway.engine.errors import GatewayError, UpstreamError, UpstreamTimeout, render, shape_for_path
from gateway.policy.config import parse_listener
from gateway.proxy.server import StartupError

log = logging.getLogger("kgate.decision")

# Headers of Allow.upstream_headers that Envoy's mutation rules would ignore, or that Envoy sets itself.
_NOT_SET = frozenset({"host", "content-length", "transfer-encoding", "connection"})


async def start_extproc(service: DecisionService, listen: str, token: str | None) -> Any:
    """Serve the external processor on ``listen`` (``HOST:PORT`` or ``unix:/path``); the ``grpc.aio.Server``."""
    grpc, aio, pb, pb_grpc, mode_pb = load()
    try:
        where = parse_listener(listen)
    except ValueError as exc:
        raise StartupError(f"ext_proc listener: {exc}") from None
    if token is None and not isinstance(where, str) and not is_loopback(where[0]):
        raise StartupError(f"Envoy's external processor on {listen} would be open to the network (its answers "
                           "carry the upstreams' credentials): set the decision token (decision.token_env) and "
                           "send it from Envoy as grpc_service.initial_metadata, or listen on loopback or "
                           "unix:/path")
    cfg = service.engine.gw.config
    biggest = max([cfg.server.max_body_bytes, *(u.max_response_bytes for u in cfg.upstreams.values())])
    size = max(4 << 20, biggest + (biggest >> 3) + (1 << 20))  # a buffered body and its message's framing
    server = aio.server(options=[("grpc.max_receive_message_length", size),
                                 ("grpc.max_send_message_length", size),
                                 ("grpc.so_reuseport", 0)])  # a port in use is an error, not shared
    pb_grpc.add_ExternalProcessorServicer_to_server(Processor(service, token, grpc, pb, mode_pb), server)
    if isinstance(where, str):
        _clear_stale_socket(where)
    try:
        port = server.add_insecure_port(f"unix:{where}" if isinstance(where, str) else listen)
    except RuntimeError as exc:
        port, why = 0, str(exc)
    else:
        why = "the address is in use or not available"
    if port == 0:
        raise StartupError(f"cannot listen for Envoy's external processor on {listen}: {why}")
    await server.start()
    if isinstance(where, str):
        os.chmod(where, 0o660)  # the socket's group may call it; nobody else
    return server


class Processor:
    """The ``ExternalProcessor`` service: one :class:`Exchange` per stream."""

    def __init__(self, service: DecisionService, token: str | None, grpc: Any, pb: Any, mode_pb: Any):
        self.service, self.grpc, self.pb, self.mode_pb = service, grpc, pb, mode_pb
        self._expected = f"Bearer {token}".encode() if token else None
        self._endings: set[asyncio.Task[None]] = set()  # settles of streams that went away, running on

    async def Process(self, request_iterator: Any, context: Any) -> None:
        if self._expected is not None:
            given = dict(context.invocation_metadata() or ()).get("authorization", "")
            if not hmac.compare_digest(str(given).encode(), self._expected):
                await context.abort(self.grpc.StatusCode.UNAUTHENTICATED,
                                    "kgate's ext_proc needs gRPC metadata 'authorization: Bearer <token>'")
        ex = Exchange(self.service, self.pb, self.mode_pb, "unknown")
        try:
            async for msg in request_iterator:
                reply = await ex.handle(msg)
                if reply is not None and not msg.observability_mode:
                    await context.write(reply)
                    ex.written()
                if ex.over:
                    return  # an ImmediateResponse: Envoy asks nothing more on this stream
        finally:
            if ex.waiting:
                # Gone before the last chunk (the client, Envoy, or a shutdown cancelled the stream): settled
                # on its own task, which a cancellation of this one does not stop.
                task = asyncio.get_running_loop().create_task(ex.gone())
                self._endings.add(task)
                task.add_done_callback(self._endings.discard)
                await asyncio.shield(task)


class Exchange:
    """One HTTP request through Envoy: its admission, then its answer metered chunk by chunk."""

    def __init__(self, service: DecisionService, pb: Any, mode_pb: Any, peer: str):
        self.service, self.pb, self.mode_pb = service, pb, mode_pb
        self.wire = Wire(pb, mode_pb)
        self.peer = peer
        self.method, self.path = "", "/"
        self.headers: dict[str, str] = {}
        self.allow: Allow | None = None
        self.status: int | None = None  # the upstream's, once its headers came
        self.offset = 0
        self.held: list[bytes] = []  # a unary answer's chunks, released with the last
        self.final: Settled | None = None
        self.over = False  # an ImmediateResponse was sent
        self._pending_allow = False  # the Allow is being written
        self.forwarded = False  # the Allow went out to Envoy

    @property
    def waiting(self) -> bool:
        """Admitted here and not settled yet."""
        return self.allow is not None and self.final is None

    def written(self) -> None:
        if self._pending_allow:
            self._pending_allow, self.forwarded = False, True

    async def handle(self, msg: Any) -> Any:
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            return await self._request_headers(msg)
        if kind == "request_body":
            body = msg.request_body
            if not body.end_of_stream:
                return self._refuse(500, "kgate's ext_proc needs the whole request body at once: set "
                                    "processing_mode.request_body_mode: BUFFERED", "kgate_body_mode")
            return await self._admit(body.body, on_headers=False)
        if kind == "response_headers":
            return await self._response_headers(msg.response_headers)
        if kind == "response_body":
            return await self._response_body(msg.response_body)
        if kind == "response_trailers" and self.waiting:
            done = await self._settle(b"", final=True)
            if done.passed:
                log.warning("request %s: %d bytes of the stream's end dropped: the response trailers came after "
                            "them (set response_trailer_mode: SKIP)", done.request_id, len(done.passed))
        if kind in ("request_trailers", "response_trailers"):
            return self.wire.trailers(kind)
        return None  # nothing Envoy sends: not answered

    # ---------------------------------------------------------------------------------------- request
    async def _request_headers(self, msg: Any) -> Any:
        self.headers, raw = read_headers(msg.request_headers.headers)
        self.wire.raw = raw or not self.headers  # answer in the field Envoy speaks (raw_value when unsure)
        self.method = self.headers.get(":method", "")
        self.path = self.headers.get(":path", "/")
        self.peer = _peer(msg) or self.peer
        if msg.request_headers.end_of_stream:
            return await self._admit(b"", on_headers=True)
        return self.wire.request_headers()

    async def _admit(self, body: bytes, on_headers: bool) -> Any:
        if self.allow is not None or self.over:
            return self.wire.request_headers() if on_headers else self.wire.request_body()
        client = {k: v for k, v in self.headers.items() if not k.startswith(":")}
        decision = await self.service.admit(AdmitInput(self.method, self.path, client, body, self.peer))
        if not isinstance(decision, Allow):
            self.over = True
            return self.wire.immediate(decision.status, decision.headers, decision.body, f"kgate_{decision.code}")
        self.allow, self._pending_allow = decision, True
        sets = {k: v for k, v in decision.upstream_headers.items() if k.lower() not in _NOT_SET}
        sets.update({":path": _upstream_path(decision), "content-length": str(len(decision.body)),
                     "x-kgate-upstream": decision.upstream,
                     # kgate reads the answer's bytes: it must not come compressed
                     "accept-encoding": "identity"})
        remove = [h for h in decision.remove_headers if h not in sets]
        common = self.wire.common(set_headers=sets, remove=remove, body=decision.body, replace=True,
                                  clear_route_cache=True)
        return self.wire.request_headers(common) if on_headers else self.wire.request_body(common)

    def _refuse(self, status: int, message: str, details: str) -> Any:
        self.over = True
        body = orjson.dumps(render(GatewayError(message), shape_for_path(self.path)))
        return self.wire.immediate(status, {"content-type": "application/json"}, body, details)

    # --------------------------------------------------------------------------------------- response
    async def _response_headers(self, headers_msg: Any) -> Any:
        a = self.allow
        if a is None or self.final is not None:
            return self.wire.response_headers()
        headers, _ = read_headers(headers_msg.headers)
        try:
            self.status = int(headers.get(":status", ""))
        except ValueError:
            self.status = 502
        if self.status == 504:
            # A gateway gave up waiting — Envoy's own route timeout, most likely — while the model may still
            # be working: charged as the proxy charges its own timeout (on_missing_usage), answered as kgate's.
            done = await self._settle(b"", final=True, outcome="upstream_timeout", with_status=False)
            return self._replacement(done, force=True)
        if self.status >= 400 or headers_msg.end_of_stream:
            done = await self._settle(b"", final=True)
            replaced = self._replacement(done)
            if replaced is not None:
                return replaced
            return self.wire.response_headers(self.wire.common(set_headers=a.response_headers))
        changes = a.stream or bool(a.rename)  # the body the client gets differs from the upstream's
        common = self.wire.common(set_headers=a.response_headers, remove=("content-length",) if changes else ())
        return self.wire.response_headers(common, buffer_body=not a.stream)

    async def _response_body(self, chunk: Any) -> Any:
        a = self.allow
        if a is None or self.final is not None:  # not ours, or an error answer passed on as it is
            return self.wire.response_body()
        eos = bool(chunk.end_of_stream)
        try:
            done = await self._settle(chunk.body, final=eos)
        except GatewayError as err:  # more than the upstream's max_response_bytes
            log.warning("request %s: %s", a.request_id, err.message)
            done = await self._settle(b"", final=True, outcome="upstream_broken", advance=False)
            return self._replacement(done, force=True)
        if a.stream:
            return self.wire.response_body(self.wire.common(body=done.passed or None,
                                                            clear_body=not done.passed))
        self.held.append(chunk.body)
        if not eos:
            return self.wire.response_body(self.wire.common(clear_body=True))
        replaced = self._replacement(done)
        if replaced is not None:
            return replaced
        body = b"".join(self.held)
        for old, new in a.rename:
            body = body.replace(old, new)
        self.held = []
        sets = {**done.headers, "content-length": str(len(body))}  # applies where the body came buffered
        return self.wire.response_body(self.wire.common(set_headers=sets, body=body))

    async def _settle(self, data: bytes, final: bool, outcome: str = "complete", advance: bool = True,
                      with_status: bool = True) -> Settled:
        assert self.allow is not None
        part = SettleInput(status=self.status if with_status else None, data=data if advance else b"",
                           offset=self.offset, final=final, outcome=outcome)
        done = await self.service.settle(self.allow.request_id, part)
        if advance:
            self.offset += len(data)
        if final or done.state == "settled":
            self.final = done
        return done

    def _replacement(self, done: Settled, force: bool = False) -> Any:
        """kgate's own error answer where the proxy would give one instead of the upstream's (None: pass the
        upstream's on)."""
        if not force and (done.status is None or done.status < 400 or done.status == self.status):
            return None
        self.over = True
        status = done.status if done.status is not None and done.status >= 400 else 502
        upstream = self.status or 0
        err: GatewayError
        if status == 504:
            err = UpstreamTimeout(done.reason or "the upstream did not answer in time")
        else:
            code = "upstream_auth" if upstream in (401, 403, 407) else (
                f"upstream_{upstream}" if upstream >= 500 else None)
            err = UpstreamError(done.reason or "the upstream's answer could not be passed on", code=code)
        headers = {"content-type": "application/json", "x-kgate-request-id": done.request_id}
        body = orjson.dumps(render(err, shape_for_path(self.path)))
        return self.wire.immediate(status, headers, body, f"kgate_{err.code or err.kind}")

    async def gone(self) -> None:
        """The stream went away before the last chunk: settle as the client's leaving (or as never sent)."""
        if self.allow is None or self.final is not None:
            return
        outcome = "client_disconnected" if self.forwarded else "not_sent"
        if self.status is None and self.forwarded:
            log.info("request %s: the ext_proc stream ended before the upstream's answer (the client left, or "
                     "Envoy does not send response headers to kgate); charged as unanswered", self.allow.request_id)
        try:
            await self._settle(b"", final=True, outcome=outcome, advance=False)
        except (UnknownRequest, GatewayError):  # settled meanwhile (a shutdown)
            pass
        except Exception:
            log.exception("settling request %s after its ext_proc stream ended", self.allow.request_id)


def _upstream_path(allow: Allow) -> str:
    """The path to send upstream: the upstream's base path (``base_url: http://host/prefix``) and kgate's path."""
    from urllib.parse import urlsplit

    base = urlsplit(allow.upstream_url).path.rstrip("/") if allow.upstream_url and "://" in allow.upstream_url else ""
    return base + allow.path


def _peer(msg: Any) -> str | None:
    """The client's address: Envoy's ``source.address`` attribute (``request_attributes``), the downstream
    connection's own address. Never a forwarded-for header, which the client writes, nor the stream's peer,
    which is Envoy: a trusted identity header (``server.trusted_identity_sources``) is believed by it."""
    for attrs in msg.attributes.values():
        value = attrs.fields.get("source.address")
        if value is not None and value.string_value:
            addr = value.string_value  # "10.0.0.1:5678", "[::1]:5678"
            host = addr.rsplit(":", 1)[0] if addr.count(":") == 1 or addr.startswith("[") else addr
            return host.strip("[]")
    return None


def _clear_stale_socket(path: str) -> None:
    """Remove a Unix socket left by an earlier run (gRPC does not replace it); any other file stays (and the
    bind then fails)."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
