"""The audit record and its hash chain (docs/design.md §7.1): what a line holds and what its hash covers.

The writer (:mod:`gateway.audit.log`) adds three fields to each record it is given:

- ``seq``: the per-replica sequence number, 1, 2, 3, ... across files and restarts;
- ``prev``: the ``hash`` of the record before (:data:`GENESIS`, 64 zeros, for seq 1);
- ``hash``: hex sha256 over ``prev`` (its ASCII hex) followed by the canonical JSON of the record without
  ``hash`` (orjson, sorted keys, no spaces). With an HMAC key the hash is HMAC-SHA256 over the same bytes
  and the record says ``"mac": "hmac-sha256"``.

The records never carry prompt or completion text: top-level keys that would (:data:`TEXT_KEYS`) are
dropped and named in ``redacted``. ``kgate audit verify`` (:mod:`gateway.audit.verify`) checks the chain
with :func:`canonical` and :func:`chain_hash`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

GENESIS = "0" * 64
MAC_NAME = "hmac-sha256"
DECISIONS = ("allowed", "denied", "clamped", "failed", "partial", "spooled", "replayed", "admin")
# Fields the writer owns: a caller's values for them are replaced.
CHAIN_FIELDS = ("seq", "prev", "hash", "mac")
# Top-level keys that would carry prompt or completion text: never written.
TEXT_KEYS = frozenset({
    "messages", "prompt", "input", "contents", "system", "instructions", "completion", "choices",
    "content", "text", "body", "candidates", "output",
})


class AuditError(Exception):
    """The audit log cannot do what was asked: not started, closed, a failed write, a corrupt tail."""


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: orjson with sorted keys, no spaces, without ``hash``."""
    return orjson.dumps({k: v for k, v in record.items() if k != "hash"}, option=orjson.OPT_SORT_KEYS)


def chain_hash(prev: str, body: bytes, key: bytes | None = None) -> str:
    """sha256 (or HMAC-SHA256 with ``key``) over the previous hash's hex text followed by ``body``."""
    msg = prev.encode("utf-8", "surrogatepass") + body
    if key is None:
        return hashlib.sha256(msg).hexdigest()
    return hmac.digest(key, msg, "sha256").hex()  # one-shot OpenSSL HMAC: the same hex as hmac.new(...)


def chain_line(rec: dict[str, Any], seq: int, prev: str, key: bytes | None) -> bytes:
    """Give ``rec`` its place after (``seq``, ``prev``) in the chain (``seq``, ``prev``, ``mac``, ``hash``
    set in place); return its line."""
    rec["seq"] = seq + 1
    rec["prev"] = prev
    rec.pop("hash", None)
    if key is not None:
        rec["mac"] = MAC_NAME
    else:
        rec.pop("mac", None)
    body = orjson.dumps(rec, default=json_default, option=orjson.OPT_SORT_KEYS)  # canonical: no hash yet
    rec["hash"] = digest = chain_hash(prev, body, key)
    # One serialization per record: the line is the canonical body with the hash appended (verify
    # parses the line, so key order in the file does not matter).
    return b"".join((body[:-1], b',"hash":"', digest.encode(), b'"}\n'))


def json_default(obj: Any) -> Any:
    """orjson's ``default`` for record values JSON has no type for: sets as sorted lists, paths and bytes
    as text; anything else is the caller's bug (TypeError)."""
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if isinstance(obj, (Path, bytes)):
        return str(obj)
    raise TypeError(f"audit record value of type {type(obj).__name__} is not JSON-serializable")


def hmac_key_from_env(name: str | None) -> bytes | None:
    """The HMAC key held in the environment variable ``name`` (``audit.hmac_key_env``), or None when unset.

    Raises :class:`AuditError` when a variable is named but missing or empty: a configured HMAC key that
    silently falls back to plain hashes would weaken the log without anyone noticing.
    """
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise AuditError(f"audit HMAC key: environment variable {name} is not set or empty")
    return value.encode("utf-8")


def rfc3339(ts: float) -> str:
    """RFC 3339 UTC with milliseconds: ``2025-01-31T23:59:59.123Z`` (the same text as ``datetime``'s
    ``isoformat(timespec="milliseconds")``, which rounds to microseconds, then truncates)."""
    sec = int(ts)  # truncated toward zero, as math.modf does
    us = round((ts - sec) * 1e6)  # exact: modf's fraction, without the call and its tuple
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    elif us < 0:
        sec, us = sec - 1, us + 1_000_000
    return _second_text(sec) + _MILLIS[us // 1000]


# ".000Z" ... ".999Z": indexing a table is a fifth of the cost of the f-string's ":03d" per record.
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


@functools.lru_cache(maxsize=4)
def _second_text(sec: int) -> str:
    # Every record of one second shares this prefix: formatting a datetime per record was a measurable
    # part of writing one.
    return datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
