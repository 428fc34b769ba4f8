"""The store's own error type: what the ledger and the directory raise when Redis cannot answer.

The request flow (``gateway.engine``) catches :class:`StoreError` and never a Redis client's exceptions,
so it does not depend on which client (``gateway.ledger.resp`` or redis-py) carried the call.
"""

from __future__ import annotations


class StoreError(Exception):
    """Redis is unreachable, timed out, or answered with an error: the operation may or may not have run."""


class ScriptMissing(StoreError):
    """Redis does not have a ledger script (flushed, or its load was refused): an awaited call reloads it."""
