"""``kgate audit verify``: walk each replica's hash chain and name the first broken record.

:func:`verify` reads each replica's files in write order (:mod:`gateway.audit.files`) and names the first
broken record by file, line and kind: ``altered`` (hash mismatch, or a line that is not a record),
``missing`` (a sequence gap), ``reordered``, ``inserted``, ``truncated`` (an incomplete line nobody noted),
``hmac-key-needed``, ``wrong-hmac-key``. A torn last line that the writer noted after a crash is a
warning, not a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.audit.chain import GENESIS, MAC_NAME, canonical, chain_hash, hmac_key_from_env
from gateway.audit.command import ArgParser, load_audit_config, run_cli
from gateway.audit.records import discover
from gateway.engine.errors import UsageError


@dataclass(frozen=True)
class Problem:
    """The first broken record of one replica's chain."""

    kind: str
    file: str
    line: int
    detail: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind}: {self.detail}"


@dataclass
class VerifyResult:
    records: int = 0
    replicas: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class _Line:
    file: Path
    lineno: int
    offset: int
    raw: bytes
    last_in_file: bool

    @property
    def where(self) -> str:
        return f"{self.file}:{self.lineno}"

    @property
    def terminated(self) -> bool:
        return self.raw.endswith(b"\n")


def _lines(files: list[Path]) -> Iterator[_Line]:
    for f in files:
        with open(f, "rb") as fh:
            pending: _Line | None = None
            offset = 0
            for lineno, raw in enumerate(fh, 1):
                if pending is not None:
                    yield pending
                pending = _Line(f, lineno, offset, raw, False)
                offset += len(raw)
            if pending is not None:
                yield _Line(f, pending.lineno, pending.offset, pending.raw, True)


class _Peekable:
    def __init__(self, it: Iterator[_Line]):
        self._it = it
        self._head: list[_Line] = []

    def __iter__(self) -> _Peekable:
        return self

    def __next__(self) -> _Line:
        return self._head.pop() if self._head else next(self._it)

    def peek(self) -> _Line | None:
        if not self._head:
            try:
                self._head.append(next(self._it))
            except StopIteration:
                return None
        return self._head[0]


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The record on a line, or None when the line is not a chained audit record."""
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(rec, dict):
        return None
    if not (isinstance(rec.get("seq"), int) and isinstance(rec.get("prev"), str)
            and isinstance(rec.get("hash"), str)):
        return None
    return rec


def _self_hash_ok(rec: dict[str, Any], key: bytes | None) -> bool:
    return chain_hash(rec["prev"], canonical(rec), key) == rec["hash"]


class _Chain:
    """Verifies one replica's files; stops at the first problem."""

    def __init__(self, files: list[Path], key: bytes | None, allow_pruned: bool, warnings: list[str]):
        self.lines = _Peekable(_lines(files))
        self.key = key
        self.allow_pruned = allow_pruned
        self.warnings = warnings
        self.records = 0

    def run(self) -> Problem | None:
        exp_seq: int | None = None
        exp_prev = GENESIS
        last: tuple[_Line, dict[str, Any]] | None = None
        seen_mac = False
        for ln in self.lines:
            if not ln.terminated:
                problem = self._torn(ln)
                if problem:
                    return problem
                continue
            rec = _parse(ln.raw)
            if rec is None:
                what = "an empty line" if not ln.raw.strip() else "not a valid audit record"
                return self._problem("altered", ln, f"{what} (the file was edited)")
            seq, prev = rec["seq"], rec["prev"]
            key: bytes | None = None
            if "mac" in rec:
                if rec["mac"] != MAC_NAME:
                    return self._problem("altered", ln, f"unknown mac {rec['mac']!r}")
                if self.key is None:
                    return self._problem("hmac-key-needed", ln, "records are authenticated with HMAC-SHA256; "
                                         "give the key with --hmac-key-env NAME or --config FILE")
                key, seen_mac = self.key, True
            elif seen_mac and self.key is not None:
                return self._problem("altered", ln, f"seq {seq} has a plain hash after HMAC records "
                                     "(authentication was stripped)")
            if not _self_hash_ok(rec, key):
                if key is not None and not self._any_verifies(ln):
                    return self._problem("wrong-hmac-key", ln, "no record of this replica verifies with the "
                                         "given HMAC key (wrong key, or every record altered)")
                return self._problem("altered", ln, f"hash mismatch at seq {seq}: the record was changed "
                                     "after it was written")
            if exp_seq is None:
                problem = self._start(ln, seq, prev)
            else:
                problem = self._link(ln, seq, prev, exp_seq, exp_prev, last)
            if problem:
                return problem
            exp_seq, exp_prev, last = seq + 1, rec["hash"], (ln, rec)
            self.records += 1
        return None

    def _problem(self, kind: str, ln: _Line, detail: str) -> Problem:
        return Problem(kind, str(ln.file), ln.lineno, detail)

    def _torn(self, ln: _Line) -> Problem | None:
        """An unterminated last line: fine when the writer's next segment notes it, else truncation."""
        nxt = self.lines.peek()
        if nxt is None:
            return self._problem("truncated", ln, f"incomplete last line ({len(ln.raw)} bytes, no newline): "
                                 "torn by a crash mid-write or cut off")
        note = _parse(nxt.raw) if nxt.lineno == 1 and nxt.file != ln.file else None
        if (note and note.get("event") == "torn_tail" and note.get("torn_file") == ln.file.name
                and note.get("torn_offset") == ln.offset):
            self.warnings.append(f"{ln.where}: torn: incomplete last line ({len(ln.raw)} bytes) left by a "
                                 f"crash mid-write; noted by the writer at {nxt.where}, the chain continues")
            return None
        return self._problem("truncated", ln, f"incomplete line ({len(ln.raw)} bytes, no newline) that the "
                             "writer did not note: the file was cut")

    def _start(self, ln: _Line, seq: int, prev: str) -> Problem | None:
        if seq == 1 and prev == GENESIS:
            return None
        if seq == 1:
            return self._problem("altered", ln, "seq 1 does not start from the genesis hash")
        if self.allow_pruned:
            return None
        later = self._find_seq(1)
        if later is not None:
            return self._problem("reordered", ln, f"the chain starts at seq {seq}; seq 1 appears later at "
                                 f"{later.where}")
        return self._problem("missing", ln, f"the chain starts at seq {seq}: records 1..{seq - 1} are "
                             "missing (older files deleted? --allow-pruned accepts a pruned start)")

    def _link(self, ln: _Line, seq: int, prev: str, exp_seq: int, exp_prev: str,
              last: tuple[_Line, dict[str, Any]] | None) -> Problem | None:
        if seq == exp_seq and prev == exp_prev:
            return None
        before = f" ({last[0].where})" if last else ""
        if seq == exp_seq:
            return self._problem("altered", ln, f"prev does not match the hash of seq {seq - 1}{before}: "
                                 "one of the two records was replaced")
        if seq > exp_seq:
            later = self._find_seq(exp_seq)
            if later is not None:
                return self._problem("reordered", ln, f"seq {seq} where seq {exp_seq} was expected; seq "
                                     f"{exp_seq} appears later at {later.where}")
            gap = f"seq {exp_seq}" if seq == exp_seq + 1 else f"seqs {exp_seq}..{seq - 1}"
            where = " (at the start of this file: a file before it may have been deleted)" \
                if ln.lineno == 1 else ""
            return self._problem("missing", ln, f"{gap} missing before this record{where}")
        if last is not None and seq == exp_seq - 1 and prev == last[1]["prev"]:
            return self._problem("inserted", last[0], f"this record (seq {seq}) is not part of the chain: "
                                 f"the next record {ln.where} chains to the one before it")
        return self._problem("inserted", ln, f"seq {seq} again where seq {exp_seq} was expected: "
                             "a duplicated or inserted record")

    def _find_seq(self, seq: int) -> _Line | None:
        for ln in self.lines:
            rec = _parse(ln.raw)
            if rec is not None and rec["seq"] == seq:
                return ln
        return None

    def _any_verifies(self, first: _Line) -> bool:
        for ln in (first, *self.lines):
            rec = _parse(ln.raw)
            if rec is not None and "mac" in rec and _self_hash_ok(rec, self.key):
                return True
        return False


def verify(paths: Iterable[str | Path], *, hmac_key: bytes | None = None,
           allow_pruned: bool = False) -> VerifyResult:
    """Verify every replica chain under ``paths``; at most one problem (the first) per replica."""
    groups = discover(paths)
    result = VerifyResult(replicas=len(groups))
    for files in groups.values():
        chain = _Chain(files, hmac_key, allow_pruned, result.warnings)
        problem = chain.run()
        result.records += chain.records
        if problem:
            result.problems.append(problem)
    return result


def _configured_key(name: str | None) -> bytes | None:
    """The key of the config's ``audit.hmac_key_env``, or None when that variable is unset: the gateway
    then writes plain sha256 chains (the key is optional), and HMAC records, if any, are reported as
    ``hmac-key-needed`` naming the variable."""
    if not name or not os.environ.get(name):
        return None
    return hmac_key_from_env(name)


def verify_main(args: list[str]) -> int:
    """``kgate audit verify PATH...``: 0 and ``ok: N records, M replicas``, or 1 naming the first break."""
    return run_cli("kgate audit verify", _verify_main, args)


def _verify_main(args: list[str]) -> int:
    p = ArgParser(prog="kgate audit verify", description="Verify the hash chains of audit log files.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="audit files or directories "
                   "(default: the configured audit dir)")
    p.add_argument("--config", help="configuration file (for audit.dir and audit.hmac_key_env)")
    p.add_argument("--hmac-key-env", metavar="NAME", help="environment variable holding the HMAC key")
    p.add_argument("--allow-pruned", action="store_true",
                   help="accept a chain whose oldest files were removed by retention")
    ns = p.parse_args(args)
    # The config is read only when it is needed: for the default PATH or for the HMAC key's variable.
    paths: list[str] = ns.paths
    key: bytes | None = hmac_key_from_env(ns.hmac_key_env)  # named on the command line: it must be set
    if not paths or (ns.config and not ns.hmac_key_env):
        audit_cfg = load_audit_config(ns.config)
        paths = paths or [audit_cfg.dir]
        if key is None:
            key = _configured_key(audit_cfg.hmac_key_env)
    result = verify(paths, hmac_key=key, allow_pruned=ns.allow_pruned)
    if result.replicas == 0:
        raise UsageError(f"no audit files (audit-YYYY-MM-DD.jsonl) under {' '.join(map(str, paths))}")
    for w in result.warnings:
        print(f"warning: {w}")
    if result.ok:
        print(f"ok: {result.records} records, {result.replicas} replicas")
        return 0
    for problem in result.problems:
        print(problem)
    print(f"FAILED: {len(result.problems)} of {result.replicas} replicas have a broken chain "
          f"({result.records} records verified before the breaks)")
    return 1
