"""`RunState`: everything one training step reads, built once before the first step (`setup`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unlearn.config import TrainConfig
from unlearn.methods.base import Method, Needs
from unlearn.prompts import Tokenized


@dataclass
class StartValues:
    """What the starting model contributes during training (the method's "reference"): values
    cached in one pass, and the frozen copies a method's declaration asks for."""

    forget: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # cached on forget items
    second: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # and on second answers
    model: torch.nn.Module | None = None  # whole frozen copy (a KL retain term)
    hidden: torch.nn.Module | None = None  # its first blocks only (reference hidden states)
    weights: dict[str, torch.Tensor] | None = None  # CPU copy of the weights, for `finalize`
    seconds: float = 0.0  # the cached pass's wall time


@dataclass
class Masked:
    """A parameter only some of whose entries train: its float mask and its weight decay."""

    param: torch.nn.Parameter
    mask: torch.Tensor
    weight_decay: float = 0.0


@dataclass
class RunState:
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    method: Method
    params: Any
    needs: Needs
    cfg: TrainConfig
    pad_id: int
    forget: list[Tokenized]
    retain: list[Tokenized] | None  # None when the method has no retain term
    second: list[Tokenized] | None
    steps: list[list[list[int]]]  # steps -> micro-batches -> forget positions
    retain_plan: list[list[int]]  # the retain micro-batch paired with each forget micro-batch
    offsets: list[int]  # index of each step's first micro-batch in `retain_plan`
    start: StartValues
    masks: list[Masked]
    frozen: list[torch.nn.Parameter]  # parameters the loop froze (requires_grad restored after)
    fingerprint: dict[str, Any]
    output: Path
    log_path: Path
    anchor: Any = None
    prepared: Any = None
    state: dict[str, float] = field(default_factory=dict)  # the method's (`Method.init_state`)
    keep_logits: bool = False  # the model takes `logits_to_keep` (`batches.forward`)
    share_prefix: bool = False  # run a batch's common first tokens once
    pack: bool = False  # and the rest without padding
    softcap: float | None = None  # the model's final logit soft-capping (`losses.HeadLogits`)
    perturbed: Any = None
    # what each forget / retain sequence counts for in its loss's mean, when several processes
    # share a batch (`schedule.shard`); None: count sequences
    forget_sizes: list[int] | None = None
    retain_sizes: list[int] | None = None

    @property
    def total(self) -> int:
        return len(self.steps)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]
