"""The audit log writer and `kgate audit verify`: the chain, rotation, restarts, torn tails, tampering."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import resource
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.audit.chain import GENESIS, MAC_NAME, AuditError, canonical, chain_hash, hmac_key_from_env
from gateway.audit.log import AuditLog
from gateway.audit.verify import verify, verify_main

DAY1 = datetime(2025, 3, 1, 10, 0, tzinfo=UTC).timestamp()
DAY = 86400.0


class Clock:
    def __init__(self, t: float = DAY1):
        self.t = t

    def __call__(self) -> float:
        return self.t


def decision(i: int, **extra: Any) -> dict[str, Any]:
    return {"request_id": f"req-{i}", "principal": f"p{i % 3}", "org": "acme", "key_id": "k1",
            "tier": "standard", "model": "m1", "api": "openai.chat", "stream": False, "decision": "allowed",
            "usage": {"samples": 1, "prompt_tokens": 10, "reasoning_tokens": 0, "output_tokens": 20,
                      "generated_tokens": 20, "k": 1.0, "flops": 1.5e12, "source": "upstream"},
            "status": 200, **extra}


async def write_days(root: Path, replica: str = "r1", days: int = 3, per_day: int = 5,
                     key: bytes | None = None) -> list[Path]:
    """A log of ``days`` daily files with ``per_day`` records each; returns the files in order."""
    clock = Clock()
    log = AuditLog(root, replica, hmac_key=key, clock=clock)
    await log.start()
    i = 0
    for d in range(days):
        clock.t = DAY1 + d * DAY
        for _ in range(per_day):
            await log.write(decision(i))
            i += 1
            clock.t += 1
    await log.close()
    return sorted((root / replica).glob("audit-*.jsonl"))


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in lines(path)]


def problem(root: Path, **kw: Any) -> tuple[str, str, int]:
    result = verify([root], **kw)
    assert len(result.problems) == 1, result
    p = result.problems[0]
    return p.kind, Path(p.file).name, p.line


# ---------------------------------------------------------------------------------------------- writer
async def test_write_returns_the_chained_record_and_writes_one_canonical_line(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "r1", clock=Clock(DAY1 + 0.25))
    await log.start()
    rec = await log.write({**decision(0), "messages": [{"role": "user", "content": "secret"}]})
    await log.close()
    path = tmp_path / "r1" / "audit-2025-03-01.jsonl"
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    on_disk = orjson.loads(raw)
    assert on_disk == rec
    assert rec["seq"] == 1 and rec["prev"] == GENESIS
    assert rec["hash"] == chain_hash(GENESIS, canonical(rec))
    # the line is the canonical body (sorted keys, no hash) with the hash appended last
    assert raw == canonical(rec)[:-1] + b',"hash":"' + rec["hash"].encode() + b'"}\n'
    assert rec["ts"] == "2025-03-01T10:00:00.250Z" and rec["replica"] == "r1"
    assert "messages" not in rec and rec["redacted"] == ["messages"] and b"secret" not in raw
    assert log.records_written == 1 and log.write_errors == 0 and log.redactions == 1


async def test_caller_chain_fields_are_replaced_and_ts_kept(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "r1")
    await log.start()
    rec = await log.write({"decision": "admin", "ts": "2025-01-01T00:00:00.000Z", "seq": 99,
                           "prev": "x", "hash": "y", "mac": "z"})
    epoch = await log.write({"decision": "admin", "ts": DAY1 + 0.0125})  # epoch seconds become RFC 3339
    await log.close()
    assert rec["seq"] == 1 and rec["prev"] == GENESIS and "mac" not in rec
    assert rec["ts"] == "2025-01-01T00:00:00.000Z"
    assert epoch["ts"] == "2025-03-01T10:00:00.012Z"


@pytest.mark.parametrize("fsync", [False, True], ids=["loop-writer", "fsync-thread"])
async def test_concurrent_writers_keep_one_valid_chain(tmp_path: Path, fsync: bool) -> None:
    log = AuditLog(tmp_path, "r1", fsync=fsync)
    await log.start()

    async def worker(w: int) -> list[int]:
        seqs = []
        for j in range(25):
            if j % 5 == 0:
                log.write_nowait(decision(w * 100 + j))
            else:
                seqs.append((await log.write(decision(w * 100 + j)))["seq"])
            await asyncio.sleep(0)
        return seqs

    acked = await asyncio.gather(*(worker(w) for w in range(40)))
    await log.close()
    assert log.records_written == 1000 and log.write_errors == 0
    all_acked = [s for seqs in acked for s in seqs]
    assert len(set(all_acked)) == len(all_acked) == 800
    (path,) = (tmp_path / "r1").glob("audit-*.jsonl")
    assert [r["seq"] for r in records(path)] == list(range(1, 1001))
    result = verify([tmp_path])
    assert result.ok and result.records == 1000 and result.replicas == 1


async def test_writing_does_not_block_the_event_loop(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "r1", fsync=True)
    await log.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.gather(*(log.write(decision(i)) for i in range(200)))
    task.cancel()
    await log.close()
    assert ticks > 0 and log.records_written == 200 and verify([tmp_path]).ok


async def test_restart_resumes_the_chain(tmp_path: Path) -> None:
    for round_ in range(3):
        log = AuditLog(tmp_path, "r1")
        await log.start()
        first = await log.write(decision(round_))
        await log.write(decision(round_))
        await log.close()
        assert first["seq"] == 2 * round_ + 1
    (path,) = (tmp_path / "r1").glob("audit-*.jsonl")
    recs = records(path)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(recs))
    assert verify([tmp_path]).ok


async def test_daily_rotation_continues_the_chain_across_files(tmp_path: Path) -> None:
    files = await write_days(tmp_path, days=3, per_day=4)
    assert [f.name for f in files] == ["audit-2025-03-01.jsonl", "audit-2025-03-02.jsonl",
                                       "audit-2025-03-03.jsonl"]
    day1, day2 = records(files[0]), records(files[1])
    assert day2[0]["prev"] == day1[-1]["hash"] and day2[0]["seq"] == 5
    # A restart on a later day resumes from the newest file into a new day file.
    log = AuditLog(tmp_path, "r1", clock=Clock(DAY1 + 5 * DAY))
    await log.start()
    rec = await log.write(decision(99))
    await log.close()
    assert rec["seq"] == 13 and (tmp_path / "r1" / "audit-2025-03-06.jsonl").exists()
    assert verify([tmp_path]).ok


async def test_clock_stepping_back_does_not_reopen_an_old_day(tmp_path: Path) -> None:
    clock = Clock(DAY1 + DAY)
    log = AuditLog(tmp_path, "r1", clock=clock)
    await log.start()
    await log.write(decision(1))
    clock.t = DAY1
    await log.write(decision(2))
    await log.close()
    assert [p.name for p in (tmp_path / "r1").glob("audit-*.jsonl")] == ["audit-2025-03-02.jsonl"]
    assert verify([tmp_path]).ok


async def test_torn_tail_starts_a_new_segment_that_notes_it(tmp_path: Path) -> None:
    (path,) = await write_days(tmp_path, days=1, per_day=3)
    size = path.stat().st_size
    # A crash in the middle of writing record 4:
    path.write_bytes(path.read_bytes() + b'{"decision":"allowed","hash":"ab')
    # Before the writer restarts, the file is simply truncated: verify says so.
    assert problem(tmp_path) == ("truncated", path.name, 4)

    log = AuditLog(tmp_path, "r1", clock=Clock(DAY1 + 60))
    await log.start()
    rec = await log.write(decision(3))
    await log.close()
    segment = tmp_path / "r1" / "audit-2025-03-01.1.jsonl"
    note, after = records(segment)
    assert note["event"] == "torn_tail" and note["decision"] == "admin"
    assert (note["torn_file"], note["torn_offset"], note["torn_bytes"]) == (path.name, size, 32)
    assert note["seq"] == 4 and note["prev"] == orjson.loads(lines(path)[-2])["hash"]
    assert rec == after and rec["seq"] == 5
    result = verify([tmp_path])
    assert result.ok and result.records == 5
    assert len(result.warnings) == 1 and f"{path.name}:4: torn" in result.warnings[0]


async def test_torn_tail_of_a_whole_file_resumes_from_the_previous_file(tmp_path: Path) -> None:
    files = await write_days(tmp_path, days=1, per_day=2)
    torn = tmp_path / "r1" / "audit-2025-03-02.jsonl"
    torn.write_bytes(b'{"seq":3,"pr')
    log = AuditLog(tmp_path, "r1", clock=Clock(DAY1 + 2 * DAY))
    await log.start()
    rec = await log.write(decision(9))
    await log.close()
    assert rec["seq"] == 4 and records(files[0])[-1]["hash"] == records(
        tmp_path / "r1" / "audit-2025-03-03.jsonl")[0]["prev"]
    assert verify([tmp_path]).ok


async def test_a_corrupt_complete_last_line_refuses_to_resume(tmp_path: Path) -> None:
    (path,) = await write_days(tmp_path, days=1, per_day=2)
    path.write_bytes(path.read_bytes() + b"garbage\n")
    log = AuditLog(tmp_path, "r1")
    with pytest.raises(AuditError, match="cannot resume"):
        await log.start()
    # The lock was released: a fixed log can be opened.
    path.write_bytes(b"".join(lines(path)[:-1]))
    log = AuditLog(tmp_path, "r1")
    await log.start()
    await log.close()


async def test_one_writer_per_replica(tmp_path: Path) -> None:
    first = AuditLog(tmp_path, "r1")
    await first.start()
    with pytest.raises(AuditError, match="another process"):
        await AuditLog(tmp_path, "r1").start()
    other = AuditLog(tmp_path, "r2")
    await other.start()
    await other.close()
    await first.close()


@pytest.mark.parametrize("fsync", [False, True], ids=["loop-writer", "fsync-thread"])
async def test_write_errors_are_counted_and_the_chain_survives(tmp_path: Path, fsync: bool) -> None:
    log = AuditLog(tmp_path, "r1", clock=Clock(), fsync=fsync)
    await log.start()
    await log.write(decision(0))
    (path,) = (tmp_path / "r1").glob("audit-*.jsonl")
    size = path.stat().st_size
    # A file size limit 100 bytes past the end: the next line is written in part, then EFBIG (a full disk
    # behaves alike). The writer must cut the partial line off and not advance the chain.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
    try:
        with pytest.raises(AuditError, match="cannot write"):
            await log.write(decision(1))
        log.write_nowait(decision(2))
        with pytest.raises(AuditError):  # the queue is in order: this one also waits for the one before
            await log.write(decision(3))
        assert (path.stat().st_size, log.write_errors) == (size, 3)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with pytest.raises(TypeError):
        await log.write({"decision": "allowed", "bad": object()})
    rec = await log.write(decision(4))
    await log.close()
    assert log.write_errors == 4 and log.records_written == 2 and rec["seq"] == 2
    assert [r["seq"] for r in records(path)] == [1, 2]
    assert verify([tmp_path]).ok


@pytest.mark.parametrize("fsync", [False, True], ids=["loop-writer", "fsync-thread"])
async def test_records_that_do_not_fit_leave_whole_lines_and_an_unbroken_chain(tmp_path: Path, fsync: bool) -> None:
    """Room for two and a half more lines. The loop writer writes record by record: two go in, the third
    is cut off again, the rest fail. The fsync thread writes one loop turn's records in one write(2): if it
    fails part-way, none of them is in the file. Either way each waiting writer hears what happened and
    the chain continues from the last record that is in the file."""
    log = AuditLog(tmp_path, "r1", clock=Clock(), fsync=fsync)
    await log.start()
    await log.write(decision(0))
    (path,) = (tmp_path / "r1").glob("audit-*.jsonl")
    size = path.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + int(2.5 * size), hard))
    try:
        results = await asyncio.gather(*(log.write(decision(i)) for i in range(1, 6)), return_exceptions=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    written = [r for r in results if isinstance(r, dict)]
    assert all(isinstance(r, AuditError) for r in results[len(written):]), results
    assert len(written) == (0 if fsync else 2) and log.write_errors == 5 - len(written)
    after = await log.write(decision(6))
    await log.close()
    assert after["seq"] == 2 + len(written)
    expected = ["req-0", *(r["request_id"] for r in written), "req-6"]
    assert [r["request_id"] for r in records(path)] == expected and verify([tmp_path]).ok


async def test_write_requires_start_and_refuses_after_close(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "r1")
    with pytest.raises(AuditError, match="not started"):
        await log.write(decision(0))
    await log.start()
    await log.close()
    with pytest.raises(AuditError, match="closed"):
        log.write_nowait(decision(0))
    with pytest.raises(ValueError):
        AuditLog(tmp_path, "../x")


async def test_close_drains_queued_records(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, "r1")
    await log.start()
    for i in range(300):
        log.write_nowait(decision(i))
    await log.close()
    (path,) = (tmp_path / "r1").glob("audit-*.jsonl")
    assert len(lines(path)) == 300 and verify([tmp_path]).ok


# ------------------------------------------------------------------------------------------------ HMAC
async def test_hmac_chain_needs_the_right_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = await write_days(tmp_path, days=2, per_day=3, key=b"s3cret")
    rec = records(files[0])[0]
    assert rec["mac"] == MAC_NAME
    assert rec["hash"] == chain_hash(GENESIS, canonical(rec), b"s3cret")
    assert verify([tmp_path], hmac_key=b"s3cret").ok
    assert problem(tmp_path) == ("hmac-key-needed", files[0].name, 1)
    assert problem(tmp_path, hmac_key=b"wrong") == ("wrong-hmac-key", files[0].name, 1)
    # An edited record under the right key is "altered", not a key problem.
    raw = lines(files[1])
    raw[1] = raw[1].replace(b'"tier":"standard"', b'"tier":"premium"')
    files[1].write_bytes(b"".join(raw))
    assert problem(tmp_path, hmac_key=b"s3cret") == ("altered", files[1].name, 2)

    monkeypatch.setenv("AUDIT_KEY", "s3cret")
    assert hmac_key_from_env("AUDIT_KEY") == b"s3cret" and hmac_key_from_env(None) is None
    monkeypatch.delenv("AUDIT_KEY")
    with pytest.raises(AuditError, match="AUDIT_KEY"):
        hmac_key_from_env("AUDIT_KEY")


async def test_stripping_the_mac_is_caught(tmp_path: Path) -> None:
    (path,) = await write_days(tmp_path, days=1, per_day=3, key=b"k")
    recs = records(path)
    # Re-hash the last record without a key: a valid plain hash, but authentication was removed.
    forged = {k: v for k, v in recs[2].items() if k not in ("mac", "hash")}
    forged["hash"] = chain_hash(forged["prev"], canonical(forged))
    path.write_bytes(b"".join(lines(path)[:2]) + orjson.dumps(forged) + b"\n")
    assert problem(tmp_path, hmac_key=b"k") == ("altered", path.name, 3)


# ------------------------------------------------------------------------------------------- tampering
async def test_edited_field_is_altered(tmp_path: Path) -> None:
    files = await write_days(tmp_path)
    raw = lines(files[0])
    raw[2] = raw[2].replace(b'"status":200', b'"status":201')
    files[0].write_bytes(b"".join(raw))
    assert problem(tmp_path) == ("altered", files[0].name, 3)


async def test_deleted_line_is_missing(tmp_path: Path) -> None:
    files = await write_days(tmp_path)
    raw = lines(files[1])
    del raw[1]
    files[1].write_bytes(b"".join(raw))
    kind, name, line = problem(tmp_path)
    assert (kind, name, line) == ("missing", files[1].name, 2)
    assert "seq 7 missing" in str(verify([tmp_path]).problems[0])


async def test_swapped_lines_are_reordered(tmp_path: Path) -> None:
    files = await write_days(tmp_path)
    raw = lines(files[0])
    raw[1], raw[2] = raw[2], raw[1]
    files[0].write_bytes(b"".join(raw))
    assert problem(tmp_path) == ("reordered", files[0].name, 2)


async def test_swapped_first_lines_are_reordered(tmp_path: Path) -> None:
    files = await write_days(tmp_path, days=1)
    raw = lines(files[0])
    raw[0], raw[1] = raw[1], raw[0]
    files[0].write_bytes(b"".join(raw))
    assert problem(tmp_path) == ("reordered", files[0].name, 1)


async def test_truncated_last_line(tmp_path: Path) -> None:
    files = await write_days(tmp_path)
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 40])
    assert problem(tmp_path) == ("truncated", files[2].name, 5)
    # The same cut in a middle file, with no torn-tail note after it, is also truncation.
    files[2].write_bytes(data)
    data0 = files[0].read_bytes()
    files[0].write_bytes(data0[:-1])
    assert problem(tmp_path) == ("truncated", files[0].name, 5)


async def test_inserted_forged_line(tmp_path: Path) -> None:
    files = await write_days(tmp_path)
    raw, recs = lines(files[1]), records(files[1])
    # A careful forger: correct seq, prev and a valid sha256 over the forged content.
    forged = {**recs[1], "principal": "mallory", "request_id": "forged"}
    del forged["hash"]
    forged["seq"], forged["prev"] = recs[1]["seq"] + 1, recs[1]["hash"]
    forged["hash"] = chain_hash(forged["prev"], canonical(forged))
    raw.insert(2, orjson.dumps(forged, option=orjson.OPT_SORT_KEYS) + b"\n")
    files[1].write_bytes(b"".join(raw))
    assert problem(tmp_path) == ("inserted", files[1].name, 3)
    # A careless one (no valid hash) shows as an altered line.
    raw[2] = raw[2].replace(b"mallory", b"eve")
    files[1].write_bytes(b"".join(raw))
    assert problem(tmp_path) == ("altered", files[1].name, 3)


async def test_duplicated_line_is_inserted(tmp_path: Path) -> None:
    files = await write_days(tmp_path)
    raw = lines(files[0])
    raw.insert(4, raw[1])
    files[0].write_bytes(b"".join(raw))
    assert problem(tmp_path) == ("inserted", files[0].name, 5)


async def test_deleted_middle_file_is_missing(tmp_path: Path) -> None:
    files = await write_days(tmp_path)
    files[1].unlink()
    result = verify([tmp_path])
    assert problem(tmp_path) == ("missing", files[2].name, 1)
    assert "seqs 6..10 missing" in str(result.problems[0]) and "deleted" in str(result.problems[0])


async def test_deleted_first_file_is_missing_unless_pruning_is_allowed(tmp_path: Path) -> None:
    files = await write_days(tmp_path)
    files[0].unlink()
    assert problem(tmp_path) == ("missing", files[1].name, 1)
    assert verify([tmp_path], allow_pruned=True).ok


async def test_garbage_line_in_the_middle_is_altered(tmp_path: Path) -> None:
    files = await write_days(tmp_path)
    raw = lines(files[0])
    raw[1] = b'{"half": \n'
    files[0].write_bytes(b"".join(raw))
    assert problem(tmp_path) == ("altered", files[0].name, 2)


async def test_replaced_record_breaks_the_next_link(tmp_path: Path) -> None:
    files = await write_days(tmp_path)
    raw, recs = lines(files[0]), records(files[0])
    forged = {**recs[2], "principal": "mallory"}
    del forged["hash"]
    forged["hash"] = chain_hash(forged["prev"], canonical(forged))
    raw[2] = orjson.dumps(forged) + b"\n"
    files[0].write_bytes(b"".join(raw))
    result = verify([tmp_path])
    assert problem(tmp_path) == ("altered", files[0].name, 4)
    assert "prev does not match" in result.problems[0].detail


async def test_each_replica_is_verified_on_its_own(tmp_path: Path) -> None:
    await write_days(tmp_path, "r1", days=2, per_day=3)
    files = await write_days(tmp_path, "r2", days=2, per_day=3)
    result = verify([tmp_path])
    assert result.ok and result.records == 12 and result.replicas == 2
    # Files given one by one are grouped by their replica directory, in write order.
    assert verify(list(reversed(files))).ok
    raw = lines(files[1])
    raw[0] = raw[0].replace(b'"org":"acme"', b'"org":"evil"')
    files[1].write_bytes(b"".join(raw))
    result = verify([tmp_path])
    assert [(p.kind, Path(p.file).parent.name) for p in result.problems] == [("altered", "r2")]


# ------------------------------------------------------------------------------------------------- CLI
async def test_verify_main_ok_and_failure_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = await write_days(tmp_path, days=2, per_day=3)
    await write_days(tmp_path, "r2", days=1, per_day=2)
    assert verify_main([str(tmp_path)]) == 0
    assert capsys.readouterr().out == "ok: 8 records, 2 replicas\n"
    raw = lines(files[1])
    del raw[0]
    files[1].write_bytes(b"".join(raw))
    assert verify_main([str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{files[1]}:1: missing: seq 4 missing")
    assert out[-1].startswith("FAILED: 1 of 2 replicas")


async def test_verify_main_bad_input_is_one_line_and_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify_main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    assert verify_main(["--bogus", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert verify_main([str(tmp_path)]) == 2  # an empty directory holds no audit files
    assert "no audit files" in capsys.readouterr().err
    assert verify_main(["--hmac-key-env", "KGATE_TEST_UNSET_KEY", str(tmp_path)]) == 2
    assert "KGATE_TEST_UNSET_KEY" in capsys.readouterr().err


async def test_verify_main_takes_dir_and_key_from_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    await write_days(tmp_path / "audit", days=1, per_day=2, key=b"from-env")
    cfg = tmp_path / "kgate.yaml"
    cfg.write_text(f"audit:\n  dir: {tmp_path / 'audit'}\n  hmac_key_env: TEST_AUDIT_KEY\n")
    monkeypatch.setenv("TEST_AUDIT_KEY", "from-env")
    assert verify_main(["--config", str(cfg)]) == 0
    assert capsys.readouterr().out == "ok: 2 records, 1 replicas\n"
    assert verify_main(["--config", str(cfg), str(tmp_path / "audit")]) == 0
    capsys.readouterr()
    cfg.write_text("audit:\n  dri: x\n")
    assert verify_main(["--config", str(cfg)]) == 2
    assert "dri" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ Redis Stream sink
@pytest.fixture
def redis_sock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a unix socket (never the shared one on 6379)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not on PATH")
    d = tmp_path_factory.mktemp("redis")
    sock = d / "redis.sock"
    proc = subprocess.Popen([exe, "--port", "0", "--unixsocket", str(sock), "--save", "",
                             "--appendonly", "no", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while not sock.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("redis-server did not start")
        time.sleep(0.02)
    yield str(sock)
    proc.terminate()
    proc.wait(5)


async def test_stream_sink_mirrors_each_record(tmp_path: Path, redis_sock: str) -> None:
    client = aioredis.Redis(unix_socket_path=redis_sock)
    log = AuditLog(tmp_path, "r1", redis=client, stream="kgate:audit", stream_maxlen=1000)
    await log.start()
    written = [await log.write(decision(i)) for i in range(10)]
    for i in range(10, 20):
        log.write_nowait(decision(i))
    tagged = await log.write(decision(20, tags={"b", "a"}))  # a set: JSON has no type for it, the log does
    await log.close()
    entries: Any = await client.xrange("kgate:audit")
    await client.aclose()
    assert log.stream_written == 21 and log.stream_errors == 0 and len(entries) == 21
    fields = entries[3][1]
    assert fields[b"seq"] == b"4" and fields[b"hash"] == written[3]["hash"].encode()
    assert orjson.loads(fields[b"record"]) == written[3]
    assert orjson.loads(entries[20][1][b"record"])["tags"] == ["a", "b"] and tagged["seq"] == 21
    assert verify([tmp_path]).ok


async def test_stream_failures_are_counted_and_never_block_the_file(tmp_path: Path) -> None:
    # redis-py's default client retries with backoff: seconds per failed command.
    client = aioredis.Redis(unix_socket_path=str(tmp_path / "no-such.sock"))
    log = AuditLog(tmp_path, "r1", redis=client, stream="kgate:audit", stream_timeout=0.2)
    await log.start()
    started = time.monotonic()
    for i in range(20):
        await log.write(decision(i))
    elapsed = time.monotonic() - started
    await log.close()
    await client.aclose()
    assert elapsed < 1.0
    assert log.records_written == 20 and log.stream_errors == 20 and log.stream_written == 0
    assert verify([tmp_path]).ok


def test_file_names_are_what_operators_expect(tmp_path: Path) -> None:
    async def go() -> Path:
        log = AuditLog(tmp_path / "audit", "gw-1", clock=Clock(DAY1))
        await log.start()
        await log.write(decision(0))
        await log.close()
        return tmp_path / "audit" / "gw-1"

    d = asyncio.run(go())
    names = sorted(os.listdir(d))
    daily = [n for n in names if re.fullmatch(r"audit-\d{4}-\d{2}-\d{2}\.jsonl", n)]
    assert daily == ["audit-2025-03-01.jsonl"]


async def test_a_file_named_twice_is_read_once(tmp_path: Path) -> None:
    files = await write_days(tmp_path, days=2, per_day=2)
    result = verify([tmp_path, files[0], tmp_path / "r1" / ".." / "r1" / files[1].name])
    assert result.ok and result.records == 4
