"""From raw request and response bytes to compute figures: the path shared by the gateway and the CLI.

``parse_request`` is what the gateway does before any compute is spent (adapter, model, bound);
``meter_response`` is what it does after (usage, K, FLOPs). ``kgate estimate`` and ``kgate meter`` run
exactly these functions, so a compliance team can reproduce the gateway's numbers for one request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from gateway.adapters import Adapter, adapter_for_path
from gateway.adapters.fields import CLEAN, Screen, screen_body
from gateway.engine.compute import Bound, ComputeRequest, Measured, admission_bound, estimate_prompt_tokens, measure
from gateway.engine.errors import BadRequest, NotFound
from gateway.policy.config import Config, ModelConfig

# orjson reads 1024 levels of nesting but writes only about 250 (the exact limit depends on the content):
# a body nested deeper would parse and then fail when forwarded. A body with fewer brackets than this
# cannot be that deep, so only the rare one with more pays for a trial encoding.
NESTING_CHECK = 200


@dataclass(frozen=True, init=False)
class ParsedRequest:
    adapter: Adapter
    path_params: dict[str, str]
    body: dict[str, Any]
    model_name: str
    model: ModelConfig
    request: ComputeRequest
    bound: Bound
    screen: Screen = CLEAN  # unknown fields and provider-held context (the tier's field policy reads it)

    # Written out, as for the value classes of gateway.engine.compute (the dict filled in one call, in the
    # fields' order): the generated __init__ of a frozen dataclass costs about three times this one, on
    # every request.
    def __init__(self, adapter: Adapter, path_params: dict[str, str], body: dict[str, Any], model_name: str,
                 model: ModelConfig, request: ComputeRequest, bound: Bound, screen: Screen = CLEAN) -> None:
        self.__dict__.update(adapter=adapter, path_params=path_params, body=body, model_name=model_name,
                             model=model, request=request, bound=bound, screen=screen)


def resolve_path(path: str) -> tuple[Adapter, dict[str, str]]:
    """The adapter for an API path (query string allowed, e.g. Gemini's ``?alt=sse``)."""
    parts = urlsplit(path)
    found = adapter_for_path(parts.path)
    if found is None:
        raise NotFound(f"unknown API path {parts.path!r}")
    adapter, params = found
    if parts.query and adapter.api == "gemini":
        alt = parse_qs(parts.query).get("alt", [""])[0]
        params = {**params, "alt": alt}
    return adapter, params


def decode_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; BadRequest for anything else."""
    if not raw or raw.isspace():  # (not raw.strip(): that copies the body)
        raise BadRequest("the request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    if len(raw) > NESTING_CHECK and raw.count(b"[") + raw.count(b"{") > NESTING_CHECK:
        try:
            orjson.dumps(body)
        except orjson.JSONEncodeError:
            raise BadRequest("the request body is nested too deeply (at most about 250 levels)") from None
    return body


def lookup_model(config: Config, name: str) -> ModelConfig:
    model = config.models.get(name)
    if model is None:
        raise NotFound(f"unknown model {name[:128]!r}", code="model_not_found", param="model")
    return model


def parse_request(config: Config, adapter: Adapter, path_params: Mapping[str, str], raw: bytes,
                  body: dict[str, Any] | None = None) -> ParsedRequest:
    """Parse and bound one request: everything the gateway knows before it spends compute."""
    if body is None:
        body = decode_body(raw)
    name = adapter.model_name(body, path_params)
    model = lookup_model(config, name)
    req = adapter.parse(body, path_params)
    screen = screen_body(adapter.api, body)
    prompt = estimate_prompt_tokens(len(raw))
    if screen.context:  # priced per reference: the body's size says nothing of what they hold
        prompt += len(screen.context) * model.provider_context_prompt_tokens
    req = req.named(name, prompt)
    return ParsedRequest(adapter=adapter, path_params=dict(path_params), body=body, model_name=name,
                         model=model, request=req, bound=admission_bound(req, model), screen=screen)


def meter_response(parsed: ParsedRequest, raw: bytes) -> Measured:
    """Meter a recorded response: a JSON body, or a raw stream transcript (SSE, or Gemini's JSON array)."""
    adapter, req = parsed.adapter, parsed.request
    text = raw.lstrip()
    streamed = req.stream or text.startswith((b"data:", b"event:", b":"))
    if not streamed:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadRequest("the response is neither a JSON body nor an SSE transcript") from None
        usage = adapter.usage_from_json(doc, req)
    else:
        meter = adapter.stream_meter(req, True)
        meter.feed(raw)
        meter.close()
        usage = meter.usage()
    return measure(usage, parsed.model, parsed.bound)


def estimate_dict(parsed: ParsedRequest) -> dict[str, Any]:
    """The ``kgate estimate`` object (docs/design.md §9)."""
    b = parsed.bound
    return {
        "samples": b.samples,
        "prompt_tokens": b.prompt_tokens,
        "output_cap": b.output_cap,
        "reasoning_budget": b.reasoning_budget,
        "generated_tokens_max": b.generated_tokens_max,
        "k_max": b.k_max,
        "flops_max": b.flops_max,
        "model": parsed.model_name,
        "api": parsed.adapter.api,
    }


def meter_dict(parsed: ParsedRequest, measured: Measured) -> dict[str, Any]:
    """The ``kgate meter`` object (docs/design.md §9)."""
    return {**measured.as_dict(), "model": parsed.model_name, "api": parsed.adapter.api}
