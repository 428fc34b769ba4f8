"""What the engine takes in and gives back for one request: typed stage results (docs/design.md §4).

A transport turns its own request into a :class:`Call`; :meth:`gateway.engine.Engine.admit` answers with
an :class:`Admission` (forward :attr:`Admission.forward` upstream) or a :class:`Denial` (answer its error).
How the request ended — charged what, decided how, and the upstream leg's timings the transport
measured — is an :class:`Ending`. The audit record and the
metrics are made from these, never from an HTTP status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.engine.errors import GatewayError

if TYPE_CHECKING:
    from gateway.adapters import Adapter
    from gateway.engine.compute import Bound, Measured
    from gateway.engine.metering import ParsedRequest
    from gateway.ledger.ledger import Reservation
    from gateway.policy.config import Config, TierConfig
    from gateway.policy.directory import Principal


@dataclass(slots=True)
class Call:
    """One API request as any transport sees it. ``body`` may come later (:meth:`Engine.admit` takes a
    reader), so that a caller is identified before its body is read, as an HTTP server would."""

    adapter: Adapter | None  # the API's (None for an endpoint that is not a model call, e.g. /v1/models)
    params: dict[str, str]  # path parameters (Gemini: model, method, alt)
    path: str
    headers: Mapping[str, str]  # case-insensitive, as the client sent them
    query: Mapping[str, str]
    query_string: str
    # The connection's peer, asked only when a trusted identity header is present: an IP address,
    # "unix" for a Unix socket, "closed" or "unknown" (see gateway.engine.identity.untrusted).
    peer: Callable[[], str]
    body: bytes | None = None
    doc: dict[str, Any] | None = None  # ``body`` decoded, where the transport had to look into it already


@dataclass(slots=True)
class Facts:
    """What the engine learnt of a request while admitting it: filled in by :func:`admit` alone, stage by
    stage, so that a request refused half-way is recorded with what was known by then."""

    request_id: str
    api: str
    started: float  # perf_counter at arrival
    config: Config  # the policy snapshot this request runs under (a reload never changes it half-way)
    principal: Principal | None = None
    tier: str | None = None
    grant: str | None = None
    model: str | None = None
    upstream: str | None = None
    stream: bool = False
    bound: Bound | None = None
    mode: str = "enforce"
    would_deny: bool = False
    rule: str | None = None
    reason: str = ""  # what shadow mode would have refused
    clamped: Sequence[str] = ()  # what was lowered (replaced, never changed in place)
    store: str = "ok"  # ok | unmetered | spooled (admitted while the store was away)
    eval: str | None = None  # the evaluation run the caller is under (gateway/evals/runs.py), if any


@dataclass(slots=True)
class Forward:
    """The request kgate sends upstream: the body carries the bound's caps in the API's own fields."""

    upstream: str
    path: str  # path and query on the upstream
    body: bytes
    wants_usage: bool  # the client asked for streamed usage itself (else kgate strips what it added)


@dataclass(slots=True)
class Admission:
    """An admitted request: its budgets are held (``reservation``) and ``forward`` may go upstream."""

    facts: Facts
    tier: TierConfig
    parsed: ParsedRequest
    reservation: Reservation | None
    forward: Forward
    ending: Ending  # filled in as the request goes upstream and back


@dataclass(slots=True)
class Denial:
    """A request refused (or failed) before anything was held or sent: answer ``error``, record ``facts``."""

    facts: Facts
    error: GatewayError


@dataclass(slots=True)
class Ending:
    """How a request ended: the audit decision, the status the client got, what it was charged.

    ``store`` may change after the answer left (a settle posted after it failed and was spooled): the
    engine then writes a second record of the same request id.
    """

    decision: str = "failed"
    status: int = 500
    reason: str = ""
    rule: str | None = None
    measured: Measured | None = None
    store: str = "ok"  # ok | unmetered | spooled | unsettled
    released: bool = False  # the hold was voided: nothing generated, nothing charged
    recorded: bool = False  # the audit record is written
    # The upstream leg, as the transport measured it (perf_counter seconds; fields here rather than an
    # object of their own: two objects per request cost measurably more than one).
    sent_at: float | None = None  # when the request left for the upstream (None: never sent)
    first_byte_seconds: float | None = None  # from sending to the first byte of the answer
    upstream_seconds: float = 0.0
