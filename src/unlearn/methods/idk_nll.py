"""IdkNLL: teach the model to answer forget questions with a refusal ("I don't know").

    L = gamma * NLL(forget question -> refusal) + alpha * R(retain)

The forget answers are replaced by refusal sentences before batching (the `forget_targets` hook,
`refusal_targets` below, picks them with `unlearn.refusals.pick_refusal`), so the forget term is
ordinary NLL.
This is TOFU's "Preference Optimization" baseline (Maini et al. 2024, arXiv:2401.06121; the `idk`
loss of TOFU's code, there with both terms weighted equally and an NLL retain term), and the "PO"
of GRIN and WAGLE. It is not DPO (for that with refusals see `idk_dpo`). Unlike gradient ascent
it has a well-defined optimum, so it cannot collapse the model, but the knowledge may only be
masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from unlearn import losses
from unlearn.errors import UnlearnError
from unlearn.methods.base import LossInputs, Method, Needs
from unlearn.methods.retain import check_weights, retain_spec


@dataclass(frozen=True)
class IdkNLLParams:
    # Defaults: TOFU's idk loss = NLL(idk forget) + NLL(retain), i.e. gamma = alpha = 1.
    gamma: float = 1.0  # weight of the NLL towards refusals
    alpha: float = 1.0  # weight of the retain term
    retain_loss: Literal["nll", "kl", "none"] = "nll"
    refusals: str | None = None  # .txt / .jsonl of refusal sentences; None = the built-in list

    def __post_init__(self) -> None:
        check_weights(gamma=self.gamma, alpha=self.alpha)


def idk_nll_loss(inputs: LossInputs, params: IdkNLLParams) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch already carries refusals, so fitting it is the whole forget objective."""
    refusal_nll = losses.nll(inputs.forget_logits, inputs.forget_labels)
    logs = {"refusal_nll": float(refusal_nll.detach())}
    return params.gamma * refusal_nll, logs


def refusal_targets(examples: Sequence[Any], params: IdkNLLParams, seed: int) -> list[str]:
    """One refusal per forget example, a pure function of (index, seed); Q/A records only."""
    return refusals_for(examples, params.refusals, seed, "idk_nll")


def refusals_for(examples: Sequence[Any], path: str | None, seed: int, method: str) -> list[str]:
    """The refusals of `refusal_targets`, shared with IdkDPO (its preferred answers)."""
    from unlearn.refusals import load_refusals, pick_refusal

    if any(e.kind != "qa" for e in examples):
        raise UnlearnError(
            f"method '{method}' answers forget questions with refusals, so the forget data must be "
            "question/answer records, not documents"
        )
    refusals = load_refusals(path)
    return [pick_refusal(refusals, i, seed) for i in range(len(examples))]


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="idk_nll",
    summary="NLL toward refusals on forget questions, plus a retain term (TOFU's and GRIN's PO)",
    params=IdkNLLParams,
    loss=idk_nll_loss,
    citation=(
        "Maini et al. 2024, TOFU, arXiv:2401.06121: its Preference Optimization baseline (the "
        "`idk` loss in locuslab/tofu); GRIN's and WAGLE's PO"
    ),
    needs=lambda p: Needs(retain=retain_spec(p.retain_loss, p.alpha)),
    forget_targets=refusal_targets,
)
