"""The model name in answers: the one the client asked for, not the upstream's (issue 14 item 5).

A policy maps a public model name to an upstream's (``models.X.upstream_model``); the upstream writes its
own name into every answer (``model`` in OpenAI and Anthropic bodies and events, ``modelVersion`` in
Gemini's). kgate puts the public name back, so a client sees the name it used; the audit record keeps the
upstream's (``upstream_model``).

Plain ``bytes.replace`` on the JSON as sent, in the two spellings providers write (compact, or one space
after the colon): parsing and re-encoding every answer, or a regular expression's substitution, cost
several times as much. A stream settles on the spelling of its first event that names the model, so each
later event costs one ``replace``.
"""

from __future__ import annotations

import orjson

from gateway.policy.config import ModelConfig


class Renamer:
    """Rewrites one upstream name to one public name in JSON bytes."""

    __slots__ = ("needle", "pairs")

    def __init__(self, upstream_model: str, public_model: str):
        self.needle = orjson.dumps(upstream_model)
        public = orjson.dumps(public_model)
        self.pairs = [(key + sep + self.needle, key + sep + public)
                      for key in (b'"model":', b'"modelVersion":') for sep in (b"", b" ")]

    def body(self, data: bytes) -> bytes:
        """A whole JSON answer, every spelling.

        ``find``, not ``in``: CPython 3.11's ``bytes in bytes`` first tries the needle as an int and formats
        (then drops) a TypeError for it, which costs several times the search itself."""
        needle = self.needle
        for old, new in self.pairs:  # compact first: usually the only one, and the check then ends it
            if data.find(needle) < 0:
                return data
            data = data.replace(old, new)
        return data

    def stream(self) -> StreamRenamer:
        return StreamRenamer(self)


class StreamRenamer:
    """The events of one stream: the first event that names the model fixes the spelling."""

    __slots__ = ("_new", "_old", "_renamer")

    def __init__(self, renamer: Renamer):
        self._renamer = renamer
        self._old: bytes | None = None
        self._new = b""

    def __call__(self, data: bytes) -> bytes:
        if self._old is not None:
            return data.replace(self._old, self._new)
        for old, new in self._renamer.pairs:
            if data.find(old) >= 0:  # not ``in``: see Renamer.body
                self._old, self._new = old, new
                return data.replace(old, new)
        return data


_RENAMERS: dict[tuple[str, str], Renamer] = {}


def renamer(model_name: str, model: ModelConfig) -> Renamer | None:
    """The :class:`Renamer` for a public model name (cached), or None when the upstream uses the same name."""
    upstream_model = model.upstream_model
    if not upstream_model or upstream_model == model_name:
        return None
    key = (upstream_model, model_name)
    r = _RENAMERS.get(key)
    if r is None:
        if len(_RENAMERS) > 1024:  # names come from the policy; a reload may bring new ones
            _RENAMERS.clear()
        r = _RENAMERS[key] = Renamer(upstream_model, model_name)
    return r
