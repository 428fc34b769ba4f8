"""The process's own settings: listeners, the store, the audit log and the decision API (docs/design.md §9).

These sections say how kgate runs, not whom it serves: :mod:`gateway.policy.config` holds the policy
(upstreams, models, tiers, principals) and the loader, and builds the whole :class:`~gateway.policy.config.Config`
from both.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- server
class ServerConfig(Strict):
    listen: str = "127.0.0.1:8080"
    admin_listen: str = "127.0.0.1:8081"
    admin_token_env: str = "KGATE_ADMIN_TOKEN"
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    body_timeout_seconds: PositiveFloat = 30.0  # a client that trickles its body longer gets a 408
    # A connection must deliver a complete request head within this many seconds of its first byte (a
    # client trickling its headers is closed); between requests an idle connection is kept this long.
    header_timeout_seconds: PositiveFloat = 10.0
    keepalive_timeout_seconds: PositiveFloat = 75.0  # above the 60 s idle timeout of common load balancers
    # The identity header is believed only from a peer inside one of these networks (CIDRs; ``unix`` for a
    # Unix-socket peer); required with it. From anyone else the header is refused (401), never ignored.
    trusted_identity_header: str | None = None
    trusted_identity_sources: tuple[str, ...] = ()
    metrics_on_client_port: bool = False  # /metrics is on the admin listener; true also serves it on the client one
    replica_id: str | None = None
    drain_seconds: Annotated[float, Field(ge=0)] = 30.0
    # A client that stops reading a response: a write that cannot proceed for this long ends the exchange
    # (the request is then treated as a client disconnect: charged what the upstream generated).
    write_timeout_seconds: PositiveFloat = 30.0
    # Requests of the common shape (a whole JSON POST to an API route, not a stream) served without
    # aiohttp's request machinery (gateway/proxy/fastpath.py); false: every request through aiohttp.
    fast_path: bool = True

    @field_validator("listen", "admin_listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        parse_listen(v)
        return v

    @field_validator("trusted_identity_sources")
    @classmethod
    def _sources(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for source in v:
            if source != "unix":
                try:
                    ipaddress.ip_network(source, strict=False)
                except ValueError:
                    raise ValueError(f"{source!r} is neither a CIDR (10.0.0.0/8, 10.1.2.3, fd00::/8) "
                                     "nor 'unix'") from None
        return v

    @model_validator(mode="after")
    def _trusted_header_needs_sources(self) -> ServerConfig:
        if self.trusted_identity_header and not self.trusted_identity_sources:
            raise ValueError("trusted_identity_header needs trusted_identity_sources: the networks (CIDRs) "
                             "of the proxies allowed to set it; from anyone else it would name any principal")
        return self


class DecisionConfig(Strict):
    """kgate as a plugin of another gateway (docs/plugins.md): the decision API and Envoy's ext_proc."""

    # Listeners of the decision API (HTTP/JSON): HOST:PORT or unix:/path. Empty: not served.
    listen: tuple[str, ...] = ()
    # HOST:PORT (or unix:/path) of the Envoy external processor (gRPC). None: not served.
    extproc_listen: str | None = None
    # The bearer token callers must send, from this environment variable. Unset: the decision API is served
    # only on Unix sockets and loopback addresses (or with client certificates, below).
    token_env: str = "KGATE_DECISION_TOKEN"
    # How long an admitted request may wait for its final settle before it is charged as unanswered
    # (on_missing_usage). None: the upstream's total timeout plus store.lease_grace_seconds (the hold's lease).
    settle_timeout_seconds: PositiveFloat | None = None
    # TLS for TCP listeners; with tls_client_ca, callers must present a certificate it signed (mTLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None

    @field_validator("listen")
    @classmethod
    def _listeners(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            parse_listener(item)
        return v

    @field_validator("extproc_listen")
    @classmethod
    def _extproc(cls, v: str | None) -> str | None:
        if v is not None:
            parse_listener(v)
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> DecisionConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (the listener's own certificate)")
        return self


def parse_listener(value: str) -> tuple[str, int] | str:
    """``HOST:PORT`` → (host, port); ``unix:/path`` → the socket's path; raises ValueError."""
    if value.startswith("unix:"):
        path = value[5:]
        if not path.startswith("/"):
            raise ValueError(f"expected unix:/absolute/path, got {value!r}")
        return path
    return parse_listen(value)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:8080``) → (host, port); raises ValueError."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", value.strip())
    if not m:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


class StoreConfig(Strict):
    url: str = "embedded"
    key_prefix: str = "kgate"
    data_dir: str = ".kgate"
    timeout_seconds: PositiveFloat = 0.5
    spool_max_bytes: PositiveInt = 64 * 1024 * 1024
    lease_grace_seconds: Annotated[float, Field(ge=0)] = 30.0
    lease_expiry: Literal["charge", "release"] = "charge"
    # How long a finished request id is remembered, so that a repeated settle (a retry, a spool replay)
    # counts once. Redis keeps about 230 bytes per request and scope for this long: see the README.
    record_ttl_seconds: Annotated[float, Field(ge=60)] = 3600.0

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        ok = v == "embedded" or re.match(r"^(redis|rediss|unix|redis\+sentinel|redis\+cluster|rediss\+cluster)://", v)
        if not ok:
            raise ValueError("must be 'embedded' or a redis://, rediss://, unix://, redis+sentinel:// or "
                             "redis+cluster:// URL")
        return v


class AuditConfig(Strict):
    dir: str = ".kgate/audit"
    hmac_key_env: str | None = None
    redis_stream: str | None = None
    # fsync each batch of records before the responses they belong to leave (survives a power loss, not
    # only a crash); the writes then run on a thread of their own, so a slow disk never stalls the gateway.
    fsync: bool = False



def is_loopback_host(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EvaluationsConfig(Strict):
    """Evaluation runs, their certificates and per-answer receipts (docs/design.md §14)."""

    # The keys whose certificates a policy may bind to (``models.M.evaluated.certificate``): each an
    # ``ed25519:...`` text as ``kgate eval pubkey`` prints it, or a file holding one.
    public_keys: tuple[str, ...] = ()
    # The key that signs certificates and receipts: a PEM file, else this environment variable (PEM text or
    # the 32-byte seed in base64). Needed only by tiers with receipts and by the admin API's eval finish.
    signing_key_file: str | None = None
    signing_key_env: str = "KGATE_EVAL_SIGNING_KEY"
    # How long ``eval finish`` waits for requests of the run still in flight before it writes the certificate.
    finish_wait_seconds: Annotated[float, Field(ge=0)] = 60.0
