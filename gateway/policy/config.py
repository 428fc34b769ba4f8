"""Configuration and policy schema (docs/design.md §2, §9).

A configuration is one YAML file, or several merged in order (later files add models, tiers, ...).
Every key is validated by pydantic with ``extra="forbid"``: a misspelled key is an error that names the
file, the key path and the problem (:class:`ConfigError`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Metric = Literal[
    "requests", "prompt_tokens", "output_tokens", "reasoning_tokens", "generated_tokens", "flops", "k_units"
]
METRICS: tuple[str, ...] = get_args(Metric)  # the budget metric names, in this order
WindowName = Literal["1m", "1h", "1d", "7d", "30d", "day", "month"]
Scope = Literal["principal", "org", "global"]
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
EFFORT_ORDER: tuple[str, ...] = ("none", "minimal", "low", "medium", "high", "xhigh", "max")

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


# ------------------------------------------------------------------------------------------- upstreams
class UpstreamConfig(Strict):
    base_url: str
    api_key_env: str | None = None
    connect_timeout_seconds: PositiveFloat = 5.0
    read_timeout_seconds: PositiveFloat = 300.0
    total_timeout_seconds: PositiveFloat = 600.0
    headers: dict[str, str] = Field(default_factory=dict)
    # The largest JSON answer kgate buffers (a larger one is a 502 ``upstream_too_large``); streams pass through.
    max_response_bytes: PositiveInt = 64 * 1024 * 1024
    # After a client leaves mid-stream, kgate keeps reading the upstream until its usage arrives (so that
    # hidden reasoning is charged), for at most this long and this many bytes; then the bound is charged.
    disconnect_drain_seconds: Annotated[float, Field(ge=0)] = 60.0
    disconnect_drain_bytes: NonNegInt = 16 * 1024 * 1024
    # The HTTP client that calls it: the lean httptools one, or aiohttp's client (a fallback that behaves alike).
    client: Literal["native", "aiohttp"] = "native"

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if v == "simulator":
            return v
        # No whitespace or control character anywhere: the URL's host and path go into the request line
        # and the Host header.
        if not re.fullmatch(r"https?://[^\s/]+\S*", v) or not _header_safe(v):
            raise ValueError("must be 'simulator' or an http(s):// URL (printable ASCII, no spaces)")
        return v.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"header name {name!r} is not an HTTP token")
            if name.lower() in _FRAMING_HEADERS:
                raise ValueError(f"header {name!r} is set by kgate itself (the request's framing)")
            if not _header_safe(value):
                raise ValueError(f"header {name!r}: the value must be printable ASCII (no CR, LF, NUL or "
                                 "other control character)")
        return v


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: a header name
_FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding"})  # written by gateway.proxy.http_client


def _header_safe(value: str) -> bool:
    """Printable ASCII: no CR, LF or NUL (no header injection), nor any other control character."""
    return value.isascii() and value.isprintable()


# ---------------------------------------------------------------------------------------------- models
class ModelConfig(Strict):
    upstream: str
    upstream_model: str | None = None
    active_params: PositiveFloat
    total_params: PositiveFloat | None = None
    reasoning: bool = False
    n_layers: PositiveInt | None = None
    d_attn: PositiveInt | None = None
    reference_output_tokens: PositiveInt = 512
    max_output_tokens: PositiveInt = 4096
    reasoning_effort_tokens: dict[Effort, NonNegInt] = Field(default_factory=dict)
    shared_prefill: bool = True
    evaluated_max_k: PositiveFloat | None = None
    training_flops: PositiveFloat | None = None
    # Prompt tokens added to the estimate per reference to context the provider holds (a previous
    # response, a cached content, a file id, an image by URL): the body's size says nothing of them.
    provider_context_prompt_tokens: NonNegInt = 0

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.total_params is not None and self.total_params < self.active_params:
            raise ValueError("total_params must be at least active_params")
        if (self.n_layers is None) != (self.d_attn is None):
            raise ValueError("n_layers and d_attn go together: give both or neither")
        if self.reasoning_effort_tokens and not self.reasoning:
            raise ValueError("reasoning_effort_tokens is only meaningful for a reasoning model")
        return self


# ----------------------------------------------------------------------------------------------- tiers
class BudgetConfig(Strict):
    metric: Metric
    window: WindowName
    limit: Annotated[float, Field(ge=0)]
    scope: Scope = "principal"
    rolling: bool = False
    name: str | None = None

    @model_validator(mode="after")
    def _rolling(self) -> BudgetConfig:
        if self.rolling and self.window in ("day", "month"):
            raise ValueError("calendar windows (day, month) cannot be rolling; use 1d or 30d")
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        # The label goes into RateLimit / RateLimit-Policy headers as a quoted string (RFC 9651 sf-string).
        if v and not (_header_safe(v) and '"' not in v and "\\" not in v):
            raise ValueError("a budget name must be printable ASCII without double quotes or backslashes "
                             "(it is sent in RateLimit headers)")
        return v

    @property
    def label(self) -> str:
        """A stable name for this budget: used in 429s, headers, ledger keys and metrics."""
        return self.name or f"{self.scope}:{self.metric}:{self.window}{':rolling' if self.rolling else ''}"


class TierConfig(Strict):
    description: str = ""
    models: list[str] | Literal["*"] = "*"
    efforts: list[Effort] | None = None
    max_k: PositiveFloat | None = None
    max_samples: PositiveInt | None = None
    max_reasoning_tokens: NonNegInt | None = None
    max_flops: PositiveFloat | None = None
    beyond_evaluated: bool = False
    on_exceed: Literal["reject", "clamp"] = "reject"
    budgets: list[BudgetConfig] = Field(default_factory=list)
    admission: Literal["strict", "expected"] = "strict"
    on_store_error: Literal["deny", "allow"] = "deny"
    mode: Literal["enforce", "shadow"] = "enforce"
    # Request fields, query parameters and provider headers outside each API's known set
    # (gateway/adapters/fields.py) that this tier may send: e.g. [priority, lora_path, anthropic-beta].
    allow_fields: list[str] = Field(default_factory=list)
    # Any other unknown field: refused (400 naming it), or forwarded as is; shadow mode forwards and records.
    unknown_fields: Literal["refuse", "forward"] = "refuse"
    # Context the provider holds (previous_response_id, cachedContent, files by id, images by URL).
    allow_provider_context: bool = True
    # What a request costs when the provider's usage never arrives (a stream without usage, a client that
    # left before it, a timeout after sending): ``bound`` charges the admission bound (the default: hidden
    # reasoning cannot be seen in the text), ``counted`` the tokens kgate counted or estimated from text.
    on_missing_usage: Literal["bound", "counted"] = "bound"

    @model_validator(mode="after")
    def _unique_budgets(self) -> TierConfig:
        labels = [b.label for b in self.budgets]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"duplicate budgets {sorted(dup)}: give each a distinct metric/window/scope or name")
        return self


class PrincipalConfig(Strict):
    id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@:-]+$")]
    org: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@:-]+$")] = "default"
    tier: str
    key_sha256: str | None = None
    enabled: bool = True

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be 64 lowercase hex characters (the sha256 of the API key)")
        return v


# ---------------------------------------------------------------------------------------------- config
class Config(Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    tiers: dict[str, TierConfig] = Field(default_factory=dict)
    principals: list[PrincipalConfig] = Field(default_factory=list)
    decision: DecisionConfig = Field(default_factory=DecisionConfig)
    # Filled by the loader, not by the YAML: where this config came from and its fingerprint.
    source_files: tuple[str, ...] = ()
    version: str = ""

    @model_validator(mode="after")
    def _references(self) -> Config:
        problems: list[str] = []
        for name, m in self.models.items():
            if m.upstream not in self.upstreams:
                problems.append(f"models.{name}.upstream: unknown upstream {m.upstream!r}")
        for tname, t in self.tiers.items():
            if isinstance(t.models, list):
                for i, mname in enumerate(t.models):
                    if mname not in self.models:
                        problems.append(f"tiers.{tname}.models.{i}: unknown model {mname!r}")
        seen_ids: set[str] = set()
        seen_keys: set[str] = set()
        for i, p in enumerate(self.principals):
            if p.tier not in self.tiers:
                problems.append(f"principals.{i}.tier: unknown tier {p.tier!r}")
            if p.id in seen_ids:
                problems.append(f"principals.{i}.id: duplicate principal {p.id!r}")
            seen_ids.add(p.id)
            if p.key_sha256:
                if p.key_sha256 in seen_keys:
                    problems.append(f"principals.{i}.key_sha256: the same key is given to two principals")
                seen_keys.add(p.key_sha256)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def allowed_models(self, tier: TierConfig) -> list[str]:
        return list(self.models) if tier.models == "*" else [m for m in tier.models if m in self.models]


# --------------------------------------------------------------------------------------------- loading
class ConfigError(Exception):
    """A configuration that cannot be used. ``errors`` holds one line per problem: file, key path, problem."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate mapping keys (a silent override is a policy bug)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_MERGEABLE = ("upstreams", "models", "tiers")


def _read_yaml(path: Path, raw: bytes | None = None) -> dict[str, Any]:
    try:
        text = (path.read_bytes() if raw is None else raw).decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}{where}: invalid YAML: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: (top level): expected a mapping of sections, got {type(data).__name__}"])
    return data


def _format_errors(path: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{path}: {loc}: {msg}")
    return lines


def load_config(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> Config:
    """Load and validate one or more YAML files; raise :class:`ConfigError` naming file, key and problem."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = [Path(p) for p in paths]
    if not files:
        raise ConfigError(["no configuration file given"])
    merged: dict[str, Any] = {}
    digest = hashlib.sha256()
    for f in files:
        try:
            raw = f.read_bytes()  # read once: the sha256 must be that of the bytes that were validated
        except OSError as exc:
            raise ConfigError([f"{f}: cannot read: {exc.strerror or exc}"]) from None
        data = _read_yaml(f, raw)
        digest.update(raw)
        for key, value in data.items():
            if key in _MERGEABLE and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            elif key == "principals" and isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] = [*merged[key], *value]
            else:
                merged[key] = value
    for forbidden in ("source_files", "version"):
        if forbidden in merged:
            raise ConfigError([f"{files[0]}: {forbidden}: unknown key (not allowed here)"])
    merged["source_files"] = tuple(str(f) for f in files)
    merged["version"] = digest.hexdigest()
    label = ", ".join(str(f) for f in files)
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        lines = _format_errors(label, exc)
        if len(files) > 1:
            return _locate(files, exc, lines)
        raise ConfigError(lines) from None


def _locate(files: list[Path], exc: ValidationError, lines: list[str]) -> Config:
    """For several files, try each alone to name the file that holds the error where possible."""
    located: list[str] = []
    for f in files:
        try:
            Config.model_validate({**_read_yaml(f), "source_files": (str(f),)})
        except ValidationError as single:
            located += [ln for ln in _format_errors(str(f), single) if "unknown model" not in ln
                        and "unknown upstream" not in ln and "unknown tier" not in ln]
    raise ConfigError(located or lines) from None


def is_loopback_host(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_config_path() -> Path:
    """The example policy shipped with the project, used when no configuration is given."""
    env = os.environ.get("KGATE_CONFIG")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]  # gateway/
    for candidate in (Path.cwd() / "policies" / "example.yaml", here / "data" / "example.yaml"):
        if candidate.exists():
            return candidate
    return here / "data" / "example.yaml"
