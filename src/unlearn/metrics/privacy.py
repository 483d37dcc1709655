"""Privacy leakage: is the forget set as hard to detect as it would be had it never been trained on?

Both sides are a membership-inference AUC over forget (members) vs holdout (non-members) examples,
one for the evaluated model and one for the reference model (trained without the forget set: TOFU's
retain model, MUSE's retrained model). With `auc` from `unlearn.metrics.mia` (higher = the forget
set is easier to detect; about 0.5 for the reference):

    privleak = ((1 - auc) - (1 - auc_ref)) / (1 - auc_ref) * 100
             = (auc_ref - auc) / (1 - auc_ref) * 100

0 is ideal. Negative: the forget set is still easier to detect than for the reference model
(under-unlearning; the original model scores near -100). Positive: it is now harder to detect than
text never seen (over-unlearning, itself a signal an attacker can use).

This one number is both OpenUnlearning's `privleak` (which applies `1 - x` to its AUCs, adds 1e-10
to the denominator and reports percent) and MUSE's PrivLeak (Shi et al. 2024, arXiv:2407.06460):

    PrivLeak = (AUC(f_unlearn) - AUC(f_retrain)) / AUC(f_retrain)

because MUSE's AUC keys `forget_holdout_*` label forget as non-member and holdout as member, i.e.
MUSE's AUC = 1 - ours; `muse_privleak` takes AUCs in that orientation (e.g. MUSE's published
retrain constant, 0.4772 for Min-40% on News) and reports percent, as MUSE's `eval.py` does.

`rel_diff` is OpenUnlearning's other comparison, (auc - auc_ref) / auc_ref * 100 on AUCs oriented
as ours: positive = the forget set is easier to detect than for the reference model.

OpenUnlearning falls back to a reference AUC of 0.5 when no retain-model logs are given; we never
guess: a missing reference is an error naming `--reference`.
"""

from __future__ import annotations

import math

from unlearn.errors import UnlearnError
from unlearn.metrics.declare import (
    NO_REFERENCE,
    RETAIN,
    Computed,
    SuiteData,
    SuiteMetric,
    token_logprobs,
)

_MISSING_REFERENCE = (
    "privacy leakage needs the reference (retain) model's records; pass --reference DIR"
)


def privleak(auc: float, reference_auc: float | None) -> float:
    """OpenUnlearning's privleak = MUSE's PrivLeak, in percent, from AUCs oriented as `mia.auc`."""
    auc, reference_auc = _checked(auc, reference_auc)
    if reference_auc == 1.0:
        raise UnlearnError(
            "privacy leakage is undefined: the reference model's membership AUC is 1.0, so it "
            "detects the forget set perfectly; check that --reference is a model not trained on it"
        )
    return (reference_auc - auc) / (1.0 - reference_auc) * 100.0


def muse_privleak(muse_auc: float, muse_reference_auc: float | None) -> float:
    """MUSE's PrivLeak in percent from AUCs in MUSE's orientation (= 1 - `mia.auc`'s)."""
    muse_auc, muse_reference_auc = _checked(muse_auc, muse_reference_auc)
    if muse_reference_auc == 0.0:
        raise UnlearnError(
            "privacy leakage is undefined: the reference model's MUSE AUC is 0.0, so it detects "
            "the forget set perfectly; check that --reference is a model not trained on it"
        )
    return (muse_auc - muse_reference_auc) / muse_reference_auc * 100.0


def rel_diff(auc: float, reference_auc: float | None) -> float:
    """OpenUnlearning's rel_diff in percent: (auc - auc_ref) / auc_ref * 100, AUCs as `mia.auc`."""
    auc, reference_auc = _checked(auc, reference_auc)
    if reference_auc == 0.0:
        raise UnlearnError(
            "relative AUC difference is undefined: the reference model's membership AUC is 0.0; "
            "check that --reference points at the retain model's records"
        )
    return (auc - reference_auc) / reference_auc * 100.0


def _checked(auc: float, reference_auc: float | None) -> tuple[float, float]:
    if reference_auc is None:
        raise UnlearnError(_MISSING_REFERENCE)
    for name, value in (("AUC", auc), ("reference AUC", reference_auc)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(auc), float(reference_auc)


# ---------------------------------------------------------------------------- declarations
def _privleak(data: SuiteData) -> Computed:
    """privleak from the Min-K% AUCs of the model and of the retained model: the retain
    comparison's records when given, else the suite's published AUC (MUSE's), the source said in
    the results' notes."""
    from unlearn.metrics.mia import auc, min_k_score

    if RETAIN in data.comparisons:
        ref_auc = auc(
            min_k_score(token_logprobs(data.ref("member")), data.min_k),
            min_k_score(token_logprobs(data.ref("nonmember")), data.min_k),
        )
        data.notes["privleak_reference"] = "the retain comparison's records"
    elif data.retrain_auc is not None:
        ref_auc, source = data.retrain_auc
        data.notes["privleak_reference"] = source
    else:
        return {}, {"privleak": NO_REFERENCE}
    out = {"reference_mia_min_k_auc": ref_auc}
    try:
        out["privleak"] = privleak(data.metrics["mia_min_k_auc"], ref_auc)
    except UnlearnError as exc:  # e.g. a reference AUC of exactly 1: undefined, not fatal
        return out, {"privleak": str(exc)}
    return out, {}


PRIVLEAK = SuiteMetric(
    "privleak", _privleak, ("reference_mia_min_k_auc", "privleak"),
    frozenset({"answer.token_logprobs"}), sets=("member", "nonmember"),
    sets_hint="needs both a forget and a holdout set (--holdout FILE)",
    needs_metrics=("mia_min_k_auc",), skip_key="privleak", sets_key="mia",
)  # fmt: skip
