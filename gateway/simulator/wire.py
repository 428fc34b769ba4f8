"""The simulator's renderers: a :class:`~gateway.simulator.model.Plan` in each provider's wire format.

Non-streamed responses are dicts (the caller serialises them). Streams are iterators of *frames*:
``bytes`` are wire events, ready to send; an ``int`` is a number of token-times the model spends
before the next event (the server turns it into a sleep when a token rate is set, and ignores it
otherwise). Visible tokens stream one per event per choice, so a gateway that counts streamed tokens
counts exactly; hidden reasoning costs time but no event.

Usage quirks reproduced (see WIRE-FORMATS.md): OpenAI counts reasoning inside ``completion_tokens``
summed over choices, prompt once, streamed usage only with ``include_usage``; vLLM adds per-choice usage
to content chunks with ``continuous_usage_stats`` and streams reasoning in ``reasoning``; SGLang reports
``reasoning_tokens`` at the top of ``usage``; DeepSeek adds prompt-cache counters and
``reasoning_content``; Anthropic counts thinking inside ``output_tokens`` and sends cumulative
``message_delta`` usage; Gemini reports thoughts outside ``candidatesTokenCount`` and cumulative
``usageMetadata`` in every chunk, omitting zero counts as proto3 JSON does.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import orjson

from gateway.simulator.model import UNCAPPED, Plan

Frame = bytes | int

_RUN = secrets.token_hex(4)  # keeps ids unique across worker processes
_seq = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}{_RUN}{next(_seq):016x}"


# ------------------------------------------------------------------------------------------------ text
class TokenText:
    """A deterministic endless text, one word per token, so any length is a slice away."""

    def __init__(self, sentence: str):
        self.words = tuple(" " + w for w in sentence.split())
        self._cycle = "".join(self.words)
        self._prefix = [""]
        for w in self.words:
            self._prefix.append(self._prefix[-1] + w)
        self.text = lru_cache(maxsize=512)(self._text)

    def token(self, i: int) -> str:
        return self.words[i % len(self.words)]

    def _text(self, k: int) -> str:
        q, r = divmod(k, len(self.words))
        return self._cycle * q + self._prefix[r]


VISIBLE = TokenText(
    "The simulated model answers with this deterministic text so that tests can predict every token it "
    "streams and every count it reports; it repeats the sentence for as long as the request asks and "
    "stops when the output cap or its configured length is reached.")
REASONING = TokenText(
    "Let me think about this step by step, weighing each option carefully before I settle on an answer "
    "and check it once more.")
SIGNATURE = "c2ltdWxhdGVkLXNpZ25hdHVyZQ" * 4


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


DONE = b"data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------------ errors
# status -> (OpenAI type, Anthropic type, Gemini status)
_ERROR_TYPES: dict[int, tuple[str, str, str]] = {
    400: ("invalid_request_error", "invalid_request_error", "INVALID_ARGUMENT"),
    401: ("authentication_error", "authentication_error", "UNAUTHENTICATED"),
    403: ("permission_error", "permission_error", "PERMISSION_DENIED"),
    404: ("not_found_error", "not_found_error", "NOT_FOUND"),
    408: ("timeout_error", "timeout_error", "DEADLINE_EXCEEDED"),
    413: ("invalid_request_error", "request_too_large", "INVALID_ARGUMENT"),
    429: ("rate_limit_error", "rate_limit_error", "RESOURCE_EXHAUSTED"),
    500: ("server_error", "api_error", "INTERNAL"),
    502: ("server_error", "api_error", "UNAVAILABLE"),
    503: ("server_error", "overloaded_error", "UNAVAILABLE"),
    504: ("timeout_error", "timeout_error", "DEADLINE_EXCEEDED"),
    529: ("server_error", "overloaded_error", "UNAVAILABLE"),
}


def error_shape(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1beta/"):
        return "gemini"
    return "openai"


def error_body(shape: str, flavor: str, status: int, message: str,
               param: str | None = None) -> dict[str, Any]:
    """An error in the API's own shape; OpenAI-compatible servers vary by flavour."""
    oa, an, ge = _ERROR_TYPES.get(status, ("server_error", "api_error", "UNKNOWN"))
    if shape == "anthropic":
        return {"type": "error", "error": {"type": an, "message": message}, "request_id": new_id("req_")}
    if shape == "gemini":
        return {"error": {"code": status, "message": message, "status": ge}}
    if flavor == "vllm":  # OpenAI shape, integer code
        return {"error": {"message": message, "type": oa, "param": param, "code": status}}
    if flavor == "sglang":  # the older flat shape
        return {"object": "error", "message": message, "type": oa, "param": param, "code": status}
    code = {429: "rate_limit_exceeded", 500: "server_error"}.get(status)
    return {"error": {"message": message, "type": oa, "param": param, "code": code}}


# ---------------------------------------------------------------------------------- OpenAI-compatible
def _reasoning_field(flavor: str) -> str | None:
    """The delta/message field carrying reasoning text; OpenAI never returns it."""
    return {"vllm": "reasoning", "sglang": "reasoning_content", "deepseek": "reasoning_content"}.get(flavor)


def openai_usage(p: Plan, flavor: str) -> dict[str, Any]:
    """Chat/Completions usage: prompt once, completion tokens (reasoning included) over all choices."""
    pt, ct, rt = p.prompt_tokens, p.reported_output, p.choices * p.reasoning
    u: dict[str, Any] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    if flavor == "vllm":
        u["prompt_tokens_details"] = None
        if rt:  # only with a reasoning parser, as recent vLLM
            u["completion_tokens_details"] = {"reasoning_tokens": rt}
    elif flavor == "sglang":
        u["prompt_tokens_details"] = None
        u["reasoning_tokens"] = rt
    elif flavor == "deepseek":
        u["prompt_tokens_details"] = {"cached_tokens": 0}
        u["completion_tokens_details"] = {"reasoning_tokens": rt}
        u["prompt_cache_hit_tokens"] = 0
        u["prompt_cache_miss_tokens"] = pt
    else:
        u["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 0}
        u["completion_tokens_details"] = {"reasoning_tokens": rt, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    return u


def chat_json(p: Plan, flavor: str) -> dict[str, Any]:
    return {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
            **_chat_body(p, flavor)}


_CHAT_TAILS: dict[tuple[Any, ...], bytes] = {}


def chat_bytes(p: Plan, flavor: str) -> bytes:
    """:func:`chat_json` serialised, the hot path of the benchmark: everything after ``created``
    depends only on the plan's counts, so it is serialised once per distinct plan and reused."""
    key = (p.model, p.choices, p.reasoning, p.visible, p.capped, p.prompt_tokens, flavor)
    tail = _CHAT_TAILS.get(key)
    if tail is None:
        if len(_CHAT_TAILS) >= 4096:
            _CHAT_TAILS.clear()
        tail = _CHAT_TAILS[key] = orjson.dumps(_chat_body(p, flavor))[1:]
    return b''.join((b'{"id":"', new_id("chatcmpl-").encode(), b'","object":"chat.completion","created":',
                     str(int(time.time())).encode(), b",", tail))


def _chat_body(p: Plan, flavor: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": VISIBLE.text(p.visible), "refusal": None,
                           "annotations": []}
    field = _reasoning_field(flavor)
    if field and p.reasoning:
        msg[field] = REASONING.text(p.reasoning)
    finish = "length" if p.capped else "stop"
    return {
        "model": p.model,
        "choices": [{"index": i, "message": msg, "logprobs": None, "finish_reason": finish}
                    for i in range(p.choices)],
        "usage": openai_usage(p, flavor), "service_tier": "default", "system_fingerprint": "fp_sim",
    }


def completions_json(p: Plan, flavor: str) -> dict[str, Any]:
    text, finish = VISIBLE.text(p.visible), "length" if p.capped else "stop"
    return {
        "id": new_id("cmpl-"), "object": "text_completion", "created": int(time.time()), "model": p.model,
        "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": finish}
                    for i in range(p.choices)],
        "usage": openai_usage(p, flavor), "system_fingerprint": None,
    }


def _choice_usage(p: Plan, done: int) -> dict[str, int]:
    """vLLM continuous usage: this choice's tokens so far, not the request's."""
    pt = p.prompt_tokens
    return {"prompt_tokens": pt, "completion_tokens": done, "total_tokens": pt + done}


def openai_stream(p: Plan, flavor: str) -> Iterator[Frame]:
    """Chat or legacy completions chunks, one token per chunk per choice, then the usage chunk
    (only with ``include_usage``) and ``[DONE]``."""
    chat = p.api == "chat"
    head: dict[str, Any] = {"id": new_id("chatcmpl-" if chat else "cmpl-"),
                            "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": int(time.time()), "model": p.model}
    if chat:
        head["system_fingerprint"] = "fp_sim"
    continuous = p.include_usage and p.continuous_usage and flavor in ("vllm", "sglang")

    def chunk(i: int, part: dict[str, Any], finish: str | None = None, done: int = 0) -> bytes:
        c: dict[str, Any] = {"index": i, **part, "logprobs": None, "finish_reason": finish}
        d = {**head, "choices": [c]}
        if continuous:
            d["usage"] = _choice_usage(p, done)
        elif p.include_usage:
            d["usage"] = None
        return _sse(d)

    def content(text: str) -> dict[str, Any]:
        return {"delta": {"content": text}} if chat else {"text": text}

    rng = range(p.choices)
    if chat:
        for i in rng:
            yield chunk(i, {"delta": {"role": "assistant", "content": "", "refusal": None}})
    field = _reasoning_field(flavor) if chat else None
    if field:
        for t in range(p.reasoning):
            yield 1
            tok = REASONING.token(t)
            for i in rng:
                yield chunk(i, {"delta": {field: tok}}, done=t + 1)
    elif p.reasoning:
        yield p.reasoning  # hidden reasoning: time passes, nothing is sent
    for t in range(p.visible):
        yield 1
        part = content(VISIBLE.token(t))
        for i in rng:
            yield chunk(i, part, done=p.reasoning + t + 1)
    finish = "length" if p.capped else "stop"
    last: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
    for i in rng:
        yield chunk(i, last, finish, done=p.output_tokens)
    if p.include_usage:
        yield _sse({**head, "choices": [], "usage": openai_usage(p, flavor)})
    yield DONE


# ---------------------------------------------------------------------------------- OpenAI Responses
def responses_usage(p: Plan) -> dict[str, Any]:
    out = p.output_tokens
    return {"input_tokens": p.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": p.reasoning},
            "total_tokens": p.prompt_tokens + out}


def _response_obj(p: Plan, rid: str, created: int, status: str, output: list[Any],
                  usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": created, "status": status, "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": None, "max_output_tokens": None if p.cap == UNCAPPED else p.cap,
        "max_tool_calls": None,
        "model": p.model, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": p.effort or ("medium" if p.reasoning else None), "summary": None},
        "service_tier": "default", "store": True, "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto", "tools": [],
        "top_logprobs": 0, "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None,
        "metadata": {},
    }


def _message_item(mid: str, status: str, text: str) -> dict[str, Any]:
    return {"id": mid, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]}


def _responses_output(p: Plan, rs_id: str, msg_id: str) -> list[Any]:
    out: list[Any] = []
    if p.reasoning:
        out.append({"id": rs_id, "type": "reasoning", "summary": []})
    if p.visible:
        out.append(_message_item(msg_id, "incomplete" if p.capped else "completed", VISIBLE.text(p.visible)))
    return out


def responses_json(p: Plan) -> dict[str, Any]:
    output = _responses_output(p, new_id("rs_"), new_id("msg_"))
    return _response_obj(p, new_id("resp_"), int(time.time()), "incomplete" if p.capped else "completed",
                         output, responses_usage(p))


def responses_stream(p: Plan) -> Iterator[Frame]:
    """Typed events; usage only in the final ``response.completed`` / ``response.incomplete``."""
    rid, created, rs_id, msg_id = new_id("resp_"), int(time.time()), new_id("rs_"), new_id("msg_")
    seq = itertools.count()

    def ev(kind: str, **data: Any) -> bytes:
        return _event(kind, {"type": kind, "sequence_number": next(seq), **data})

    pending = _response_obj(p, rid, created, "in_progress", [], None)
    yield ev("response.created", response=pending)
    yield ev("response.in_progress", response=pending)
    index = 0
    if p.reasoning:
        item = {"id": rs_id, "type": "reasoning", "summary": []}
        yield ev("response.output_item.added", output_index=index, item=item)
        yield p.reasoning
        yield ev("response.output_item.done", output_index=index, item=item)
        index += 1
    if p.visible:
        status = "incomplete" if p.capped else "completed"
        text = VISIBLE.text(p.visible)
        ids = {"item_id": msg_id, "output_index": index, "content_index": 0}
        yield ev("response.output_item.added", output_index=index,
                 item={"id": msg_id, "type": "message", "status": "in_progress", "role": "assistant",
                       "content": []})
        yield ev("response.content_part.added", **ids,
                 part={"type": "output_text", "annotations": [], "logprobs": [], "text": ""})
        for t in range(p.visible):
            yield 1
            yield ev("response.output_text.delta", **ids, delta=VISIBLE.token(t), logprobs=[])
        yield ev("response.output_text.done", **ids, text=text, logprobs=[])
        yield ev("response.content_part.done", **ids,
                 part={"type": "output_text", "annotations": [], "logprobs": [], "text": text})
        yield ev("response.output_item.done", output_index=index, item=_message_item(msg_id, status, text))
    final = "incomplete" if p.capped else "completed"
    yield ev(f"response.{final}", response=_response_obj(p, rid, created, final,
                                                          _responses_output(p, rs_id, msg_id),
                                                          responses_usage(p)))


# ---------------------------------------------------------------------------------- Anthropic Messages
def anthropic_usage(p: Plan, output_tokens: int | None = None) -> dict[str, Any]:
    """Output tokens include thinking; ``output_tokens_details.thinking_tokens`` splits it out."""
    return {"input_tokens": p.prompt_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
            "output_tokens": p.output_tokens if output_tokens is None else output_tokens,
            "output_tokens_details": {"thinking_tokens": p.reasoning}}


def messages_json(p: Plan) -> dict[str, Any]:
    content: list[Any] = []
    if p.reasoning:
        content.append({"type": "thinking", "thinking": REASONING.text(p.reasoning), "signature": SIGNATURE})
    if p.visible:
        content.append({"type": "text", "text": VISIBLE.text(p.visible)})
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": p.model,
            "content": content,
            "stop_reason": "max_tokens" if p.capped else "end_turn", "stop_sequence": None,
            "usage": {**anthropic_usage(p), "service_tier": "standard"}}


def messages_stream(p: Plan, server_tools: bool = False) -> Iterator[Frame]:
    """message_start (input usage, output 1), thinking then text blocks, cumulative message_delta —
    twice in a row with ``server_tools``, as when server tools run — and message_stop."""
    start: dict[str, Any] = {
        "id": new_id("msg_"), "type": "message", "role": "assistant", "model": p.model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": p.prompt_tokens, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 1, "service_tier": "standard"}}
    yield _event("message_start", {"type": "message_start", "message": start})
    yield _event("ping", {"type": "ping"})
    index = 0
    if p.reasoning:
        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": {"type": "thinking", "thinking": "",
                                                               "signature": ""}})
        for t in range(p.reasoning):
            yield 1
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                 "delta": {"type": "thinking_delta",
                                                           "thinking": REASONING.token(t)}})
        yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                             "delta": {"type": "signature_delta", "signature": SIGNATURE}})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
        index += 1
    if p.visible:
        yield _event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": {"type": "text", "text": ""}})
        for t in range(p.visible):
            yield 1
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                 "delta": {"type": "text_delta", "text": VISIBLE.token(t)}})
        yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
    delta = {"stop_reason": "max_tokens" if p.capped else "end_turn", "stop_sequence": None}
    if server_tools:  # cumulative: an earlier, smaller count first; only the last one is the total
        yield _event("message_delta", {"type": "message_delta", "delta": delta,
                                       "usage": anthropic_usage(p, max(1, (p.output_tokens + 1) // 2))})
    yield _event("message_delta", {"type": "message_delta", "delta": delta, "usage": anthropic_usage(p)})
    yield _event("message_stop", {"type": "message_stop"})


# ---------------------------------------------------------------------------------------------- Gemini
def gemini_usage(p: Plan, visible_done: int, thoughts_done: int) -> dict[str, Any]:
    """``candidatesTokenCount`` excludes thoughts; zero counts are omitted, as proto3 JSON does."""
    cand, thoughts = p.choices * visible_done, p.choices * thoughts_done
    u: dict[str, Any] = {"promptTokenCount": p.prompt_tokens}
    if cand:
        u["candidatesTokenCount"] = cand
    u["totalTokenCount"] = p.prompt_tokens + cand + thoughts
    u["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": p.prompt_tokens}]
    if thoughts:
        u["thoughtsTokenCount"] = thoughts
    return u


def gemini_json(p: Plan) -> dict[str, Any]:
    parts: list[Any] = []
    if p.show_reasoning:
        parts.append({"text": REASONING.text(p.reasoning), "thought": True})
    if p.visible:
        parts.append({"text": VISIBLE.text(p.visible)})
    content: dict[str, Any] = {"parts": parts, "role": "model"} if parts else {"role": "model"}
    finish = "MAX_TOKENS" if p.capped else "STOP"
    cands = [{"content": content, "finishReason": finish, "index": i} for i in range(p.choices)]
    return {"candidates": cands,
            "usageMetadata": gemini_usage(p, p.visible, p.reasoning), "modelVersion": p.model,
            "responseId": new_id("sim")}


def gemini_stream(p: Plan) -> Iterator[Frame]:
    """GenerateContentResponse chunks as JSON bytes (the server frames them as SSE or a JSON array);
    every chunk carries the cumulative ``usageMetadata``."""
    rid = new_id("sim")
    rng = range(p.choices)

    def chunk(part: dict[str, Any] | None, finish: str | None, visible: int, thoughts: int) -> bytes:
        cands = []
        for i in rng:
            c: dict[str, Any] = {"content": {"parts": [part], "role": "model"} if part else {"role": "model"}}
            if finish:
                c["finishReason"] = finish
            c["index"] = i
            cands.append(c)
        return orjson.dumps({"candidates": cands, "usageMetadata": gemini_usage(p, visible, thoughts),
                             "modelVersion": p.model, "responseId": rid})

    finish = "MAX_TOKENS" if p.capped else "STOP"
    if p.show_reasoning:
        for t in range(p.reasoning):
            yield 1
            yield chunk({"text": REASONING.token(t), "thought": True}, None, 0, t + 1)
    elif p.reasoning:
        yield p.reasoning
    for t in range(p.visible):
        yield 1
        yield chunk({"text": VISIBLE.token(t)}, finish if t == p.visible - 1 else None, t + 1, p.reasoning)
    if not p.visible:
        yield chunk(None, finish, 0, p.reasoning)
