"""TOFU's model utility: one number for what unlearning must not break.

    model_utility = harmonic mean of 9 values: {retain, real_authors, world_facts} x
                    {probability, rouge_l_recall, truth_ratio}

with probability = mean `probability` on retain and mean `normalized_probability` on real authors
and world facts, rouge_l_recall = mean ROUGE-L recall, truth_ratio = `true_better` aggregate
(TOFU `aggregate_eval_stat.get_model_utility`; OpenUnlearning `hm_aggregate`). The harmonic mean is
dominated by the worst value, so collapsing any one of them collapses utility; any value of 0 makes
it 0 (as scipy.stats.hmean returns).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from scipy.stats import hmean

from unlearn.errors import UnlearnError
from unlearn.metrics.declare import Computed, SuiteData, SuiteMetric

#: What each utility set contributes (TOFU: retain, real_authors, world_facts x these three).
UTILITY_METRICS = ("probability", "rouge_l_recall", "truth_ratio")
MODEL_UTILITY_KEYS = tuple(
    f"{split}_{metric}"
    for split in ("retain", "real_authors", "world_facts")
    for metric in UTILITY_METRICS
)


def model_utility(values: Mapping[str, float], keys: tuple[str, ...] | None = None) -> float:
    """Harmonic mean of `keys` (default TOFU's 9 `MODEL_UTILITY_KEYS`) values in [0, 1]; other
    keys of `values` are ignored. A suite declares which sets count (`EvalSet.utility`)."""
    keys = MODEL_UTILITY_KEYS if keys is None else tuple(keys)
    missing = [key for key in keys if key not in values]
    if missing or not keys:
        raise UnlearnError(
            f"model utility needs {', '.join(missing) or 'utility sets'}; evaluate the retain, "
            "real_authors and world_facts splits (probability, ROUGE-L recall, truth ratio) "
            "before aggregating"
        )
    chosen = [float(values[key]) for key in keys]
    for key, value in zip(keys, chosen, strict=True):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"model utility input {key} must be in [0, 1], got {value}")
    if min(chosen) == 0.0:
        return 0.0
    return float(hmean(chosen))


# ---------------------------------------------------------------------------- declarations
UTILITY_HINT = "TOFU-style retain, real_authors and world_facts sets"


def _model_utility(data: SuiteData) -> Computed:
    """TOFU's harmonic mean over the sets the suite declares as utility sets."""
    keys = [f"{name}_{m}" for name in data.utility for m in UTILITY_METRICS]
    absent = [k for k in keys if k not in data.metrics]
    if not keys:
        return {}, {"model_utility": f"needs {UTILITY_HINT} (this suite declares none)"}
    if absent:
        return {}, {"model_utility": f"needs {', '.join(absent)} ({UTILITY_HINT})"}
    return {"model_utility": model_utility(data.metrics, tuple(keys))}, {}


MODEL_UTILITY = SuiteMetric("model_utility", _model_utility, ("model_utility",), frozenset())
