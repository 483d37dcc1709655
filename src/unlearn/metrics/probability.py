"""TOFU's "Prob.": how likely the model finds the reference answer, per answer token.

    probability(q, a) = P(a|q)^(1/|a|) = exp(mean_t log p(a_t | q, a_<t))

TOFU (`aggregate_eval_stat.py`: `np.exp(-avg_gt_loss)`) and OpenUnlearning
(`evaluate_probability`: `exp(-avg_losses)`) both use the per-token MEAN log-probability, not the
summed one, so that long answers are not penalised for their length; so do we. Every function
here therefore takes mean log-probabilities; `mean_logprob` turns a record's sum and length into
one.

On the retain and forget splits the reported value is the mean of `probability`. On real authors
and world facts, whose questions come with wrong answers, TOFU reports `normalized_probability`:

    P(true)^(1/|true|) / (P(true)^(1/|true|) + sum_k P(false_k)^(1/|false_k|))

(TOFU `avg_true_prob / avg_all_prob`; OpenUnlearning `probability_w_options`, which adds 1e-10 to
the denominator: we compute it in log space instead, which needs no epsilon.)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import logsumexp

from unlearn.errors import UnlearnError
from unlearn.metrics import _inputs
from unlearn.metrics.declare import PERTURBED, SUM, SetData, SetMetric, mean, perturbed_lp


def mean_logprob(logprob_sum: ArrayLike, num_tokens: ArrayLike) -> np.ndarray:
    """Per-token mean log-probability [N] from summed log-probabilities and answer lengths [N]."""
    total = _inputs.vector(logprob_sum, "logprob_sum")
    length = _inputs.vector(num_tokens, "num_tokens")
    _inputs.same_length(total, length, "logprob_sum and num_tokens")
    if np.any(length <= 0):
        i = int(np.argmax(length <= 0))
        raise UnlearnError(
            f"num_tokens: example {i} has no answer tokens, so its probability is undefined; "
            "check that its answer is non-empty and not cut off by max_length"
        )
    return total / length


def probability(mean_logprob: ArrayLike) -> np.ndarray:
    """Length-normalised answer probability exp(mean_t log p) per example [N]; average for Prob."""
    return np.exp(_inputs.vector(mean_logprob, "mean_logprob"))


def normalized_probability(
    true_mean_logprob: ArrayLike, false_mean_logprobs: ArrayLike
) -> np.ndarray:
    """Share of the length-normalised probability that goes to the true answer, per example [N].

    true_mean_logprob: [N] mean token log-prob of the correct answer.
    false_mean_logprobs: [N, K] mean token log-probs of the K wrong answers of each question.
    """
    true = _inputs.vector(true_mean_logprob, "true_mean_logprob")
    false = _inputs.matrix(false_mean_logprobs, "false_mean_logprobs", rows=true.size)
    every = np.concatenate([true[:, None], false], axis=1)
    return np.exp(true - logsumexp(every, axis=1))


# ---------------------------------------------------------------------------- declarations
def answer_mean_lp(data: SetData) -> np.ndarray:
    answers = [r["answer"] for r in data.records]
    return mean_logprob([a["logprob_sum"] for a in answers], [a["n_tokens"] for a in answers])


def _mean_nll(data: SetData) -> dict[str, np.ndarray]:
    return {"mean_nll": -answer_mean_lp(data)}


def _probability(data: SetData) -> dict[str, np.ndarray]:
    """Plain on forget/retain; normalised over the perturbed answers on utility sets (TOFU)."""
    lp = answer_mean_lp(data)
    if data.role == "utility" and data.has_perturbed:
        return {"probability": normalized_probability(lp, perturbed_lp(data.records))}
    return {"probability": probability(lp)}


def _raw_probability(data: SetData) -> dict[str, np.ndarray]:
    """The answer's own probability on a utility set, before normalising over the perturbed
    answers (OpenUnlearning's `ra_Q_A_Prob` / `wf_Q_A_Prob`, next to their `_normalised` forms)."""
    return {"raw_probability": probability(answer_mean_lp(data))}


MEAN_NLL = SetMetric("mean_nll", _mean_nll, mean, "mean", SUM)
PROBABILITY = SetMetric("probability", _probability, mean, "mean", SUM | PERTURBED, kinds=("qa",))
RAW_PROBABILITY = SetMetric(
    "raw_probability", _raw_probability, mean, "mean", SUM, kinds=("qa",), roles=("utility",),
    needs_perturbed=True,
)  # fmt: skip
