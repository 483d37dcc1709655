"""Token-level memorisation of an answer under teacher forcing: exact memorisation and extraction
strength, both from the per-token flags "the model's top-1 prediction is the reference token".

- exact memorization (EM; Tirumala et al. 2022, as in OpenUnlearning `exact_memorization`):
  the share of answer tokens that are the top-1 prediction, mean(flags).
- extraction strength (ES; Wang et al. 2025, "Towards Effective Evaluations and Comparisons for
  LLM Unlearning Methods"; OpenUnlearning `extraction_strength`): ES = 1 - k/|y| with k the
  shortest prefix of the answer after which every remaining token is the top-1 prediction. Since
  teacher-forced top-1 matches on a suffix are exactly what greedy decoding from that prefix
  would reproduce, k is the fewest answer tokens one must reveal for greedy decoding to extract
  the rest. ES = 1: the whole answer comes out from the
  question alone; ES = 0: even the last token is not predicted.

Deviation: OpenUnlearning loops k over 0..|y|-1 only, so an answer whose last token is not the
top-1 prediction gets ES = 1/|y| there; we let k = |y| (an empty suffix), which gives 0, as the
formula says. Everything else agrees. OpenUnlearning also drops the last answer position (the
end-of-sequence prediction) before computing EM and ES; that is the model pass's choice of which
flags to record, not the metric's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from unlearn.metrics import _inputs
from unlearn.metrics.declare import SetData, SetMetric, mean


def exact_memorization(top1_match: Sequence[ArrayLike]) -> np.ndarray:
    """Share of answer tokens that are the model's top-1 prediction, per example [N].

    top1_match[i]: one flag (bool or 0/1) per answer token of example i.
    """
    return np.array([flags.mean() for flags in _flags(top1_match)])


def extraction_strength(top1_match: Sequence[ArrayLike]) -> np.ndarray:
    """1 - (shortest prefix after which all tokens are top-1 matched) / answer length, [N]."""
    out = []
    for flags in _flags(top1_match):
        misses = np.flatnonzero(flags == 0)
        prefix = 0 if misses.size == 0 else int(misses[-1]) + 1
        out.append(1.0 - prefix / flags.size)
    return np.array(out)


def _flags(top1_match: Sequence[ArrayLike]) -> list[np.ndarray]:
    flags = _inputs.ragged(top1_match, "top1_match")
    for i, f in enumerate(flags):
        if not np.all((f == 0) | (f == 1)):
            raise ValueError(f"top1_match[{i}] must hold only 0/1 or True/False")
    return flags


# ---------------------------------------------------------------------------- declarations
def _exact_memorization(data: SetData) -> dict[str, np.ndarray]:
    return {"exact_memorization": exact_memorization([r["answer"]["top1"] for r in data.records])}


def _extraction_strength(data: SetData) -> dict[str, np.ndarray]:
    top1 = [r["answer"]["top1"] for r in data.records]
    return {"extraction_strength": extraction_strength(top1)}


TOP1 = frozenset({"answer.top1"})
EXACT_MEMORIZATION = SetMetric("exact_memorization", _exact_memorization, mean, "mean", TOP1)
EXTRACTION_STRENGTH = SetMetric("extraction_strength", _extraction_strength, mean, "mean", TOP1)
