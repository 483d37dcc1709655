"""ROUGE between a greedy generation and the reference answer: how much of the answer comes back.

Scored with Google's `rouge_score` exactly as TOFU (`eval_rouge_recall`) and OpenUnlearning
(`eval_text_similarity`) do: `RougeScorer(["rouge1", "rougeL"], use_stemmer=True)` and
`score(reference, generation)`, the reference as target. TOFU's headline number is ROUGE-L recall
(the share of the reference's words recovered in order), averaged over examples; OpenUnlearning
also reports ROUGE-1 recall and ROUGE-L F1, and MUSE's knowledge/verbatim memorisation use ROUGE-L
F1. We return all four per example.

Note `rouge_score`'s tokenizer keeps only [a-z0-9] runs after lowercasing, so text in other scripts
scores 0; that is the same in TOFU and OpenUnlearning.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer

from unlearn.metrics import _inputs
from unlearn.metrics.declare import GENERATED_ROLES, SetData, SetMetric, mean

ROUGE_KEYS = ("rouge1_recall", "rouge1_f1", "rouge_l_recall", "rouge_l_f1")


@lru_cache(maxsize=2)
def _scorer(stem: bool = True) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=stem)


def rouge(
    generations: Sequence[str], references: Sequence[str], stem: bool = True
) -> dict[str, np.ndarray]:
    """Per-example ROUGE-1/ROUGE-L recall and F1, each [N], keyed by `ROUGE_KEYS`.

    `stem`: Porter-stem words first (TOFU and OpenUnlearning do; MUSE's own code does not)."""
    _inputs.same_length(generations, references, "generations and references")
    out: dict[str, list[float]] = {key: [] for key in ROUGE_KEYS}
    for generation, reference in zip(generations, references, strict=True):
        scores = _scorer(stem).score(reference, generation)
        out["rouge1_recall"].append(scores["rouge1"].recall)
        out["rouge1_f1"].append(scores["rouge1"].fmeasure)
        out["rouge_l_recall"].append(scores["rougeL"].recall)
        out["rouge_l_f1"].append(scores["rougeL"].fmeasure)
    return {key: np.asarray(values, dtype=np.float64) for key, values in out.items()}


def mean_rouge(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """Average each per-example ROUGE array over the split (what TOFU and MUSE report)."""
    return {
        key: float(np.mean(_inputs.nonempty(np.asarray(values, dtype=np.float64), key)))
        for key, values in scores.items()
    }


# ---------------------------------------------------------------------------- declarations
def _rouge(data: SetData) -> dict[str, np.ndarray]:
    return rouge([r["generation"] for r in data.records], list(data.texts), stem=data.stem)


ROUGE = SetMetric(
    "rouge", _rouge, mean, "mean", frozenset({"generation", "data.text"}), keys=ROUGE_KEYS,
    kinds=("qa",), roles=GENERATED_ROLES, needs_generation=True,
)  # fmt: skip
