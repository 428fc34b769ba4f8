"""The stream meter's hot path against a straightforward reference (the code before it was made faster).

:class:`~gateway.adapters.sse.SSEParser` reads the common event (one ``data:`` line) inline, returns lists
rather than a generator, and :class:`~gateway.adapters.base.StreamMeter` forwards a lone event's bytes
without a join; :class:`~gateway.adapters.openai_common.ChoiceStreamMeter` checks exact types. None of it
may change what is metered or forwarded, whatever the upstream's formatting: on many seeded random streams
(hostile ones included: ``data:`` without its space, CR/CRLF/LF line ends, comments, multi-line data, split
reads, invalid UTF-8, usage and errors in every spelling) the events, the bytes passed to the client, the
usage, the counted tokens, the error and the finished flag must all be the reference's.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping
from itertools import pairwise
from typing import Any

import orjson
import pytest

from gateway.adapters.base import StreamMeter
from gateway.adapters.openai_chat import ChatCompletions, _count_delta
from gateway.adapters.openai_common import ChoiceStreamMeter, _Choice, _flat_error
from gateway.adapters.openai_completions import Completions
from gateway.adapters.sse import SSEEvent, SSEParser, parse_event
from gateway.engine.compute import ComputeRequest

# ------------------------------------------------------------------------------------------- reference
_REF_BLANK_LINE = re.compile(rb"\r\n\r\n|\r\n\n|\n\r\n|\r\r\n|\n\n|\r\r|\r\n\r|\n\r")


def ref_parse_event(raw: bytes) -> SSEEvent:
    name: str | None = None
    data_lines: list[str] = []
    text = raw.decode("utf-8", errors="replace")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    for line in text.split("\n"):
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            name = value
        elif field == "data":
            data_lines.append(value)
    if name is None and not data_lines:
        return SSEEvent(raw=raw, event=None, data=None)
    return SSEEvent(raw=raw, event=name, data="\n".join(data_lines) if data_lines else None)


class RefParser:
    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        buf = self._buf + chunk
        start = 0
        for m in _REF_BLANK_LINE.finditer(buf):
            if m.end() == len(buf) and buf.endswith(b"\r"):
                break
            raw = buf[start:m.end()]
            start = m.end()
            yield ref_parse_event(raw)
        self._buf = buf[start:]

    def flush(self) -> Iterator[SSEEvent]:
        rest, self._buf = self._buf, b""
        if rest:
            yield ref_parse_event(rest)


def ref_count_delta(choice: Mapping[str, Any]) -> tuple[int, int]:
    d = choice.get("delta")
    if not isinstance(d, dict):
        return 0, 0
    visible = 1 if (d.get("content") or d.get("refusal") or d.get("tool_calls")) else 0
    reasoning = 1 if (d.get("reasoning_content") or d.get("reasoning")) else 0
    return visible, reasoning


def ref_count_text(choice: Mapping[str, Any]) -> tuple[int, int]:
    return (1 if choice.get("text") else 0), 0


class RefChoiceMeter(ChoiceStreamMeter):
    """The choice meter as it was: a generator parser, a join per read, isinstance checks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ref_parser = RefParser()

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for ev in self._ref_parser.feed(chunk):
            if self.on_event(ev):
                out.append(ev.raw)
        return b"".join(out)

    def close(self) -> bytes:
        out: list[bytes] = []
        for ev in self._ref_parser.flush():
            if self.on_event(ev):
                out.append(ev.raw)
        return b"".join(out)

    def on_event(self, ev: SSEEvent) -> bool:
        data = ev.data
        if not data or data[0] != "{":
            if data is not None and data.strip() == "[DONE]":
                self.finished = True
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict):
            return True
        choices = obj.get("choices")
        usage = obj.get("usage")
        if not choices:
            if isinstance(usage, dict):
                self._final = usage
                return self.client_wants_usage
            err = obj.get("error")
            if isinstance(err, dict):
                self.error = err
            elif err is not None:
                self.error = {"message": str(err)}
            elif obj.get("object") == "error":
                self.error = _flat_error(obj)
            return True
        if not isinstance(choices, list):
            return True
        if isinstance(usage, dict) and self._trailing_usage(choices):
            self._final = usage
            return self.client_wants_usage
        for c in choices:
            if not isinstance(c, dict):
                continue
            idx = c.get("index", 0)
            if not isinstance(idx, int) or isinstance(idx, bool):
                idx = 0
            st = self._choices.get(idx)
            if st is None:
                st = self._choices[idx] = _Choice()
            v, r = self._count(c)
            st.visible += v
            st.reasoning += r
            if c.get("finish_reason") is not None:
                st.finished = True
            if isinstance(usage, dict):
                st.usage = usage
                st.usage_final = c.get("finish_reason") is not None
        return True


# ---------------------------------------------------------------------------------- random streams
_TEXTS = ["", "", "hi", " tok", "é", "\n", "a\\b", '"q"', "data: x\n\n", "\r\n", "🙂", " "]
_DELTA_KEYS = ["content", "refusal", "tool_calls", "reasoning_content", "reasoning", "role"]


def _delta(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([None, "x", [], 3])
    d: dict[str, Any] = {}
    for key in rng.sample(_DELTA_KEYS, rng.randint(0, 3)):
        if key == "tool_calls":
            d[key] = rng.choice([[], [{"index": 0, "function": {"arguments": "{}"}}], None])
        else:
            d[key] = rng.choice([*_TEXTS, None])
    return d


def _choice(rng: random.Random, chat: bool) -> Any:
    if rng.random() < 0.03:
        return rng.choice(["x", 1, None, []])
    c: dict[str, Any] = {}
    if rng.random() < 0.9:
        c["index"] = rng.choice([0, 0, 0, 1, 2, True, False, 1.0, "1", None, -1])
    if chat:
        c["delta"] = _delta(rng)
    else:
        c["text"] = rng.choice([*_TEXTS, None, 5])
    if rng.random() < 0.5:
        c["logprobs"] = None
    c["finish_reason"] = rng.choice([None, None, None, "stop", "length", ""])
    items = list(c.items())
    rng.shuffle(items)
    return dict(items)


def _usage(rng: random.Random) -> Any:
    if rng.random() < 0.1:
        return rng.choice([None, "x", 5, []])
    p, c = rng.randint(0, 50), rng.randint(0, 50)
    u: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c + rng.choice([0, 0, 7])}
    if rng.random() < 0.3:
        u["completion_tokens_details"] = {"reasoning_tokens": rng.randint(0, c)}
    return u


def _chunk_obj(rng: random.Random, chat: bool) -> Any:
    roll = rng.random()
    if roll < 0.04:
        return rng.choice([[1, 2], 3, "s", None, True])
    obj: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    if roll < 0.12:
        obj["choices"] = []
        obj["usage"] = _usage(rng)
    elif roll < 0.18:
        obj.pop("object")
        kind = rng.random()
        if kind < 0.4:
            obj["error"] = {"message": "boom", "code": 500}
        elif kind < 0.7:
            obj["error"] = rng.choice(["bad", 3, ["x"]])
        else:
            obj.update({"object": "error", "message": "flat", "code": 400, "type": "t"})
    elif roll < 0.22:
        obj["choices"] = rng.choice([{"index": 0}, "x", 0, None])
    else:
        obj["choices"] = [_choice(rng, chat) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        if rng.random() < 0.3:
            obj["usage"] = rng.choice([None, _usage(rng)])
    items = list(obj.items())
    rng.shuffle(items)
    return dict(items)


def _json_text(rng: random.Random, obj: Any) -> bytes:
    text = orjson.dumps(obj)
    style = rng.random()
    if style < 0.2:  # spaces after separators, as Python's json writes
        text = text.replace(b'":', b'": ').replace(b',"', b', "')
    elif style < 0.3:
        text = b"  " + orjson.dumps(obj, option=orjson.OPT_INDENT_2) + b" "
    elif style < 0.35:  # a key written with an escape: the same key to a JSON parser
        text = text.replace(b'"usage"', b'"\\u0075sage"').replace(b'"choices"', b'"ch\\u006fices"')
    elif style < 0.4:
        text = text[: rng.randint(0, len(text))]  # broken JSON
    return text


def _data_lines(rng: random.Random, text: bytes) -> list[bytes]:
    """``text`` as one or more data lines (a multi-line value is joined with newlines by the parser)."""
    parts = text.split(b"\n")
    if len(parts) == 1 and rng.random() < 0.1 and len(text) > 2:
        cut = rng.randint(1, len(text) - 1)
        if text[cut - 1:cut] in (b",", b"{") or rng.random() < 0.3:
            parts = [text[:cut], text[cut:]]
    prefix = rng.choice([b"data: ", b"data: ", b"data: ", b"data:", b"data:  ", b"data :", b"Data: "])
    return [prefix + p for p in parts]


def _event(rng: random.Random, chat: bool) -> tuple[list[bytes], bool]:
    """An event's lines, and whether it may be the stream's last (for flush)."""
    roll = rng.random()
    if roll < 0.05:
        return [rng.choice([b"data: [DONE]", b"data:[DONE]", b"data:  [DONE] ", b"data: [DONE]x"])], True
    if roll < 0.09:
        return [rng.choice([b": ping", b":", b"id: 3", b"retry: 10", b"event: ping", b"data", b"data:"])], True
    if roll < 0.11:
        return [b"data: " + bytes([rng.randrange(128, 256)]) + b'{"choices":[]}'], True
    lines = _data_lines(rng, _json_text(rng, _chunk_obj(rng, chat)))
    if rng.random() < 0.1:
        lines.insert(rng.randrange(len(lines) + 1), rng.choice([b": keep-alive", b"event: chunk", b"id: 9"]))
    return lines, True


def random_stream(rng: random.Random, chat: bool) -> bytes:
    eol = rng.choice([b"\n", b"\n", b"\n", b"\r\n", b"\r", None])
    out: list[bytes] = []
    if rng.random() < 0.1:
        out.append(rng.choice([b"\n", b"\r\n", b": hello\n"]))
    for _ in range(rng.randint(0, 24)):
        lines, _ = _event(rng, chat)
        for line in lines:
            out.append(line + (eol if eol is not None else rng.choice([b"\n", b"\r\n", b"\r"])))
        out.append(eol if eol is not None else rng.choice([b"\n", b"\r\n", b"\r"]))
    raw = b"".join(out)
    if raw and rng.random() < 0.2:
        raw = raw[: -rng.randint(1, min(len(raw), 8))]  # cut off: the rest comes out in flush
    return raw


def random_splits(rng: random.Random, raw: bytes) -> list[bytes]:
    mode = rng.random()
    if mode < 0.3 or not raw:
        return [raw]
    if mode < 0.4:
        return [raw[i:i + 1] for i in range(len(raw))]
    cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(1, 12)))) if len(raw) > 1 else []
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in pairwise(bounds)]


def _events(parser: Any, chunks: list[bytes]) -> list[tuple[bytes, str | None, str | None]]:
    out = []
    for c in chunks:
        out += [(e.raw, e.event, e.data) for e in parser.feed(c)]
    out += [(e.raw, e.event, e.data) for e in parser.flush()]
    return out


def _req(samples: int = 1) -> ComputeRequest:
    return ComputeRequest(api="openai.chat", model="m", samples=samples, output_cap=1000, stream=True)


def _run(meter: StreamMeter, chunks: list[bytes]) -> tuple[Any, ...]:
    passed = [meter.feed(c) for c in chunks]
    passed.append(meter.close())
    assert isinstance(meter, ChoiceStreamMeter)
    states = sorted((k, c.visible, c.reasoning, c.finished, c.usage_final, orjson.dumps(c.usage))
                    for k, c in meter._choices.items())
    return passed, meter.usage(), meter.error, meter.finished, states, meter._final


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("seed", range(40))
def test_parser_events_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        raw = random_stream(rng, chat=rng.random() < 0.7)
        chunks = random_splits(rng, raw)
        assert _events(SSEParser(), chunks) == _events(RefParser(), chunks)


@pytest.mark.parametrize("seed", range(40))
def test_chat_meter_matches_reference(seed: int) -> None:
    rng = random.Random(1000 + seed)
    for _ in range(40):
        chat = rng.random() < 0.7
        raw = random_stream(rng, chat)
        chunks = random_splits(rng, raw)
        wants = rng.random() < 0.5
        samples = rng.choice([1, 1, 2])
        if chat:
            fast: StreamMeter = ChatCompletions().stream_meter(_req(samples), wants)
            ref = RefChoiceMeter(_req(samples), wants, ref_count_delta)
        else:
            fast = Completions().stream_meter(_req(samples), wants)
            ref = RefChoiceMeter(_req(samples), wants, ref_count_text, samples_floor=samples)
        got, want = _run(fast, chunks), _run(ref, chunks)
        assert got == want, raw
        assert b"".join(got[0]) == b"".join(want[0])


def test_lone_event_bytes_pass_unchanged() -> None:
    """A read of one whole event is forwarded as those very bytes; a stripped usage chunk as nothing."""
    m = ChatCompletions().stream_meter(_req(), False)
    ev = b'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
    assert m.feed(ev) is ev
    assert m.feed(b'data:{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\r\n\r\n') == b""
    assert m.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n" and m.finished
    u = m.usage()
    assert (u.source, u.prompt_tokens, u.output_tokens) == ("upstream", 1, 1)


def test_count_delta_matches_reference() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        c = _choice(rng, chat=True)
        if isinstance(c, dict):
            assert _count_delta(c) == ref_count_delta(c)


def test_fast_data_line_matches_parse_event() -> None:
    """The inline reading of a one-line ``data:`` event is parse_event's, byte for byte."""
    for raw in (b"data: x\n\n", b"data:x\n\n", b"data:  x\n\n", b"data:\n\n", b"data: \n\n", b"data: \xff\xfe\n\n",
                b"data: a:b\n\n", b"data: [DONE]\n\n", b"data:: x\n\n"):
        (ev,) = SSEParser().feed(raw)
        assert (ev.raw, ev.event, ev.data) == (raw, *(lambda e: (e.event, e.data))(ref_parse_event(raw)))
        assert parse_event(raw) == ev
