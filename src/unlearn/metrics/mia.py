"""Membership-inference scores: can an attacker still tell forget-set text from unseen text?

Every score here is oriented so that HIGHER = MORE LIKELY A MEMBER (seen in training). Then
`auc(member_scores, nonmember_scores)` with the forget set as members and a holdout set as
non-members is the probability that a random forget example looks more "member" than a random
holdout example: near 1 before unlearning, near the retain model's value (about 0.5) after good
unlearning. This equals OpenUnlearning's `mia_auc` (which orients scores the other way, higher =
non-member, and labels holdout 1, forget 0: the two flips cancel).

Per example, from the answer's per-token log-probabilities log p_t (t = 1..T):

- LOSS (Yeom et al. 2018): mean_t log p_t, i.e. minus the mean NLL. OpenUnlearning: +mean NLL.
- zlib (Carlini et al. 2021): -(mean NLL) / len(zlib.compress(text.encode("utf-8"))), the
  log-perplexity over the text's zlib entropy in bytes. OpenUnlearning uses the same MEAN NLL
  (`avg_loss`), not the summed NLL; so do we.
- Min-K% (Shi et al. 2024): the mean of the lowest k-fraction of log p_t, max(1, int(T*k)) tokens;
  k = 0.4 as in MUSE's privleak and OpenUnlearning's MUSE configs. OpenUnlearning: its negation.
- Min-K%++ (Zhang et al. 2024, arXiv:2404.02936): per token z_t = (log p_t - mu_t) / sigma_t with
  mu_t = E_{z~p(.|x_<t)}[log p(z|x_<t)] and sigma_t^2 = E[log p(z|x_<t)^2] - mu_t^2 over the whole
  vocabulary, then the mean of the lowest k-fraction of z_t. sigma_t^2 is clamped at 1e-6 (as
  OpenUnlearning does) so a one-hot prediction does not divide by zero. The model pass records
  mu_t and sigma_t (`vocab_logprob_moments` shows the computation).
- reference (Carlini et al. 2021; OpenUnlearning `mia_reference`): ref NLL - target NLL (mean
  NLLs), i.e. how much better the evaluated model fits the text than a reference model does.
  OpenUnlearning: target - ref.
- gradient norm (Wang et al. 2024, arXiv:2402.17012): -||grad of the example's mean NLL||_2 over all
  parameters (`unlearn.eval.gradnorm.grad_norms`, run by `eval --mia-gradnorm`); members
  sit near a minimum, so their gradients are small. OpenUnlearning's `mia_gradnorm` averages the
  per-tensor p-norms (p = 2 in its MUSE config) and returns the positive norm, oriented like its
  other attacks (higher = non-member); ours is the negation, oriented like our other attacks
  (higher = member), so the AUCs agree.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score

from unlearn.errors import UnlearnError
from unlearn.metrics import _inputs
from unlearn.metrics.declare import (
    MIN_K_DEFAULT,
    RETAIN,
    Computed,
    SetData,
    SuiteData,
    SuiteMetric,
    token_logprobs,
)

_MIN_VOCAB_VARIANCE = 1e-6


def loss_score(token_logprobs: Sequence[ArrayLike]) -> np.ndarray:
    """LOSS attack: mean token log-prob (= -mean NLL) per example [N]; higher = member."""
    return np.array([lp.mean() for lp in _inputs.ragged(token_logprobs, "token_logprobs")])


def zlib_score(token_logprobs: Sequence[ArrayLike], texts: Sequence[str]) -> np.ndarray:
    """zlib attack: -(mean NLL) / zlib-compressed byte length of the text, per example [N]."""
    _inputs.same_length(token_logprobs, texts, "token_logprobs and texts")
    logps = _inputs.ragged(token_logprobs, "token_logprobs")
    entropy = [len(zlib.compress(text.encode("utf-8"))) for text in texts]
    return np.array([lp.mean() for lp in logps]) / np.array(entropy, dtype=np.float64)


def min_k_score(token_logprobs: Sequence[ArrayLike], k: float = MIN_K_DEFAULT) -> np.ndarray:
    """Min-K%: mean of the lowest fraction k of token log-probs per example [N]; higher = member."""
    _check_k(k)
    return np.array(
        [_lowest_mean(lp, k) for lp in _inputs.ragged(token_logprobs, "token_logprobs")]
    )


def min_k_plus_plus_score(
    token_logprobs: Sequence[ArrayLike],
    vocab_mean_logprob: Sequence[ArrayLike],
    vocab_std_logprob: Sequence[ArrayLike],
    k: float = MIN_K_DEFAULT,
) -> np.ndarray:
    """Min-K%++: mean of the lowest fraction k of (log p_t - mu_t) / sigma_t, per example [N].

    vocab_mean_logprob[i], vocab_std_logprob[i]: mu_t and sigma_t at each answer token of
    example i (see module docstring and `vocab_logprob_moments`).
    """
    _check_k(k)
    _inputs.same_length(token_logprobs, vocab_mean_logprob, "token_logprobs and vocab_mean_logprob")
    _inputs.same_length(token_logprobs, vocab_std_logprob, "token_logprobs and vocab_std_logprob")
    logps = _inputs.ragged(token_logprobs, "token_logprobs")
    mus = _inputs.ragged(vocab_mean_logprob, "vocab_mean_logprob")
    sigmas = _inputs.ragged(vocab_std_logprob, "vocab_std_logprob")
    out = []
    for i, (lp, mu, sigma) in enumerate(zip(logps, mus, sigmas, strict=True)):
        if not lp.size == mu.size == sigma.size:
            raise ValueError(f"example {i}: token_logprobs, mu and sigma differ in length")
        sigma = np.sqrt(np.maximum(sigma**2, _MIN_VOCAB_VARIANCE))
        out.append(_lowest_mean((lp - mu) / sigma, k))
    return np.array(out)


def vocab_logprob_moments(vocab_logprobs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """mu_t and sigma_t of log p(z) under z ~ p, from [T, V] log-softmax outputs; each [T]."""
    logp = np.asarray(vocab_logprobs, dtype=np.float64)
    if logp.ndim != 2:
        raise ValueError(f"vocab_logprobs must be [T, V], got shape {logp.shape}")
    p = np.exp(logp)
    finite = np.where(p > 0, logp, 0.0)  # a token of probability 0 adds 0, not 0 * -inf = NaN
    mu = (p * finite).sum(axis=-1)
    variance = (p * finite**2).sum(axis=-1) - mu**2
    return mu, np.sqrt(np.maximum(variance, 0.0))


def reference_score(
    token_logprobs: Sequence[ArrayLike], reference_token_logprobs: Sequence[ArrayLike] | None
) -> np.ndarray:
    """Reference attack: reference mean NLL - evaluated model's mean NLL, per example [N]."""
    if reference_token_logprobs is None:
        raise UnlearnError(
            "the reference membership attack needs the reference model's records; "
            "pass --reference DIR"
        )
    _inputs.same_length(token_logprobs, reference_token_logprobs, "target and reference records")
    return loss_score(token_logprobs) - loss_score(reference_token_logprobs)


def gradnorm_score(grad_norms: ArrayLike) -> np.ndarray:
    """Gradient-norm attack: minus each example's precomputed gradient norm [N]; higher = member."""
    return -_inputs.vector(grad_norms, "grad_norms")


def auc(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> float:
    """ROC AUC of telling members from non-members by score (higher = member); 0.5 = chance."""
    members = _inputs.vector(member_scores, "member_scores")
    nonmembers = _inputs.vector(nonmember_scores, "nonmember_scores")
    if members.size == 0 or nonmembers.size == 0:
        raise UnlearnError(
            f"membership AUC needs both members and non-members, got {members.size} member and "
            f"{nonmembers.size} non-member scores; check that the forget and holdout splits "
            "are non-empty"
        )
    labels = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    return float(roc_auc_score(labels, np.concatenate([members, nonmembers])))


def _lowest_mean(values: np.ndarray, k: float) -> float:
    count = max(1, int(values.size * k))
    return float(np.sort(values)[:count].mean())


def _check_k(k: float) -> None:
    if not 0.0 < k <= 1.0:
        raise UnlearnError(
            f"Min-K% fraction k={k} is out of range; use a value in (0, 1], e.g. 0.4"
        )


# ---------------------------------------------------------------------------- declarations
NO_MOMENTS = "needs vocabulary moments, which this suite's sets do not record (EvalSet.moments)"
MIA_SETS = ("member", "nonmember")
MIA_HINT = "needs both a forget and a holdout set (--holdout FILE)"


def _has_moments(d: SetData) -> bool:
    return all("vocab_mu" in r["answer"] for r in d.records)


def _attack_scores(d: SetData, k: float, moments: bool) -> dict[str, np.ndarray]:
    tok = token_logprobs(d)
    answers = [r["answer"] for r in d.records]
    out = {
        "loss": loss_score(tok),
        "zlib": zlib_score(tok, list(d.texts)),
        "min_k": min_k_score(tok, k),
    }
    if moments:
        out["min_k_plus_plus"] = min_k_plus_plus_score(
            tok, [a["vocab_mu"] for a in answers], [a["vocab_sigma"] for a in answers], k
        )
    return out


def _mia(data: SuiteData) -> Computed:
    member, nonmember = data.get("member"), data.get("nonmember")
    moments = _has_moments(member) and _has_moments(nonmember)
    fs = _attack_scores(member, data.min_k, moments)
    hs = _attack_scores(nonmember, data.min_k, moments)
    skipped = {} if moments else {"mia_min_k_plus_plus_auc": NO_MOMENTS}
    return {f"mia_{key}_auc": auc(fs[key], hs[key]) for key in fs}, skipped


def _mia_gradnorm(data: SuiteData) -> Computed:
    forget, holdout = data.get("member").records, data.get("nonmember").records
    if not all("grad_norm" in r for r in [*forget, *holdout]):
        why = "needs per-example gradient norms (one backward pass each); pass --mia-gradnorm"
        return {}, {"mia_gradnorm_auc": why}
    score = auc(
        gradnorm_score([r["grad_norm"] for r in forget]),
        gradnorm_score([r["grad_norm"] for r in holdout]),
    )
    return {"mia_gradnorm_auc": score}, {}


def _mia_reference(data: SuiteData) -> Computed:
    member = reference_score(token_logprobs(data.get("member")), token_logprobs(data.ref("member")))
    nonmember = reference_score(
        token_logprobs(data.get("nonmember")), token_logprobs(data.ref("nonmember"))
    )
    return {"mia_reference_auc": auc(member, nonmember)}, {}


MIA = SuiteMetric(
    "mia", _mia, ("mia_loss_auc", "mia_zlib_auc", "mia_min_k_auc", "mia_min_k_plus_plus_auc"),
    frozenset({"answer.token_logprobs", "answer.vocab_mu", "answer.vocab_sigma", "data.text"}),
    sets=MIA_SETS, sets_hint=MIA_HINT, sets_key="mia",
)  # fmt: skip
MIA_GRADNORM = SuiteMetric(
    "mia_gradnorm", _mia_gradnorm, ("mia_gradnorm_auc",), frozenset({"grad_norm"}),
    sets=MIA_SETS, sets_hint=MIA_HINT, sets_key="mia",
)  # fmt: skip
MIA_REFERENCE = SuiteMetric(
    "mia_reference", _mia_reference, ("mia_reference_auc",), frozenset({"answer.token_logprobs"}),
    sets=MIA_SETS, sets_hint=MIA_HINT, compare=(RETAIN,), sets_key="mia",
)  # fmt: skip
