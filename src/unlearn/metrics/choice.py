"""Multiple-choice knowledge (WMDP, MMLU): is the right option the most likely continuation?

lm-evaluation-harness's protocol (v0.4.12, `ConfigurableTask.process_results`, `metrics.py`):
each option is a continuation (" A" .. " D") of the question's prompt, scored by its summed
log-likelihood; an example is right when the answer's option has the highest one (`acc`; ties
go to the first option, as `np.argmax`). The standard error of a set's mean is the sample
standard deviation (n - 1) over sqrt(n) (`mean_stderr`); over several sets, accuracy is weighted
by size and the standard error pooled (`pooled_sample_stderr`), as the harness's groups do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from unlearn.metrics import _inputs
from unlearn.metrics.declare import Computed, SetData, SetMetric, SuiteData, SuiteMetric, mean


def accuracy(choice_logprobs: Sequence[Sequence[float]], targets: Sequence[int]) -> np.ndarray:
    """1.0 where the target option has the highest log-likelihood, else 0.0, [N]."""
    _inputs.same_length(choice_logprobs, targets, "choice_logprobs and targets")
    return np.asarray(
        [
            float(int(np.argmax(lp)) == int(t))
            for lp, t in zip(choice_logprobs, targets, strict=True)
        ],
        dtype=np.float64,
    )


def choice_stderr(values: ArrayLike) -> float:
    """Standard error of the mean: sample standard deviation (n - 1) / sqrt(n); NaN for n < 2."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size < 2:
        return float("nan")
    return float(np.std(arr, ddof=1) / math.sqrt(arr.size))


def pooled_stderr(sizes: Sequence[int], stderrs: Sequence[float]) -> float:
    """lm-evaluation-harness's pooled standard error of a size-weighted mean over k sets:
    sqrt(sum((n_i - 1) * n_i * se_i^2) / (N - k) / N)."""
    n_total, k = sum(sizes), len(sizes)
    if n_total - k <= 0:
        return float("nan")
    pooled = sum((n - 1) * n * se**2 for n, se in zip(sizes, stderrs, strict=True) if n > 1)
    return float(math.sqrt(pooled / (n_total - k) / n_total))


# ---------------------------------------------------------------------------- declarations
def _accuracy(data: SetData) -> dict[str, np.ndarray]:
    return {"accuracy": accuracy([r["choice_logprobs"] for r in data.records],
                                 [r["target"] for r in data.records])}  # fmt: skip


def _overall(data: SuiteData) -> Computed:
    """Accuracy over every multiple-choice set, weighted by size (lm-evaluation-harness's group
    `acc`), with its pooled standard error."""
    sets = [d for d in data.sets.values() if d.kind == "choice"]
    if not sets:
        return {}, {}
    per = [_accuracy(d)["accuracy"] for d in sets]
    sizes = [len(p) for p in per]
    acc = float(np.sum([np.sum(p) for p in per]) / np.sum(sizes))
    return {
        "accuracy": acc,
        "accuracy_stderr": pooled_stderr(sizes, [choice_stderr(p) for p in per]),
    }, {}


READS = frozenset({"choice_logprobs", "target"})
ACCURACY = SetMetric(
    "accuracy", _accuracy, mean,
    "mean (the answer's option has the highest summed log-likelihood); `_stderr`: sample "
    "standard deviation / sqrt(n), as lm-evaluation-harness", READS, kinds=("choice",),
    stderr=True,
)  # fmt: skip
OVERALL_ACCURACY = SuiteMetric("accuracy", _overall, ("accuracy", "accuracy_stderr"), READS)
