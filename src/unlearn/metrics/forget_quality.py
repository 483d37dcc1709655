"""TOFU's forget quality: is the unlearned model indistinguishable from one never trained on the
forget set, judged by the distribution of its forget-set truth ratios?

    forget_quality = p-value of the two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp,
                     two-sided, method "auto") between the evaluated model's per-example forget-set
                     truth ratios and the reference (retain) model's.

A high p-value means the test cannot tell the two distributions apart. The inputs
are the RAW per-example truth ratios `truth_ratio.truth_ratio` returns, not an aggregate. TOFU
(`aggregate_eval_stat.get_forget_quality`) feeds exp(perturbed_loss - paraphrased_loss) = 1/tr and
OpenUnlearning (`forget_quality` / `get_forget_quality`) the raw scores or 1/(tr + 1e-10); the KS
statistic only depends on the order of the values, and 1/x keeps ties and reverses the order of
both samples alike, so all give the same p-value.

A missing reference is an error, never a silent None (OpenUnlearning returns None).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import ks_2samp

from unlearn.errors import UnlearnError
from unlearn.metrics import _inputs
from unlearn.metrics.declare import PERTURBED, RETAIN, TRUE, Computed, SuiteData, SuiteMetric


def forget_quality(truth_ratios: ArrayLike, reference_truth_ratios: ArrayLike | None) -> float:
    """KS-test p-value between the model's and the retain model's forget-set truth ratios."""
    if reference_truth_ratios is None or np.size(reference_truth_ratios) == 0:
        raise UnlearnError(
            "forget quality needs the reference (retain) model's forget-set truth ratios; "
            "pass --reference DIR"
        )
    model = _inputs.nonempty(_inputs.vector(truth_ratios, "truth_ratios"), "truth_ratios")
    reference = _inputs.vector(reference_truth_ratios, "reference_truth_ratios")
    return float(ks_2samp(model, reference).pvalue)


# ---------------------------------------------------------------------------- declarations
def _forget_quality(data: SuiteData) -> Computed:
    from unlearn.metrics.truth_ratio import truth_ratios

    mine = truth_ratios(data.get("forget"))
    theirs = truth_ratios(data.ref("forget"))
    return {"forget_quality": forget_quality(mine, theirs)}, {}


FORGET_QUALITY = SuiteMetric(
    "forget_quality", _forget_quality, ("forget_quality",), TRUE | PERTURBED, sets=("forget",),
    needs_perturbed=True, compare=(RETAIN,),
)  # fmt: skip
