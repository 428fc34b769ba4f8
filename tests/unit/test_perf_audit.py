"""The audit writer's fast paths write what the plain forms wrote, and the day's file is open from start."""

from __future__ import annotations

import math
import os
import random
import resource
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.audit.chain import canonical, chain_hash, chain_line, json_default, rfc3339
from gateway.audit.log import AuditLog
from gateway.audit.verify import verify

DAY1 = datetime(2025, 3, 1, 10, 0, tzinfo=UTC).timestamp()


def _rfc3339_plain(ts: float) -> str:
    """The formula rfc3339 replaced (an f-string per record)."""
    frac, whole = math.modf(ts)
    us = round(frac * 1e6)
    sec = int(whole)
    if us >= 1_000_000:
        sec, us = sec + 1, us - 1_000_000
    elif us < 0:
        sec, us = sec - 1, us + 1_000_000
    return f"{datetime.fromtimestamp(sec, UTC).strftime('%Y-%m-%dT%H:%M:%S')}.{us // 1000:03d}Z"


def test_rfc3339_is_the_plain_formula_and_datetime_isoformat() -> None:
    rnd = random.Random(7)
    edge = [0.0, -0.0, 0.9999995, 1.9999996, -0.0000004, -1.5, DAY1 + 0.0125, DAY1 - 1e-7]
    for ts in edge + [rnd.uniform(-1e9, 4e9) for _ in range(20_000)]:
        assert rfc3339(ts) == _rfc3339_plain(ts), ts
    for ts in [DAY1 + rnd.random() * 86400 for _ in range(2000)] + [DAY1 + 0.0125, DAY1 + 59.9995]:
        iso = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert rfc3339(ts) == iso, ts


@pytest.mark.parametrize("key", [None, b"s3cret"])
def test_chain_line_is_the_canonical_body_with_the_hash_appended(key: bytes | None) -> None:
    rec: dict[str, Any] = {"ts": "2025-03-01T10:00:00.250Z", "replica": "r1", "decision": "allowed",
                           "usage": {"k": 1.5, "flops": 2e12}, "tags": {"b", "a"}, "hash": "old", "mac": "x"}
    line = chain_line(rec, 6, "ab" * 32, key)
    assert rec["seq"] == 7 and rec["prev"] == "ab" * 32 and ("mac" in rec) == (key is not None)
    body = orjson.dumps({k: v for k, v in rec.items() if k != "hash"}, default=json_default,
                        option=orjson.OPT_SORT_KEYS)
    assert line == b'%s,"hash":"%s"}\n' % (body[:-1], rec["hash"].encode())
    assert rec["hash"] == chain_hash("ab" * 32, canonical(orjson.loads(line)), key)


@pytest.mark.parametrize("fsync", [False, True], ids=["loop-writer", "fsync-thread"])
async def test_first_write_needs_no_new_file_descriptor(tmp_path: Path, fsync: bool) -> None:
    """Under file-descriptor exhaustion (thousands of open streams) the first record still goes in: the
    day's file was opened when the log started."""
    log = AuditLog(tmp_path, "r1", clock=lambda: DAY1, fsync=fsync)
    await log.start()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.open(os.devnull, os.O_RDONLY)  # the lowest free descriptor
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))  # no new descriptor can be had
    try:
        with pytest.raises(OSError):
            os.close(os.open(os.devnull, os.O_RDONLY))
        rec = await log.write({"decision": "allowed", "request_id": "req-0"})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await log.close()
    assert rec["seq"] == 1 and log.write_errors == 0
    assert [orjson.loads(x)["request_id"] for x in (tmp_path / "r1" / "audit-2025-03-01.jsonl").open("rb")] == [
        "req-0"]


async def test_torn_tail_is_noted_once_at_start_in_its_place_in_the_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "r1", clock=lambda: DAY1)
    await log.start()
    first = [await log.write({"decision": "allowed", "request_id": f"req-{i}"}) for i in range(2)]
    await log.close()
    path = tmp_path / "r1" / "audit-2025-03-01.jsonl"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes() + b'{"decision":"allowed","ha')  # a crash mid-write
    segment = tmp_path / "r1" / "audit-2025-03-01.1.jsonl"
    # Started, and stopped without a record: the note is written (once), right after the last record.
    for _ in range(2):
        log = AuditLog(tmp_path, "r1", clock=lambda: DAY1 + 60)
        await log.start()
        await log.close()
        (note,) = [orjson.loads(x) for x in segment.read_bytes().splitlines()]
        assert note["event"] == "torn_tail" and note["seq"] == 3 and note["prev"] == first[-1]["hash"]
        assert (note["torn_file"], note["torn_offset"], note["torn_bytes"]) == (path.name, size, 25)
    log = AuditLog(tmp_path, "r1", clock=lambda: DAY1 + 120)
    await log.start()
    rec = await log.write({"decision": "allowed", "request_id": "req-2"})
    await log.close()
    assert rec["seq"] == 4 and rec["prev"] == note["hash"]
    assert sorted(p.name for p in (tmp_path / "r1").glob("audit-*")) == sorted([path.name, segment.name])
    result = verify([tmp_path])
    assert result.ok and result.records == 4 and len(result.warnings) == 1


@pytest.mark.parametrize("fsync", [False, True], ids=["loop-writer", "fsync-thread"])
async def test_a_fresh_record_is_written_as_a_copied_one(tmp_path: Path, fsync: bool) -> None:
    def make() -> dict[str, Any]:
        return {"ts": DAY1 + 0.5, "request_id": "req-0", "decision": "allowed", "seq": 9, "hash": "x",
                "usage": {"k": 1.0}, "messages": ["secret"]}

    lines = []
    for fresh in (False, True):
        log = AuditLog(tmp_path / str(fresh), "r1", clock=lambda: DAY1, fsync=fsync)
        await log.start()
        given = make()
        rec = await log.write(given, fresh=fresh)
        log.write_nowait(make(), fresh=fresh)
        await log.close()
        assert (rec is given) == (fresh and not fsync) and rec["seq"] == 1 and "messages" not in rec
        if not fresh:
            assert given["seq"] == 9 and "messages" in given  # a copied record is left as it was
        lines.append((tmp_path / str(fresh) / "r1" / "audit-2025-03-01.jsonl").read_bytes())
    assert lines[0] == lines[1] and lines[0].count(b"\n") == 2
