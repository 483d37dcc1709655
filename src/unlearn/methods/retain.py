"""The retain term that most unlearning methods add to their forget term, and how it is weighted.

Forgetting alone (gradient ascent, NPO without a regulariser) degrades the whole model; the usual
remedy, from TOFU's GradDiff/KL baselines onwards, is to keep the model good on a retain set while
it forgets. Two flavours exist:

- "nll": keep fitting the retain answers, L = NLL(retain);
- "kl":  stay close to the starting model on the retain batch, L = KL(pi_ref || pi_theta) per token
  (the frozen starting model's logits come in `LossInputs.ref_retain_logits`).

A method declares its term (`retain_spec`, or a `RetainTerm` of its own) and the training loop
adds it; the method's loss returns its forget term only.
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


def declared_value(term: RetainTerm, inputs: LossInputs) -> torch.Tensor:
    """The unweighted value of a method's declared retain term on `inputs`' retain fields."""
    return term.loss(inputs) if term.loss is not None else retain_term(term.kind, inputs)  # type: ignore[arg-type]


def declared_weight(term: RetainTerm, state: dict[str, float]) -> float:
    """The term's weight, times the state entry it names (a dual variable) if any."""
    return term.weight * (state[term.state_weight] if term.state_weight else 1.0)


def objective(method, inputs: LossInputs, params) -> tuple[torch.Tensor, dict[str, float]]:
    """The method's forget term plus its declared retain term, both on `inputs`: the objective one
    loop step minimises (the loop computes the two on their own batches, in separate passes).
    For checking a method by hand; `inputs` must carry the retain fields the term reads."""
    loss, logs = method.loss(inputs, params)
    term = method.needs(params).retain
    if term is None or term.weight == 0:
        return loss, logs
    value = declared_value(term, inputs)
    state = inputs.state or (dict(method.init_state(params)) if method.init_state else {})
    return loss + declared_weight(term, state) * value, {
        **logs,
        "retain_loss": float(value.detach()),
    }
