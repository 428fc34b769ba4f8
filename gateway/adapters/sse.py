"""Server-sent events as the providers stream them: :class:`SSEParser` cuts a byte stream into
:class:`SSEEvent` s at blank lines, keeping each event's bytes exactly as they came.

It sits on the gateway's streaming hot path (every chunk of every streamed answer goes through
:meth:`SSEParser.feed`), so it is plain code with no layers between the parser and :func:`parse_event`.
"""

from __future__ import annotations

import re
from typing import Any

import orjson


class SSEEvent:
    """One server-sent event: its raw bytes (forwarded unchanged), its ``event:`` name and ``data:``.

    A plain class with slots rather than a frozen dataclass: one is made for every event of every stream,
    and a frozen dataclass's ``__init__`` (``object.__setattr__`` per field) costs several times as much.
    Treat it as immutable all the same.
    """

    __slots__ = ("data", "event", "raw")

    def __init__(self, raw: bytes, event: str | None, data: str | None):
        self.raw = raw
        self.event = event
        self.data = data

    def __repr__(self) -> str:
        return f"SSEEvent(raw={self.raw!r}, event={self.event!r}, data={self.data!r})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not SSEEvent:
            return NotImplemented
        assert isinstance(other, SSEEvent)
        return self.raw == other.raw and self.event == other.event and self.data == other.data

    def __hash__(self) -> int:
        return hash((self.raw, self.event, self.data))

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

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events completed by ``chunk``, in order (a list: no generator to resume per event)."""
        buf = self._buf + chunk if self._buf else chunk
        events: list[SSEEvent] = []
        start = 0
        if buf.find(b"\r") < 0:  # the common case: LF only (find, not `in`: see model_names.Renamer.body)
            find = buf.find
            while True:
                end = find(b"\n\n", start)
                if end < 0:
                    break
                nxt = end + 2
                # The common event, one "data:" line and its blank line, inline (what parse_event makes of
                # it): no other line end before the blank line. Anything else takes parse_event.
                if buf.startswith(b"data:", start) and find(b"\n", start, end) < 0:
                    v = start + 6 if buf[start + 5:start + 6] == b" " else start + 5
                    events.append(SSEEvent(buf[start:nxt], None, buf[v:end].decode("utf-8", errors="replace")))
                else:
                    ev = parse_event(buf[start:nxt])
                    if ev is not None:
                        events.append(ev)
                start = nxt
        else:
            for m in _BLANK_LINE.finditer(buf):
                if m.end() == len(buf) and buf.endswith(b"\r"):
                    break  # a CR at the end may be the first half of a CRLF: wait for the next byte
                raw = buf[start:m.end()]
                start = m.end()
                ev = parse_event(raw)
                if ev is not None:
                    events.append(ev)
        self._buf = buf[start:] if start else buf
        return events

    def flush(self) -> list[SSEEvent]:
        """What is left when the stream ends (an event without its closing blank line), bytes unchanged."""
        rest, self._buf = self._buf, b""
        if rest:
            ev = parse_event(rest)
            if ev is not None:
                return [ev]
        return []

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
