"""The figures of an evaluation certificate, from the audit records of one run (docs/design.md §14).

Pure functions over records as the audit log holds them (dicts), so that ``kgate eval finish`` (which
writes a certificate) and ``kgate eval verify`` (which recomputes one from the log) compute every figure
the same way, and a verifier can compare them exactly after a JSON round trip.

- The figures cover the run's **request records** (admin records have no ``request_id``); the compute
  figures cover the **metered** ones: a metered decision, each request id once (:class:`Metered`, the
  ledger's rule, so a spooled request and its replay count once).
- Nothing is rounded. Sums are :func:`math.fsum` (exactly rounded, so independent of record order); means
  are that sum over the count; percentiles are nearest-rank. A figure with no values is 0, never null.
- A value that is missing or not a finite number (an older record, a denied request's ``usage: null``) is
  left out of its figure rather than counted as 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from gateway.audit.records import Metered

Record = Mapping[str, Any]
Number = int | float

# Upper bounds of the K histogram's buckets; each K is counted in the first bucket whose bound is >= K.
HISTOGRAM_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, math.inf)
INF_TEXT = "+Inf"  # JSON has no infinity
PERCENTILES = (("p50", 50), ("p90", 90), ("p99", 99))


# ------------------------------------------------------------------------------------------ selection
def request_records(records: Iterable[Record]) -> list[Record]:
    """The request records among ``records`` (an admin record's ``request_id`` is null)."""
    return [r for r in records if r.get("request_id") is not None]


def metered_records(requests: Iterable[Record]) -> list[Record]:
    """The records whose usage counts: a metered decision, each request id once (first record wins)."""
    counts = Metered()
    return [r for r in requests if counts(cast(dict[str, Any], r))]  # it only reads the record


def number(rec: Record, section: str, name: str) -> Number | None:
    """``rec[section][name]`` when it is a finite number (not a bool), else None."""
    part = rec.get(section)
    value = part.get(name) if isinstance(part, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def numbers(records: Iterable[Record], section: str, name: str) -> list[Number]:
    """Every finite ``rec[section][name]`` of ``records``."""
    return [v for r in records if (v := number(r, section, name)) is not None]


def generated_tokens(rec: Record) -> Number | None:
    """``usage.generated_tokens``, or reasoning + output tokens for records that predate it."""
    value = number(rec, "usage", "generated_tokens")
    if value is not None:
        return value
    reasoning, output = number(rec, "usage", "reasoning_tokens"), number(rec, "usage", "output_tokens")
    if reasoning is None and output is None:
        return None
    return (reasoning or 0) + (output or 0)


# ----------------------------------------------------------------------------------------- statistics
def maximum(values: Iterable[Number]) -> Number:
    """The largest value, 0 when there is none."""
    return max(values, default=0)


def total(values: Iterable[Number]) -> float:
    """The exactly rounded sum (the same whatever the order of the records)."""
    return math.fsum(values)


def mean(values: Sequence[Number]) -> float:
    """The sum over the count, 0 when there is none."""
    return math.fsum(values) / len(values) if values else 0


def percentile(ordered: Sequence[Number], pct: int) -> Number:
    """Nearest rank: the value at index ceil(pct/100 · n) - 1 of the sorted values (0 when there are none)."""
    if not ordered:
        return 0
    # ceil(pct/100 · n) in integers: exact for every n, with no float product to round the wrong way.
    rank = -(-pct * len(ordered) // 100)
    return ordered[max(rank, 1) - 1]


def histogram(values: Iterable[Number]) -> list[list[Any]]:
    """``[[upper_bound, count], ...]`` over :data:`HISTOGRAM_BOUNDS` (every bucket, empty ones too)."""
    counts = [0] * len(HISTOGRAM_BOUNDS)
    for v in values:
        counts[next(i for i, bound in enumerate(HISTOGRAM_BOUNDS) if v <= bound)] += 1
    return [[INF_TEXT if math.isinf(b) else int(b), n] for b, n in zip(HISTOGRAM_BOUNDS, counts, strict=True)]


def tally(values: Iterable[Any]) -> dict[str, int]:
    """Occurrences of each value, keyed by its text, in key order."""
    return dict(sorted(Counter(str(v) for v in values).items()))


# -------------------------------------------------------------------------------------------- sections
def run_figures(records: Iterable[Record]) -> dict[str, Any]:
    """The certificate's ``figures``: request counts and the compute of the run's metered requests."""
    requests = request_records(records)
    met = metered_records(requests)
    k = sorted(numbers(met, "usage", "k"))
    flops = numbers(met, "usage", "flops")
    reasoning = numbers(met, "usage", "reasoning_tokens")
    generated = [g for r in met if (g := generated_tokens(r)) is not None]
    return {
        "requests": {"total": len(requests), "metered": len(met),
                     "by_decision": tally(r.get("decision") for r in requests)},
        "k": {"max": maximum(k), "mean": mean(k), **{name: percentile(k, p) for name, p in PERCENTILES},
              "histogram": histogram(k)},
        "k_bound": {"max": maximum(numbers(met, "bound", "k_max"))},
        "samples": {"max": maximum(numbers(met, "usage", "samples")),
                    "bound_max": maximum(numbers(met, "bound", "samples"))},
        "reasoning_tokens": {"max": maximum(reasoning), "total": total(reasoning),
                             "bound_max": maximum(numbers(met, "bound", "reasoning_tokens_max"))},
        "output_cap": {"max": maximum(numbers(met, "bound", "output_cap"))},
        "prompt_tokens": {"total": total(numbers(met, "usage", "prompt_tokens"))},
        "generated_tokens": {"max": maximum(generated), "total": total(generated)},
        "flops": {"max": maximum(flops), "mean": mean(flops), "total": total(flops),
                  "bound_max": maximum(numbers(met, "bound", "flops_max"))},
        "usage_sources": tally(_usage(r)["source"] for r in met if isinstance(_usage(r).get("source"), str)),
        "overruns": sum(1 for r in met if _usage(r).get("overrun") is True),
    }


def model_figures(records: Iterable[Record]) -> dict[str, dict[str, Any]]:
    """The certificate's ``models``: per public model name named by a request record, the upstream model
    names it was served as and the largest compute its metered requests had and were admitted with."""
    requests = request_records(records)
    met = metered_records(requests)  # over all models: a request id counts once whatever its model
    names = sorted({m for r in requests if isinstance(m := r.get("model"), str)})
    return {name: _one_model([r for r in met if r.get("model") == name]) for name in names}


def _one_model(met: list[Record]) -> dict[str, Any]:
    flops = numbers(met, "usage", "flops")
    return {
        "upstream_models": sorted({u for r in met if isinstance(u := r.get("upstream_model"), str)}),
        "requests": len(met),
        "k_max": maximum(numbers(met, "usage", "k")),
        "k_bound_max": maximum(numbers(met, "bound", "k_max")),
        "samples_bound_max": maximum(numbers(met, "bound", "samples")),
        "reasoning_tokens_bound_max": maximum(numbers(met, "bound", "reasoning_tokens_max")),
        "output_cap_max": maximum(numbers(met, "bound", "output_cap")),
        "flops_max": maximum(flops),
        "flops_total": total(flops),
    }


def policy_hashes(records: Iterable[Record]) -> list[str]:
    """The distinct ``policy_sha256`` of the records (admin records too: the policies in force), sorted."""
    return sorted({h for r in records if isinstance(h := r.get("policy_sha256"), str)})


def sections(records: Sequence[Record]) -> dict[str, Any]:
    """The certificate's ``figures``, ``models`` and ``policy_sha256`` from the run's tagged records."""
    return {"figures": run_figures(records), "models": model_figures(records),
            "policy_sha256": policy_hashes(records)}


def _usage(rec: Record) -> Mapping[str, Any]:
    usage = rec.get("usage")
    return usage if isinstance(usage, Mapping) else {}


# -------------------------------------------------------------------------------------------- comparing
_MISSING = object()


def differences(certified: Any, recomputed: Any, path: str = "") -> list[str]:
    """One line per value that differs between two JSON documents, naming its path
    (``figures.k.max: certificate 4.0, audit log 5.0``)."""
    if isinstance(certified, dict) and isinstance(recomputed, dict):
        out: list[str] = []
        for key in sorted(set(certified) | set(recomputed), key=str):
            sub = f"{path}.{key}" if path else str(key)
            out += differences(certified.get(key, _MISSING), recomputed.get(key, _MISSING), sub)
        return out
    if (isinstance(certified, list) and isinstance(recomputed, list) and len(certified) == len(recomputed)
            and certified != recomputed):
        out = []
        for i, (a, b) in enumerate(zip(certified, recomputed, strict=True)):
            out += differences(a, b, f"{path}[{i}]")
        return out
    if _same(certified, recomputed):
        return []
    return [f"{path}: certificate {_text(certified)}, audit log {_text(recomputed)}"]


def _same(a: Any, b: Any) -> bool:
    # == alone would take True for 1; a number's int/float spelling is the same computation's either way.
    return a is not _MISSING and b is not _MISSING and isinstance(a, bool) == isinstance(b, bool) and a == b


def _text(value: Any) -> str:
    return "(missing)" if value is _MISSING else repr(value)
