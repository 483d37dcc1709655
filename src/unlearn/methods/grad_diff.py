"""Gradient difference: gradient ascent on the forget set, gradient descent on the retain set.

    L = -gamma * NLL(forget) + alpha * R(retain),   R = NLL (default) or KL(pi_ref || pi_theta)

TOFU's GradDiff baseline (Maini et al. 2024, arXiv:2401.06121; "KL" there is the KL retain variant);
the weights and their defaults follow OpenUnlearning's configs/trainer/GradDiff.yaml (gamma=1,
alpha=1, retain_loss_type=NLL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from unlearn import losses
from unlearn.methods.base import LossInputs, Method, Needs
from unlearn.methods.retain import check_weights, retain_spec


@dataclass(frozen=True)
class GradDiffParams:
    # Defaults: OpenUnlearning configs/trainer/GradDiff.yaml; TOFU weighs both terms equally.
    gamma: float = 1.0  # weight of the (negated) forget NLL
    alpha: float = 1.0  # weight of the retain term
    retain_loss: Literal["nll", "kl"] = "nll"
    # "pcgrad": when the forget gradient conflicts with the retain gradient (negative dot product)
    # it loses its component along it before the two add up (PCGrad, Yu et al. 2020,
    # arXiv:2001.06782): gradient surgery on GradDiff, one process only.
    combine: Literal["sum", "pcgrad"] = "sum"

    def __post_init__(self) -> None:
        check_weights(gamma=self.gamma, alpha=self.alpha)


def grad_diff_loss(
    inputs: LossInputs, params: GradDiffParams
) -> tuple[torch.Tensor, dict[str, float]]:
    """Ascent on forget, descent on retain; the retain term is what keeps the model usable."""
    forget_nll = losses.nll(inputs.forget_logits, inputs.forget_labels)
    logs = {"forget_nll": float(forget_nll.detach())}
    return -params.gamma * forget_nll, logs


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="grad_diff",
    summary="gradient ascent on the forget set plus NLL or KL on the retain set",
    params=GradDiffParams,
    loss=grad_diff_loss,
    needs=lambda p: Needs(retain=retain_spec(p.retain_loss, p.alpha), gradients=p.combine),
    citation=(
        "Maini et al. 2024, TOFU, arXiv:2401.06121 (GradDiff / KL baselines); "
        "defaults from OpenUnlearning configs/trainer/GradDiff.yaml"
    ),
)
