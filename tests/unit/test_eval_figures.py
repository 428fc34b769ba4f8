"""The figures of an evaluation certificate (gateway.evals.figures), from hand-made audit records."""

from __future__ import annotations

import math
from typing import Any

import orjson

from gateway.evals import figures
from gateway.evals.figures import differences, model_figures, percentile, run_figures, sections

RUN = "ev_0123456789abcdef"


def request(rid: str, k: float = 1.0, *, decision: str = "allowed", model: str = "m1", upstream: str = "up-m1",
            flops: float = 1e12, k_bound: float | None = None, samples: int = 1, reasoning: int = 100,
            output: int = 50, prompt: int = 200, source: str = "upstream", overrun: bool = False,
            policy: str = "p1") -> dict[str, Any]:
    metered = decision not in ("denied", "failed")
    return {
        "request_id": rid, "model": model, "upstream_model": upstream, "decision": decision, "eval": RUN,
        "policy_sha256": policy,
        "bound": {"samples": samples, "prompt_tokens": prompt, "output_cap": 1000 * samples,
                  "reasoning_budget": 2000, "generated_tokens_max": 3000, "output_tokens_max": 1000,
                  "reasoning_tokens_max": 2000 * samples, "k_max": k_bound if k_bound is not None else 2 * k,
                  "flops_max": 2 * flops},
        "usage": {"samples": samples, "prompt_tokens": prompt, "reasoning_tokens": reasoning,
                  "output_tokens": output, "generated_tokens": reasoning + output, "k": k, "flops": flops,
                  "source": source, "overrun": overrun} if metered else None,
    }


def admin(reason: str, policy: str = "p1") -> dict[str, Any]:
    return {"request_id": None, "decision": "admin", "reason": reason, "eval": RUN, "policy_sha256": policy}


def test_percentiles_are_nearest_rank() -> None:
    ks = [float(i) for i in range(10, 0, -1)]  # given out of order: the figures sort them
    f = run_figures([request(f"r{i}", k) for i, k in enumerate(ks)])["k"]
    assert (f["p50"], f["p90"], f["p99"], f["max"]) == (5.0, 9.0, 10.0, 10.0)
    assert f["mean"] == 5.5
    # Nearest rank, not interpolation: the 27th of 30 values, the 1st of 1.
    assert percentile(list(range(1, 31)), 90) == 27
    assert percentile([7], 50) == 7 and percentile([7], 99) == 7
    assert percentile([], 50) == 0


def test_histogram_counts_each_k_in_its_first_bucket() -> None:
    recs = [request(f"r{i}", k) for i, k in enumerate([0.5, 1.0, 1.5, 3.0, 4.0, 1024.0, 2000.0])]
    hist = dict((str(b), n) for b, n in run_figures(recs)["k"]["histogram"])
    assert list(hist) == ["1", "2", "4", "8", "16", "32", "64", "128", "256", "512", "1024", "+Inf"]
    assert hist == {"1": 2, "2": 1, "4": 2, "8": 0, "16": 0, "32": 0, "64": 0, "128": 0, "256": 0, "512": 0,
                    "1024": 1, "+Inf": 1}


def test_each_request_id_is_metered_once() -> None:
    recs = [request("a", 3.0, decision="spooled", flops=5e12), request("a", 3.0, decision="replayed", flops=5e12),
            request("b", 1.0, flops=1e12)]
    f = run_figures(recs)
    assert f["requests"] == {"total": 3, "metered": 2, "by_decision": {"allowed": 1, "replayed": 1, "spooled": 1}}
    assert f["flops"]["total"] == 6e12
    assert f["generated_tokens"]["total"] == 300.0
    assert model_figures(recs)["m1"]["requests"] == 2


def test_denied_requests_are_counted_but_not_metered() -> None:
    recs = [request("a", 2.0, k_bound=4.0), request("d", 50.0, decision="denied", k_bound=64.0),
            request("f", 9.0, decision="failed", k_bound=32.0)]
    f = run_figures(recs)
    assert f["requests"]["total"] == 3 and f["requests"]["metered"] == 1
    assert f["requests"]["by_decision"] == {"allowed": 1, "denied": 1, "failed": 1}
    # A refused request's admission bound is not compute the run was served under.
    assert f["k_bound"]["max"] == 4.0
    assert f["k"]["max"] == 2.0


def test_compute_figures_of_metered_requests() -> None:
    recs = [request("a", 2.0, samples=4, reasoning=800, flops=3e12, source="upstream", overrun=True),
            request("b", 8.0, samples=1, reasoning=100, flops=1e12, source="estimated"),
            admin("eval.start")]
    f = run_figures(recs)
    assert f["samples"] == {"max": 4, "bound_max": 4}
    assert f["reasoning_tokens"] == {"max": 800, "total": 900.0, "bound_max": 8000}
    assert f["output_cap"] == {"max": 4000}
    assert f["prompt_tokens"] == {"total": 400.0}
    assert f["generated_tokens"] == {"max": 850, "total": 1000.0}
    assert f["flops"] == {"max": 3e12, "mean": 2e12, "total": 4e12, "bound_max": 6e12}
    assert f["usage_sources"] == {"estimated": 1, "upstream": 1}
    assert f["overruns"] == 1
    assert f["requests"]["total"] == 2  # the admin record is no request


def test_sums_are_exact() -> None:
    recs = [request(f"r{i}", 1.0, flops=0.1) for i in range(10)]
    assert sum([0.1] * 10) != 1.0
    assert run_figures(recs)["flops"]["total"] == 1.0
    assert model_figures(recs)["m1"]["flops_total"] == 1.0


def test_models_with_their_upstream_models() -> None:
    recs = [request("a", 2.0, upstream="up-b", k_bound=3.0, flops=2e12),
            request("b", 6.0, upstream="up-a", k_bound=8.0, samples=2, flops=5e12),
            request("c", 1.0, model="m2", decision="denied", upstream="up-m2"),
            request("d", 1.0, upstream="up-c", decision="failed")]
    models = model_figures(recs)
    assert sorted(models) == ["m1", "m2"]
    assert models["m1"] == {"upstream_models": ["up-a", "up-b"], "requests": 2, "k_max": 6.0, "k_bound_max": 8.0,
                            "samples_bound_max": 2, "reasoning_tokens_bound_max": 4000, "output_cap_max": 2000,
                            "flops_max": 5e12, "flops_total": 7e12}
    # Named by a refused request only: listed, with nothing served (a policy cannot bind to it).
    assert models["m2"]["requests"] == 0 and models["m2"]["upstream_models"] == []
    assert models["m2"]["k_bound_max"] == 0


def test_empty_run_is_all_zeros_never_null() -> None:
    out = sections([admin("eval.start", "p1"), admin("eval.finish", "p2")])
    f = out["figures"]
    assert f["requests"] == {"total": 0, "metered": 0, "by_decision": {}}
    assert {k: v for k, v in f["k"].items() if k != "histogram"} == {"max": 0, "mean": 0, "p50": 0, "p90": 0,
                                                                     "p99": 0}
    assert all(n == 0 for _, n in f["k"]["histogram"])
    assert f["flops"] == {"max": 0, "mean": 0, "total": 0.0, "bound_max": 0}
    assert f["usage_sources"] == {} and f["overruns"] == 0
    assert out["models"] == {}
    assert out["policy_sha256"] == ["p1", "p2"]

    def nulls(v: Any) -> bool:
        return v is None or (isinstance(v, dict) and any(map(nulls, v.values()))) or (
            isinstance(v, list) and any(map(nulls, v)))

    assert not nulls(out)


def test_missing_or_non_finite_values_are_left_out() -> None:
    a, b = request("a", 2.0), request("b", 4.0)
    b["usage"]["k"] = math.nan
    b["usage"]["flops"] = True  # a bool is no number
    del b["usage"]["generated_tokens"]
    f = run_figures([a, b])
    assert f["k"]["max"] == 2.0 and f["k"]["mean"] == 2.0
    assert f["flops"]["total"] == 1e12
    assert f["generated_tokens"]["total"] == 300.0  # reasoning + output when generated_tokens is absent


def test_round_trip_through_json_compares_equal() -> None:
    recs = [request(f"r{i}", k, flops=k * 1.1e12) for i, k in enumerate([0.3, 1.7, 2.9, 12.25, 3000.5])]
    computed = sections(recs)
    assert differences(orjson.loads(orjson.dumps(computed)), sections(recs)) == []


def test_differences_name_each_path() -> None:
    recs = [request("a", 4.0), request("b", 2.0)]
    certified = orjson.loads(orjson.dumps(sections(recs)))
    certified["figures"]["k"]["max"] = 5.0
    certified["figures"]["k"]["histogram"][2][1] = 9
    certified["models"]["m1"]["upstream_models"] = ["other"]
    del certified["figures"]["overruns"]
    certified["policy_sha256"] = ["p1", "p9"]
    assert differences(certified, sections(recs)) == [
        "figures.k.histogram[2][1]: certificate 9, audit log 1",
        "figures.k.max: certificate 5.0, audit log 4.0",
        "figures.overruns: certificate (missing), audit log 0",
        "models.m1.upstream_models[0]: certificate 'other', audit log 'up-m1'",
        "policy_sha256: certificate ['p1', 'p9'], audit log ['p1']",  # lists of another length: whole
    ]
    assert differences({"x": True}, {"x": 1}) == ["x: certificate True, audit log 1"]
    assert figures.HISTOGRAM_BOUNDS[-1] == math.inf
