"""Scoring a suite from saved records: one loop over the metric registry, no model involved.

`score_suite` turns each dataset's records into a `SetData`, runs every registered per-set metric
that applies, then every suite metric whose declared inputs (sets, reference records, other
metrics) are present; a metric whose inputs are missing is reported under `skipped` with the
reason, never silently absent or defaulted. What each metric reads: `unlearn.metrics.registry`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unlearn.eval.suites.builders import EvalSet, Suite
from unlearn.metrics.choice import choice_stderr
from unlearn.metrics.mia import MIN_K_DEFAULT
from unlearn.metrics.registry import (
    SET_METRICS,
    SUITE_METRICS,
    SetData,
    SetMetric,
    SuiteData,
    SuiteMetric,
    no_comparison,
)

Records = dict[str, list[dict[str, Any]]]


def set_data(s: EvalSet, recs: list[dict[str, Any]]) -> SetData:
    """The registry's view of one dataset of a suite, its declaration and its records."""
    texts = [_truth_text(s, r, rec) for r, rec in zip(s.rows, recs, strict=True)]
    return SetData(
        s.name, s.role, s.kind, recs, texts, s.has_paraphrase, s.has_truth_ratio,
        truth=s.truth, only=s.metrics, mia=s.mia, stem=s.rouge_stem, judge=s.judge,
    )  # fmt: skip


def _truth_text(s: EvalSet, row: dict[str, Any], rec: dict[str, Any]) -> str:
    """`data.text`: the answer (cut to the characters the record says were kept, e.g. MUSE's first
    128 tokens of a verbatim continuation), the document, or the right option's label."""
    if s.kind == "text":
        return row["text"]
    if s.kind == "choice":
        return row["labels"][row["target"]]
    if s.kind == "probe":
        return row["answers"][0]
    kept = rec.get("truth_chars")
    return row["answer"] if kept is None else row["answer"][:kept]


def _applies(m: SetMetric, d: SetData) -> str | None:
    """None if `m` runs on `d`; "" if it does not apply (silently); else the skip reason."""
    if d.kind not in m.kinds or d.role not in m.roles:
        return ""
    if d.only is not None and m.name not in d.only:
        return ""
    if m.needs_generation and any("generation" not in r for r in d.records):
        return ""
    if m.needs_perturbed and not d.has_perturbed:
        return "the data has no perturbed_answer column"
    return None


def score_set(
    d: SetData,
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, str]]:
    """Metrics of one dataset from its records: (aggregates, per-example values, skipped)."""
    agg: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    for m in SET_METRICS:
        why = _applies(m, d)
        if why:
            skipped.update({f"{d.name}_{key}": why for key in m.emits})
        if why is not None:
            continue
        for key, values in m.compute(d).items():
            per[key] = np.asarray(values, dtype=np.float64).tolist()
            agg[f"{d.name}_{key}"] = m.aggregate(values, d)
            if m.stderr:
                agg[f"{d.name}_{key}_stderr"] = choice_stderr(values)
    return agg, per, skipped


def _missing(m: SuiteMetric, data: SuiteData) -> tuple[str, str] | None:
    """(key, why) when `m` cannot run on this suite (why "" = not applicable, silently), or None."""
    if any(data.find(sel) is None for sel in m.sets):
        return m.sets_key or m.skip_as, m.sets_hint
    why = _missing_input(m, data)
    return None if why is None else (m.skip_as, why)


def _missing_input(m: SuiteMetric, data: SuiteData) -> str | None:
    if m.needs_perturbed and not all(data.get(sel).has_perturbed for sel in m.sets):
        names = " and ".join(data.get(sel).name for sel in m.sets)
        return f"the {names} data has no perturbed_answer column (no truth ratio)"
    absent = [c for c in m.compare if c not in data.comparisons]
    if absent:
        return "; ".join(no_comparison(c) for c in absent)
    missing = [k for k in m.needs_metrics if k not in data.metrics]
    if missing:
        hint = f" ({m.metrics_hint})" if m.metrics_hint else ""
        return f"needs {', '.join(missing)}{hint}"
    return None


def score_suite(
    suite: Suite,
    records: Records,
    comparisons: dict[str, Records] | None = None,
    min_k: float = MIN_K_DEFAULT,
    notes: dict[str, str] | None = None,
) -> tuple[dict[str, float], dict[str, str], dict[str, dict[str, list[float]]]]:
    """Every metric that applies, from records alone: (metrics, skipped with reasons, per-example).

    `comparisons`: other models' records of the same sets, by name ("retain": the model trained
    without the forget set). The suite's declared suite metrics run (all, when it declares none);
    `notes` receives what a metric says about its inputs (e.g. where privleak's reference AUC
    came from)."""
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    per_example: dict[str, dict[str, list[float]]] = {}
    sets = {s.name: set_data(s, records[s.name]) for s in suite.sets}
    for name, d in sets.items():
        agg, per, skip = score_set(d)
        metrics.update(agg)
        skipped.update(skip)
        per_example[name] = {k: _json_safe(v) for k, v in per.items()}
    said: dict[str, str] = {} if notes is None else notes
    for m in SUITE_METRICS:
        if suite.metrics is not None and m.name not in suite.metrics:
            continue
        data = SuiteData(
            sets, comparisons or {}, metrics, min_k, suite.retrain_auc, suite.utility, said
        )
        missing = _missing(m, data)
        if missing is not None:
            key, why = missing
            if why:
                skipped[key] = why
            continue
        values, skip = m.compute(data)
        metrics.update(values)
        skipped.update(skip)
    for key in [k for k, v in metrics.items() if not np.isfinite(v)]:
        del metrics[key]
        skipped[key] = "undefined on this data (e.g. no answer has key words)"
    return metrics, skipped, per_example


def _json_safe(values: list[float]) -> list[float | None]:
    return [None if not np.isfinite(v) else v for v in values]
