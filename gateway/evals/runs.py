"""Evaluation runs in the store: open, look up, track in flight, finish (docs/design.md §14).

A run belongs to one principal (optionally to one of its keys). While it is open, the engine tags every
request of that principal (or key) with the run's id, in its audit record (``eval``), which is what the
certificate is computed from. Entries, under the directory's prefix:

- ``eval:<id>``: the run (a hash: label, principal, key_id, models, started/finished at and by, the
  certificate's sha256 once written);
- ``evals``: every run id, scored by its start;
- ``eval_open:<principal>``: the open run of a principal (read by :meth:`Directory.open_eval`, cached);
- ``eval:<id>:inflight``: request id → deadline of each tagged request admitted and not yet recorded, so that
  ``finish`` waits for them: a certificate written while one of its requests is still running would not
  cover it. A gateway that dies leaves entries behind; they count only until their deadline.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.audit.chain import rfc3339
from gateway.engine.errors import BadRequest, Conflict, NotFound
from gateway.ledger.errors import STORE_FAILURES, store_error
from gateway.policy.directory import Directory

RUN_PREFIX = "ev_"


@dataclass(frozen=True)
class EvalRun:
    id: str
    label: str
    principal: str
    key_id: str | None
    models: tuple[str, ...]
    started_at: float
    started_by: str
    finished_at: float | None = None
    finished_by: str | None = None
    certificate_sha256: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def open(self) -> bool:
        return self.finished_at is None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = list(self.models)
        d.pop("extra")
        d["open"] = self.open
        return d

    def certificate_run(self) -> dict[str, Any]:
        """The ``run`` object of its certificate (times in RFC 3339)."""
        return {"id": self.id, "label": self.label, "principal": self.principal, "key_id": self.key_id,
                "models": list(self.models), "started_at": rfc3339(self.started_at),
                "finished_at": rfc3339(self.finished_at) if self.finished_at is not None else None,
                "started_by": self.started_by, "finished_by": self.finished_by}


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class EvalRuns:
    """The runs of one store, over the directory's connection and prefix."""

    def __init__(self, directory: Directory, redis: Any, clock: Any = time.time) -> None:
        if redis is None:
            raise BadRequest("evaluation runs need the store (store.url)")
        self._d, self._r, self._clock = directory, redis, clock

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except STORE_FAILURES as exc:
            raise store_error(exc) from exc

    # ------------------------------------------------------------------------------------------ reading
    async def get(self, run_id: str) -> EvalRun:
        rec = await self._call(self._r.hgetall(self._d.key(f"eval:{run_id}")))
        if not rec:
            raise NotFound(f"unknown evaluation run {run_id!r}")
        r = {_s(k): _s(v) for k, v in rec.items()}
        fin = r.get("finished_at")
        return EvalRun(id=run_id, label=r.get("label", ""), principal=r["principal"], key_id=r.get("key_id") or None,
                       models=tuple(m for m in r.get("models", "").split(",") if m),
                       started_at=float(r["started_at"]), started_by=r.get("started_by", ""),
                       finished_at=float(fin) if fin else None, finished_by=r.get("finished_by") or None,
                       certificate_sha256=r.get("certificate_sha256") or None)

    async def every(self) -> list[EvalRun]:
        ids = await self._call(self._r.zrange(self._d.key("evals"), 0, -1))
        return [await self.get(_s(i)) for i in ids]

    # ------------------------------------------------------------------------------------------ changes
    async def start(self, principal: str, label: str, models: list[str], actor: str,
                    key_id: str | None = None) -> EvalRun:
        """Open a run for ``principal`` (refused while another is open for it: requests can carry one tag)."""
        open_key = self._d.key(f"eval_open:{principal}")
        run = EvalRun(id=RUN_PREFIX + secrets.token_hex(8), label=label, principal=principal, key_id=key_id,
                      models=tuple(models), started_at=self._clock(), started_by=actor)
        # HSETNX on the open marker: two operators starting runs for one principal at once get one each.
        claimed = await self._call(self._r.hsetnx(open_key, "run", run.id))
        if not claimed:
            current = _s(await self._call(self._r.hget(open_key, "run")))
            raise Conflict(f"evaluation run {current} is open for principal {principal!r}; finish it first",
                           param="principal")
        mapping = {"label": label, "principal": principal, "models": ",".join(models),
                   "started_at": repr(run.started_at), "started_by": actor}
        if key_id:
            mapping["key_id"] = key_id
            await self._call(self._r.hset(open_key, "key_id", key_id))
        await self._call(self._r.hset(self._d.key(f"eval:{run.id}"), mapping=mapping))
        await self._call(self._r.zadd(self._d.key("evals"), {run.id: run.started_at}))
        await self._d.publish(f"eval_open:{principal}")
        return run

    async def close(self, run_id: str, actor: str) -> EvalRun:
        """Stop tagging: the run's principal is no longer under evaluation (its in-flight requests still are)."""
        run = await self.get(run_id)
        if not run.open:
            raise Conflict(f"evaluation run {run_id} finished at {rfc3339(run.finished_at or 0)}",
                           param="run")
        now = self._clock()
        await self._call(self._r.hset(self._d.key(f"eval:{run_id}"),
                                      mapping={"finished_at": repr(now), "finished_by": actor}))
        open_key = self._d.key(f"eval_open:{run.principal}")
        if _s(await self._call(self._r.hget(open_key, "run")) or b"") == run_id:
            await self._call(self._r.delete(open_key))
        await self._d.publish(f"eval_open:{run.principal}")
        return await self.get(run_id)

    async def record_certificate(self, run_id: str, sha256: str) -> None:
        await self._call(self._r.hset(self._d.key(f"eval:{run_id}"), "certificate_sha256", sha256))

    # ---------------------------------------------------------------------------------------- in flight
    async def admitted(self, run_id: str, request_id: str, deadline_s: float) -> None:
        await self._call(self._r.hset(self._d.key(f"eval:{run_id}:inflight"), request_id,
                                      repr(self._clock() + deadline_s)))

    async def recorded(self, run_id: str, request_id: str) -> None:
        await self._call(self._r.hdel(self._d.key(f"eval:{run_id}:inflight"), request_id))

    async def in_flight(self, run_id: str) -> dict[str, float]:
        """Tagged requests admitted and not yet recorded whose deadline has not passed: request id → deadline."""
        rec = await self._call(self._r.hgetall(self._d.key(f"eval:{run_id}:inflight")))
        now = self._clock()
        live = {_s(k): float(_s(v)) for k, v in (rec or {}).items()}
        return {k: v for k, v in live.items() if v > now}

    async def wait_idle(self, run_id: str, timeout: float, poll: float = 0.2) -> dict[str, float]:
        """Wait until no tagged request of the run is in flight, for at most ``timeout`` seconds; returns what
        is still in flight then (empty: all recorded)."""
        deadline = time.monotonic() + timeout
        while True:
            pending = await self.in_flight(run_id)
            if not pending or time.monotonic() >= deadline:
                return pending
            await asyncio.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))
