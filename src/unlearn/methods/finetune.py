"""Plain fine-tuning: minimise NLL on the training data.

    L = NLL(batch)

Used by `unlearn finetune` to build the model that is later unlearned (TOFU's "finetune on the full
set" stage) and for relearning attacks. The shared loop passes the training data as the "forget"
batch, so this is the one method for which "forget" means "learn".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unlearn import losses
from unlearn.methods.base import LossInputs, Method


@dataclass(frozen=True)
class FinetuneParams:
    """No loss hyperparameters; learning rate, epochs etc. belong to the training config."""


def finetune_loss(
    inputs: LossInputs, params: FinetuneParams
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean NLL, the same quantity as a Hugging Face model's `loss`."""
    loss = losses.nll(inputs.forget_logits, inputs.forget_labels)
    return loss, {"nll": float(loss.detach())}


METHOD = Method(
    mean_over="token",  # its forget loss averages over answer tokens
    name="finetune",
    summary="plain NLL fine-tuning on the given data (used by `unlearn finetune`)",
    params=FinetuneParams,
    loss=finetune_loss,
    citation="standard causal-LM fine-tuning, as in TOFU's finetune stage (arXiv:2401.06121)",
)
