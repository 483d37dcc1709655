"""IdkDPO: DPO preferring a refusal ("I don't know") over the forget answer.

    L = gamma * -(2/beta) * mean_b log sigmoid(beta * (w_refusal - l_answer)) + alpha * R(retain)

The loss is `unlearn.methods.dpo`'s; only the preferred answers differ: one refusal per forget
example, picked as IdkNLL picks them (`idk_nll.refusals_for`, stable per index and seed). It is
DPO (Rafailov et al. 2023, arXiv:2305.18290) with refusals, not TOFU's "preference optimization"
(that is IdkNLL, the `idk` loss of TOFU's code, and GRIN's/WAGLE's "PO"). OpenUnlearning names it
IdkDPO and runs it as its DPO trainer on TOFU_QA_forget_idk data (configs/experiment/unlearn/tofu/
idk.yaml with configs/trainer/DPO.yaml), so the defaults are DPO's. Unlike OpenUnlearning, which
draws a fresh random refusal each time an example is loaded, each example keeps one refusal for the
whole run, so the cached reference log-probs stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from unlearn.methods.base import Method
from unlearn.methods.dpo import check_dpo_params, dpo_loss, dpo_needs
from unlearn.methods.idk_nll import refusals_for


@dataclass(frozen=True)
class IdkDPOParams:
    # beta=0.1, gamma=alpha=1, NLL retain: OpenUnlearning configs/trainer/DPO.yaml (there is no
    # IdkDPO.yaml: its IdkDPO is the DPO trainer on refusal "alternate" answers); TOFU's dpo loss
    # also uses beta=0.1.
    beta: float = 0.1  # inverse temperature of the preference margin
    gamma: float = 1.0  # weight of the DPO forget term
    alpha: float = 1.0  # weight of the retain term
    retain_loss: Literal["nll", "kl", "none"] = "nll"
    refusals: str | None = None  # .txt / .jsonl of refusal sentences; None = the built-in list

    def __post_init__(self) -> None:
        check_dpo_params(self.beta, self.gamma, self.alpha)


def refusal_preferred(examples: Sequence[Any], params: IdkDPOParams, seed: int) -> list[str]:
    """One refusal per forget example, the answer to prefer over the data's."""
    return refusals_for(examples, params.refusals, seed, "idk_dpo")


METHOD = Method(
    name="idk_dpo",
    summary="DPO preferring a refusal over the forget answer, plus a retain term (IdkDPO)",
    params=IdkDPOParams,
    loss=dpo_loss,
    citation=(
        "Rafailov et al. 2023, DPO, arXiv:2305.18290; OpenUnlearning IdkDPO = DPO.yaml on "
        "TOFU_QA_forget_idk (refusals from TOFU, arXiv:2401.06121; not TOFU's PO, see idk_nll)"
    ),
    needs=dpo_needs,
    second_targets=refusal_preferred,
)
