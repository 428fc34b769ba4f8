"""Envoy's ext_proc messages as the external processor (:mod:`gateway.decision.extproc`) reads and writes them.

The generated protobuf modules come from the ``xds-protos`` package (``pip install 'kgate[envoy]'``) and are
imported only when the processor starts, so kgate runs without them. Field semantics follow
``envoy/service/ext_proc/v3/external_processor.proto``:

- a header's value comes in ``raw_value`` (bytes) from an Envoy whose ``send_header_raw_value`` runtime
  feature is on (the default of recent versions), in ``value`` from older ones; the same feature decides which
  of the two Envoy reads back in a ``HeaderMutation`` (setting both is an error), so kgate answers in the
  field the request came in (:attr:`Wire.raw`);
- ``HeaderValueOption.append_action`` ``OVERWRITE_IF_EXISTS_OR_ADD``: a set replaces the client's value;
- ``HeaderMutation.remove_headers`` are applied before ``set_headers``, so removing the client's
  ``authorization`` and setting the upstream's own works in one mutation;
- ``ImmediateResponse.status`` must be a defined ``envoy.type.v3.StatusCode`` of at least 200.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.proxy.server import StartupError

INSTALL_HINT = "Envoy's external processor needs grpcio and xds-protos: pip install 'kgate[envoy]'"


def load() -> tuple[Any, Any, Any, Any, Any]:
    """(grpc, grpc.aio, external_processor_pb2, external_processor_pb2_grpc, processing_mode_pb2), or a
    :class:`StartupError` naming the extra to install."""
    # gRPC's fork support restarts its poller in a forked child; a child that closes descriptors before
    # exec (subprocess: the embedded redis-server) can then abort on EBADF (grpc/grpc#43055). kgate never
    # uses gRPC in a child, so it is off unless the operator set it.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        import grpc
        import grpc.aio
        from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
        from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
    except ImportError as exc:
        raise StartupError(f"{INSTALL_HINT} ({exc})") from None
    return grpc, grpc.aio, external_processor_pb2, external_processor_pb2_grpc, processing_mode_pb2


def read_headers(header_map: Any) -> tuple[dict[str, str], bool]:
    """An ``envoy.config.core.v3.HeaderMap`` → ({lower-case name: value}, whether Envoy used ``raw_value``).
    A repeated name's values are joined with ", ", as HTTP folds them."""
    out: dict[str, str] = {}
    raw = False
    for h in header_map.headers:
        if h.raw_value:
            raw = True
            value = h.raw_value.decode("utf-8", "replace")
        else:
            value = h.value
        key = h.key.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out, raw


class Wire:
    """Builds the processor's answers for one stream, in the header-value field its Envoy speaks."""

    def __init__(self, pb: Any, mode_pb: Any, raw: bool = True):
        self.pb, self.mode_pb, self.raw = pb, mode_pb, raw
        from envoy.config.core.v3 import base_pb2
        from envoy.type.v3 import http_status_pb2

        self._base, self._status = base_pb2, http_status_pb2

    # --------------------------------------------------------------------------------------- pieces
    def mutation(self, set_headers: Mapping[str, str] | None = None, remove: Iterable[str] = ()) -> Any:
        opts = []
        overwrite = self._base.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        for key, value in (set_headers or {}).items():
            header = (self._base.HeaderValue(key=key.lower(), raw_value=value.encode()) if self.raw
                      else self._base.HeaderValue(key=key.lower(), value=value))
            opts.append(self._base.HeaderValueOption(header=header, append_action=overwrite))
        return self.pb.HeaderMutation(set_headers=opts, remove_headers=[r.lower() for r in remove])

    def status_code(self, status: int) -> Any:
        codes = self._status.StatusCode
        valid = {v.number for v in codes.DESCRIPTOR.values}
        code = status if status in valid and status >= 200 else (502 if 500 <= status else 500)
        return self._status.HttpStatus(code=code)

    # ------------------------------------------------------------------------------------- answers
    def immediate(self, status: int, headers: Mapping[str, str], body: bytes, details: str) -> Any:
        """Answer the client this instead of going on (a denial, or kgate's error for the upstream's)."""
        return self.pb.ProcessingResponse(immediate_response=self.pb.ImmediateResponse(
            status=self.status_code(status), headers=self.mutation(headers), body=body,
            details=details.replace(" ", "_")[:200]))

    def request_headers(self, common: Any = None) -> Any:
        return self.pb.ProcessingResponse(request_headers=self.pb.HeadersResponse(response=common))

    def request_body(self, common: Any = None) -> Any:
        return self.pb.ProcessingResponse(request_body=self.pb.BodyResponse(response=common))

    def response_headers(self, common: Any = None, buffer_body: bool = False) -> Any:
        """``buffer_body``: ask Envoy (``mode_override``, honoured where the filter has ``allow_mode_override``)
        to send this answer's body whole, so headers can still be set with it."""
        msg = self.pb.ProcessingResponse(response_headers=self.pb.HeadersResponse(response=common))
        if buffer_body:
            m = self.mode_pb.ProcessingMode
            msg.mode_override.CopyFrom(m(request_header_mode=m.SEND, response_header_mode=m.SEND,
                                         request_body_mode=m.BUFFERED, response_body_mode=m.BUFFERED,
                                         request_trailer_mode=m.SKIP, response_trailer_mode=m.SKIP))
        return msg

    def response_body(self, common: Any = None) -> Any:
        return self.pb.ProcessingResponse(response_body=self.pb.BodyResponse(response=common))

    def trailers(self, kind: str) -> Any:
        return self.pb.ProcessingResponse(**{kind: self.pb.TrailersResponse()})

    def common(self, *, set_headers: Mapping[str, str] | None = None, remove: Iterable[str] = (),
               body: bytes | None = None, clear_body: bool = False, replace: bool = False,
               clear_route_cache: bool = False) -> Any:
        """A ``CommonResponse``: header mutation (when any), the body replaced (``body``) or cleared."""
        c = self.pb.CommonResponse()
        if replace:
            c.status = self.pb.CommonResponse.CONTINUE_AND_REPLACE
        remove = tuple(remove)
        if set_headers or remove:
            c.header_mutation.CopyFrom(self.mutation(set_headers, remove))
        if body is not None:
            c.body_mutation.body = body
        elif clear_body:
            c.body_mutation.clear_body = True
        c.clear_route_cache = clear_route_cache
        return c
