"""Server-sent events as the providers stream them: :class:`SSEParser` cuts a byte stream into
:class:`SSEEvent` s at blank lines, keeping each event's bytes exactly as they came.

It sits on the gateway's streaming hot path (every chunk of every streamed answer goes through
:meth:`SSEParser.feed`), so it is plain code with no layers between the parser and :func:`parse_event`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class SSEEvent:
    """One server-sent event: its raw bytes (forwarded unchanged), its ``event:`` name and ``data:``."""

    raw: bytes
    event: str | None
    data: str | None

    def json(self) -> Any:
        """The data as JSON, or None when it is absent, ``[DONE]`` or not JSON."""
        if not self.data or self.data == "[DONE]":
            return None
        try:
            return orjson.loads(self.data)
        except orjson.JSONDecodeError:
            return None


class SSEParser:
    """Splits a byte stream into events at blank lines; keeps a partial event until it is complete.

    Each event keeps its raw bytes exactly as the upstream sent them (LF, CRLF or CR line ends: Gemini
    and Vertex send CRLF), and where the chunks were cut never changes the events.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        buf = self._buf + chunk if self._buf else chunk
        start = 0
        if b"\r" not in buf:  # the common case: LF only
            while True:
                end = buf.find(b"\n\n", start)
                if end < 0:
                    break
                raw = buf[start:end + 2]
                start = end + 2
                ev = parse_event(raw)
                if ev is not None:
                    yield ev
        else:
            for m in _BLANK_LINE.finditer(buf):
                if m.end() == len(buf) and buf.endswith(b"\r"):
                    break  # a CR at the end may be the first half of a CRLF: wait for the next byte
                raw = buf[start:m.end()]
                start = m.end()
                ev = parse_event(raw)
                if ev is not None:
                    yield ev
        self._buf = buf[start:]

    def flush(self) -> Iterator[SSEEvent]:
        """What is left when the stream ends (an event without its closing blank line), bytes unchanged."""
        rest, self._buf = self._buf, b""
        if rest:
            ev = parse_event(rest)
            if ev is not None:
                yield ev

    @property
    def pending(self) -> bytes:
        return self._buf


# Two line ends in a row, each LF, CRLF or CR; longer alternatives first so a CRLF is never cut in two.
_BLANK_LINE = re.compile(rb"\r\n\r\n|\r\n\n|\n\r\n|\r\r\n|\n\n|\r\r|\r\n\r|\n\r")


def parse_event(raw: bytes) -> SSEEvent | None:
    """One event's bytes (a blank line at the end, or none at the end of a stream) as an :class:`SSEEvent`:
    its last ``event:`` name and its ``data:`` lines joined by newlines; comments and other fields skipped."""
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
