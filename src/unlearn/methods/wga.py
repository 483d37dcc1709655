"""WGA, weighted gradient ascent: gradient ascent with each answer token weighted by its own
(detached) probability under the current model.

    w_t = sg(p_theta(y_t | y_<t, x)) ** beta
    L   = gamma * (1/N) * sum_{b,t} w_t * log p_theta(y_t | y_<t, x)  +  alpha * R(retain)

N is the number of answer tokens in the batch, sg stops the gradient. Wang et al. 2025, "Rethinking
LLM Unlearning Objectives: A Gradient Perspective and Go Beyond", arXiv:2502.19301 (ICLR 2025). Plain
gradient ascent's per-token gradient is grad(p)/p, so it grows without bound exactly on the tokens
that are already forgotten (p -> 0): that is what makes it collapse the model. The weight p**beta
cancels that inverse-confidence factor; at beta = 1 the gradient is that of mean_t p_t, bounded, and
it fades on its own once a token is unlikely. beta = 0 is gradient ascent.

The exact form (a per-token mean over the batch's answer tokens, weights from exp(-CE) detached) is
`compute_wga_loss` in OpenUnlearning src/trainer/utils.py, used by src/trainer/unlearn/wga.py, which
adds the retain term with gamma/alpha weights as GradDiff does.
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
class WGAParams:
    # Defaults: OpenUnlearning configs/trainer/WGA.yaml (beta 1, alpha 1, gamma 1, NLL retain);
    # beta = 1 is also the paper's setting (OpenUnlearning community/methods/WGA/README.md).
    beta: float = 1.0  # exponent of the token weight p**beta; 0 gives gradient ascent
    gamma: float = 1.0  # weight of the WGA forget term
    alpha: float = 1.0  # weight of the retain term
    retain_loss: Literal["nll", "kl", "none"] = "nll"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        check_weights(gamma=self.gamma, alpha=self.alpha)


def wga_forget_term(
    logits: torch.Tensor, labels: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(forget term, answer-token log-probs [B, T-1], their mask): the weighted mean of log p."""
    logp, mask = losses.token_logprobs(logits, labels)
    weight = logp.detach().exp() ** beta
    term = (weight * logp * mask).sum() / mask.sum().clamp(min=1)
    return term, logp, mask


def wga_loss(inputs: LossInputs, params: WGAParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Probability-weighted ascent on forget tokens, plus the weighted retain term."""
    forget, logp, mask = wga_forget_term(inputs.forget_logits, inputs.forget_labels, params.beta)
    count = mask.sum().clamp(min=1)
    logs = {
        "forget_loss": float(forget.detach()),
        "forget_nll": float(-logp.detach().sum() / count),
        "token_weight": float(((logp.detach().exp() ** params.beta) * mask).sum() / count),
    }
    return params.gamma * forget, logs


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="wga",
    summary="gradient ascent with tokens weighted by their probability p**beta, plus a retain term",
    params=WGAParams,
    loss=wga_loss,
    needs=lambda p: Needs(retain=retain_spec(p.retain_loss, p.alpha)),
    citation=(
        "Wang et al. 2025, Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go "
        "Beyond, arXiv:2502.19301; formula and defaults from OpenUnlearning compute_wga_loss / "
        "configs/trainer/WGA.yaml"
    ),
)
