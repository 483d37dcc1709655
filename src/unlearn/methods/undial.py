"""UNDIAL: self-distillation towards the starting model with the answer token's logit lowered.

    q_t = softmax(z_ref_t - beta * onehot(y_t))            (teacher: the starting model, adjusted)
    L = gamma * mean_{answer tokens t} CE(q_t, softmax(z_theta_t)) + alpha * R(retain)
      = gamma * mean_t -sum_v q_t(v) log softmax(z_theta_t)(v) + alpha * R(retain)

Dong et al. 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in Large
Language Models", arXiv:2402.10052 (NAACL 2025). The target is a fixed distribution, so the loss is
bounded below by the teacher's entropy and the model cannot be driven to collapse the way gradient
ascent drives it: it only moves mass away from the memorised token, onto the tokens the starting
model already found plausible.

The forget term is OpenUnlearning's `compute_undial_loss` (src/trainer/utils.py), which builds the
teacher from a frozen copy of the starting model. Here the starting model's logits on the forget
batch are cached once before training (`needs`: reference "logits"), which is the same teacher
because it never changes. One deliberate difference: OpenUnlearning averages the cross-entropy over
every position of the sequence, prompt and padding included (their -100 labels index the vocabulary
from the end); we average over answer tokens only, like every other method here.
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
class UNDIALParams:
    # Defaults: OpenUnlearning configs/trainer/UNDIAL.yaml (beta 10, gamma 1, alpha 0, NLL retain);
    # alpha=0 because the paper uses no retain set (community/methods/UNDIAL/README.md, which
    # also gives beta in [3, 10, 30] as the range to search).
    beta: float = 10.0  # how far the answer token's logit is lowered in the teacher
    gamma: float = 1.0  # weight of the distillation (forget) term
    alpha: float = 0.0  # weight of the retain term; 0 = none, as in the paper
    retain_loss: Literal["nll", "kl", "none"] = "nll"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta}")
        check_weights(gamma=self.gamma, alpha=self.alpha)


def undial_forget_term(
    logits: losses.Logits, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """Mean over answer tokens of CE(softmax(ref - beta * onehot(y)), softmax(logits))."""
    shift_labels = labels[:, 1:]
    student, mask = losses.answer_logits(logits, labels)  # [N, V], only answer positions
    teacher = ref_logits[:, :-1, :].to(student.device)[mask].float()
    target = shift_labels[mask]
    teacher = teacher.scatter_add(-1, target.unsqueeze(-1), torch.full_like(teacher[:, :1], -beta))
    soft = F.softmax(teacher, dim=-1)
    if student.shape[0] == 0:
        return student.sum()  # no answer tokens: a zero that keeps the graph
    return F.cross_entropy(student, soft)


def undial_loss(inputs: LossInputs, params: UNDIALParams) -> tuple[torch.Tensor, dict[str, float]]:
    """Distillation towards the adjusted starting model on the forget batch, plus the retain term."""
    ref_logits = inputs.ref_forget.get("logits")
    if ref_logits is None:
        raise ValueError("UNDIAL needs ref_forget['logits'] (declared in Needs.reference)")
    forget = undial_forget_term(inputs.forget_logits, ref_logits, inputs.forget_labels, params.beta)
    logs = {
        "forget_loss": float(forget.detach()),
        "forget_nll": float(losses.nll(inputs.forget_logits.detach(), inputs.forget_labels)),
    }
    return params.gamma * forget, logs


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="undial",
    summary="self-distillation towards the starting model with the answer token's logit lowered",
    params=UNDIALParams,
    loss=undial_loss,
    needs=lambda p: Needs(retain=retain_spec(p.retain_loss, p.alpha), reference=("logits",)),
    citation=(
        "Dong et al. 2024, UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning "
        "in Large Language Models, arXiv:2402.10052; defaults from OpenUnlearning UNDIAL.yaml"
    ),
)
