"""DPO for unlearning: prefer a given answer (win) over the data's answer (lose, the one to forget).

    w = log pi_theta(y_win|x) - log pi_ref(y_win|x)
    l = log pi_theta(y_lose|x) - log pi_ref(y_lose|x)
    L = gamma * -(2/beta) * mean_b log sigmoid(beta * (w - l)) + alpha * R(retain)

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model", arXiv:2305.18290, applied to unlearning as in TOFU (Maini et al. 2024) and OpenUnlearning:
`compute_dpo_loss` in open-unlearning src/trainer/utils.py is exactly the forget term above (its
`-2 / beta` factor included, which plain DPO lacks: it makes the term NPO's scale, and at the start,
w = l = 0, it equals (2/beta) * log 2), with log pi the SUM of answer-token log-probs
(`compute_batch_nll`). src/trainer/unlearn/dpo.py takes win = the "alternate" answer and
lose = the "original" forget answer, and adds gamma/alpha weights and the retain term as GradDiff.

Here the losing answer is the forget batch itself and the winning one is the method's second
target: for `dpo` the data's `preferred` column, for `idk_dpo` a refusal. OpenUnlearning keeps a
frozen reference model for pi_ref; both answers' reference log-probs are cached once before
training instead (`Needs.reference`), so no second model is in memory (unless retain_loss="kl").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from unlearn import losses
from unlearn.errors import UnlearnError
from unlearn.methods.base import LossInputs, Method, Needs
from unlearn.methods.retain import check_weights, retain_spec


@dataclass(frozen=True)
class DPOParams:
    # beta=0.1, gamma=alpha=1, NLL retain term: OpenUnlearning configs/trainer/DPO.yaml (its
    # Python default beta=1.0 is overridden there); beta=0.1 is also DPO's own common setting
    # (Rafailov et al. 2023) and TOFU's dpo loss.
    beta: float = 0.1  # inverse temperature of the preference margin
    gamma: float = 1.0  # weight of the DPO forget term
    alpha: float = 1.0  # weight of the retain term
    retain_loss: Literal["nll", "kl", "none"] = "nll"

    def __post_init__(self) -> None:
        check_dpo_params(self.beta, self.gamma, self.alpha)


def check_dpo_params(beta: float, gamma: float, alpha: float) -> None:
    """beta > 0 (the margin's scale; the loss divides by it) and non-negative finite weights."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    check_weights(gamma=gamma, alpha=alpha)


def dpo_forget_term(
    win_log_ratio: torch.Tensor, lose_log_ratio: torch.Tensor, beta: float
) -> torch.Tensor:
    """-(2/beta) * mean log sigmoid(beta * (win - lose)), from per-sequence log-ratios [B]."""
    return -(2.0 / beta) * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def dpo_loss(inputs: LossInputs, params: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO forget term on cached reference log-probs of both answers, plus the retain term.

    `params` is any dataclass with beta, gamma, alpha and retain_loss (DPOParams, IdkDPOParams).
    """
    ref_win = inputs.ref_second.get("sequence_logp")
    if inputs.second_logits is None or inputs.second_labels is None or ref_win is None:
        raise ValueError("DPO needs second_logits/labels and ref_second['sequence_logp']")
    if inputs.ref_forget_logp is None:
        raise ValueError("DPO needs ref_forget_logp (declared in Needs.reference)")
    win_logp, _ = losses.sequence_logprob(inputs.second_logits, inputs.second_labels)
    lose_logp, lose_len = losses.sequence_logprob(inputs.forget_logits, inputs.forget_labels)
    win = win_logp - ref_win.to(win_logp)
    lose = lose_logp - inputs.ref_forget_logp.to(lose_logp)
    forget = dpo_forget_term(win, lose, params.beta)
    logs = {
        "forget_loss": float(forget.detach()),
        "win_log_ratio": float(win.detach().mean()),
        "lose_log_ratio": float(lose.detach().mean()),
        "forget_nll": float(-lose_logp.detach().sum() / lose_len.sum().clamp(min=1)),
        "preferred_nll": float(losses.nll(inputs.second_logits.detach(), inputs.second_labels)),
    }
    return params.gamma * forget, logs


def dpo_needs(params: Any) -> Needs:
    """Retain term, both answers' reference log-probs (cached), and a second answer per example."""
    return Needs(
        retain=retain_spec(params.retain_loss, params.alpha),
        reference=("sequence_logp",),
        second_target=True,
    )


def preferred_targets(examples: Sequence[Any], params: DPOParams, seed: int) -> list[str]:
    """The data's preferred answer of every forget example (`forget.preferred_key` column)."""
    for e in examples:
        if e.kind != "qa" or e.preferred is None:
            what = "is a document" if e.kind != "qa" else "has no preferred answer"
            raise UnlearnError(
                f"method 'dpo' needs a preferred answer for every forget example, but example "
                f"'{e.id}' {what}; add a 'preferred' column to the question/answer forget data "
                "(or name yours with forget.preferred_key=NAME), or use --method idk_dpo to "
                "prefer refusals"
            )
    return [e.preferred for e in examples]


METHOD = Method(
    name="dpo",
    summary="prefer the data's 'preferred' answer over the answer to forget (DPO), plus a retain term",
    params=DPOParams,
    loss=dpo_loss,
    citation=(
        "Rafailov et al. 2023, Direct Preference Optimization, arXiv:2305.18290; loss and defaults "
        "from OpenUnlearning (trainer/utils.py compute_dpo_loss, configs/trainer/DPO.yaml)"
    ),
    needs=dpo_needs,
    second_targets=preferred_targets,
)
