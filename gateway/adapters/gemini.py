"""Google Gemini, ``POST /v1beta/models/{model}:generateContent`` and ``:streamGenerateContent``.

The model is in the path and streaming is the method. Compute lives in ``generationConfig``:
``candidateCount`` (samples), ``maxOutputTokens`` and ``thinkingConfig`` (``thinkingBudget``: 0 off,
-1 automatic, N a budget; or ``thinkingLevel``, never both). The REST API also takes snake_case
(``generation_config``, ``candidate_count`` ...): both spellings are read, and a rewrite writes the one
the client used.

Usage ``usageMetadata``: ``candidatesTokenCount`` EXCLUDES thoughts (``thoughtsTokenCount``), the prompt
is ``promptTokenCount`` + ``toolUsePromptTokenCount`` (``cachedContentTokenCount`` is inside the
former). In a stream every chunk may carry it, cumulative: the last wins. A stream is SSE with
``?alt=sse`` (CRLF framed), else one JSON array sent piece by piece; both are metered, neither is changed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from gateway.adapters.anthropic_messages import estimate_tokens, request_object
from gateway.adapters.base import (
    Adapter,
    SSEEvent,
    StreamMeter,
    as_ints,
    json_size,
    nonneg,
    req_int,
    req_obj,
    req_str,
    upstream_query,
    write_cap,
)
from gateway.engine.compute import Bound, ClampTarget, ComputeRequest, Usage
from gateway.engine.errors import BadRequest, Forbidden

LEVELS: tuple[str, ...] = ("minimal", "low", "medium", "high")  # thinkingLevel, lower-cased
MAX_CANDIDATES = 8  # Gemini's documented range of candidateCount is 1-8
METHODS: tuple[str, ...] = ("generateContent", "streamGenerateContent")


def _key(obj: Mapping[str, Any], camel: str, snake: str, path: str, *, snake_style: bool = False) -> str:
    """The spelling of a field the client used (BadRequest when it gave both); a default otherwise."""
    if camel in obj and snake in obj:
        raise BadRequest(f"give '{path}{camel}' or '{path}{snake}', not both", param=f"{path}{camel}")
    if camel in obj:
        return camel
    if snake in obj:
        return snake
    return snake if snake_style else camel


class GeminiGenerateContent(Adapter):
    """Gemini ``generateContent`` / ``streamGenerateContent``: candidates are samples, thoughts are apart."""

    api = "gemini"
    shape = "gemini"
    upstream_path = "/v1beta/models/{model}:{method}"

    def model_name(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> str:
        model = path_params.get("model", "")
        if not model:
            raise BadRequest("the model is missing from the path (/v1beta/models/{model}:generateContent)",
                             param="model")
        return model

    def is_stream(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> bool:
        return path_params.get("method") == "streamGenerateContent"

    def parse(self, body: Mapping[str, Any], path_params: Mapping[str, str]) -> ComputeRequest:
        body = request_object(body)
        model = self.model_name(body, path_params)
        if not isinstance(body.get("contents"), list):
            got = "missing" if body.get("contents") is None else type(body["contents"]).__name__
            raise BadRequest(f"'contents' must be a list, got {got}", param="contents")
        gkey = _key(body, "generationConfig", "generation_config", "")
        gen = req_obj(body, gkey) or {}
        snake = gkey == "generation_config"
        p = f"{gkey}."
        ckey = _key(gen, "candidateCount", "candidate_count", p, snake_style=snake)
        samples = req_int(gen, ckey, default=1, minimum=1, maximum=MAX_CANDIDATES, param=p + ckey)
        mkey = _key(gen, "maxOutputTokens", "max_output_tokens", p, snake_style=snake)
        cap = req_int(gen, mkey, minimum=1, param=p + mkey)
        budget, disabled, effort = _thinking(gen, p, snake)
        return ComputeRequest(
            api=self.api,
            model=model,
            samples=samples or 1,
            output_cap=cap,
            thinking_budget=budget,
            thinking_disabled=disabled,
            effort=effort,
            stream=self.is_stream(body, path_params),
        )

    def rewrite(self, body: dict[str, Any], req: ComputeRequest, target: ClampTarget) -> list[str]:
        changes: list[str] = []
        gkey = _key(body, "generationConfig", "generation_config", "")
        snake = gkey == "generation_config"
        gen = body.get(gkey)
        gen = dict(gen) if isinstance(gen, dict) else {}
        if target.samples != req.samples:
            gen[_key(gen, "candidateCount", "candidate_count", "", snake_style=snake)] = target.samples
            changes.append(f"candidateCount={target.samples}")
        mkey = _key(gen, "maxOutputTokens", "max_output_tokens", "", snake_style=snake)
        if gen.get(mkey) != target.output_cap:
            # Also when the client gave none: the bound assumed the model's cap, so the upstream must too.
            gen[mkey] = target.output_cap
            changes.append(f"maxOutputTokens={target.output_cap}")
        tkey = _key(gen, "thinkingConfig", "thinking_config", "", snake_style=snake)
        tc = gen.get(tkey)
        tc = dict(tc) if isinstance(tc, dict) else {}
        bkey = _key(tc, "thinkingBudget", "thinking_budget", "", snake_style=snake)
        lkey = _key(tc, "thinkingLevel", "thinking_level", "", snake_style=snake)
        if target.reasoning_budget is not None and lkey not in tc and tc.get(bkey) != target.reasoning_budget:
            tc[bkey] = target.reasoning_budget
            changes.append(f"thinkingBudget={target.reasoning_budget}")
        if target.effort is not None and target.effort != req.effort and bkey not in tc:
            if target.effort not in LEVELS:
                raise Forbidden(f"the tier allows reasoning efforts this API cannot express "
                                f"(lowest thinkingLevel is MINIMAL, the tier needs {target.effort!r})")
            tc[lkey] = target.effort.upper()
            changes.append(f"thinkingLevel={target.effort.upper()}")
        if tc:
            gen[tkey] = tc
        if changes:
            body[gkey] = gen
        return changes

    def write_bound(self, body: dict[str, Any], req: ComputeRequest, bound: Bound) -> list[str]:
        gkey = _key(body, "generationConfig", "generation_config", "")
        snake = gkey == "generation_config"
        old = body.get(gkey)
        gen = dict(old) if isinstance(old, dict) else {}  # a copy: the client's body stays as it was sent
        mkey = _key(gen, "maxOutputTokens", "max_output_tokens", "", snake_style=snake)
        change = write_cap(gen, mkey, bound.output_cap)
        ckey = _key(gen, "candidateCount", "candidate_count", "", snake_style=snake)
        gen.update(as_ints(gen, (ckey,)) or {})
        tkey = _key(gen, "thinkingConfig", "thinking_config", "", snake_style=snake)
        tc = gen.get(tkey)
        if isinstance(tc, dict):
            ints = as_ints(tc, ("thinkingBudget", "thinking_budget"))
            if ints is not None:
                gen[tkey] = ints
        body[gkey] = gen
        return [change] if change else []

    def prepare_upstream(self, body: dict[str, Any], upstream_model: str, stream: bool) -> bool:
        return True  # the model is in the path; every stream chunk may carry usageMetadata

    def upstream_url_path(self, upstream_model: str, path_params: Mapping[str, str], query: str) -> str:
        method = path_params.get("method") or "generateContent"
        if method not in METHODS:
            raise BadRequest(f"unknown method {method[:64]!r}", param="method")
        model = upstream_model.removeprefix("models/")
        # The caller's key never goes upstream: the gateway authenticates with its own.
        kept = upstream_query(query)
        path = f"/v1beta/models/{quote(model, safe='-._~/')}:{method}"
        return path + ("?" + kept if kept else "")

    def usage_from_json(self, body: Any, req: ComputeRequest) -> Usage:
        chunks = body if isinstance(body, list) else [body]
        tally = _Tally()
        for chunk in chunks:
            if isinstance(chunk, dict):
                tally.take(chunk)
        return tally.usage(req, estimated=True)

    def stream_meter(self, req: ComputeRequest, client_wants_usage: bool) -> StreamMeter:
        return GeminiStreamMeter(req, client_wants_usage)


def _thinking(gen: Mapping[str, Any], p: str, snake: bool) -> tuple[int | None, bool, str | None]:
    """(explicit budget, thinking disabled, effort) from ``thinkingConfig``."""
    tkey = _key(gen, "thinkingConfig", "thinking_config", p, snake_style=snake)
    tc = req_obj(gen, tkey, param=p + tkey)
    if tc is None:
        return None, False, None
    p = f"{p}{tkey}."
    bkey = _key(tc, "thinkingBudget", "thinking_budget", p)
    lkey = _key(tc, "thinkingLevel", "thinking_level", p)
    budget = req_int(tc, bkey, minimum=-1, param=p + bkey)
    level = req_str(tc, lkey, param=p + lkey)
    if budget is not None and level is not None:
        raise BadRequest(f"'{p}{bkey}' and '{p}{lkey}' cannot be used together", param=p + lkey)
    if level is not None:
        if level.lower() not in LEVELS:
            raise BadRequest(f"'{p}{lkey}' must be one of MINIMAL, LOW, MEDIUM, HIGH; got {level[:64]!r}",
                             param=p + lkey)
        return None, False, level.lower()
    if budget == 0:
        return None, True, None
    if budget is None or budget == -1:  # -1: the model decides; the bound is the output cap
        return None, False, None
    return budget, False, None


class _Tally:
    """What Gemini response chunks say: the last ``usageMetadata`` (cumulative) and the generated text."""

    __slots__ = ("blocked", "cached", "candidates", "error", "finished", "has_usage", "prompt", "text_chars",
                 "thought_chars", "thoughts", "tool_prompt", "total", "visible")

    def __init__(self) -> None:
        self.has_usage = False
        self.prompt = self.tool_prompt = self.cached = self.visible = self.thoughts = self.total = 0
        self.thought_chars = self.text_chars = 0
        self.candidates: set[int] = set()  # indexes seen
        self.finished: set[int] = set()  # indexes with a finishReason
        self.blocked = False  # the prompt was blocked: no candidates will come
        self.error: dict[str, Any] | None = None

    def take(self, chunk: Mapping[str, Any]) -> None:
        err = chunk.get("error")
        if err is not None:
            self.error = err if isinstance(err, dict) else {"message": str(err)}
        um = chunk.get("usageMetadata", chunk.get("usage_metadata"))
        if isinstance(um, dict):
            self.has_usage = True  # cumulative: replace, never add
            self.prompt = nonneg(um.get("promptTokenCount"))
            self.tool_prompt = nonneg(um.get("toolUsePromptTokenCount"))
            self.cached = nonneg(um.get("cachedContentTokenCount"))
            self.visible = nonneg(um.get("candidatesTokenCount"))
            self.thoughts = nonneg(um.get("thoughtsTokenCount"))
            self.total = nonneg(um.get("totalTokenCount"))
        feedback = chunk.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            self.blocked = True
        candidates = chunk.get("candidates")
        if isinstance(candidates, list):
            for pos, cand in enumerate(candidates):
                if isinstance(cand, dict):
                    self._candidate(pos, cand)

    def _candidate(self, pos: int, cand: Mapping[str, Any]) -> None:
        index = cand.get("index", pos)  # proto3 JSON omits index 0
        index = index if isinstance(index, int) else pos
        self.candidates.add(index)
        if cand.get("finishReason"):
            self.finished.add(index)
        content = cand.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        if not isinstance(parts, list):
            return
        for part in parts:
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str):
                if part.get("thought") is True:
                    self.thought_chars += len(text)
                else:
                    self.text_chars += len(text)
            elif part.get("functionCall") is not None:
                self.text_chars += json_size(part["functionCall"])

    def done(self, samples: int) -> bool:
        """Every expected candidate has finished (or the prompt was blocked)."""
        expected = max(samples, len(self.candidates))
        return self.blocked or (bool(self.finished) and len(self.finished) >= expected)

    def usage(self, req: ComputeRequest, *, estimated: bool) -> Usage:
        samples = len(self.candidates) or req.samples
        if self.has_usage:
            prompt = self.prompt + self.tool_prompt
            # totalTokenCount is the cross-check: what it holds beyond the parts was generated all the
            # same (thoughts a server left out of thoughtsTokenCount), so it is charged as reasoning.
            hidden = max(self.total - (prompt + self.visible + self.thoughts), 0)
            return Usage(samples=samples, prompt_tokens=prompt, reasoning_tokens=self.thoughts + hidden,
                         output_tokens=self.visible, source="upstream", cached_tokens=self.cached)
        return Usage(samples=samples, prompt_tokens=req.prompt_tokens,
                     reasoning_tokens=estimate_tokens(self.thought_chars),
                     output_tokens=estimate_tokens(self.text_chars),
                     source="estimated" if estimated else "counted")


class GeminiStreamMeter(StreamMeter):
    """Meters a Gemini stream, SSE (``alt=sse``) or a JSON array; the bytes pass through unchanged.

    The format is told from the first byte that is not white space: ``[`` (or ``{``) is JSON.
    """

    def __init__(self, req: ComputeRequest, client_wants_usage: bool):
        super().__init__(req, client_wants_usage)
        self._tally = _Tally()
        self._mode: str | None = None  # "sse" | "json", once known
        self._lead = b""  # white space before the format is known
        self._array = _JsonElements()

    def feed(self, chunk: bytes) -> bytes:
        if self._mode is None:
            data = self._lead + chunk
            head = data.lstrip()
            if not head:
                self._lead = data
                return b""
            self._lead = b""
            self._mode = "json" if head[:1] in (b"[", b"{") else "sse"
            chunk = data
        if self._mode == "sse":
            return super().feed(chunk)
        for element in self._array.feed(chunk):
            self._element(element)
        if self._array.closed and self.error is None:  # the closing bracket is the end marker
            self.finished = True
        return chunk

    def close(self) -> bytes:
        if self._mode is None:
            rest, self._lead = self._lead, b""
            return rest
        if self._mode == "json":
            return b""
        pending = bool(self._parser.pending.strip())
        out = super().close()
        # SSE has no end marker: a stream that ends on an event boundary after a finishReason is complete.
        if not pending and (self._tally.finished or self._tally.blocked) and self.error is None:
            self.finished = True
        return out

    def on_event(self, ev: SSEEvent) -> bool:
        doc = ev.json()
        if isinstance(doc, dict):
            self._chunk(doc)
        return True

    def _element(self, raw: bytes) -> None:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, dict):
            self._chunk(doc)

    def _chunk(self, doc: Mapping[str, Any]) -> None:
        self._tally.take(doc)
        if self._tally.error is not None:
            self.error = self._tally.error
        if self._tally.done(self.req.samples):
            self.finished = True

    def usage(self) -> Usage:
        return self._tally.usage(self.req, estimated=False)


_IN_STRING = re.compile(rb'["\\]')
_STRUCTURE = re.compile(rb'["{}\[\]]')
MAX_ELEMENT_BYTES = 16 * 1024 * 1024  # one streamed chunk larger than this is passed on unmetered


class _JsonElements:
    """Cuts a JSON array arriving piece by piece into its elements' bytes (a lone object is one element).

    Only quotes, backslashes and brackets are looked at, so the cost is a regex scan per piece.
    """

    __slots__ = ("_depth", "_element_depth", "_escape", "_in_string", "_parts", "_size", "closed")

    def __init__(self) -> None:
        self._depth = 0
        self._element_depth = 0  # 2 inside a top-level array, 1 for a lone object
        self._in_string = False
        self._escape = False  # the previous piece ended on a backslash inside a string
        self._parts: list[bytes] = []  # the current element so far
        self._size = 0
        self.closed = False  # the top-level value has ended

    def feed(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        n = len(chunk)
        i = 0
        start = 0 if self._depth >= self._element_depth > 0 else -1  # where the current element began
        while i < n:
            if self._escape:
                self._escape = False
                i += 1
                continue
            if self._in_string:
                m = _IN_STRING.search(chunk, i)
                if m is None:
                    break
                j = m.start()
                if chunk[j] == 0x5C:  # backslash: skip the escaped byte, maybe in the next piece
                    if j + 1 < n:
                        i = j + 2
                    else:
                        self._escape = True
                        i = n
                    continue
                self._in_string = False
                i = j + 1
                continue
            m = _STRUCTURE.search(chunk, i)
            if m is None:
                break
            j = m.start()
            c = chunk[j]
            i = j + 1
            if c == 0x22:  # "
                self._in_string = True
            elif c in (0x5B, 0x7B):  # [ {
                if self._depth == 0:
                    self._element_depth = 2 if c == 0x5B else 1
                self._depth += 1
                if self._depth == self._element_depth:
                    start = j
            else:  # ] }
                self._depth -= 1
                if self._depth == self._element_depth - 1 and start >= 0:
                    self._add(chunk[start:i])
                    if self._size <= MAX_ELEMENT_BYTES:
                        out.append(b"".join(self._parts))
                    self._parts, self._size, start = [], 0, -1
                if self._depth <= 0:
                    self.closed = True
        if start >= 0:
            self._add(chunk[start:])
        return out

    def _add(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size <= MAX_ELEMENT_BYTES:
            self._parts.append(piece)
        else:
            self._parts = []
