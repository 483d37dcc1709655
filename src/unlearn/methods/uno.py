"""UNO: unlearning via orthogonalization (Mandal & Gottwald 2025, arXiv:2506.04712).

As the authors' code defines it for a conditional generator (github pinakm9/forget,
modules/imagenet/ortho.py; the class-conditional DiT is the model an LLM corresponds to, the
prompt being the condition):

    L_f   = NLL(forget answer | forget question)        the memorised data: only its gradient is used
    L_sub = NLL(substitute answer | forget question)    the forgetting substitute: a refusal here
    L_r   = NLL(retain answer | retain question)
    g_f = grad L_f,   g_r = grad (gamma * L_sub + alpha * L_r)
    L   = gamma * L_sub + alpha * L_r + lam * (g_f . g_r)^2 / (|g_f|^2 |g_r|^2 + 1e-12)

There is no ascent term: the model learns the substitute answer for the forget questions and keeps
the retain answers, while the penalty (a squared cosine, differentiated by a double backward) moves
it to where that descent is orthogonal to the gradient of the memorised answers. In the authors'
DiT the substitute is "retain images under the forget label"; for a language model the answer the
forget question should get instead is a refusal (`substitute="idk"`, IdkNLL's refusals);
`substitute="none"` is their unconditional VAE form, L = alpha * L_r + lam * cos^2.

In this project `loss` returns gamma * L_sub (from the second answers), `probe` returns L_f (whose
gradient only enters the cosine), the retain term is the declared one, and the loop combines them
(`Needs(gradients="uno")`, unlearn.train.gradients). What differs from the authors' code is in
docs/methods/uno.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from unlearn import losses
from unlearn.methods.base import LossInputs, Method, Needs
from unlearn.methods.idk_nll import refusals_for
from unlearn.methods.retain import check_weights, retain_spec


@dataclass(frozen=True)
class UNOParams:
    # lam 0.02: the authors' ImageNet DiT runs, the only ones with mean-reduced losses as here
    # (notebooks/summary/ImageNet.ipynb, dit-o/config.json); their VAE runs use 1e3 on sum-reduced
    # losses, about the same share (5-10%) of the starting loss. gamma = alpha = 1: L_sub and L_r
    # have weight 1 in modules/imagenet/ortho.py. NLL retain: their models' own training loss.
    lam: float = 0.02  # weight of the squared cosine between g_f and g_r
    gamma: float = 1.0  # weight of the substitute term L_sub
    alpha: float = 1.0  # weight of the retain term
    retain_loss: Literal["nll", "kl"] = "nll"
    substitute: Literal["idk", "none"] = "idk"  # what the forget questions learn to answer
    refusals: str | None = None  # .txt / .jsonl of refusal sentences; None = the built-in list

    def __post_init__(self) -> None:
        check_uno_params(self)


def check_uno_params(p: Any) -> None:
    if not (math.isfinite(p.lam) and p.lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {p.lam}")
    check_weights(gamma=p.gamma, alpha=p.alpha)
    if p.alpha == 0 and (p.substitute == "none" or p.gamma == 0):
        raise ValueError(
            "alpha must be > 0 when there is no substitute term: g_r would be zero "
            "(the method needs a retain term, and --retain data)"
        )


def substitute_loss(inputs: LossInputs, params: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """gamma * NLL of the substitute answers (the second answers), or 0 without a substitute."""
    if inputs.forget_logits is None:
        raise ValueError("UNO needs the forget logits (Needs.logits)")
    with torch.no_grad():
        forget_nll = losses.nll(inputs.forget_logits, inputs.forget_labels)
    logs = {"forget_nll": float(forget_nll)}
    if params.substitute == "none" or params.gamma == 0:
        return inputs.forget_logits.sum() * 0.0, logs
    if inputs.second_logits is None or inputs.second_labels is None:
        raise ValueError("UNO's substitute term needs the second answers (Needs.second_target)")
    sub = losses.nll(inputs.second_logits, inputs.second_labels)
    logs["substitute_nll"] = float(sub.detach())
    return params.gamma * sub, logs


def forget_probe(inputs: LossInputs, params: Any) -> torch.Tensor:
    """L_f, the NLL of the memorised forget answers: its gradient g_f is what g_r is kept
    orthogonal to (UNO) or projected off (UNO-S); it is never minimised or ascended."""
    assert inputs.forget_logits is not None
    return losses.nll(inputs.forget_logits, inputs.forget_labels)


def substitute_targets(examples: Sequence[Any], params: Any, seed: int) -> list[str]:
    """One refusal per forget example (IdkNLL's, stable per index and seed)."""
    return refusals_for(examples, params.refusals, seed, "uno")


def uno_needs(params: Any, gradients: str) -> Needs:
    return Needs(
        retain=retain_spec(params.retain_loss, params.alpha),
        second_target=params.substitute != "none" and params.gamma != 0,
        gradients=gradients,
        orthogonal_weight=params.lam,
    )


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="uno",
    summary="descend a refusal substitute and the retain loss, their gradient kept orthogonal to the forget gradient",
    params=UNOParams,
    loss=substitute_loss,
    citation=(
        "Mandal & Gottwald 2025, UNO: Unlearning via Orthogonalization in Generative Models, "
        "arXiv:2506.04712; authors' code pinakm9/forget (modules/imagenet/ortho.py)"
    ),
    needs=lambda p: uno_needs(p, "uno"),
    second_targets=substitute_targets,
    probe=forget_probe,
)
