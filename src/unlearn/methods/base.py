"""What every unlearning method is: a hyperparameter dataclass and a loss over one model pass.

The shared training loop (`unlearn.train.loop`) runs the model on a forget batch (and a retain batch
when the method asks for one), looks up cached reference values, and hands everything to the
method's `loss`. A method never runs the model itself, never owns an optimizer, and never inherits
from another method: what methods share lives in `unlearn.losses` and `unlearn.methods.retain`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

ForgetTarget = Literal["answer", "refusal"]


@dataclass
class LossInputs:
    """One optimisation step's worth of model outputs and cached values.

    forget_logits / forget_labels: the model on the forget batch, [B, T, V] and [B, T] (-100 masked).
    retain_logits / retain_labels: the model on the paired retain batch, or None if not requested.
    ref_forget_logp: log pi_ref(y|x) summed over answer tokens [B], computed once before training
        by the starting model (only when the method sets `needs_reference_logp`).
    ref_retain_logits: the frozen starting model on the retain batch (only for KL retain terms).
    defer_retain: set by the training loop, which backpropagates the retain term in a pass of its
        own so that the forget and retain batches' activations are never in memory together; the
        method's loss then returns only its forget part (see `retain.weighted_retain`).
    """

    forget_logits: torch.Tensor
    forget_labels: torch.Tensor
    retain_logits: torch.Tensor | None = None
    retain_labels: torch.Tensor | None = None
    ref_forget_logp: torch.Tensor | None = None
    ref_retain_logits: torch.Tensor | None = None
    defer_retain: bool = False


LossFn = Callable[[LossInputs, Any], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass(frozen=True)
class Method:
    """A registered unlearning method.

    name: CLI name (`--method npo`).
    summary: one line for `unlearn methods`.
    params: the frozen hyperparameter dataclass; every field has the paper's default.
    loss: (LossInputs, params) -> (scalar loss to minimise, {term name: float} to log).
    citation: where the defaults and the formula come from.
    needs_reference_logp: cache log pi_ref(y|x) of every forget example before training.
    forget_target: "refusal" replaces forget answers by refusal sentences (IdkNLL-style methods).
    """

    name: str
    summary: str
    params: type
    loss: LossFn
    citation: str
    needs_reference_logp: bool = False
    forget_target: ForgetTarget = "answer"

    def needs_retain(self, params: Any) -> bool:
        """Whether the loop must forward a retain batch: any method with a weighted retain term."""
        kind = getattr(params, "retain_loss", None)
        weight = getattr(params, "alpha", 0.0)
        return kind is not None and kind != "none" and weight != 0

    def needs_reference_model(self, params: Any) -> bool:
        """Only a KL retain term needs a frozen copy of the starting model during training."""
        return self.needs_retain(params) and getattr(params, "retain_loss", None) == "kl"
