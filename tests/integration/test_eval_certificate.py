"""Evaluation certificates against audit logs written by the real writer: build, sign, verify, and tamper
with the log and the certificate (gateway.evals.certificate). No Redis."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.audit.chain import canonical, chain_hash
from gateway.audit.log import AuditLog
from gateway.evals.certificate import (
    KEY_NEEDED,
    CertificateError,
    build_certificate,
    format_check,
    load_certificate,
    segments,
    verify_certificate,
)
from gateway.evals.signing import SigningKey, generate, sign_document

RUN = "ev_00112233aabbccdd"
OTHER_RUN = "ev_ffffffffffffffff"
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC).timestamp()
HMAC_KEY = b"audit-hmac-secret"
RUN_DOC = {"id": RUN, "label": "cyber-uplift v3", "principal": "evals", "key_id": None, "models": ["m1", "m2"],
           "started_at": "2025-03-01T09:00:00.000Z", "finished_at": "2025-03-01T09:10:00.000Z",
           "started_by": "ops", "finished_by": "ops"}


def request(rid: str, k: float, *, model: str = "m1", decision: str = "allowed", tag: str | None = RUN,
            flops: float = 1e12) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "request_id": rid, "principal": "evals" if tag else "someone", "model": model,
        "upstream_model": f"up-{model}", "decision": decision, "policy_sha256": "pol1",
        "bound": {"samples": 1, "prompt_tokens": 100, "output_cap": 512, "reasoning_budget": 1024,
                  "generated_tokens_max": 1536, "output_tokens_max": 512, "reasoning_tokens_max": 1024,
                  "k_max": 2 * k, "flops_max": 2 * flops},
        "usage": None if decision == "denied" else {
            "samples": 1, "prompt_tokens": 100, "reasoning_tokens": 300, "output_tokens": 80,
            "generated_tokens": 380, "k": k, "flops": flops, "source": "upstream", "overrun": False},
    }
    if tag:
        rec["eval"] = tag
    return rec


def admin(reason: str) -> dict[str, Any]:
    return {"request_id": None, "decision": "admin", "reason": reason, "eval": RUN, "policy_sha256": "pol1"}


# Each replica's records in write order: untagged traffic before, between and after the run's.
R1 = [request("u1", 1.0, tag=None), admin("eval.start"), request("a1", 2.0), request("u2", 9.0, tag=None),
      request("a2", 4.0, model="m2"), request("a3", 30.0, decision="denied"), request("u3", 1.0, tag=None)]
R2 = [request("u4", 50.0, tag=None), request("b1", 3.0), request("u5", 1.0, tag=None), request("b2", 1.5),
      admin("eval.finish"), request("u6", 7.0, tag=None)]


async def write(audit: Path, replica: str, records: list[dict[str, Any]], key: bytes | None = None) -> None:
    """Append ``records`` to a replica's chain with the real writer (continuing it when it exists)."""
    log = AuditLog(audit, replica, hmac_key=key, clock=lambda: T0 + 60)
    await log.start()
    for rec in records:
        await log.write(rec)
    await log.close()


@pytest.fixture
def key() -> SigningKey:
    return generate()


@pytest.fixture(params=[None, HMAC_KEY], ids=["sha256", "hmac"])
async def audit(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    await write(tmp_path / "audit", "r1", R1, request.param)
    await write(tmp_path / "audit", "r2", R2, request.param)
    return tmp_path / "audit"


def hmac_of(audit: Path) -> bytes | None:
    return HMAC_KEY if "mac" in lines(audit, "r1")[0] else None


def certify(audit: Path, key: SigningKey, tmp_path: Path) -> dict[str, Any]:
    """Build and sign, write the file as ``kgate eval finish`` does, and read it back."""
    doc = build_certificate(RUN_DOC, [audit], key, hmac=hmac_of(audit) is not None, software="kgate test",
                            now=T0 + 700, hmac_key=hmac_of(audit))
    path = tmp_path / "cert.json"
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    return load_certificate(path)


def verify(doc: dict[str, Any], key: SigningKey, audit: Path) -> Any:
    return verify_certificate(doc, [key.public], [audit], hmac_of(audit))


def lines(audit: Path, replica: str) -> list[dict[str, Any]]:
    (path,) = (audit / replica).glob("audit-*.jsonl")
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def rewrite(audit: Path, replica: str, recs: list[dict[str, Any]]) -> None:
    (path,) = (audit / replica).glob("audit-*.jsonl")
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))


def rehash(recs: list[dict[str, Any]], start: int, key: bytes | None) -> None:
    """Recompute the chain from ``recs[start]`` on, as someone holding ``key`` could."""
    for i in range(start, len(recs)):
        if i > 0:
            recs[i]["prev"] = recs[i - 1]["hash"]
        recs[i]["hash"] = chain_hash(recs[i]["prev"], canonical(recs[i]), key)


# ---------------------------------------------------------------------------------------------- building
async def test_certificate_verifies_against_its_log(audit: Path, key: SigningKey, tmp_path: Path) -> None:
    doc = certify(audit, key, tmp_path)
    cert = doc["certificate"]
    segs = {s["replica"]: s for s in cert["audit"]["segments"]}
    r1, r2 = lines(audit, "r1"), lines(audit, "r2")
    # r1's segment runs from eval.start (seq 2) to the denied request (seq 6); r2's from b1 to eval.finish.
    assert segs["r1"] == {"replica": "r1", "first_seq": 2, "first_prev": r1[0]["hash"], "last_seq": 6,
                          "last_hash": r1[5]["hash"], "records": 5, "tagged": 4}
    assert segs["r2"] == {"replica": "r2", "first_seq": 2, "first_prev": r2[0]["hash"], "last_seq": 5,
                          "last_hash": r2[4]["hash"], "records": 4, "tagged": 3}
    assert cert["audit"]["hmac"] is (hmac_of(audit) is not None)
    fig = cert["figures"]
    assert fig["requests"] == {"total": 5, "metered": 4, "by_decision": {"allowed": 4, "denied": 1}}
    assert fig["k"]["max"] == 4.0 and fig["k_bound"]["max"] == 8.0  # untagged K 50 and the denied 30: not counted
    assert cert["models"]["m2"]["upstream_models"] == ["up-m2"]
    assert cert["policy_sha256"] == ["pol1"]
    assert cert["issuer"] == {"software": "kgate test", "key_id": key.public.key_id, "public_key": key.public.text}

    check = verify(doc, key, audit)
    assert check.ok, check.problems
    assert check.signed_by == key.public.key_id and check.warnings == []
    text = format_check(check)
    assert text.startswith(f"OK: run {RUN} ('cyber-uplift v3'), signed by key {key.public.key_id}")
    assert "requests 5 (4 metered), K max 4, FLOPs total 4e+12, 2 audit segment(s)" in text


async def test_no_record_of_the_run_is_an_error(audit: Path, key: SigningKey) -> None:
    with pytest.raises(CertificateError, match=f"no audit record of run {OTHER_RUN}"):
        build_certificate({**RUN_DOC, "id": OTHER_RUN}, [audit], key, hmac=False, software="kgate test")
    with pytest.raises(CertificateError, match="no such file or directory"):
        build_certificate(RUN_DOC, [audit / "nowhere"], key, hmac=False, software="kgate test")


async def test_a_broken_chain_is_not_certified(audit: Path, key: SigningKey) -> None:
    recs = lines(audit, "r1")
    recs[3]["usage"]["k"] = 0.5
    rewrite(audit, "r1", recs)
    with pytest.raises(CertificateError, match=r"replica r1: the audit chain is broken .* seq 4"):
        build_certificate(RUN_DOC, [audit], key, hmac=False, software="kgate test", hmac_key=hmac_of(audit))


async def test_a_break_after_the_segment_is_not_the_runs_concern(audit: Path) -> None:
    recs = lines(audit, "r2")
    recs[-1]["usage"]["k"] = 0.5  # u6, after eval.finish
    rewrite(audit, "r2", recs)
    segs, tagged = segments([audit], RUN, hmac_of(audit))
    assert [s["replica"] for s in segs] == ["r1", "r2"]
    assert [r.get("request_id") or r["reason"] for r in tagged] == [
        "eval.start", "a1", "a2", "a3", "b1", "b2", "eval.finish"]


# --------------------------------------------------------------------------------------- tampering: log
async def test_edited_record_is_detected(audit: Path, key: SigningKey, tmp_path: Path) -> None:
    doc = certify(audit, key, tmp_path)
    recs = lines(audit, "r1")
    recs[4]["usage"]["k"] = 5.0  # a2: 4.0 -> 5.0, its hash left as it was
    rewrite(audit, "r1", recs)
    check = verify(doc, key, audit)
    assert not check.ok
    assert any("replica r1:" in p and "hash mismatch at seq 5" in p for p in check.problems), check.problems
    assert "figures.k.max: certificate 4.0, audit log 5.0" in check.problems


async def test_edit_with_the_chain_rehashed_is_detected(audit: Path, key: SigningKey, tmp_path: Path) -> None:
    doc = certify(audit, key, tmp_path)
    recs = lines(audit, "r1")
    recs[2]["usage"]["k"] = 1.0  # a1: 2.0 -> 1.0, then every later hash recomputed, as one with the key could
    rehash(recs, 2, hmac_of(audit))
    rewrite(audit, "r1", recs)
    check = verify(doc, key, audit)
    assert not any("hash mismatch" in p or "follows" in p for p in check.problems)  # the chain itself holds
    assert any(p.startswith("replica r1: ") and "not the certificate's last_hash" in p for p in check.problems)
    assert "figures.k.mean: certificate 2.625, audit log 2.375" in check.problems


async def test_deleted_record_is_detected(audit: Path, key: SigningKey, tmp_path: Path) -> None:
    doc = certify(audit, key, tmp_path)
    recs = lines(audit, "r2")
    del recs[2]  # u5: an untagged record inside the segment; no figure changes, the chain does
    rewrite(audit, "r2", recs)
    check = verify(doc, key, audit)
    assert not check.ok
    assert any("replica r2:" in p and "seq 4 follows seq 2" in p for p in check.problems), check.problems
    assert "replica r2: the segment holds 3 records, the certificate says 4" in check.problems
    assert not any(p.startswith("figures.") for p in check.problems)


async def test_deleted_last_record_is_detected(audit: Path, key: SigningKey, tmp_path: Path) -> None:
    doc = certify(audit, key, tmp_path)
    rewrite(audit, "r2", lines(audit, "r2")[:4])  # eval.finish and everything after it gone
    check = verify(doc, key, audit)
    assert "replica r2: the chain ends inside the certified segment, before seq 5: records were deleted" \
        in check.problems


async def test_tagged_record_after_the_segment_is_not_covered(audit: Path, key: SigningKey,
                                                               tmp_path: Path) -> None:
    doc = certify(audit, key, tmp_path)
    await write(audit, "r1", [request("late", 100.0)], hmac_of(audit))
    await write(audit, "r3", [request("r3-only", 2.0)], hmac_of(audit))  # a replica the certificate never saw
    check = verify(doc, key, audit)
    uncovered = [p for p in check.problems if "not covered by the certificate" in p]
    assert len(uncovered) == 2, check.problems
    assert uncovered[0].startswith(f"replica r1: 1 record(s) tagged with run {RUN} are not covered")
    assert uncovered[1].startswith("replica r3: ")
    # The chain is intact and the figures come from the segments only: nothing else is wrong.
    assert len(check.problems) == 2


async def test_rewritten_chain_before_the_segment_is_detected(audit: Path, key: SigningKey,
                                                              tmp_path: Path) -> None:
    doc = certify(audit, key, tmp_path)
    recs = lines(audit, "r2")
    recs[0]["usage"]["k"] = 1.0  # u4, before the segment; the whole chain re-hashed after it
    rehash(recs, 0, hmac_of(audit))
    rewrite(audit, "r2", recs)
    problems = verify(doc, key, audit).problems
    assert any("not the certificate's first_prev" in p for p in problems), problems


# ------------------------------------------------------------------------------- tampering: certificate
async def test_changed_figure_breaks_the_signature(audit: Path, key: SigningKey, tmp_path: Path) -> None:
    doc = certify(audit, key, tmp_path)
    doc["certificate"]["figures"]["k"]["max"] = 1.0
    check = verify(doc, key, audit)
    assert not check.ok and check.signed_by is None
    assert any(p.startswith("signature: the signature does not match") for p in check.problems)
    assert "figures.k.max: certificate 1.0, audit log 4.0" in check.problems
    assert format_check(check).startswith(f"FAILED: run {RUN} ('cyber-uplift v3'): 2 problem(s)")


async def test_resigned_with_another_key_is_untrusted(audit: Path, key: SigningKey, tmp_path: Path) -> None:
    doc = certify(audit, key, tmp_path)
    forger = generate()
    cert = doc["certificate"]
    cert["models"]["m1"]["k_bound_max"] = 64.0
    cert["issuer"] = {**cert["issuer"], "key_id": forger.public.key_id, "public_key": forger.public.text}
    doc["signature"] = sign_document(cert, forger)
    check = verify(doc, key, audit)
    assert any(f"signed by key '{forger.public.key_id}', which is none of the 1 trusted key(s)" in p
               for p in check.problems), check.problems
    assert "models.m1.k_bound_max: certificate 64.0, audit log 6.0" in check.problems
    # Without trusted keys the forgery is intact (integrity only), and the verifier is told so.
    alone = verify_certificate(doc, [], None)
    assert alone.ok and alone.signed_by == forger.public.key_id
    assert any("proves the certificate is intact, not who signed it" in w for w in alone.warnings)


async def test_without_the_log_only_the_signature_is_checked(audit: Path, key: SigningKey,
                                                             tmp_path: Path) -> None:
    doc = certify(audit, key, tmp_path)
    check = verify_certificate(doc, [key.public])
    assert check.ok and any("audit log not checked" in n for n in check.notes)
    doc["certificate"]["version"] = 2
    assert verify_certificate(doc, [key.public]).problems == ["certificate version 2 is not one this kgate reads (1)"]
    doc["certificate"]["version"] = 1
    doc["certificate"]["audit"]["segments"][0]["last_seq"] = "6"
    problems = verify_certificate(doc, [key.public]).problems
    assert problems == ["audit.segments[0]: last_seq missing or of the wrong type"]


# -------------------------------------------------------------------------------------------------- HMAC
async def test_hmac_log_needs_its_key(tmp_path: Path, key: SigningKey) -> None:
    audit = tmp_path / "audit"
    await write(audit, "r1", R1, HMAC_KEY)
    await write(audit, "r2", R2, HMAC_KEY)
    doc = certify(audit, key, tmp_path)
    assert doc["certificate"]["audit"]["hmac"] is True
    # Built without the key (links checked, HMACs not), the certificate is the same: it is deterministic.
    again = build_certificate(RUN_DOC, [audit], key, hmac=True, software="kgate test", now=T0 + 700)
    assert again["certificate"] == doc["certificate"]
    assert verify_certificate(doc, [key.public], [audit], HMAC_KEY).ok
    assert KEY_NEEDED in verify_certificate(doc, [key.public], [audit], None).problems
    wrong = verify_certificate(doc, [key.public], [audit], b"not the key").problems
    assert any("hash mismatch" in p and "the HMAC key is wrong" in p for p in wrong), wrong


async def test_hmac_stripped_and_rehashed_is_detected(tmp_path: Path, key: SigningKey) -> None:
    audit = tmp_path / "audit"
    await write(audit, "r1", R1, HMAC_KEY)
    doc = certify(audit, key, tmp_path)
    recs = lines(audit, "r1")
    for rec in recs[3:]:  # without the key: plain sha256 from seq 4 on
        rec.pop("mac")
    rehash(recs, 3, None)
    rewrite(audit, "r1", recs)
    problems = verify_certificate(doc, [key.public], [audit], HMAC_KEY).problems
    assert any("plain hash after HMAC records" in p for p in problems), problems
    assert any("not the certificate's last_hash" in p for p in problems), problems


# ------------------------------------------------------------------------------------------- reading
def test_load_certificate_errors(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="cannot read"):
        load_certificate(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CertificateError, match="not JSON"):
        load_certificate(tmp_path / "bad.json")
    (tmp_path / "shape.json").write_text('{"certificate": {}}')
    with pytest.raises(CertificateError, match="not a signed certificate"):
        load_certificate(tmp_path / "shape.json")
    (tmp_path / "other.json").write_text('{"certificate": {"type": "x"}, "signature": {}}')
    with pytest.raises(CertificateError, match="a 'x' document"):
        load_certificate(tmp_path / "other.json")
