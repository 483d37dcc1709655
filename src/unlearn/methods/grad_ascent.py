"""Gradient ascent: push the forget answers' likelihood down with no regulariser.

    L = -NLL(forget)

The simplest unlearning baseline (TOFU, Maini et al. 2024, arXiv:2401.06121; OpenUnlearning's
GradAscent). Unbounded below, so it drives the model towards collapse if run for long; it is kept as
the reference point the other methods improve on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unlearn import losses
from unlearn.methods.base import LossInputs, Method


@dataclass(frozen=True)
class GradAscentParams:
    """No hyperparameters beyond the optimiser's (TOFU / OpenUnlearning have none either)."""


def grad_ascent_loss(
    inputs: LossInputs, params: GradAscentParams
) -> tuple[torch.Tensor, dict[str, float]]:
    """Minimising -NLL is maximising the forget NLL."""
    forget_nll = losses.nll(inputs.forget_logits, inputs.forget_labels)
    return -forget_nll, {"forget_nll": float(forget_nll.detach())}


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="grad_ascent",
    summary="gradient ascent on the forget set (maximise its NLL; no retain term)",
    params=GradAscentParams,
    loss=grad_ascent_loss,
    citation="Maini et al. 2024, TOFU: A Task of Fictitious Unlearning for LLMs, arXiv:2401.06121",
)
