"""Which request fields, query parameters and client headers may reach an upstream (issue 13, items 4, 6).

Every field an API request carries falls into one of these classes, per API (the tables below):

- **compute**: read by the adapter's ``parse`` and so inside the bound (metered), or rewritten by kgate
  (``n``, the output caps, thinking and effort settings, ``stream_options``...).
- **harmless**: passed as is. They change *what* is generated (sampling, tools, formats, metadata), not
  how much: the output cap C that kgate writes into every forwarded request bounds the generation
  whatever they say, and the provider's usage reports the prompt they add.
- **provider context**: the prompt is held by the provider (``previous_response_id``, a cached content,
  a file id, an image by URL, a tool the provider runs itself such as a web search or a page fetch): the
  prompt estimate from the body's size can be wrong by orders of magnitude. A tier refuses them with
  ``allow_provider_context: false``; a model prices each reference with ``provider_context_prompt_tokens``
  (added to the prompt estimate, so ``max_flops`` and budgets see it).
- **refused**: kgate cannot meter the request with them, whatever the policy says (Responses
  ``background: true`` answers later through another call, which kgate never sees; Gemini ``fields`` /
  ``alt=proto`` remove or re-encode ``usageMetadata``).
- anything else is **unknown**: server extensions such as vLLM's ``priority``, ``prompt_embeds`` (metered
  as extra prompts when allowed), SGLang's ``lora_path``, or a newer API field. A tier refuses them
  (``unknown_fields: refuse``, the default) unless it names them in ``allow_fields``; ``unknown_fields:
  forward`` lets them through. In ``mode: shadow`` they are forwarded and recorded as ``would_deny``.

Beta headers (``anthropic-beta``, ``openai-beta``) switch on features kgate has not seen; they count as
unknown unless allowed, by header name (every value) or as ``anthropic-beta=<value>`` (that beta only).

Sources of the field lists: the OpenAI OpenAPI spec (Chat, Completions, Responses), the Anthropic
Messages reference, the Gemini ``GenerateContentRequest`` / ``GenerationConfig`` reference, and the
sampling parameters vLLM and SGLang document for their OpenAI-compatible servers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from gateway.adapters.base import CREDENTIAL_PARAMS
from gateway.engine.errors import BadRequest, Forbidden, GatewayError

# Sampling knobs vLLM and SGLang add to the OpenAI formats: the cap bounds any generation they cause.
_SERVER_SAMPLING = frozenset({
    "top_k", "min_p", "repetition_penalty", "length_penalty", "min_tokens", "stop_token_ids", "ignore_eos",
    "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output", "no_stop_trim",
    "separate_reasoning", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "regex", "ebnf",
    "json_schema", "structured_outputs", "structural_tag", "add_generation_prompt", "continue_final_message",
    "add_special_tokens",
})
_OPENAI_SAMPLING = frozenset({
    "temperature", "top_p", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
    "stop", "seed", "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention",
})


@dataclass(frozen=True)
class FieldTable:
    """One API's known request fields (top level) and query parameters."""

    compute: frozenset[str]
    harmless: frozenset[str]
    context: frozenset[str] = frozenset()  # top-level fields that are provider-held context when set
    params: frozenset[str] = frozenset()  # harmless query parameters (credentials are removed anyway)
    known: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "known", self.compute | self.harmless | self.context)


CHAT = FieldTable(
    compute=frozenset({"model", "messages", "n", "best_of", "use_beam_search", "max_completion_tokens",
                       "max_tokens", "reasoning_effort", "reasoning", "thinking", "chat_template_kwargs",
                       "stream", "stream_options"}),
    harmless=_OPENAI_SAMPLING | _SERVER_SAMPLING | frozenset({
        "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "response_format",
        "modalities", "audio", "prediction", "verbosity"}),
    context=frozenset({"web_search_options"}),  # search results join the prompt at the provider
    params=frozenset({"api-version"}),
)
COMPLETIONS = FieldTable(
    compute=frozenset({"model", "prompt", "n", "best_of", "max_tokens", "reasoning_effort", "stream",
                       "stream_options"}),
    harmless=_OPENAI_SAMPLING | _SERVER_SAMPLING | frozenset({"echo", "suffix", "response_format"}),
    params=frozenset({"api-version"}),
)
RESPONSES = FieldTable(
    compute=frozenset({"model", "input", "instructions", "max_output_tokens", "reasoning", "stream",
                       "stream_options", "background"}),
    harmless=(_OPENAI_SAMPLING - {"frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "stop",
                                  "seed"})
    | frozenset({"tools", "tool_choice", "parallel_tool_calls", "max_tool_calls", "text", "truncation",
                 "include"}),
    context=frozenset({"previous_response_id", "conversation", "prompt"}),  # prompt: a stored template id
    params=frozenset({"api-version"}),
)
ANTHROPIC = FieldTable(
    compute=frozenset({"model", "messages", "max_tokens", "thinking", "output_config", "stream"}),
    harmless=frozenset({"system", "temperature", "top_p", "top_k", "stop_sequences", "metadata", "tools",
                        "tool_choice", "service_tier", "cache_control", "diagnostics", "inference_geo",
                        "user_profile_id"}),  # not speed or workspace_id: scheduling and billing, by name
    context=frozenset({"container", "mcp_servers"}),  # files in a container; remote MCP tool results
    params=frozenset({"beta"}),  # the SDK's ?beta=true; the beta features themselves come in the header
)
GEMINI = FieldTable(
    compute=frozenset({"contents", "generationConfig"}),
    harmless=frozenset({"systemInstruction", "tools", "toolConfig", "safetySettings", "labels"}),
    context=frozenset({"cachedContent"}),
    params=frozenset({"alt", "prettyPrint"}),
)
GEMINI_GENERATION = FieldTable(  # inside generationConfig, where Gemini keeps its compute settings
    compute=frozenset({"candidateCount", "maxOutputTokens", "thinkingConfig"}),
    harmless=frozenset({"temperature", "topP", "topK", "stopSequences", "responseMimeType", "responseSchema",
                        "responseJsonSchema", "presencePenalty", "frequencyPenalty", "seed", "responseLogprobs",
                        "logprobs", "responseModalities", "speechConfig", "mediaResolution",
                        "enableEnhancedCivicAnswers", "imageConfig"}),
)
GEMINI_THINKING = FieldTable(compute=frozenset({"thinkingBudget", "thinkingLevel", "includeThoughts"}),
                             harmless=frozenset())

TABLES: dict[str, FieldTable] = {"openai.chat": CHAT, "openai.completions": COMPLETIONS,
                                 "openai.responses": RESPONSES, "anthropic.messages": ANTHROPIC, "gemini": GEMINI}

# Client headers the gateway forwards that switch on provider features kgate has not seen.
GATED_HEADERS = ("anthropic-beta", "openai-beta")
# Gemini ``alt`` values that keep the JSON (or SSE) encoding kgate reads usage from.
GEMINI_ALT_OK = frozenset({"", "json", "sse"})
# Google system parameters that remove fields from the answer or change its encoding: usage unreadable.
GEMINI_PARAMS_REFUSED = frozenset({"fields", "callback", "upload_protocol", "uploadType"})


# ------------------------------------------------------------------------------------------ the screen
@dataclass(frozen=True)
class Screen:
    """What a request body holds beyond the fields kgate knows: unknown fields and provider context."""

    unknown: tuple[str, ...] = ()  # field paths, e.g. "priority", "generationConfig.routingConfig"
    context: tuple[str, ...] = ()  # one path per provider-held reference, e.g. "messages[0].content[1].image_url"


CLEAN = Screen()


def screen_body(api: str, body: Mapping[str, Any]) -> Screen:
    """Classify ``body``'s fields for ``api`` (see the module docstring); refuse what kgate cannot meter."""
    table = TABLES.get(api)
    if table is None:
        return CLEAN
    if api == "gemini":
        return _screen_gemini(body)
    # Set operations first (in C): nearly every request has neither unknown fields nor context keys.
    unknown = [] if table.known.issuperset(body) else [k for k in body if k not in table.known]
    context = [] if table.context.isdisjoint(body) else [
        k for k in table.context if body.get(k) not in (None, "", [], {})]
    if api == "openai.responses":
        if body.get("background") is True:
            raise BadRequest("'background': true is not supported through kgate: the answer would arrive "
                             "later through another call, which kgate cannot meter", param="background")
        context += _responses_context(body.get("input"))
        if body.get("tools"):
            context += _server_tools(body["tools"], _RESPONSES_CLIENT_TOOLS, ())
    elif api == "openai.chat":
        context += _chat_context(body.get("messages"))
    elif api == "anthropic.messages":
        context += _anthropic_context(body.get("messages"))
        if body.get("tools"):
            context += _server_tools(body["tools"], _ANTHROPIC_CUSTOM, _ANTHROPIC_CLIENT_TOOLS)
    if not unknown and not context:
        return CLEAN
    return Screen(tuple(unknown), tuple(context))


# Tools the *client* runs (the model only writes the call): anything else in ``tools`` the provider runs
# itself — a web search, a page fetch, a vector store, code in its container, a remote MCP server — and
# what it returns joins the prompt at the provider, in a loop the body's size says nothing of: provider
# context, like Chat's ``web_search_options``. Anthropic's own client tools are versioned (bash_20250124).
_RESPONSES_CLIENT_TOOLS = frozenset({"function", "custom", "local_shell", "shell", "apply_patch",
                                     "computer_use_preview", "computer_use", "computer"})
_ANTHROPIC_CLIENT_TOOLS = ("bash_", "text_editor_", "computer_", "memory_")
_ANTHROPIC_CUSTOM = frozenset({"custom"})
_GEMINI_CLIENT_TOOLS = frozenset({"functionDeclarations", "computerUse"})


def _server_tools(tools: Any, client: frozenset[str], client_prefixes: tuple[str, ...]) -> list[str]:
    """``tools[i]`` for each tool whose ``type`` is not a client tool's (a tool without one is a function)."""
    if type(tools) is not list:
        return []
    return [f"tools[{i}]" for i, t in enumerate(tools) if type(t) is dict and t.get("type") is not None
            and not (isinstance(t["type"], str) and (t["type"] in client or t["type"].startswith(client_prefixes)))]


def _screen_gemini(body: Mapping[str, Any]) -> Screen:
    unknown = [k for k in body if _camel(k) not in GEMINI.known]
    context = [k for k in body if _camel(k) == "cachedContent" and body[k]]
    for gkey in ("generationConfig", "generation_config"):
        gen = body.get(gkey)
        if isinstance(gen, dict):
            unknown += [f"{gkey}.{k}" for k in gen if _camel(k) not in GEMINI_GENERATION.known]
            for tkey in ("thinkingConfig", "thinking_config"):
                tc = gen.get(tkey)
                if isinstance(tc, dict):
                    unknown += [f"{gkey}.{tkey}.{k}" for k in tc if _camel(k) not in GEMINI_THINKING.known]
    tools = body.get("tools")
    if type(tools) is list:  # googleSearch, urlContext, codeExecution, fileSearch...: run by Google
        context += [f"tools[{i}].{k}" for i, t in enumerate(tools) if type(t) is dict
                    for k in t if _camel(k) not in _GEMINI_CLIENT_TOOLS]
    contents = body.get("contents")
    if isinstance(contents, list):
        for i, content in enumerate(contents):
            parts = content.get("parts") if isinstance(content, dict) else None
            if isinstance(parts, list):
                context += [f"contents[{i}].parts[{j}].{k}" for j, part in enumerate(parts)
                            if isinstance(part, dict) for k in ("fileData", "file_data") if part.get(k)]
    if not unknown and not context:
        return CLEAN
    return Screen(tuple(unknown), tuple(context))


_SNAKE = re.compile(r"_([a-z])")


def _camel(name: str) -> str:
    """Gemini's REST API takes snake_case too: ``generation_config`` is ``generationConfig``."""
    return _SNAKE.sub(lambda m: m.group(1).upper(), name) if "_" in name else name


def _parts(items: Any, key: str = "content") -> Iterator[tuple[int, int, Mapping[str, Any]]]:
    """(i, j, part) for each item (j = -1) of a list of messages or input items and each content part (an
    object) of it; :func:`_path` spells the position, only for what is found (on every request's path)."""
    if type(items) is not list:
        return
    for i, item in enumerate(items):
        if type(item) is not dict:
            continue
        yield i, -1, item
        content = item.get(key)
        if type(content) is list:
            for j, part in enumerate(content):
                if type(part) is dict:
                    yield i, j, part


def _path(i: int, j: int, key: str = "content") -> str:
    return f"[{i}]" if j < 0 else f"[{i}].{key}[{j}]"


def _remote_url(url: Any) -> bool:
    return isinstance(url, str) and url[:8].lower().startswith(("http://", "https://"))


def _chat_context(messages: Any) -> list[str]:
    """Images, audio and video by URL (vLLM fetches them) and files by id."""
    found: list[str] = []
    if type(messages) is not list:
        return found
    for m in messages:
        if type(m) is dict and type(m.get("content")) is list:
            break
    else:
        return found  # text-only messages (most requests): no part can refer to anything
    for i, j, part in _parts(messages):
        kind = part.get("type")
        if kind in ("image_url", "video_url", "audio_url"):
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if _remote_url(url):
                found.append(f"messages{_path(i, j)}.{kind}")
        elif kind == "file":
            f = part.get("file")
            if isinstance(f, dict) and f.get("file_id"):
                found.append(f"messages{_path(i, j)}.file.file_id")
    return found


def _responses_context(items: Any) -> list[str]:
    """``input_image`` / ``input_file`` by URL or file id, and references to stored items."""
    found = []
    for i, j, part in _parts(items):
        kind = part.get("type")
        if kind == "item_reference":
            found.append(f"input{_path(i, j)}")
        elif kind in ("input_image", "input_file"):
            if part.get("file_id"):
                found.append(f"input{_path(i, j)}.file_id")
            elif _remote_url(part.get("image_url")) or _remote_url(part.get("file_url")):
                found.append(f"input{_path(i, j)}.{'image_url' if kind == 'input_image' else 'file_url'}")
    return found


def _anthropic_context(messages: Any) -> list[str]:
    """Image and document blocks whose ``source`` is a URL or a file id; files uploaded to a container."""
    found = []
    for i, j, part in _parts(messages):
        source = part.get("source")
        if isinstance(source, dict) and source.get("type") in ("url", "file"):
            found.append(f"messages{_path(i, j)}.source")
        elif part.get("type") == "container_upload":
            found.append(f"messages{_path(i, j)}")
    return found


# ---------------------------------------------------------------------------------- query and headers
def unknown_params(api: str, query: str) -> list[str]:
    """Query parameters outside the API's known set; refuses those that make usage unreadable (Gemini)."""
    if not query:
        return []
    table = TABLES.get(api)
    known = table.params if table is not None else frozenset()
    unknown = []
    for pair in query.split("&"):
        if not pair:
            continue
        raw_name, _, raw_value = pair.partition("=")
        name = unquote_plus(raw_name)
        bare = name.removeprefix("$")  # Google takes its system parameters with a "$" too
        if bare.lower() in CREDENTIAL_PARAMS:
            continue
        if api == "gemini":
            _refuse_gemini_param(name, bare, unquote_plus(raw_value))
        if bare not in known:
            unknown.append(name)
    return unknown


def _refuse_gemini_param(name: str, bare: str, value: str) -> None:
    if bare in GEMINI_PARAMS_REFUSED:
        raise BadRequest(f"the query parameter {name!r} is not supported through kgate: it removes fields "
                         f"from the answer or changes its encoding, and kgate must read usageMetadata",
                         param=name)
    if bare == "alt" and value not in GEMINI_ALT_OK:
        raise BadRequest(f"'{name}={value[:32]}' is not supported through kgate: only alt=sse (or json) "
                         f"keeps the usageMetadata kgate meters", param=name)


def gated_headers(headers: Mapping[str, str]) -> list[str]:
    """The beta features a request switches on by header, as ``header=value`` names (one per beta)."""
    names = []
    for h in GATED_HEADERS:
        v = headers.get(h)
        if v:
            names += [f"{h}={b.strip()}" for b in v.split(",") if b.strip()] or [h]
    return names


def _allowed(name: str, allow: Iterable[str]) -> bool:
    """``name`` is allowed by its own name, or a header's beta by the header's name alone."""
    allow = set(allow)
    header = name.partition("=")[0]
    return name in allow or (header in GATED_HEADERS and header in allow)


# ----------------------------------------------------------------------------------------- the policy
@dataclass(frozen=True)
class FieldViolation:
    """A request a tier would refuse for its fields; in ``mode: shadow`` only recorded."""

    rule: str  # "unknown_field" | "provider_context"
    error: GatewayError


def check_fields(api: str, screen: Screen, tier: Any, query: str, headers: Mapping[str, str]
                 ) -> FieldViolation | None:
    """Apply the tier's field policy to a parsed request (``tier``: a :class:`~gateway.policy.config.TierConfig`).

    Raises for what kgate can never meter (every mode). Returns the violation in ``mode: shadow``;
    raises it in ``mode: enforce``; None when the request may go as it is.
    """
    violation = _violation(api, screen, tier, query, headers)
    if violation is not None and tier.mode != "shadow":
        raise violation.error
    return violation


def _violation(api: str, screen: Screen, tier: Any, query: str, headers: Mapping[str, str]
               ) -> FieldViolation | None:
    gated = gated_headers(headers)
    if screen is CLEAN and not query and not gated:  # the common case, on every request's path
        return None
    extra = [*screen.unknown, *unknown_params(api, query), *gated]
    if extra and tier.unknown_fields == "refuse":
        refused = [n for n in extra if not _allowed(n, tier.allow_fields)]
        if refused:
            first = refused[0]
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            return FieldViolation("unknown_field", BadRequest(
                f"'{first}'{more} is not a field kgate knows for this API, and your tier does not allow it; "
                f"an unknown field may change the compute a request spends (ask for it to be added to "
                f"the tier's allow_fields)", code="unknown_field", param=first, detail={"rule": "unknown_field"}))
    if screen.context and not tier.allow_provider_context:
        first = screen.context[0]
        return FieldViolation("provider_context", Forbidden(
            f"'{first}' refers to context the provider holds (its size is unknown before the request), "
            f"which your tier does not allow; send the content inline", code="provider_context_not_allowed",
            param=first, detail={"rule": "provider_context"}))
    return None
