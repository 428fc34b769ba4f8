"""What an upstream HTTP client is to the gateway: the :class:`UpstreamClient` and :class:`UpstreamResponse`
protocols, the errors both implementations raise, their :class:`Timeouts`, and the check that keeps CR, LF
and NUL out of every request they send.

Two implementations, chosen per upstream (``upstreams.<name>.client``): ``native``
(:mod:`gateway.proxy.http_client`, httptools: the fast one) and ``aiohttp``
(:mod:`gateway.proxy.aiohttp_client`, aiohttp's client: the fallback). Both honour the same contract,
which ``tests/unit/test_http_client.py`` runs over each of them:

- ``post`` sends ``POST {base_url path}{path}`` with ``Host``, ``Content-Length`` and exactly the headers
  given (no compression negotiation, user agent or cookies of its own; redirects are not followed) and
  returns once the response's status and headers have arrived (interim 1xx answers skipped);
- the body comes as it arrives (``iter_any``, transfer coding removed, content coding left alone) or whole
  (``read``, :class:`HttpTooLarge` over a limit);
- three timeouts: ``connect`` (TCP and TLS), ``read`` (the longest wait for the next bytes: the head or a
  body chunk) and ``total`` (the whole exchange); :class:`HttpTimeout` says whether the request had left;
- refused, reset, closed early or malformed: :class:`HttpBroken` (``connect`` when no connection was made);
- ``release`` returns a fully read response's connection to the pool (any other is closed); ``close``
  aborts the connection, which cancels the upstream's work on a stream;
- a request whose path or header holds CR, LF or NUL is refused with ``ValueError`` before anything is
  sent (each value's origin checks first; this is the last line).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol


class HttpBroken(Exception):
    """The upstream connection failed, closed early or spoke malformed HTTP."""

    def __init__(self, message: str, *, connect: bool = False):
        super().__init__(message)
        self.connect = connect  # the connection could not be made at all


class HttpTimeout(Exception):
    """A connect, read or total timeout expired."""

    def __init__(self, message: str, *, sent: bool = True):
        super().__init__(message)
        self.sent = sent  # the request had left: the upstream may be generating (False: connecting timed out)


class HttpTooLarge(Exception):
    """A response body larger than the reader's limit (raised before the rest of it is read)."""


class Timeouts:
    __slots__ = ("connect", "read", "total")

    def __init__(self, connect: float, read: float, total: float):
        self.connect, self.read, self.total = connect, read, total


class UpstreamResponse(Protocol):
    """An upstream response: status and headers at once, the body as it arrives."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Lower-case names; a repeated header keeps its last value."""
        ...

    def iter_any(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive (chunked encoding already decoded)."""
        ...

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; :class:`HttpTooLarge` as soon as it is known to exceed ``limit`` bytes."""
        ...

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool when it can be reused."""
        ...

    def close(self) -> None:
        """Abandon the response and its connection (cancels the upstream's work on a stream)."""
        ...


class UpstreamClient(Protocol):
    """POSTs to upstreams over pooled keep-alive connections."""

    async def post(self, base_url: str, path: str, body: bytes, headers: Mapping[str, str],
                   timeouts: Timeouts) -> UpstreamResponse: ...

    async def close(self) -> None:
        """Close every pooled connection."""
        ...


HEAD_REFUSED = "CR, LF or NUL in an upstream request's path or header"


def refuse_line_breaks(path: str, headers: Mapping[str, str]) -> None:
    """``ValueError`` when the path, a header name or a header value holds CR, LF or NUL (header injection)."""
    for text in (path, *headers.keys(), *headers.values()):
        if "\r" in text or "\n" in text or "\0" in text:
            raise ValueError(HEAD_REFUSED)
