"""The store's own error type: what the ledger and the directory raise when Redis cannot answer.

The request flow (``gateway.engine``) catches :class:`StoreError` and never a Redis client's exceptions,
so it does not depend on which client (``gateway.ledger.resp`` or redis-py) carried the call. The original
exception is the ``__cause__``.
"""

from __future__ import annotations

from redis.exceptions import NoScriptError, RedisError


class StoreError(Exception):
    """Redis is unreachable, timed out, or answered with an error: the operation may or may not have run."""


class ScriptMissing(StoreError):
    """Redis does not have a ledger script (flushed, or its load was refused): an awaited call reloads it."""


# What the clients raise when the store fails: redis-py's errors (which gateway.ledger.resp raises too) and
# OSError, which covers TimeoutError. Not RedisClusterException: redis-py raises it for a command it cannot
# route (keys in different slots, bad arguments), i.e. a bug in kgate, not a store failure.
STORE_FAILURES: tuple[type[Exception], ...] = (RedisError, OSError)


def store_error(exc: BaseException) -> StoreError:
    """The :class:`StoreError` for a client's exception (:class:`ScriptMissing` for ``NOSCRIPT``), with
    ``exc`` as its cause. Raise it ``from exc``, or hand it on as it is."""
    error = ScriptMissing(str(exc)) if isinstance(exc, NoScriptError) else StoreError(str(exc) or repr(exc))
    error.__cause__ = exc
    return error
