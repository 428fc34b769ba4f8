"""The "effective compute" section of ``kgate audit report`` (issue 17, item 5).

Per model, over the metered answers of the range (each request id once, as the rest of the report): the
largest inference FLOPs and K one answer used, the mean K, and, from the policy, the model's training FLOPs
and the compute it was evaluated under. An answer *above the evaluated bound* measured more K than
``evaluated_max_k`` (or more samples / reasoning tokens than ``evaluated_max_samples`` /
``evaluated_max_reasoning_tokens``, when set). Such answers are split by the tier they were served to: a
tier with ``beyond_evaluated: true`` may go there; any other is **flagged** — in enforce mode it should not
happen (shadow mode, a policy changed since, or a provider overrunning the admission bound explain it, and
are counted).

The policy is the one ``--config`` names, else the default one (``KGATE_CONFIG``, or the example policy)
when it exists and loads. Without one the section still shows the measured figures, and says why the
training and evaluated figures are empty. Records carry the sha256 of the policy they were served under;
answers served under another policy than the one shown are counted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from gateway.engine.errors import UsageError
from gateway.policy.config import Config, ConfigError, default_config_path, load_config

NONE_MODEL = "(none)"
MAX_EXAMPLES = 5
# Measured K is a float computed from token counts; a value equal to the bound must not be flagged.
_K_TOLERANCE = 1e-9


def load_policy(path: str | None) -> tuple[Config | None, str, str | None]:
    """(policy, where it came from, why there is none or None).

    ``--config`` that does not load is an error (the operator named it); a default one that does not load,
    or none at all, leaves the report without a policy, saying so."""
    if path:
        try:
            return load_config(path), "--config", None
        except ConfigError as exc:
            raise UsageError(f"cannot load config: {exc.errors[0]}") from None
    default = default_config_path()
    origin = "KGATE_CONFIG" if os.environ.get("KGATE_CONFIG") else "default"
    if not default.exists():
        where = f"KGATE_CONFIG={default}" if origin == "KGATE_CONFIG" else str(default)
        return None, "", f"no policy ({where} does not exist): give --config FILE for training and evaluated figures"
    try:
        return load_config(default), origin, None
    except ConfigError as exc:
        return None, "", f"the default policy {default} does not load ({exc.errors[0]}): give --config FILE"


def _count(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0.0
    return float(value)


@dataclass
class _Model:
    """What the answers of one model add up to."""

    requests: int = 0
    evaluation_requests: int = 0
    k_sum: float = 0.0
    max_k: float = 0.0
    max_k_request_id: str | None = None
    max_flops: float = 0.0
    max_flops_request_id: str | None = None
    max_samples: int = 0
    max_reasoning_tokens: int = 0
    upstream_models: set[str] = field(default_factory=set)
    above: int = 0
    above_by: dict[str, int] = field(default_factory=lambda: {"k": 0, "samples": 0, "reasoning_tokens": 0})
    beyond: int = 0
    flagged: int = 0
    flagged_shadow: int = 0
    flagged_other_policy: int = 0
    flagged_overrun: int = 0
    examples: list[str] = field(default_factory=list)


class EffectiveCompute:
    """Accumulates metered answers (:meth:`add`) into the per-model section (:meth:`result`)."""

    def __init__(self, policy: Config | None = None, origin: str = "", note: str | None = None) -> None:
        self.policy = policy
        self.origin = origin
        if policy is None and not note:
            note = "no policy given: training and evaluated figures are not shown"
        self.note = note
        self.models: dict[str, _Model] = {}
        self.other_policy = 0  # answers whose record names another policy sha256 than the one shown

    def add(self, rec: dict[str, Any], flops: float, k: float) -> None:
        """One metered answer (``flops`` and ``k`` as :func:`~gateway.audit.records.usage_amounts` reads them)."""
        model_name = rec.get("model")
        name = model_name if isinstance(model_name, str) and model_name else NONE_MODEL
        m = self.models.setdefault(name, _Model())
        usage = rec.get("usage") if isinstance(rec.get("usage"), dict) else {}
        assert isinstance(usage, dict)
        samples, reasoning = int(_count(usage.get("samples"))), int(_count(usage.get("reasoning_tokens")))
        rid = rec.get("request_id") if isinstance(rec.get("request_id"), str) else None
        m.requests += 1
        m.k_sum += k
        if rec.get("eval"):
            m.evaluation_requests += 1
        if m.max_k_request_id is None or k > m.max_k:
            m.max_k, m.max_k_request_id = k, rid
        if m.max_flops_request_id is None or flops > m.max_flops:
            m.max_flops, m.max_flops_request_id = flops, rid
        m.max_samples = max(m.max_samples, samples)
        m.max_reasoning_tokens = max(m.max_reasoning_tokens, reasoning)
        if isinstance(rec.get("upstream_model"), str):
            m.upstream_models.add(rec["upstream_model"])
        if self.policy is None:
            return
        other_policy = rec.get("policy_sha256") != self.policy.version
        self.other_policy += other_policy
        model = self.policy.models.get(name)
        if model is None:
            return
        above = [dim for dim, measured, bound in (
            ("k", k, model.evaluated_max_k),
            ("samples", samples, getattr(model, "evaluated_max_samples", None)),
            ("reasoning_tokens", reasoning, getattr(model, "evaluated_max_reasoning_tokens", None)),
        ) if bound is not None and measured > (bound * (1 + _K_TOLERANCE) if dim == "k" else bound)]
        if not above:
            return
        m.above += 1
        for dim in above:
            m.above_by[dim] += 1
        tier = self.policy.tiers.get(rec.get("tier") or "")
        if tier is not None and tier.beyond_evaluated:
            m.beyond += 1
            return
        m.flagged += 1
        m.flagged_shadow += rec.get("mode") == "shadow"
        m.flagged_other_policy += other_policy
        m.flagged_overrun += bool(usage.get("overrun"))
        if rid and len(m.examples) < MAX_EXAMPLES:
            m.examples.append(rid)

    def result(self) -> dict[str, Any]:
        """The section as plain data (the JSON report's ``effective_compute``)."""
        p = self.policy
        return {
            "policy": None if p is None else {"files": list(p.source_files), "sha256": p.version,
                                              "origin": self.origin},
            "note": self.note,
            "answers_under_other_policy": None if p is None else self.other_policy,
            "models": [self._row(name, m) for name, m in sorted(self.models.items())],
        }

    def _row(self, name: str, m: _Model) -> dict[str, Any]:
        model = self.policy.models.get(name) if self.policy is not None else None
        training = model.training_flops if model is not None else None
        evaluated = None
        if model is not None and _has_bound(model):
            evaluated = {"max_k": model.evaluated_max_k,
                         "max_samples": getattr(model, "evaluated_max_samples", None),
                         "max_reasoning_tokens": getattr(model, "evaluated_max_reasoning_tokens", None),
                         "source": getattr(model, "evaluated_source", None) or "typed in the policy"}
        judged = evaluated is not None
        return {
            "model": name,
            "upstream_models": sorted(m.upstream_models),
            "requests": m.requests,
            "evaluation_requests": m.evaluation_requests,
            "max_flops": m.max_flops,
            "max_flops_request_id": m.max_flops_request_id,
            "max_k": m.max_k,
            "max_k_request_id": m.max_k_request_id,
            "mean_k": m.k_sum / m.requests if m.requests else 0.0,
            "max_samples": m.max_samples,
            "max_reasoning_tokens": m.max_reasoning_tokens,
            "training_flops": training,
            "inference_to_training_flops": m.max_flops / training if training else None,
            "evaluated": evaluated,
            "above_evaluated": m.above if judged else None,
            "above_evaluated_by": dict(m.above_by) if judged else None,
            "beyond_evaluated_tiers": m.beyond if judged else None,
            "flagged": m.flagged if judged else None,
            "flagged_shadow": m.flagged_shadow if judged else None,
            "flagged_other_policy": m.flagged_other_policy if judged else None,
            "flagged_overrun": m.flagged_overrun if judged else None,
            "flagged_request_ids": list(m.examples),
            "note": self._why_empty(name, model, training, judged),
        }

    def _why_empty(self, name: str, model: Any, training: float | None, judged: bool) -> str | None:
        if self.policy is None:
            return "no policy"
        if model is None:
            return "model not in the policy" if name != NONE_MODEL else "answers without a model"
        missing = [what for what, absent in (("training_flops", training is None),
                                             ("evaluated bound", not judged)) if absent]
        return f"policy sets no {' and no '.join(missing)}" if missing else None


def _has_bound(model: Any) -> bool:
    return any(getattr(model, f, None) is not None
               for f in ("evaluated_max_k", "evaluated_max_samples", "evaluated_max_reasoning_tokens"))


# ----------------------------------------------------------------------------------------------- text
COLUMNS = ("model", "requests", "max_flops", "max_k", "mean_k", "training_flops", "inference/training",
           "evaluated", "above_evaluated", "beyond_evaluated_tiers", "flagged")


def _num(value: Any, digits: str) -> str:
    return "-" if value is None else format(value, digits)


def evaluated_text(ev: dict[str, Any] | None) -> str:
    """``k<=32,samples<=4,reasoning<=8192``: the evaluated bound in one cell, without spaces; ``-`` if none."""
    if ev is None:
        return "-"
    parts = [f"{label}<={ev[key]:g}" for label, key in (("k", "max_k"), ("samples", "max_samples"),
                                                         ("reasoning", "max_reasoning_tokens"))
             if ev.get(key) is not None]
    return ",".join(parts)


def row_cells(row: dict[str, Any]) -> list[str]:
    """One model's cells, in :data:`COLUMNS` order (the table and the HTML page); ``-`` stands for none."""
    return [row["model"], str(row["requests"]), _num(row["max_flops"], ".4g"), _num(row["max_k"], ".2f"),
            _num(row["mean_k"], ".2f"), _num(row["training_flops"], ".4g"),
            _num(row["inference_to_training_flops"], ".3g"), evaluated_text(row["evaluated"]),
            _num(row["above_evaluated"], "d"), _num(row["beyond_evaluated_tiers"], "d"), _num(row["flagged"], "d")]


def notes(section: dict[str, Any]) -> list[str]:
    """The lines under the table: which policy, where the evaluated bounds come from, what is flagged."""
    p = section["policy"]
    out = []
    if p is None:
        out.append(f"policy: none; {section['note']}")
    else:
        line = f"policy: {', '.join(p['files'])} (sha256 {p['sha256'][:12]}, {p['origin']})"
        other = section["answers_under_other_policy"]
        if other:
            line += f"; {other} answer{' was' if other == 1 else 's were'} served under another policy"
        out.append(line)
    for row in section["models"]:
        if row["evaluated"] is not None:
            out.append(f"evaluated bound of {row['model']}: {row['evaluated']['source']}")
    for row in section["models"]:
        if row["flagged"]:
            why = [f"{row[key]} {label}" for key, label in (("flagged_shadow", "in shadow mode"),
                                                             ("flagged_other_policy", "under another policy"),
                                                             ("flagged_overrun", "overran their admission bound"))
                   if row[key]]
            n = row["flagged"]
            because = f" ({', '.join(why)})" if why else ""
            out.append(f"FLAGGED {row['model']}: {n} answer{'s' if n != 1 else ''} above the evaluated bound served "
                       f"to tiers without beyond_evaluated{because}; e.g. "
                       f"{', '.join(row['flagged_request_ids']) or '(no request ids)'}")
    for row in section["models"]:
        if row["note"] and row["note"] != "no policy":
            out.append(f"{row['model']}: {row['note']}")
    return out


def format_section(section: dict[str, Any]) -> str:
    """The second table of ``kgate audit report``'s text output, with its notes."""
    body = [row_cells(r) for r in section["models"]]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(COLUMNS)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = ["", "Effective compute per model", line(COLUMNS), line(["-" * w for w in widths])]
    out += [line(r) for r in body] or ["(no metered answers in this range)"]
    out += notes(section)
    return "\n".join(out) + "\n"
