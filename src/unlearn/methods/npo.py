"""Negative Preference Optimization: DPO with the forget answer as the only, losing, response.

    d = log pi_theta(y|x) - log pi_ref(y|x)
    L = gamma * -(2/beta) * mean_b log sigmoid(-beta * d) + alpha * R(retain)

Zhang et al. 2024, "Negative Preference Optimization: From Catastrophic Collapse to Effective
Unlearning", arXiv:2404.05868. The forget term is bounded below by 0 and its gradient is gradient
ascent's reweighted by 2 * sigmoid(beta * d), which vanishes once an answer is unlikely: that is what
slows the collapse gradient ascent runs into. At the start (d = 0) it equals (2/beta) * log 2.

log pi(y|x) is the SUM of answer-token log-probabilities, as in the NPO paper and OpenUnlearning
(`compute_batch_nll` sums over tokens); some codebases use the per-token mean instead, which makes
beta act on a different scale, so betas tuned there do not transfer. pi_ref is the starting model;
its log-probabilities are cached once before training (declared by `needs`: `ref_forget_logp`).
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
class NPOParams:
    # beta=0.1: NPO paper's TOFU setting and OpenUnlearning configs/trainer/NPO.yaml;
    # gamma=alpha=1 and an NLL retain term (NPO+RT in the paper): OpenUnlearning NPO.yaml.
    beta: float = 0.1  # inverse temperature; as beta -> 0 NPO tends to gradient ascent
    gamma: float = 1.0  # weight of the NPO forget term
    alpha: float = 1.0  # weight of the retain term
    retain_loss: Literal["nll", "kl", "none"] = "nll"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        check_weights(gamma=self.gamma, alpha=self.alpha)


def npo_forget_term(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """-(2/beta) * mean log sigmoid(-beta * (logp - ref_logp)), from sequence log-probs [B]."""
    log_ratio = logp - ref_logp.to(logp)
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def npo_loss(inputs: LossInputs, params: NPOParams) -> tuple[torch.Tensor, dict[str, float]]:
    """NPO forget term on cached reference log-probs, plus the weighted retain term."""
    if inputs.ref_forget_logp is None:
        raise ValueError("NPO needs ref_forget_logp (declared in Needs.reference)")
    logp, length = losses.sequence_logprob(inputs.forget_logits, inputs.forget_labels)
    forget = npo_forget_term(logp, inputs.ref_forget_logp, params.beta)
    logs = {
        "forget_loss": float(forget.detach()),
        "log_ratio": float((logp.detach() - inputs.ref_forget_logp.to(logp)).mean()),
        "forget_nll": float(-logp.detach().sum() / length.sum().clamp(min=1)),
    }
    return params.gamma * forget, logs


METHOD = Method(
    name="npo",
    summary="negative preference optimization against the starting model, plus a retain term",
    params=NPOParams,
    loss=npo_loss,
    citation=(
        "Zhang et al. 2024, Negative Preference Optimization: From Catastrophic Collapse to "
        "Effective Unlearning, arXiv:2404.05868; defaults from OpenUnlearning NPO.yaml"
    ),
    needs=lambda p: Needs(retain=retain_spec(p.retain_loss, p.alpha), reference=("sequence_logp",)),
)
