"""Configuration and policy schema (docs/design.md §2, §9).

A configuration is one YAML file, or several merged in order (later files add models, tiers, ...).
Every key is validated by pydantic with ``extra="forbid"``: a misspelled key is an error that names the
file, the key path and the problem (:class:`ConfigError`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from gateway.policy.sections import AuditConfig as AuditConfig
from gateway.policy.sections import DecisionConfig as DecisionConfig
from gateway.policy.sections import EvaluationsConfig as EvaluationsConfig
from gateway.policy.sections import NonNegInt, PositiveFloat, PositiveInt, Strict
from gateway.policy.sections import ServerConfig as ServerConfig
from gateway.policy.sections import StoreConfig as StoreConfig
from gateway.policy.sections import is_loopback_host as is_loopback_host
from gateway.policy.sections import parse_listen as parse_listen
from gateway.policy.sections import parse_listener as parse_listener

Metric = Literal[
    "requests", "prompt_tokens", "output_tokens", "reasoning_tokens", "generated_tokens", "flops", "k_units"
]
METRICS: tuple[str, ...] = get_args(Metric)  # the budget metric names, in this order
WindowName = Literal["1m", "1h", "1d", "7d", "30d", "day", "month"]
Scope = Literal["principal", "org", "global"]
Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
EFFORT_ORDER: tuple[str, ...] = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


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
    # The compute the model was evaluated under: typed in, or read from a signed evaluation certificate
    # (``evaluated: {certificate: FILE}``, docs/design.md §14), which the loader verifies and copies into
    # the three figures below and ``evaluated_source``. Tiers without beyond_evaluated are held to them.
    evaluated: EvaluatedConfig | None = None
    evaluated_max_k: PositiveFloat | None = None
    evaluated_max_samples: PositiveInt | None = None
    evaluated_max_reasoning_tokens: NonNegInt | None = None
    evaluated_source: str | None = None  # set by the loader: the certificate the figures come from
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
        if self.evaluated is not None and self.evaluated_source is None and (
            self.evaluated_max_k is not None or self.evaluated_max_samples is not None
            or self.evaluated_max_reasoning_tokens is not None
        ):
            raise ValueError("evaluated_max_k, evaluated_max_samples and evaluated_max_reasoning_tokens come from "
                             "evaluated.certificate: give the certificate or the figures, not both")
        return self


class EvaluatedConfig(Strict):
    """A model's evaluated compute, from a signed certificate (``kgate eval finish`` writes one)."""

    certificate: str  # a path, relative to the policy file that names it
    # Which of the certificate's figures bind: K always; samples and reasoning tokens when listed.
    limits: tuple[Literal["k", "samples", "reasoning_tokens"], ...] = ("k",)

    @field_validator("limits")
    @classmethod
    def _k_binds(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if "k" not in v:
            raise ValueError("limits must include k (the evaluated compute multiple)")
        return v


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
    # Sign each answer's compute (x-kgate-receipt, docs/design.md §14) with evaluations' signing key.
    receipts: bool = False
    # Admit from this replica's slices of the budgets (docs/design.md §3.7): most requests without a Redis
    # round trip, settles in batches, limits as exact as per-request holds. false: every request holds for
    # itself, for budgets that must be observed request by request.
    leases: bool = True
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
    evaluations: EvaluationsConfig = Field(default_factory=EvaluationsConfig)
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
        _anchor_certificates(data, f)
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
        config = Config.model_validate(merged)
    except ValidationError as exc:
        lines = _format_errors(label, exc)
        if len(files) > 1:
            return _locate(files, exc, lines)
        raise ConfigError(lines) from None
    if any(m.evaluated is not None for m in config.models.values()):
        from gateway.evals.binding import bind_certificates  # cryptography is loaded only when needed

        config = bind_certificates(config, label, digest)
    return config


def _anchor_certificates(data: dict[str, Any], path: Path) -> None:
    """Make each ``models.M.evaluated.certificate`` of one file absolute, relative to that file (files are
    merged before validation, after which nobody knows which file named it); refuse ``evaluated_source``,
    which only the loader writes."""
    models = data.get("models")
    for name, model in (models.items() if isinstance(models, dict) else ()):
        if not isinstance(model, dict):
            continue
        if "evaluated_source" in model:
            raise ConfigError([f"{path}: models.{name}.evaluated_source: set by kgate from evaluated.certificate, "
                               "not allowed here"])
        ev = model.get("evaluated")
        if isinstance(ev, dict) and isinstance(ev.get("certificate"), str) and ev["certificate"]:
            model["evaluated"] = {**ev, "certificate": str((path.parent / ev["certificate"]).absolute())}


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
