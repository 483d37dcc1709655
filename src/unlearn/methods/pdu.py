"""PDU: forgetting as a constrained problem, solved by primal-dual descent on a Lagrangian.

    m_t   = max_v z_t,v - (1/V) sum_v z_t,v          (z_t: logits predicting answer token t)
    F     = (1/N) sum_{b,t} m_t ** 2                  (N: answer tokens in the forget batch)
    L     = gamma * F + lambda * NLL(retain)
    after each step, once past the warm-up:
    lambda <- max(0, lambda + eta * (NLL(retain) - eps))

Entesari et al. 2025, "Constrained Entropic Unlearning: A Primal-Dual Framework for Large Language
Models", arXiv:2506.05314. The goal is  min F  subject to  NLL(retain) <= eps. The forget term
drives each answer distribution towards uniform: the margin between the top logit and the mean
logit is 0 exactly when all logits are equal. Unlike gradient ascent on the answer's NLL it is
bounded below (by 0) and pulls every logit to the mean instead of pushing one token's probability
to 0, so it has no collapse mode that makes the loss unboundedly good.

The retain constraint enters through its Lagrange multiplier lambda (the "dual" state): a step of
gradient descent on the weights, then one of projected gradient ascent on lambda. lambda grows
while the retain NLL is above its bound eps and shrinks (never below 0) while it is under it, so
the retain set gets as much weight as it needs and no more, instead of a hand-tuned fixed alpha.
The dual update is skipped during a warm-up share of the run, letting the forget term act first.

The forget term, the retain term and the dual rule follow OpenUnlearning src/trainer/unlearn/pdu.py
(dual updated per step from that step's retain loss, before the weights move). Two differences:
the margin is taken at the positions whose next token is an answer token (the logits that predict
the answer; OpenUnlearning's unshifted mask takes the answer tokens' own positions, one later), and
the loss omits the constant -lambda * eps, which changes no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unlearn import losses
from unlearn.methods.base import LossInputs, Method, Needs, RetainTerm, StepInfo
from unlearn.methods.retain import check_weights


@dataclass(frozen=True)
class PDUParams:
    # TOFU defaults from OpenUnlearning community/methods/PDU/run.sh (the paper's best settings):
    # pref=100 (initial dual, trainer.method_args.alpha), dual_step_size=5, retain_loss_eps=0.3,
    # gamma=1, dual_warmup_epochs=5 of num_train_epochs=10 (Llama-3.2-1B/3B), learning rate 1e-5.
    # configs/trainer/PDU.yaml leaves retain_loss_eps required and has dual_step_size 1.
    gamma: float = 1.0  # weight of the logit-margin forget term
    dual_init: float = 100.0  # lambda at step 0 (OpenUnlearning's alpha / "pref")
    dual_step_size: float = 5.0  # eta: step size of the dual ascent
    retain_bound: float = 0.3  # eps: the constraint is retain NLL <= eps (retain_loss_eps)
    dual_warmup: float = 0.5  # share of the optimizer steps before lambda starts to move

    def __post_init__(self) -> None:
        for name in ("dual_init", "dual_step_size", "retain_bound"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not (0.0 <= self.dual_warmup <= 1.0):
            raise ValueError(
                f"dual_warmup is a share of the optimizer steps, in [0, 1], got {self.dual_warmup}"
            )
        check_weights(gamma=self.gamma)


def margin_flattening(logits: losses.Logits, labels: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of (max_v z - mean_v z)^2, z the logits predicting the token.

    Only the answer positions are gathered (and upcast), so the float32 copy is N x V, not B x T x V.
    """
    z, _ = losses.answer_logits(logits, labels)  # [N, V]
    if z.shape[0] == 0:
        return z.sum() * 0.0  # no answer token: 0, still attached to the graph
    margin = z.amax(dim=-1) - z.mean(dim=-1)
    return margin.pow(2).mean()


def pdu_loss(inputs: LossInputs, params: PDUParams) -> tuple[torch.Tensor, dict[str, float]]:
    """gamma * margin flattening on the forget batch. The retain term, lambda * retain NLL, is the
    declared one (`RetainTerm.state_weight="dual"`): the loop weights it by the dual variable."""
    if inputs.forget_logits is None:
        raise ValueError("PDU needs the forget logits (Needs.logits must be True)")
    forget = margin_flattening(inputs.forget_logits, inputs.forget_labels)
    with torch.no_grad():
        nll = losses.nll(inputs.forget_logits, inputs.forget_labels)
    logs = {"forget_loss": float(forget.detach()), "forget_nll": float(nll)}
    return params.gamma * forget, logs


def pdu_init_state(params: PDUParams) -> dict[str, float]:
    return {"dual": float(params.dual_init)}


def pdu_update_state(
    state: dict[str, float], info: StepInfo, params: PDUParams
) -> dict[str, float]:
    """Projected dual ascent after step `info.step`, from the retain NLL that step measured.

    Steps 1 .. dual_warmup * total leave lambda alone, like OpenUnlearning's first
    `dual_warmup_epochs` epochs; every later step moves it.
    """
    if info.step <= params.dual_warmup * info.total:
        return dict(state)
    if "retain_loss" not in info.logs:
        raise ValueError("PDU's dual update needs the step's retain_loss (a retain batch)")
    violation = info.logs["retain_loss"] - params.retain_bound
    return {**state, "dual": max(0.0, state["dual"] + params.dual_step_size * violation)}


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="pdu",
    summary="logit-margin flattening with retain NLL <= eps enforced by a dual variable",
    params=PDUParams,
    loss=pdu_loss,
    needs=lambda p: Needs(retain=RetainTerm(weight=1.0, kind="nll", state_weight="dual")),
    init_state=pdu_init_state,
    update_state=pdu_update_state,
    citation=(
        "Entesari et al. 2025, Constrained Entropic Unlearning: A Primal-Dual Framework for Large "
        "Language Models, arXiv:2506.05314; loss and dual rule from OpenUnlearning "
        "src/trainer/unlearn/pdu.py, defaults from its community/methods/PDU/run.sh (TOFU)"
    ),
)
