"""What the decision service takes and answers: :class:`AdmitInput` → :class:`Allow` or :class:`Deny`;
:class:`SettleInput` → :class:`Settled` (or :class:`UnknownRequest`).

Each answer's ``as_json`` is its body in the decision API (docs/decision-api.yaml); :mod:`gateway.decision.extproc`
uses the objects themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# How the exchange with the upstream ended, as the calling gateway saw it (``SettleInput.outcome``).
OUTCOMES = ("complete", "client_disconnected", "upstream_timeout", "upstream_broken", "upstream_unreachable",
            "not_sent")

# Client headers that carry a caller's credentials: never sent upstream (the gateway's own key is).
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key", "proxy-authorization",
                      "cookie")


class UnknownRequest(LookupError):
    """A settle for a request id this process does not hold (never admitted here, or already expired)."""


@dataclass(frozen=True, slots=True)
class AdmitInput:
    """The client's request as the calling gateway received it."""

    method: str
    path: str  # the path with its query string, as the client sent it
    headers: Mapping[str, str]  # any case
    body: bytes
    peer: str = "unknown"  # the client's address as the gateway saw it ("unix" for a Unix socket)


@dataclass(frozen=True, slots=True)
class Allow:
    """Send ``body`` to ``path`` on upstream ``upstream``, with ``upstream_headers`` instead of the client's
    (its credentials removed, the upstream's own added); add ``response_headers`` to the answer."""

    request_id: str
    upstream: str
    upstream_url: str | None  # the upstream's base URL as kgate knows it (None: the gateway routes itself)
    path: str
    body: bytes
    upstream_headers: dict[str, str]
    remove_headers: tuple[str, ...]
    response_headers: dict[str, str]
    stream: bool
    strip_usage: bool  # kgate asked for streamed usage the client did not: drop the usage-only event
    rename: tuple[tuple[bytes, bytes], ...]  # plain byte replacements: the upstream's model name → the public
    model: str
    api: str
    k_max: float
    flops_max: float
    samples: int
    clamped: tuple[str, ...]
    fail_open: bool  # the caller's tier serves when the store is away (on_store_error: allow)

    def as_json(self) -> dict[str, Any]:
        return {"decision": "allow", "request_id": self.request_id, "upstream": self.upstream,
                "upstream_url": self.upstream_url, "path": self.path, "body": self.body.decode(),
                "upstream_headers": self.upstream_headers, "remove_headers": list(self.remove_headers),
                "response_headers": self.response_headers, "stream": self.stream,
                "strip_usage": self.strip_usage,
                "rename": [[old.decode(), new.decode()] for old, new in self.rename],
                "model": self.model, "api": self.api, "k_max": self.k_max, "flops_max": self.flops_max,
                "samples": self.samples, "clamped": list(self.clamped), "fail_open": self.fail_open}


@dataclass(frozen=True, slots=True)
class Deny:
    """Answer the client this, instead of forwarding (already recorded in the audit log)."""

    request_id: str
    status: int
    headers: dict[str, str]
    body: bytes  # JSON, in the client's API's error shape
    code: str
    fail_open: bool

    def as_json(self) -> dict[str, Any]:
        return {"decision": "deny", "request_id": self.request_id, "status": self.status,
                "headers": self.headers, "body": self.body.decode(), "code": self.code,
                "fail_open": self.fail_open}


@dataclass(frozen=True, slots=True)
class SettleInput:
    """The next part of what the upstream answered. ``data`` starts at byte ``offset`` of the answer's body;
    ``usage`` (the provider's usage object, in its API's shape) may stand in for the body of a unary answer."""

    status: int | None = None  # the upstream's HTTP status, once known
    data: bytes = b""
    offset: int = 0
    final: bool = False
    usage: dict[str, Any] | None = None
    outcome: str = "complete"


@dataclass(slots=True)
class Settled:
    """Where a request stands after a settle call."""

    request_id: str
    state: str  # "metering" (more to come) | "settled"
    received: int  # body bytes taken so far, in order
    passed: bytes = b""  # a stream's bytes to pass to the client, for an in-process caller (usage stripped)
    decision: str | None = None
    status: int | None = None
    reason: str = ""
    charged: dict[str, Any] | None = None  # K, FLOPs, tokens (kgate meter's object) once settled
    headers: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "state": self.state, "received": self.received,
                "decision": self.decision, "status": self.status, "reason": self.reason,
                "charged": self.charged, "headers": self.headers}
