"""TOFU's truth ratio: does the model prefer the true answer to wrong ones that look just like it?

Per example, with every probability length-normalised (P^(1/|a|) = exp(mean token log-prob)) and
the K wrong ("perturbed") answers combined by their geometric mean:

    tr = (prod_k P(false_k)^(1/|false_k|))^(1/K) / P(true)^(1/|true|)
       = exp(mean_k mean_logprob(false_k) - mean_logprob(true))

On the forget and retain splits the "true" answer is the paraphrased answer; on real authors and
world facts it is the answer itself. This is OpenUnlearning's `truth_ratio` (`wrong_prob /
correct_prob` with both from `exp(-avg_loss)`, the K perturbations averaged in log space first) and
the reciprocal of the `curr_stat_1 = exp(perturbed_loss - paraphrased_loss)` in TOFU's
`aggregate_eval_stat.py`; both aggregate it the same two ways:

- `closer_to_1_better` (forget split): mean(min(tr, 1/tr)). A model that never saw the forget set
  has no reason to prefer the true answer, so tr near 1 (score near 1) is what unlearning aims for.
- `true_better` (retain, real authors, world facts; an input to model utility):
  mean(max(0, 1 - tr)).
  Higher when the true answer is clearly preferred; 0 when a wrong one is as likely or likelier.

OpenUnlearning adds 1e-10 to the denominators; we compute in log space and need none.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from unlearn.metrics import _inputs
from unlearn.metrics.declare import PERTURBED, TRUE, SetData, SetMetric, mean_lp, perturbed_lp


def truth_ratio(true_mean_logprob: ArrayLike, false_mean_logprobs: ArrayLike) -> np.ndarray:
    """Raw truth ratio tr per example [N] (what forget quality compares; see module docstring).

    true_mean_logprob: [N] mean token log-prob of the true (forget/retain: paraphrased) answer.
    false_mean_logprobs: [N, K] mean token log-probs of each question's K perturbed answers.
    """
    true = _inputs.vector(true_mean_logprob, "true_mean_logprob")
    false = _inputs.matrix(false_mean_logprobs, "false_mean_logprobs", rows=true.size)
    return np.exp(false.mean(axis=1) - true)


def closer_to_1_better(truth_ratios: ArrayLike) -> float:
    """Forget-split aggregate mean(min(tr, 1/tr)) in [0, 1]; 1 = no preference for the truth."""
    tr = _inputs.nonempty(_inputs.vector(truth_ratios, "truth_ratios"), "truth_ratios")
    with np.errstate(divide="ignore"):  # tr == 0 (underflow) gives min(0, inf) = 0, as it should
        return float(np.mean(np.minimum(tr, 1.0 / tr)))


def true_better(truth_ratios: ArrayLike) -> float:
    """Retain/real-authors/world-facts aggregate mean(max(0, 1 - tr)) in [0, 1]; higher = better."""
    tr = _inputs.nonempty(_inputs.vector(truth_ratios, "truth_ratios"), "truth_ratios")
    return float(np.mean(np.maximum(0.0, 1.0 - tr)))


# ---------------------------------------------------------------------------- declarations
def truth_ratios(data: SetData) -> np.ndarray:
    """Per-example truth ratios of a set, its declared true side against its perturbed answers."""
    true_lp = np.array([mean_lp(r[data.truth_key]) for r in data.records], dtype=np.float64)
    return truth_ratio(true_lp, perturbed_lp(data.records))


def truth_ratio_aggregate(values: np.ndarray, data: SetData) -> float:
    """TOFU: forget sets report closer_to_1_better, the others true_better."""
    return closer_to_1_better(values) if data.role == "forget" else true_better(values)


TRUTH_RATIO = SetMetric(
    "truth_ratio", lambda d: {"truth_ratio": truth_ratios(d)}, truth_ratio_aggregate,
    "closer_to_1_better (forget), true_better (others)", TRUE | PERTURBED, kinds=("qa",),
    needs_perturbed=True,
)  # fmt: skip
