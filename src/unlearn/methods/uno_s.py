"""UNO-S: gradient difference with the forget gradient projected off the retain one (surgery).

    g_f = grad_theta (-gamma * NLL(forget)),   g_r = grad_theta (alpha * R(retain))
    g_f' = g_f - (g_f . g_r / |g_r|^2) g_r    if g_f . g_r < 0  (or always, `project_always`)
    step along g_f' + g_r

Mandal & Gottwald 2025, "UNO: Unlearning via Orthogonalization in Generative Models",
arXiv:2506.04712, whose surgery variant builds on PCGrad (Yu et al. 2020, "Gradient Surgery for
Multi-Task Learning", arXiv:2001.06782). When the forget gradient points against the retain
gradient, following it would undo what the retain term protects; removing that component keeps the
part of the forget step that leaves the retain loss unchanged to first order. Unlike UNO's penalty
this costs no double backward: one extra dot product per step.

The loop accumulates g_f and g_r over the step's micro-batches separately, projects, and logs their
cosine as "grad_cos" (`Needs(gradients="project")`); this method only declares it. The forget term
is GradDiff's gradient ascent, shared with `uno`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from unlearn.methods.base import LossInputs, Method, Needs
from unlearn.methods.retain import retain_spec
from unlearn.methods.uno import check_gradient_weights, forget_ascent_loss


@dataclass(frozen=True)
class UNOSParams:
    # Not from the paper (image generators, see docs/methods/uno.md): gamma = alpha = 1 and an
    # NLL retain term are GradDiff's defaults (OpenUnlearning configs/trainer/GradDiff.yaml);
    # projecting only on conflict is PCGrad's rule.
    gamma: float = 1.0  # weight of the (negated) forget NLL
    alpha: float = 1.0  # weight of the retain term
    retain_loss: Literal["nll", "kl"] = "nll"
    project_always: bool = False  # project g_f off g_r even when they do not conflict

    def __post_init__(self) -> None:
        check_gradient_weights(self.gamma, self.alpha)


def uno_s_loss(inputs: LossInputs, params: UNOSParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Gradient ascent on forget, descent on retain; the loop does the projection."""
    return forget_ascent_loss(inputs, params.gamma, params.retain_loss, params.alpha)


METHOD = Method(
    name="uno_s",
    summary="gradient difference with the forget gradient projected off the retain gradient",
    params=UNOSParams,
    loss=uno_s_loss,
    needs=lambda p: Needs(
        retain=retain_spec(p.retain_loss, p.alpha),
        gradients="project",
        project_always=p.project_always,
    ),
    citation=(
        "Mandal & Gottwald 2025, UNO: Unlearning via Orthogonalization in Generative Models, "
        "arXiv:2506.04712 (UNO-S, gradient surgery as PCGrad, Yu et al. 2020, arXiv:2001.06782)"
    ),
)
