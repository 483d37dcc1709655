"""What one call of the training loop is given (`TrainJob`) and what it returns (`TrainResult`).

A job object instead of a long parameter list: the loop's callers (a run, WHP's reinforced copy,
tests) name what they pass, and a new per-run input is one field here, not a parameter threaded
through every function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unlearn.config import TrainConfig
from unlearn.methods.base import Method
from unlearn.prompts import Tokenized

LOG_FILE = "logs/train.jsonl"
StepCallback = Callable[[int, dict[str, float]], None]
#: A change made to the model before training (GRIN's noise): model -> {what it did}.
Perturb = Callable[[torch.nn.Module], Any]


@dataclass
class TrainJob:
    """One training run of `method` on `model`, in place (the caller owns the model).

    second: each forget example's second answer (same order) when the method declares one.
    mask: {parameter: bool tensor} from `unlearn.localization`; only its entries train.
    anchor: UOE's router anchor (`unlearn.localization.uoe.Anchor`), added to the forget term.
    prepared: what `Method.prepare` returned, handed to every loss call.
    perturb: applied to the model once before the first step (GRIN's noise injection);
        `reference` says whether the starting-model values every method compares against (cached
        log-probs and logits, the KL retain model, reference hidden states, WHP's reinforced copy,
        the task vector's start) are taken "before" it or "after" it.
    settings: other settings the remaining steps depend on (e.g. `localize.*`), checked on resume.
    """

    model: torch.nn.Module
    method: Method
    params: Any
    forget: list[Tokenized]
    cfg: TrainConfig
    output: Path
    pad_id: int
    retain: list[Tokenized] | None = None
    second: list[Tokenized] | None = None
    mask: dict[str, torch.Tensor] | None = None
    anchor: Any = None
    prepared: Any = None
    perturb: Perturb | None = None
    reference: str = "before"
    settings: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    callbacks: list[StepCallback] = field(default_factory=list)


@dataclass
class TrainResult:
    steps: int
    final_logs: dict[str, float]
    wall_seconds: float
    resumed_from: int | None = None
    log_path: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    reference_seconds: float = 0.0  # the one pass caching reference values, before step 1
    # the starting model's cached values on the forget items (`reference_values`), e.g. for the
    # run's before-training NLL check; the caller frees them (logits may be large)
    reference: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    perturbed: Any = None  # what `TrainJob.perturb` returned
