"""Evaluation certificates: build one from the audit log, and verify one against it (docs/design.md §14).

A certificate binds a run's figures (:mod:`gateway.evals.figures`) to the audit chain they came from: per
replica, the **segment** from the first record tagged with the run (``eval``) to the last, inclusive, named
by its first ``seq`` and ``prev`` and its last ``seq`` and ``hash``. Untagged records between them belong
to it: they are chained, so the segment's last hash covers every byte from its start.

:func:`verify_certificate` checks the Ed25519 signature and, given the log, re-hashes each segment from
its first record (whose ``prev`` must be the certified one) to its last (whose hash must be the certified
one), then recomputes every figure from the tagged records inside the segments. An edited record breaks
its hash; an edit whose author recomputed all later hashes ends on another last hash; a deleted record
breaks the sequence; a tagged record outside every segment is named as not covered.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.audit.chain import MAC_NAME, canonical, chain_hash, rfc3339
from gateway.audit.records import discover
from gateway.engine.errors import UsageError
from gateway.evals import figures
from gateway.evals.signing import PublicKey, SigningError, SigningKey, parse_public_key, sign_document, verify_document

CERT_TYPE = "kgate-eval-certificate"
VERSION = 1
SEGMENT_FIELDS: dict[str, type] = {"replica": str, "first_seq": int, "first_prev": str, "last_seq": int,
                                   "last_hash": str, "records": int, "tagged": int}
KEY_NEEDED = ("the audit records are authenticated with HMAC-SHA256: give the HMAC key (the environment "
              "variable named by audit.hmac_key_env) to check them")


class CertificateError(UsageError):
    """A certificate that cannot be built or read; one line, and ``kgate`` exits with status 2."""


@dataclass
class CertificateCheck:
    """What :func:`verify_certificate` found; ``ok`` when there are no problems."""

    signed_by: str | None = None  # the key id the signature verified with
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    certificate: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems and self.signed_by is not None


# ------------------------------------------------------------------------------------ reading the chain
@dataclass(frozen=True)
class _Entry:
    where: str  # file:line
    rec: dict[str, Any] | None  # None: a complete line that is not a chained audit record


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not (isinstance(rec, dict) and isinstance(rec.get("seq"), int) and isinstance(rec.get("prev"), str)
            and isinstance(rec.get("hash"), str)):
        return None
    return rec


def _entries(files: list[Path]) -> Iterator[_Entry]:
    """Each complete line of one replica's files, in write order. A line without its newline is no record
    yet (being written by a live gateway, or torn by a crash): skipped, and a record missing from the chain
    shows as a gap in ``seq``."""
    for f in files:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if raw.endswith(b"\n"):
                    yield _Entry(f"{f}:{lineno}", _parse(raw))


def _replicas(paths: Iterable[str | Path]) -> dict[str, list[Path]]:
    """Each replica's audit files under ``paths``, keyed by the replica's directory name, sorted by it."""
    try:
        groups = discover(paths)
    except UsageError as exc:
        raise CertificateError(f"audit log: {exc}") from None
    out: dict[str, list[Path]] = {}
    for directory, files in groups.items():
        if directory.name in out:
            raise CertificateError(f"two audit directories hold replica {directory.name!r} (the certificate "
                                   "names replicas by directory name): give only one")
        out[directory.name] = files
    return dict(sorted(out.items()))


class _Links:
    """Checks consecutive records: each one's hash recomputes, and it follows the one before (seq + 1,
    ``prev`` = that one's hash). Keeps the first problem; without the HMAC key, HMAC records' hashes are
    not checked (``unkeyed`` says so), their links still are."""

    def __init__(self, key: bytes | None):
        self.key = key
        self.last: dict[str, Any] | None = None
        self.problem: str | None = None
        self.unkeyed = False
        self.records = 0

    def add(self, entry: _Entry) -> None:
        problem = self._check(entry.rec)
        if problem and self.problem is None:
            self.problem = f"{entry.where}: {problem}"
        if entry.rec is not None:
            self.last = entry.rec
        self.records += 1

    def _check(self, rec: dict[str, Any] | None) -> str | None:
        if rec is None:
            return "not an audit record (the file was edited)"
        last, seq = self.last, rec["seq"]
        if last is not None and seq != last["seq"] + 1:
            return f"seq {seq} follows seq {last['seq']}: records were deleted, inserted or reordered"
        if last is not None and rec["prev"] != last["hash"]:
            return f"the prev of seq {seq} is not the hash of seq {last['seq']}: a record was replaced"
        if last is not None and "mac" in last and "mac" not in rec:
            return f"seq {seq} has a plain hash after HMAC records (the authentication was stripped)"
        key = None
        if "mac" in rec:
            if rec["mac"] != MAC_NAME:
                return f"seq {seq}: unknown mac {rec['mac']!r}"
            if self.key is None:
                self.unkeyed = True
                return None
            key = self.key
        if chain_hash(rec["prev"], canonical(rec), key) != rec["hash"]:
            wrong_key = " (or the HMAC key is wrong)" if key is not None else ""
            return f"hash mismatch at seq {seq}: the record was changed after it was written{wrong_key}"
        return None


# ------------------------------------------------------------------------------------------- building
def segments(audit_paths: Iterable[str | Path], run_id: str,
             hmac_key: bytes | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's segment in each replica's chain that holds a record tagged with it, sorted by replica, and
    the tagged records in chain order (replica by replica). Raises :class:`CertificateError` when a
    segment's chain is broken: a certificate must not vouch for a log that does not verify."""
    found: list[dict[str, Any]] = []
    tagged: list[dict[str, Any]] = []
    for replica, files in _replicas(audit_paths).items():
        segment = _find_segment(replica, files, run_id, hmac_key, tagged)
        if segment is not None:
            found.append(segment)
    return found, tagged


def _find_segment(replica: str, files: list[Path], run_id: str, key: bytes | None,
                  tagged: list[dict[str, Any]]) -> dict[str, Any] | None:
    links = _Links(key)
    first: dict[str, Any] | None = None
    last: dict[str, Any] = {}
    records_at_last = count = 0
    problem_at_last: str | None = None
    for entry in _entries(files):
        is_tagged = entry.rec is not None and entry.rec.get("eval") == run_id
        if first is None and not is_tagged:
            continue
        links.add(entry)
        if is_tagged:
            assert entry.rec is not None
            first = first or entry.rec
            last, records_at_last, problem_at_last = entry.rec, links.records, links.problem
            tagged.append(entry.rec)
            count += 1
    if first is None:
        return None
    if problem_at_last:  # a break after the run's last record is outside the segment: not this run's concern
        raise CertificateError(f"replica {replica}: the audit chain is broken among run {run_id}'s records: "
                               f"{problem_at_last} (kgate audit verify names every break)")
    return {"replica": replica, "first_seq": first["seq"], "first_prev": first["prev"],
            "last_seq": last["seq"], "last_hash": last["hash"], "records": records_at_last, "tagged": count}


def build_certificate(run: dict[str, Any], audit_paths: list[str | Path] | list[Path], key: SigningKey, *,
                      hmac: bool, software: str, now: float | None = None,
                      hmac_key: bytes | None = None) -> dict[str, Any]:
    """The signed certificate of ``run`` (the spec's ``run`` object) from the audit log under
    ``audit_paths``: ``{"certificate": {...}, "signature": {...}}``.

    ``audit.hmac`` states what the segments' records are (HMAC-authenticated or not), whatever ``hmac`` (the
    configuration's intent) says: a configured key whose variable was unset leaves plain hashes, and a
    verifier must not be sent looking for a key nobody used. With ``hmac_key`` the records' HMACs are
    checked here too; without it only their links are.
    Raises :class:`CertificateError` when the log holds no record of the run or its chain is broken.
    """
    run_id = run.get("id")
    if not isinstance(run_id, str) or not run_id:
        raise CertificateError("the run has no id")
    found, tagged = segments(audit_paths, run_id, hmac_key)
    if not found:
        where = ", ".join(map(str, audit_paths)) or "(no path)"
        raise CertificateError(f"no audit record of run {run_id} under {where}: were its requests written to "
                               "another audit directory?")
    cert: dict[str, Any] = {
        "type": CERT_TYPE, "version": VERSION, "run": dict(run), **figures.sections(tagged),
        "audit": {"hmac": any("mac" in r for r in tagged), "segments": found},
        "issued_at": rfc3339(time.time() if now is None else now),
        "issuer": {"software": software, "key_id": key.public.key_id, "public_key": key.public.text},
    }
    return {"certificate": cert, "signature": sign_document(cert, key)}


# ------------------------------------------------------------------------------------------- reading
def load_certificate(path: str | Path) -> dict[str, Any]:
    """The signed certificate document in the file ``path``; :class:`CertificateError` in one line when it
    cannot be read, is not JSON, or is not a signed certificate."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CertificateError(f"certificate {path}: cannot read: {exc.strerror or exc}") from None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise CertificateError(f"certificate {path}: not JSON (expected a file written by kgate eval finish)") \
            from None
    if not (isinstance(doc, dict) and isinstance(doc.get("certificate"), dict)
            and isinstance(doc.get("signature"), dict)):
        raise CertificateError(f'certificate {path}: not a signed certificate (expected {{"certificate": {{...}}, '
                               '"signature": {...}})')
    kind = doc["certificate"].get("type")
    if kind != CERT_TYPE:
        raise CertificateError(f"certificate {path}: a {kind!r} document, not a {CERT_TYPE!r}")
    return doc


# ------------------------------------------------------------------------------------------ verifying
def verify_certificate(doc: Any, keys: list[PublicKey], audit_paths: list[str | Path] | list[Path] | None = None,
                       hmac_key: bytes | None = None) -> CertificateCheck:
    """Check a certificate's shape and signature against the trusted ``keys`` (none: against its own issuer
    key, with a warning) and, given the audit log, its segments and every figure. Whatever is wrong is a
    problem of the result; only audit paths that do not exist raise :class:`CertificateError`."""
    check = CertificateCheck()
    check.problems += _shape_problems(doc)
    if check.problems:
        return check
    cert = check.certificate = doc["certificate"]
    _check_signature(cert, doc["signature"], keys, check)
    if audit_paths is None:
        check.notes.append("audit log not checked (give it to recompute the figures and re-hash the segments)")
    else:
        _check_audit(cert, audit_paths, hmac_key, check)
    return check


def _shape_problems(doc: Any) -> list[str]:
    if not isinstance(doc, dict) or not isinstance(doc.get("certificate"), dict):
        return ["not a certificate document (no 'certificate' object)"]
    if not isinstance(doc.get("signature"), dict):
        return ["the certificate is not signed (no 'signature' object)"]
    cert = doc["certificate"]
    if cert.get("type") != CERT_TYPE:
        return [f"type {cert.get('type')!r} is not {CERT_TYPE!r}"]
    if cert.get("version") != VERSION:
        return [f"certificate version {cert.get('version')!r} is not one this kgate reads ({VERSION})"]
    wanted = {"run": dict, "figures": dict, "models": dict, "policy_sha256": list, "audit": dict, "issuer": dict}
    problems = [f"'{k}' is missing or not a {t.__name__}" for k, t in wanted.items() if not isinstance(cert.get(k), t)]
    if problems:
        return problems
    if not isinstance(cert["run"].get("id"), str):
        problems.append("run.id is missing")
    if not isinstance(cert["issuer"].get("public_key"), str):
        problems.append("issuer.public_key is missing")
    return problems + _segment_shape_problems(cert["audit"])


def _segment_shape_problems(audit: dict[str, Any]) -> list[str]:
    segs = audit.get("segments")
    if not isinstance(audit.get("hmac"), bool) or not isinstance(segs, list):
        return ["audit.hmac or audit.segments is missing"]
    problems: list[str] = []
    for i, seg in enumerate(segs):
        bad = [k for k, t in SEGMENT_FIELDS.items() if not isinstance(seg, dict) or not _is(seg.get(k), t)]
        if bad:
            problems.append(f"audit.segments[{i}]: {', '.join(bad)} missing or of the wrong type")
    names = [s.get("replica") for s in segs if isinstance(s, dict)]
    if len(set(names)) != len(names):
        problems.append("audit.segments names a replica twice")
    return problems


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _check_signature(cert: dict[str, Any], signature: Any, keys: list[PublicKey], check: CertificateCheck) -> None:
    if not keys:
        try:
            keys = [parse_public_key(cert["issuer"]["public_key"], "issuer.public_key")]
        except SigningError as exc:
            check.problems.append(f"signature: {exc}")
            return
        check.warnings.append("no trusted public key given: the signature was checked with the certificate's own "
                              "issuer key, which proves the certificate is intact, not who signed it")
    try:
        check.signed_by = verify_document(cert, signature, keys).key_id
    except SigningError as exc:
        check.problems.append(f"signature: {exc}")


def _check_audit(cert: dict[str, Any], paths: list[str | Path] | list[Path], key: bytes | None,
                 check: CertificateCheck) -> None:
    """Re-hash each certified segment, look for tagged records outside them, and recompute the figures."""
    run_id = cert["run"]["id"]
    replicas = _replicas(paths)
    certified = {s["replica"]: s for s in cert["audit"]["segments"]}
    tagged: list[dict[str, Any]] = []
    unkeyed = cert["audit"]["hmac"] and key is None
    for name in sorted(set(certified) - set(replicas)):
        check.problems.append(f"replica {name}: no audit files of this replica under {', '.join(map(str, paths))}")
    # Requests the certificate says were still in flight when it was issued: their late records are expected.
    late = set(cert["run"].get("uncovered_in_flight") or ())
    for name, files in replicas.items():
        unkeyed |= _check_replica(name, files, certified.get(name), run_id, key, tagged, check, late)
    if unkeyed:
        check.problems.append(KEY_NEEDED)
    recomputed = orjson.loads(orjson.dumps(figures.sections(tagged)))  # as the certificate went through JSON
    check.problems += figures.differences({k: cert.get(k) for k in recomputed}, recomputed)
    records = sum(s["records"] for s in certified.values())
    check.notes.append(f"audit: {len(certified)} segment(s), {records} records re-hashed, "
                       f"{len(tagged)} tagged records, figures recomputed")


def _check_replica(name: str, files: list[Path], seg: dict[str, Any] | None, run_id: str, key: bytes | None,
                   tagged: list[dict[str, Any]], check: CertificateCheck, late: set[str]) -> bool:
    """Check one replica's chain against its segment; returns whether HMAC records went unchecked for want
    of the key."""
    walk = _SegmentWalk(seg, run_id, key, late)
    for entry in _entries(files):
        walk.add(entry)
    check.problems += [f"replica {name}: {p}" for p in walk.finish()]
    if walk.late:
        check.warnings.append(f"replica {name}: {len(walk.late)} record(s) of requests the certificate lists as "
                              f"in flight when it was issued (uncovered_in_flight) came later (first at "
                              f"{walk.late[0]}); their compute is not in the figures")
    tagged += walk.tagged
    return walk.links.unkeyed


class _SegmentWalk:
    """One replica's chain read against its certified segment (None: the certificate names none here):
    before it, inside it (every record re-hashed and linked), after it."""

    def __init__(self, seg: dict[str, Any] | None, run_id: str, key: bytes | None,
                 late: frozenset[str] | set[str] = frozenset()):
        self.seg = seg or {}
        self.expected_late = late
        self.late: list[str] = []
        self.run_id = run_id
        self.links = _Links(key)
        self.state = "before" if seg is not None else "after"
        self.problems: list[str] = []
        self.tagged: list[dict[str, Any]] = []
        self.uncovered: list[str] = []

    def add(self, entry: _Entry) -> None:
        rec = entry.rec
        if self.state == "before" and rec is not None and rec["seq"] >= self.seg["first_seq"]:
            self.state = "inside"
            self._start(entry.where, rec)
        is_tagged = rec is not None and rec.get("eval") == self.run_id
        if self.state != "inside":
            if is_tagged and self.state == "after" and rec is not None and rec.get("request_id") in self.expected_late:
                self.late.append(entry.where)
            elif is_tagged:
                self.uncovered.append(entry.where)
            return
        self.links.add(entry)
        if rec is not None and is_tagged:
            self.tagged.append(rec)
        if rec is not None and rec["seq"] >= self.seg["last_seq"]:
            self.state = "after"
            self._end(entry.where, rec)

    def _start(self, where: str, rec: dict[str, Any]) -> None:
        first = self.seg["first_seq"]
        if rec["seq"] != first:
            self.problems.append(f"the segment's first record (seq {first}) is missing: the chain goes on with "
                                 f"seq {rec['seq']} at {where}")
        elif rec["prev"] != self.seg["first_prev"]:
            self.problems.append(f"{where}: the prev of seq {first} is not the certificate's first_prev: the "
                                 "chain before the segment was rewritten")

    def _end(self, where: str, rec: dict[str, Any]) -> None:
        last = self.seg["last_seq"]
        if rec["seq"] != last:
            self.problems.append(f"the segment's last record (seq {last}) is missing: the chain goes on with "
                                 f"seq {rec['seq']} at {where}")
        elif rec["hash"] != self.seg["last_hash"]:
            self.problems.append(f"{where}: the hash of seq {last} is not the certificate's last_hash: records "
                                 "of the segment were changed and the chain re-hashed after them")

    def finish(self) -> list[str]:
        """The problems found, first the chain's own."""
        seg, out = self.seg, [self.links.problem] if self.links.problem else []
        if self.state == "before":
            out.append(f"the certified segment (seq {seg['first_seq']}..{seg['last_seq']}) is not in this "
                       "replica's chain: it ends before it")
        elif self.state == "inside":
            out.append(f"the chain ends inside the certified segment, before seq {seg['last_seq']}: records "
                       "were deleted")
        out += self.problems
        if seg and self.links.records != seg["records"]:
            out.append(f"the segment holds {self.links.records} records, the certificate says {seg['records']}")
        if seg and len(self.tagged) != seg["tagged"]:
            out.append(f"the segment holds {len(self.tagged)} records tagged with the run, the certificate says "
                       f"{seg['tagged']}")
        if self.uncovered:
            out.append(f"{len(self.uncovered)} record(s) tagged with run {self.run_id} are not covered by the "
                       f"certificate (first at {self.uncovered[0]})")
        return out


# ------------------------------------------------------------------------------------------ reporting
def format_check(check: CertificateCheck) -> str:
    """The result as lines for a terminal: an OK summary of the certified figures, or the problems."""
    cert = check.certificate or {}
    run = cert.get("run") or {}
    fig = cert.get("figures") or {}
    name = f"run {run.get('id', '?')} ({run.get('label', '')!r})" if run else "certificate"
    lines: list[str] = []
    if check.ok:
        req, k, flops = fig.get("requests") or {}, fig.get("k") or {}, fig.get("flops") or {}
        segs = (cert.get("audit") or {}).get("segments") or []
        lines.append(f"OK: {name}, signed by key {check.signed_by}")
        lines.append(f"  requests {req.get('total')} ({req.get('metered')} metered), K max {_g(k.get('max'))}, "
                     f"FLOPs total {_g(flops.get('total'))}, {len(segs)} audit segment(s)")
    else:
        lines.append(f"FAILED: {name}: {len(check.problems)} problem(s)")
        lines += [f"  problem: {p}" for p in check.problems]
    lines += [f"  warning: {w}" for w in check.warnings]
    lines += [f"  note: {n}" for n in check.notes]
    return "\n".join(lines)


def _g(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
