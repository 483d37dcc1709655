"""Task-vector negation: fine-tune on the forget data, then move the other way.

    theta_ft  = theta_0 fine-tuned on the forget data with plain NLL
    tau       = theta_ft - theta_0                      (the forget data's task vector)
    theta_new = theta_0 - alpha * tau

Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089, Sec. 3
(forgetting via negation). Fine-tuning on a task moves the weights in a direction that improves
it; subtracting that displacement degrades the task while, in the paper's experiments, leaving
control tasks largely intact, because the fine-tuning step is small and specific. For unlearning,
the "task" is the forget set: the negated vector lowers the likelihood of exactly what fine-tuning
on it raised. Unlike gradient ascent there is no loss to run away with: the model moves a fixed,
bounded distance (alpha times the fine-tuning displacement) from where it started.

The training loop runs the fine-tuning (token-mean NLL on the forget answers, as `finetune` does)
and keeps a CPU copy of the starting weights; `finalize` forms theta_new once, after the last step.
alpha is the paper's scaling coefficient, which it picks on held-out data from a grid in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unlearn import losses
from unlearn.methods.base import LossInputs, Method


@dataclass(frozen=True)
class TaskVectorParams:
    # alpha=1.0: the plain negation, the top of the paper's grid [0, 1] (chosen there on held-out
    # data) and MUSE's code default (baselines/unlearn.py); MUSE's own runs used alpha=5.
    alpha: float = 1.0  # scaling coefficient of the negated task vector

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}")
        if self.alpha == 0:
            raise ValueError(
                "alpha=0 returns the starting model unchanged; use alpha > 0 (1.0 subtracts the "
                "whole fine-tuning displacement)"
            )
        if self.alpha < 0:
            raise ValueError(
                f"alpha must be > 0, got {self.alpha}: a negative alpha adds the forget data's "
                "task vector, i.e. learns it (use `unlearn finetune` for that)"
            )


def task_vector_loss(
    inputs: LossInputs, params: TaskVectorParams
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean NLL on the forget answers: the fine-tuning that builds the task vector."""
    if inputs.forget_logits is None:
        raise ValueError("task_vector needs the forget logits (Needs.logits must be True)")
    loss = losses.nll(inputs.forget_logits, inputs.forget_labels)
    return loss, {"forget_nll": float(loss.detach())}


@torch.no_grad()
def negate_task_vector(
    start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], params: TaskVectorParams
) -> dict[str, torch.Tensor]:
    """{name: start - alpha * (trained - start)} for every trained tensor, on the CPU.

    Computed in float32 one tensor at a time and written into `start`'s own tensors (the loop's
    snapshot, not needed afterwards), which are returned: the result costs no second copy of the
    weights, on the CPU or on the accelerator.
    """
    missing = sorted(set(trained) - set(start))
    if missing:
        raise ValueError(f"no starting weights for {missing[0]!r}; cannot form its task vector")
    alpha = params.alpha
    for name, weight in trained.items():
        base = start[name]
        tuned = weight.detach().to(device=base.device, dtype=torch.float32)  # may alias weight
        base32 = base.float()
        base.copy_(base32 - alpha * (tuned - base32))  # out of place: `weight` is never written
    return {name: start[name] for name in trained}


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="task_vector",
    summary="fine-tune on the forget data, then subtract alpha times the weight change",
    params=TaskVectorParams,
    loss=task_vector_loss,
    finalize=negate_task_vector,
    citation=(
        "Ilharco et al. 2023, Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089 "
        "(forgetting via negation); alpha=1 as in MUSE's task-vector baseline code"
    ),
)
