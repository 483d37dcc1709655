"""SimNPO: NPO without a reference model, on length-normalised log-probabilities.

    L = gamma * -(2/beta) * mean_b log sigmoid(beta * (-log pi_theta(y|x) / |y| - delta))
        + alpha * R(retain)

Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
Unlearning", arXiv:2410.07163. Replacing NPO's reward log(pi_theta / pi_ref) by SimPO's
(1/|y|) log pi_theta removes the bias towards examples the starting model already found unlikely and
stops long answers dominating the gradient.

Margin placement: the paper writes log sigmoid(-(beta/|y|) log pi_theta(y|x) - gamma_paper); the
authors' code (OPTML-Group/Unlearn-Simple, TOFU/dataloader.py) and OpenUnlearning's
trainer/unlearn/simnpo.py compute log sigmoid(beta * (avg_nll - delta)), i.e. gamma_paper =
beta * delta. We follow the code, so `delta` is on the per-token NLL scale. Both default to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from unlearn import losses
from unlearn.methods.base import LossInputs, Method, Needs
from unlearn.methods.retain import check_weights, retain_spec


@dataclass(frozen=True)
class SimNPOParams:
    # Defaults: the authors' TOFU forget10 run (Unlearn-Simple TOFU/README.md: beta=4.5,
    # npo_coeff=0.125, margin gamma=0 in TOFU/config/forget.yaml, grad_diff_coeff=1), adopted
    # unchanged by OpenUnlearning configs/trainer/SimNPO.yaml (beta 4.5, gamma 0.125, delta 0).
    beta: float = 4.5  # inverse temperature on the per-token NLL
    delta: float = 0.0  # margin, in per-token NLL units (the paper's gamma / beta)
    gamma: float = 0.125  # weight of the SimNPO forget term (npo_coeff in the authors' code)
    alpha: float = 1.0  # weight of the retain term
    retain_loss: Literal["nll", "kl", "none"] = "nll"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        if not math.isfinite(self.delta):
            raise ValueError(f"delta must be a finite number, got {self.delta}")
        check_weights(gamma=self.gamma, alpha=self.alpha)


def simnpo_forget_term(
    logp: torch.Tensor, length: torch.Tensor, beta: float, delta: float
) -> torch.Tensor:
    """-(2/beta) * mean log sigmoid(beta * (avg_nll - delta)) from summed log-probs and |y| [B]."""
    avg_nll = -logp / length.clamp(min=1).to(logp)
    return -(2.0 / beta) * F.logsigmoid(beta * (avg_nll - delta)).mean()


def simnpo_loss(inputs: LossInputs, params: SimNPOParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Reference-free forget term plus the weighted retain term."""
    logp, length = losses.sequence_logprob(inputs.forget_logits, inputs.forget_labels)
    forget = simnpo_forget_term(logp, length, params.beta, params.delta)
    logs = {
        "forget_loss": float(forget.detach()),
        "forget_nll": float(-logp.detach().sum() / length.sum().clamp(min=1)),
    }
    return params.gamma * forget, logs


METHOD = Method(
    name="simnpo",
    summary="reference-free, length-normalised NPO, plus a retain term",
    params=SimNPOParams,
    loss=simnpo_loss,
    needs=lambda p: Needs(retain=retain_spec(p.retain_loss, p.alpha)),
    citation=(
        "Fan et al. 2024, Simplicity Prevails: Rethinking Negative Preference Optimization for "
        "LLM Unlearning, arXiv:2410.07163; defaults from OPTML-Group/Unlearn-Simple (TOFU "
        "forget10) = OpenUnlearning SimNPO.yaml"
    ),
)
