"""The error vocabulary and its one mapping to HTTP and to each API's error shape (docs/design.md §4, §10).

Every error the gateway answers with is a :class:`GatewayError`; :func:`render` turns it into the body
the client's API expects: OpenAI ``{"error": {...}}``, Anthropic ``{"type": "error", "error": {...}}``,
Gemini ``{"error": {"code", "message", "status"}}``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

ErrorShape = Literal["openai", "anthropic", "gemini"]


class GatewayError(Exception):
    """An error with a status, a machine-readable kind and a message safe to show the client."""

    status: ClassVar[int] = 500
    kind: ClassVar[str] = "internal_error"  # the label in metrics and audit records
    openai_type: ClassVar[str] = "server_error"
    anthropic_type: ClassVar[str] = "api_error"
    gemini_status: ClassVar[str] = "INTERNAL"
    # The audit decision of a request that ends with this error: "denied" when policy (or the caller's own
    # mistake) refused it, "failed" when something went wrong on the way. A failure after the upstream did
    # work is recorded as "partial" instead (it is charged): see gateway.engine.record.error_ending.
    decision: ClassVar[str] = "failed"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, detail: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.detail = dict(detail or {})


class BadRequest(GatewayError):
    decision = "denied"
    status = 400
    kind = "bad_request"
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    gemini_status = "INVALID_ARGUMENT"


class Unauthenticated(GatewayError):
    decision = "denied"
    status = 401
    kind = "unauthenticated"
    openai_type = "authentication_error"
    anthropic_type = "authentication_error"
    gemini_status = "UNAUTHENTICATED"


class Forbidden(GatewayError):
    """The caller is known but not entitled: a model outside its tier, or a per-request cap."""

    decision = "denied"
    status = 403
    kind = "forbidden"
    openai_type = "permission_error"
    anthropic_type = "permission_error"
    gemini_status = "PERMISSION_DENIED"


class NotFound(GatewayError):
    decision = "denied"
    status = 404
    kind = "not_found"
    openai_type = "invalid_request_error"
    anthropic_type = "not_found_error"
    gemini_status = "NOT_FOUND"


class Conflict(GatewayError):
    """The change asked for contradicts the current state (an admin operation: a run already open)."""

    decision = "denied"
    status = 409
    kind = "conflict"
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    gemini_status = "ALREADY_EXISTS"


class MethodNotAllowed(GatewayError):
    status = 405
    kind = "method_not_allowed"
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    gemini_status = "INVALID_ARGUMENT"


class RequestTimeout(GatewayError):
    """The client did not send its request body in time (a slow or stalled client)."""

    status = 408
    kind = "request_timeout"
    openai_type = "invalid_request_error"
    anthropic_type = "timeout_error"
    gemini_status = "DEADLINE_EXCEEDED"


class PayloadTooLarge(GatewayError):
    decision = "denied"
    status = 413
    kind = "payload_too_large"
    openai_type = "invalid_request_error"
    anthropic_type = "request_too_large"
    gemini_status = "INVALID_ARGUMENT"


class BudgetExceeded(GatewayError):
    decision = "denied"
    status = 429
    kind = "budget_exceeded"
    openai_type = "rate_limit_error"
    anthropic_type = "rate_limit_error"
    gemini_status = "RESOURCE_EXHAUSTED"


class StoreUnavailable(GatewayError):
    decision = "denied"
    status = 503
    kind = "store_unavailable"
    openai_type = "server_error"
    anthropic_type = "overloaded_error"
    gemini_status = "UNAVAILABLE"


class ShuttingDown(GatewayError):
    status = 503
    kind = "shutting_down"
    openai_type = "server_error"
    anthropic_type = "overloaded_error"
    gemini_status = "UNAVAILABLE"


class UpstreamError(GatewayError):
    status = 502
    kind = "upstream_error"
    openai_type = "server_error"
    anthropic_type = "api_error"
    gemini_status = "UNAVAILABLE"


class UpstreamTimeout(GatewayError):
    status = 504
    kind = "upstream_timeout"
    openai_type = "server_error"
    anthropic_type = "timeout_error"
    gemini_status = "DEADLINE_EXCEEDED"


class ClientClosed(GatewayError):
    """The client hung up before its request arrived whole: nothing was forwarded or charged, and nobody
    reads the answer (499, nginx's "client closed request", for the audit record and the metrics)."""

    status = 499
    kind = "client_closed"
    openai_type = "invalid_request_error"
    anthropic_type = "invalid_request_error"
    gemini_status = "CANCELLED"


class InternalError(GatewayError):
    status = 500
    kind = "internal_error"


class UsageError(Exception):
    """Bad input to a ``kgate`` command (an option, a file, a date): printed as one line, exit status 2.
    Not a :class:`GatewayError`: it is never an HTTP answer."""


def render(err: GatewayError, shape: ErrorShape) -> dict[str, Any]:
    """The error body in the shape of the API the client spoke."""
    if shape == "anthropic":
        return {"type": "error", "error": {"type": err.anthropic_type, "message": err.message}}
    if shape == "gemini":
        return {"error": {"code": err.status, "message": err.message, "status": err.gemini_status}}
    return {"error": {"message": err.message, "type": err.openai_type, "param": err.param,
                      "code": err.code or err.kind}}


def shape_for_path(path: str) -> ErrorShape:
    """Which API's error shape a path speaks, for errors raised before an adapter is chosen."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1beta/"):
        return "gemini"
    return "openai"


def render_stream_error(err: GatewayError, api: str) -> bytes:
    """An error as the in-stream event of the client's API, for failures after the stream has begun."""
    import orjson

    if api == "anthropic.messages":
        body = render(err, "anthropic")
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"
    if api == "openai.responses":
        body = {"type": "error", "code": err.code or err.kind, "message": err.message, "param": err.param}
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"
    shape: ErrorShape = "gemini" if api == "gemini" else "openai"
    return b"data: " + orjson.dumps(render(err, shape)) + b"\n\n"
