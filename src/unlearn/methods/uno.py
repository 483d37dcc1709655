"""UNO: gradient difference plus a penalty on the alignment of the forget and retain gradients.

    g_f = grad_theta L_f,   L_f = -gamma * NLL(forget)
    g_r = grad_theta L_r,   L_r = alpha * R(retain)
    L   = L_f + L_r + lam * (g_f . g_r)^2 / (|g_f|^2 |g_r|^2)

Mandal & Gottwald 2025, "UNO: Unlearning via Orthogonalization in Generative Models",
arXiv:2506.04712. A step along g_f that has a component along g_r also changes the retain loss:
forgetting then costs utility, and the retain term spends its next steps undoing it. The penalty is
the squared cosine of the two gradients; minimising it moves the parameters to where forgetting and
retaining act on (locally) independent directions, so later forget steps leave the retain loss
alone. The cosine is scale-free, so the penalty does not depend on gamma or alpha (> 0).

The paper works on image generators (VAEs, diffusion transformers) with their own forget losses.
What carries over to language models is the penalty itself, which acts on parameter gradients of
any differentiable loss; the forget term here is gradient ascent on the forget answers, as in
GradDiff. The loop computes g_f and g_r with `create_graph=True` and differentiates the penalty by
a double backward (`Needs(gradients="orthogonal")`); this method only declares it.
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
class UNOParams:
    # Not from the paper: its forget losses, weights and schedules are for image generators and
    # do not transfer (docs/methods/uno.md). gamma = alpha = 1 and an NLL retain term are
    # GradDiff's defaults (OpenUnlearning configs/trainer/GradDiff.yaml); lam = 1 gives the
    # penalty, a squared cosine in [0, 1], the weight of the other terms at their start.
    lam: float = 1.0  # weight of the squared cosine between forget and retain gradients
    gamma: float = 1.0  # weight of the (negated) forget NLL
    alpha: float = 1.0  # weight of the retain term
    retain_loss: Literal["nll", "kl"] = "nll"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam}")
        check_gradient_weights(self.gamma, self.alpha)


def check_gradient_weights(gamma: float, alpha: float) -> None:
    """Both terms must be present: the loop compares their gradients."""
    check_weights(gamma=gamma, alpha=alpha)
    if gamma == 0:
        raise ValueError(
            "gamma must be > 0: the forget gradient is what the retain one is compared to"
        )
    if alpha == 0:
        raise ValueError("alpha must be > 0: the method needs a retain term (and --retain data)")


def forget_ascent_loss(
    inputs: LossInputs, gamma: float, retain_loss: Literal["nll", "kl"], alpha: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """-gamma * NLL(forget) + alpha * R(retain); the loop defers R to its own pass."""
    if inputs.forget_logits is None:
        raise ValueError("this method needs the forget logits (Needs.logits)")
    forget_nll = losses.nll(inputs.forget_logits, inputs.forget_labels)
    logs = {"forget_nll": float(forget_nll.detach())}
    return -gamma * forget_nll, logs


def uno_loss(inputs: LossInputs, params: UNOParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Gradient ascent on forget, descent on retain; the loop adds the orthogonality penalty."""
    return forget_ascent_loss(inputs, params.gamma, params.retain_loss, params.alpha)


METHOD = Method(
    name="uno",
    summary="gradient difference plus lam * squared cosine of the forget and retain gradients",
    params=UNOParams,
    loss=uno_loss,
    needs=lambda p: Needs(
        retain=retain_spec(p.retain_loss, p.alpha), gradients="orthogonal", orthogonal_weight=p.lam
    ),
    citation=(
        "Mandal & Gottwald 2025, UNO: Unlearning via Orthogonalization in Generative Models, "
        "arXiv:2506.04712 (penalty on the gradients' cosine); forget/retain terms as GradDiff"
    ),
)
