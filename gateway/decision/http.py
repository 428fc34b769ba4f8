"""The decision API over HTTP/JSON: ``POST /v1/admit`` and ``POST /v1/settle`` (docs/decision-api.yaml).

Served by ``kgate serve --decision-listen ADDR`` on its own listeners — ``HOST:PORT`` or ``unix:/path`` —
next to (never on) the client listener, over the same engine. Callers authenticate with
``Authorization: Bearer <token>`` (the token from the environment variable ``decision.token_env``) or, on
TCP, with a client certificate (``decision.tls_client_ca``). Without a token the API is served only on a
Unix socket or a loopback address, which the host's own permissions protect.

A decision is always a 200 whose body says ``allow`` or ``deny``: the HTTP status of this API's own answer
is about the call (400 malformed, 401 unauthenticated, 404 unknown request id, 503 shutting down), never
about the client's request.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from gateway.decision.service import AdmitInput, DecisionService, SettleInput, UnknownRequest
from gateway.engine.errors import BadRequest, GatewayError

log = logging.getLogger("kgate.decision")

SERVICE: web.AppKey[DecisionService] = web.AppKey("kgate_decision", DecisionService)
_TOKEN: web.AppKey[str] = web.AppKey("kgate_decision_token", str)

MAX_SETTLE_BYTES = 16 << 20  # one settle call's JSON; a larger answer comes in several segments


def create_decision_app(service: DecisionService, token: str | None) -> web.Application:
    """The decision API over ``service``. ``token``: required as a bearer token on every call (None: the
    listeners must be protected otherwise — a Unix socket, loopback, or client certificates)."""
    limit = service.engine.gw.config.server.max_body_bytes
    app = web.Application(client_max_size=max(MAX_SETTLE_BYTES, limit * 4 // 3 + (1 << 16)),
                          middlewares=[_errors])
    app[SERVICE] = service
    app[_TOKEN] = token or ""
    app.router.add_post("/v1/admit", admit)
    app.router.add_post("/v1/settle", settle)
    app.router.add_get("/healthz", healthz)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication first; errors of the call itself as ``{"error": {"code", "message"}}``."""
    token = request.app[_TOKEN]
    if token and request.path != "/healthz":
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "unauthorized", "the decision API needs 'Authorization: Bearer <token>'")
    try:
        return await handler(request)
    except GatewayError as err:
        return _error(err.status, err.code or err.kind, err.message)
    except UnknownRequest as exc:
        return _error(404, "unknown_request", f"no admitted request {str(exc)[:64]!r} is waiting here "
                      "(settled and forgotten, expired, or admitted by another kgate process)")
    except web.HTTPException:
        raise
    except Exception:
        log.exception("internal error in the decision API (%s)", request.path)
        return _error(500, "internal_error", "internal error")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": {"code": code, "message": message}}),
                        content_type="application/json")


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    return doc


def _bytes(doc: dict[str, Any], name: str) -> bytes:
    """A field given as text (``name``) or as base64 (``name_base64``)."""
    b64 = doc.get(f"{name}_base64")
    if b64 is not None:
        if not isinstance(b64, str):
            raise BadRequest(f"{name}_base64 must be a string", param=f"{name}_base64")
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{name}_base64 is not valid base64", param=f"{name}_base64") from None
    text = doc.get(name, "")
    if not isinstance(text, str):
        raise BadRequest(f"{name} must be a string", param=name)
    return text.encode()


def _headers(value: object) -> dict[str, str]:
    """``{"name": "value" | ["value", ...]}`` or ``[["name", "value"], ...]`` → one value per name (repeated
    values joined with ", ", as HTTP folds them)."""
    pairs: list[tuple[object, object]]
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        pairs = [(p[0], p[1]) for p in value]
    elif value is None:
        return {}
    else:
        raise BadRequest("headers must be an object of name → value (or list of values)", param="headers")
    out: dict[str, str] = {}
    for k, v in pairs:
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            v = ", ".join(v)
        if not isinstance(k, str) or not isinstance(v, str):
            raise BadRequest("header names and values must be strings", param="headers")
        key = k.lower()
        out[key] = f"{out[key]}, {v}" if key in out else v
    return out


def _str(doc: dict[str, Any], name: str, default: str | None = None) -> str:
    v = doc.get(name, default)
    if not isinstance(v, str):
        raise BadRequest(f"{name} must be a string" if name in doc else f"{name} is required", param=name)
    return v


async def admit(request: web.Request) -> web.Response:
    doc = await _json(request)
    path = _str(doc, "path")
    if not path.startswith("/"):
        raise BadRequest("path must start with '/'", param="path")
    req = AdmitInput(method=_str(doc, "method", "POST"), path=path, headers=_headers(doc.get("headers")),
                     body=_bytes(doc, "body"), peer=_str(doc, "peer", "unknown"))
    result = await request.app[SERVICE].admit(req)
    return _ok(result.as_json())


async def settle(request: web.Request) -> web.Response:
    doc = await _json(request)
    rid = _str(doc, "request_id")
    status = doc.get("status")
    offset = doc.get("offset", 0)
    usage = doc.get("usage")
    if status is not None and (not isinstance(status, int) or isinstance(status, bool)):
        raise BadRequest("status must be an integer", param="status")
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise BadRequest("offset must be an integer", param="offset")
    if usage is not None and not isinstance(usage, dict):
        raise BadRequest("usage must be an object", param="usage")
    final = doc.get("final", False)
    if not isinstance(final, bool):
        raise BadRequest("final must be true or false", param="final")
    part = SettleInput(status=status, data=_bytes(doc, "data"), offset=offset, final=final, usage=usage,
                       outcome=_str(doc, "outcome", "complete"))
    result = await request.app[SERVICE].settle(rid, part)
    return _ok(result.as_json())


async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return _ok({"status": "ok", "pending": service.pending})


def _ok(doc: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(doc), content_type="application/json")
