"""What every wire-format adapter provides (the SSE framing they share is :mod:`gateway.adapters.sse`).

An adapter knows one API's request and response format. It never talks to the network; the request
handler calls it in this order:

1. :meth:`Adapter.model_name` and :meth:`Adapter.parse`: the request in compute-model terms
   (:class:`~gateway.engine.compute.ComputeRequest`); raises :class:`~gateway.engine.errors.BadRequest` for bad input.
2. :meth:`Adapter.rewrite`: lower samples / output cap / thinking budget / effort to a clamp target.
3. :meth:`Adapter.prepare_upstream`: map the model name, make a stream carry usage; returns whether the
   client itself asked for streamed usage (so the extra chunk can be stripped).
4. :meth:`Adapter.usage_from_json` for a JSON response, or :meth:`Adapter.stream_meter` for a stream:
   a :class:`StreamMeter` that sees the upstream bytes, returns the bytes to forward, and ends with the
   usage (``source: upstream``, or ``counted`` when the stream carried none).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import unquote_plus

import orjson

from gateway.adapters.sse import SSEEvent, SSEParser
from gateway.engine.compute import Bound, ClampTarget, ComputeRequest, Usage
from gateway.engine.errors import BadRequest, ErrorShape


class StreamMeter(ABC):
    """Meters one streamed response while it passes through.

    ``feed`` takes the upstream's bytes and returns those to send to the client now (everything, except
    events the client did not ask for, such as an injected usage chunk). ``close`` returns what is
    still held. ``usage()`` gives the final usage: the provider's own when the stream carried it
    (``source: upstream``), else the streamed tokens counted (``source: counted``).
    """

    def __init__(self, req: ComputeRequest, client_wants_usage: bool):
        self.req = req
        self.client_wants_usage = client_wants_usage
        self.finished = False  # the API's own end-of-stream marker was seen
        self.error: dict[str, Any] | None = None  # an error event the upstream sent in the stream
        self._parser = SSEParser()

    def feed(self, chunk: bytes) -> bytes:
        events = self._parser.feed(chunk)
        if not events:
            return b""
        on_event = self.on_event
        if len(events) == 1:  # the common case: a read brings one event
            ev = events[0]
            return ev.raw if on_event(ev) else b""
        return b"".join([ev.raw for ev in events if on_event(ev)])

    def close(self) -> bytes:
        on_event = self.on_event
        return b"".join([ev.raw for ev in self._parser.flush() if on_event(ev)])

    @abstractmethod
    def on_event(self, ev: SSEEvent) -> bool:
        """Account for one event; True to forward it to the client."""

    @abstractmethod
    def usage(self) -> Usage:
        """The usage of the whole response so far."""


class Adapter(ABC):
    """One API's wire format."""

    api: ClassVar[str]  # "openai.chat", "openai.completions", "openai.responses", "anthropic.messages", "gemini"
    shape: ClassVar[ErrorShape]
    upstream_path: ClassVar[str] = ""  # the path to call upstream ("{model}" filled in by the adapter)

    @abstractmethod
    def model_name(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> str:
        """The public model name the client asked for (BadRequest when missing)."""

    @abstractmethod
    def is_stream(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> bool: ...

    @abstractmethod
    def parse(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> ComputeRequest:
        """Validate the compute-relevant fields and return the request in compute-model terms.

        ``prompt_tokens`` is left 0: the handler estimates it from the body size.
        """

    @abstractmethod
    def rewrite(self, body: dict[str, Any], req: ComputeRequest, target: ClampTarget) -> list[str]:
        """Lower the request in place to ``target``; return what was changed, as ``field=value`` strings."""

    @abstractmethod
    def prepare_upstream(self, body: dict[str, Any], upstream_model: str, stream: bool) -> bool:
        """Map the model name and make a stream carry usage; return whether the client asked for it."""

    @abstractmethod
    def write_bound(self, body: dict[str, Any], req: ComputeRequest, bound: Bound) -> list[str]:
        """Make the forwarded ``body`` (a shallow copy: copy any nested object before changing it) say what
        the bound assumed: the per-sample cap C (``bound.output_cap``) in the API's own cap field, always,
        and integer fields as integers (``parse`` accepts ``2.0`` for 2). Returns the real clamps: a field
        the client set above C, as ``field=value`` strings. BadRequest where the API cannot carry C."""

    def upstream_url_path(self, upstream_model: str, path_params: Mapping[str, str], query: str) -> str:
        """The path (and query, credentials removed) to call on the upstream."""
        if not query:  # most requests
            return self.upstream_path
        kept = upstream_query(query)
        return self.upstream_path + (f"?{kept}" if kept else "")

    @abstractmethod
    def usage_from_json(self, body: Any, req: ComputeRequest) -> Usage:
        """Usage of a non-streamed response; estimated from its text (``source: estimated``) when absent."""

    @abstractmethod
    def stream_meter(self, req: ComputeRequest, client_wants_usage: bool) -> StreamMeter: ...


# Query parameters that carry credentials (Google's ``key``, OAuth's ``access_token``, ...): the caller's
# never travel upstream, whatever their spelling's case; the gateway authenticates with its own.
CREDENTIAL_PARAMS = frozenset({"key", "api_key", "api-key", "apikey", "access_token", "x-goog-api-key"})


def upstream_query(query: str) -> str:
    """An encoded query string without its credential parameters."""
    # Google also takes its system parameters with a "$" ("$key"): a credential all the same.
    return "&".join(p for p in query.split("&")
                    if p and unquote_plus(p.partition("=")[0]).removeprefix("$").lower() not in CREDENTIAL_PARAMS)


# ---------------------------------------------------------------------------------- validation helpers
# The largest integer any field may carry (2**53 - 1, the largest a JSON number holds exactly): beyond it
# a sample count times an output cap no longer converts to a float, and no API means such a value.
MAX_INT = 2**53 - 1


def req_int(body: Mapping[str, Any], key: str, *, default: int | None = None, minimum: int | None = None,
            maximum: int | None = None, param: str | None = None) -> int | None:
    """An optional integer field, validated: bools, floats with a fraction and magnitudes above
    :data:`MAX_INT` are refused."""
    v = body.get(key)
    if v is None:
        return default
    # The common case first: a plain int within every limit (the checks below would pass it unchanged).
    if type(v) is int and -MAX_INT <= v <= MAX_INT and (minimum is None or v >= minimum) and (
            maximum is None or v <= maximum):
        return v
    name = param or key
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"'{name}' must be an integer, got {type(v).__name__}", param=name)
    if abs(v) > MAX_INT:
        raise BadRequest(f"'{name}' must be an integer of magnitude at most {MAX_INT}, got {str(v)[:32]}",
                         param=name)
    if isinstance(v, float):
        if not v.is_integer():
            raise BadRequest(f"'{name}' must be an integer, got {v}", param=name)
        v = int(v)
    if minimum is not None and v < minimum:
        raise BadRequest(f"'{name}' must be at least {minimum}, got {v}", param=name)
    if maximum is not None and v > maximum:
        raise BadRequest(f"'{name}' must be at most {maximum}, got {v}", param=name)
    return int(v)


def write_cap(body: dict[str, Any], key: str, cap: int) -> str | None:
    """Set ``body[key]`` to the cap C; the change as ``key=C`` when the client had asked for more (a real
    clamp), None when it had asked for C or sent none (the routine write every forwarded request gets)."""
    cur = body.get(key)
    body[key] = cap
    if isinstance(cur, (int, float)) and not isinstance(cur, bool) and cur > cap:
        return f"{key}={cap}"
    return None


def as_ints(obj: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any] | None:
    """The integer fields ``keys`` of ``obj`` as ints (``2.0`` → ``2``): a new dict when one changed, else
    None. ``parse`` has already refused fractions, so each float here is integral."""
    floats = [k for k in keys if type(obj.get(k)) is float]
    if not floats:
        return None
    return {**obj, **{k: int(obj[k]) for k in floats}}


# req_bool, req_str and req_obj are spelled out rather than sharing a helper: they run for most fields of
# every request, and the extra call cost about 1.5k instructions per request (bench/instructions.py).
def req_bool(body: Mapping[str, Any], key: str, *, default: bool = False, param: str | None = None) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        name = param or key
        raise BadRequest(f"'{name}' must be a boolean, got {type(v).__name__}", param=name)
    return v


def req_str(body: Mapping[str, Any], key: str, *, required: bool = False, choices: tuple[str, ...] | None = None,
            param: str | None = None) -> str | None:
    v = body.get(key)
    if v is None:
        if required:
            name = param or key
            raise BadRequest(f"'{name}' is required", param=name)
        return None
    if not isinstance(v, str):
        name = param or key
        raise BadRequest(f"'{name}' must be a string, got {type(v).__name__}", param=name)
    if choices is not None and v not in choices:
        name = param or key
        raise BadRequest(f"'{name}' must be one of {', '.join(choices)}; got {v[:64]!r}", param=name)
    return v


def req_obj(body: Mapping[str, Any], key: str, *, param: str | None = None) -> Mapping[str, Any] | None:
    v = body.get(key)
    if v is not None and not isinstance(v, dict):
        name = param or key
        raise BadRequest(f"'{name}' must be an object, got {type(v).__name__}", param=name)
    return v


def json_size(obj: Any) -> int:
    """The length of ``obj`` as JSON, for token estimates; an upstream may send JSON nested deeper than
    orjson writes (255 levels), which must not fail the request: its text length stands in."""
    try:
        return len(orjson.dumps(obj))
    except orjson.JSONEncodeError:
        return len(str(obj))


USAGE_CEILING = 2**53  # the largest usage figure taken as reported: exact as a float, and as a JSON int64


def nonneg(x: Any) -> int:
    """A usage figure as a non-negative int (providers send null, floats or strings on bad days). A figure
    beyond :data:`USAGE_CEILING` (``1e300``, ``"inf"``) counts as the ceiling: still charged as the
    overrun it is, but finite, so that the ledger can post it and the audit log can write it."""
    if type(x) is int:  # the common case, first
        return x if 0 < x <= USAGE_CEILING else (USAGE_CEILING if x > 0 else 0)
    if x is None or isinstance(x, bool):
        return 0
    if isinstance(x, str):
        try:
            x = float(x)
        except ValueError:
            return 0
    if isinstance(x, float):
        if x != x:  # NaN
            return 0
        x = max(0.0, min(x, USAGE_CEILING))
    if not isinstance(x, (int, float)):
        return 0
    v = min(int(x), USAGE_CEILING)
    return v if v > 0 else 0
