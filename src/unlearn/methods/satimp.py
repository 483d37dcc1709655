"""SatImp: gradient ascent with each answer token weighted by saturation times importance.

    p_t = sg(p_theta(y_t | y_<t, x))
    w_t = p_t ** beta1 * (1 - p_t) ** beta2
    L   = gamma * (1/N) * sum_{b,t} w_t * log p_theta(y_t | y_<t, x)  +  alpha * R(retain)

N is the number of answer tokens in the batch, sg stops the gradient. Yang et al. 2025, "Exploring
Criteria of Loss Reweighting to Enhance LLM Unlearning", arXiv:2505.11953 (ICML 2025), Sec. 5. The
paper separates two goals of loss reweighting: *saturation* (spend no more effort on tokens that are
already forgotten: weight p**beta1, small once p is small, as in WGA) and *importance* (emphasise the
tokens that matter most to the loss: (1 - p)**beta2, which downweights tokens the model finds
trivially likely, e.g. function words). Their product keeps the mid-probability tokens that carry
the answer, and is 0 at both p = 0 and p = 1.

The exact form (a per-token mean over the batch's answer tokens, weights from exp(-CE) detached) is
`compute_satimp_loss` in OpenUnlearning src/trainer/utils.py, used by src/trainer/unlearn/satimp.py
with the retain term weighted as GradDiff does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from unlearn import losses
from unlearn.methods.base import LossInputs, Method, Needs
from unlearn.methods.retain import check_weights, retain_spec


@dataclass(frozen=True)
class SatImpParams:
    # Defaults: OpenUnlearning community/methods/SatImp/README.md (beta1 5, beta2 1, gamma 1,
    # alpha 0.1: "the rate between forget loss and retain loss is set to 10") and the SatImp
    # trainer's own defaults in src/trainer/unlearn/satimp.py. configs/trainer/SatImp.yaml has
    # alpha and gamma the other way round (alpha 1, gamma 0.1), contradicting that README.
    beta1: float = 5.0  # saturation exponent: weight p**beta1
    beta2: float = 1.0  # importance exponent: weight (1 - p)**beta2
    gamma: float = 1.0  # weight of the SatImp forget term
    alpha: float = 0.1  # weight of the retain term
    retain_loss: Literal["nll", "kl", "none"] = "nll"

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        check_weights(gamma=self.gamma, alpha=self.alpha)


def satimp_weights(logp: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """p**beta1 * (1 - p)**beta2 from token log-probs, detached."""
    p = logp.detach().exp()
    return p**beta1 * (1 - p) ** beta2


def satimp_loss(inputs: LossInputs, params: SatImpParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Saturation- and importance-weighted ascent on forget tokens, plus the retain term."""
    logp, mask = losses.token_logprobs(inputs.forget_logits, inputs.forget_labels)
    weight = satimp_weights(logp, params.beta1, params.beta2) * mask
    count = mask.sum().clamp(min=1)
    forget = (weight * logp).sum() / count
    logs = {
        "forget_loss": float(forget.detach()),
        "forget_nll": float(-logp.detach().sum() / count),
        "token_weight": float(weight.sum() / count),
    }
    return params.gamma * forget, logs


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="satimp",
    summary="gradient ascent with tokens weighted by p**beta1 * (1-p)**beta2, plus a retain term",
    params=SatImpParams,
    loss=satimp_loss,
    needs=lambda p: Needs(retain=retain_spec(p.retain_loss, p.alpha)),
    citation=(
        "Yang et al. 2025, Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning, "
        "arXiv:2505.11953; formula from OpenUnlearning compute_satimp_loss, defaults from its "
        "community/methods/SatImp/README.md"
    ),
)
