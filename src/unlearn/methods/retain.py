"""The retain term that most unlearning methods add to their forget term, and how it is weighted.

Forgetting alone (gradient ascent, NPO without a regulariser) degrades the whole model; the usual
remedy, from TOFU's GradDiff/KL baselines onwards, is to keep the model good on a retain set while
it forgets. Two flavours exist:

- "nll": keep fitting the retain answers, L = NLL(retain);
- "kl":  stay close to the starting model on the retain batch, L = KL(pi_ref || pi_theta) per token
  (the frozen starting model's logits come in `LossInputs.ref_retain_logits`).

Methods combine this with their own forget term instead of inheriting it from a GradDiff parent.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from unlearn import losses
from unlearn.methods.base import LossInputs, RetainTerm

RetainLoss = Literal["nll", "kl", "none"]


def retain_term(kind: RetainLoss, inputs: LossInputs) -> torch.Tensor:
    """The unweighted retain loss; raises ValueError if the loop did not supply what `kind` needs."""
    if kind == "none":
        return torch.zeros((), device=inputs.forget_logits.device)
    if kind not in ("nll", "kl"):
        raise ValueError(f"unknown retain_loss {kind!r}; valid: nll, kl, none")
    if inputs.retain_logits is None or inputs.retain_labels is None:
        raise ValueError(f"retain_loss={kind!r} needs retain_logits and retain_labels, got None")
    if kind == "nll":
        return losses.nll(inputs.retain_logits, inputs.retain_labels)
    if inputs.ref_retain_logits is None:
        raise ValueError("retain_loss='kl' needs ref_retain_logits (the frozen starting model)")
    return losses.kl_to_reference(
        inputs.retain_logits, inputs.ref_retain_logits, inputs.retain_labels
    )


def weighted_retain(
    kind: RetainLoss, alpha: float, inputs: LossInputs, logs: dict[str, float]
) -> torch.Tensor:
    """alpha * retain_term, skipped entirely when alpha is 0 or kind is "none".

    The loop only forwards a retain batch when `Method.needs_retain` says so (alpha != 0 and kind
    != "none"), so the term must not be computed otherwise. With `defer_retain` the loop computes
    it itself in a separate backward pass. Records the unweighted term in `logs`.
    """
    if alpha == 0 or kind == "none" or inputs.defer_retain:
        return torch.zeros((), device=inputs.forget_logits.device)
    term = retain_term(kind, inputs)
    logs["retain_loss"] = float(term.detach())
    return alpha * term


def retain_spec(kind: RetainLoss, alpha: float) -> RetainTerm | None:
    """The declared retain term of a method with `alpha` / `retain_loss` hyperparameters."""
    if kind == "none" or alpha == 0:
        return None
    return RetainTerm(weight=alpha, kind=kind)


def check_weights(**weights: float) -> None:
    """Reject negative or non-finite loss weights: a negative weight turns forgetting into learning."""
    for name, value in weights.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
