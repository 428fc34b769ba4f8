"""Calling the model servers: routing, credentials, headers and timeouts (docs/design.md §4.2).

The client's credentials never travel upstream: each upstream's own key comes from the environment
variable its policy names, in the header style of the API being spoken. Hop-by-hop headers and anything
not on an allowlist are dropped in both directions.

Each upstream is called through the client its policy names (``client: native | aiohttp``, see
:mod:`gateway.proxy.upstream_client`); :class:`UpstreamClients` holds one of each kind in use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.engine.errors import UpstreamError, UpstreamTimeout
from gateway.policy.config import UpstreamConfig
from gateway.proxy.aiohttp_client import AiohttpClient
from gateway.proxy.http_client import HttpClient
from gateway.proxy.upstream_client import (
    HttpBroken,
    HttpTimeout,
    HttpTooLarge,
    Timeouts,
    UpstreamClient,
    UpstreamResponse,
)

log = logging.getLogger(__name__)

# Client headers that carry meaning for the provider and nothing about the caller's identity.
FORWARD_REQUEST_HEADERS = ("anthropic-version", "anthropic-beta", "openai-beta", "accept")
MAX_FORWARDED_VALUE = 1024  # characters; provider headers (versions, beta flags) are far shorter
# Upstream response headers worth passing back (request ids help a client open a support ticket).
FORWARD_RESPONSE_HEADERS = ("content-type", "x-request-id", "request-id", "openai-processing-ms",
                            "anthropic-organization-id")


Response = UpstreamResponse  # what ``send`` returns, by the name the handler knows


class UpstreamClients:
    """One client of each kind in use (built at its first request), for all upstreams; closed together.

    An :class:`UpstreamClient` itself, which sends through the native client: :func:`send` picks the
    target's own kind.
    """

    def __init__(self) -> None:
        self._clients: dict[str, UpstreamClient] = {}

    @property
    def built(self) -> tuple[str, ...]:
        """The kinds built so far."""
        return tuple(self._clients)

    def get(self, kind: str) -> UpstreamClient:
        client = self._clients.get(kind)
        if client is None:
            if kind == "native":
                client = HttpClient()
            elif kind == "aiohttp":
                client = AiohttpClient()
            else:
                raise ValueError(f"no upstream client of kind {kind!r}")
            self._clients[kind] = client
        return client

    async def post(self, base_url: str, path: str, body: bytes, headers: Mapping[str, str],
                   timeouts: Timeouts) -> UpstreamResponse:
        return await self.get("native").post(base_url, path, body, headers, timeouts)

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str
    config: UpstreamConfig
    timeout: Timeouts
    auth_value: str | None  # the upstream's own key, from the environment


class Upstreams:
    """The configured upstreams, resolved to URLs (the simulator's when ``base_url: simulator``)."""

    def __init__(self, upstreams: Mapping[str, UpstreamConfig], simulator_url: str | None):
        self._targets: dict[str, Target] = {}
        for name, cfg in upstreams.items():
            base = simulator_url if cfg.base_url == "simulator" else cfg.base_url
            if base is None:
                continue
            key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
            if key is not None and not (key.isascii() and key.isprintable()):
                # A key read from a file often ends in a newline: sent as is, it would end the header
                # early. Refused (the upstream then answers 401, upstream_auth), never sent nor logged.
                log.error("upstream %r: the key in $%s holds a control character (a trailing newline?) or "
                          "non-ASCII; it is not used", name, cfg.api_key_env)
                key = None
            timeout = Timeouts(connect=cfg.connect_timeout_seconds, read=cfg.read_timeout_seconds,
                               total=cfg.total_timeout_seconds)
            self._targets[name] = Target(name, base.rstrip("/"), cfg, timeout, key)

    def get(self, name: str) -> Target:
        target = self._targets.get(name)
        if target is None:
            raise UpstreamError(f"upstream {name!r} is not available")
        return target


def request_headers(target: Target, api_shape: str, client: Mapping[str, str], request_id: str) -> dict[str, str]:
    """The headers sent upstream: content type, the upstream's own credentials, a few provider headers."""
    h = {"content-type": "application/json", "x-request-id": request_id, **provider_headers(client)}
    if api_shape == "anthropic" and "anthropic-version" not in h:
        h["anthropic-version"] = "2023-06-01"
    if target.auth_value:
        if api_shape == "anthropic":
            h["x-api-key"] = target.auth_value
        elif api_shape == "gemini":
            h["x-goog-api-key"] = target.auth_value
        else:
            h["authorization"] = f"Bearer {target.auth_value}"
    if target.config.base_url == "simulator":
        # The built-in simulator takes test-control headers (x-sim-fault, ...); real upstreams never see them.
        for k, v in client.items():
            if k.lower().startswith("x-sim-") and _clean(v):
                h[k.lower()] = v
    for k, v in target.config.headers.items():
        h[k.lower()] = v
    return h


def provider_headers(client: Mapping[str, str]) -> dict[str, str]:
    """The client's provider headers that travel upstream (beta flags among them: the tier's field policy,
    gateway/adapters/fields.py, decides whether a request carrying them goes at all)."""
    h = {}
    for name in FORWARD_REQUEST_HEADERS:
        v = client.get(name)
        if v is not None and _clean(v):
            h[name] = v
    return h


def _clean(value: str) -> bool:
    """A header value safe to forward: printable ASCII (so no CR, LF or NUL: no header injection; and no
    other control or non-ASCII bytes, which no provider header carries) of sane length."""
    return len(value) <= MAX_FORWARDED_VALUE and value.isascii() and value.isprintable()


def response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """The upstream's headers passed back to the client: the allowlisted ones whose value is safe to send
    (the httptools parser already refuses CR, LF and NUL in a value; this holds for any client)."""
    # A loop, not a comprehension (a function call of its own in 3.11), with _clean inlined: on every
    # answer. tests/unit/test_perf_finish.py holds it to _clean.
    h = {}
    for k in FORWARD_RESPONSE_HEADERS:
        v = upstream.get(k)
        if v is not None and len(v) <= MAX_FORWARDED_VALUE and v.isascii() and v.isprintable():
            h[k] = v
    return h


async def send(client: UpstreamClient, target: Target, path: str, body: bytes,
               headers: Mapping[str, str]) -> UpstreamResponse:
    """POST to the upstream (through the client of the target's kind when ``client`` is the gateway's
    :class:`UpstreamClients`); connection failures and timeouts become UpstreamError / UpstreamTimeout."""
    if isinstance(client, UpstreamClients):
        client = client.get(target.config.client)
    try:
        return await client.post(target.base_url, path, body, headers, target.timeout)
    except HttpTimeout as exc:
        if not exc.sent:
            raise UpstreamTimeout(f"connecting to upstream {target.name!r} timed out",
                                  code="upstream_connect_timeout") from None
        raise UpstreamTimeout(f"upstream {target.name!r} did not answer in time") from None
    except HttpBroken as exc:
        if exc.connect:
            raise UpstreamError(f"cannot connect to upstream {target.name!r}", code="upstream_unreachable") from None
        raise UpstreamError(f"upstream {target.name!r} failed before answering") from None


async def read_body(target: Target, resp: UpstreamResponse) -> bytes:
    """The whole response body; failures while reading it become UpstreamError / UpstreamTimeout, and a body
    over the upstream's ``max_response_bytes`` an UpstreamError ``upstream_too_large`` (the upstream did
    the work: the caller charges it like any failure after sending)."""
    try:
        return await resp.read(target.config.max_response_bytes)
    except HttpTooLarge:
        raise UpstreamError(f"upstream {target.name!r} sent an answer larger than its max_response_bytes "
                            f"({target.config.max_response_bytes})", code="upstream_too_large") from None
    except HttpTimeout:
        raise UpstreamTimeout(f"upstream {target.name!r} timed out while sending its answer") from None
    except HttpBroken:
        raise UpstreamError(f"upstream {target.name!r} broke off its answer") from None
