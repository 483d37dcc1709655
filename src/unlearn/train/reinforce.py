"""WHP's reinforced model: a copy of the start fine-tuned further on the forget data with plain
NLL, by this same loop (its log in OUT/logs/reinforce/); its forget logits are cached and the copy
is freed before the unlearning run builds anything else."""

from __future__ import annotations

import copy
import dataclasses

import torch

from unlearn.methods.base import Needs
from unlearn.train.job import TrainJob
from unlearn.train.reference import reference_values


def reinforced_logits(job: TrainJob, needs: Needs) -> dict[str, list[torch.Tensor]] | None:
    spec = needs.reinforce
    if spec is None:
        return None
    from unlearn.methods.finetune import METHOD as FINETUNE
    from unlearn.methods.finetune import FinetuneParams
    from unlearn.train.loop import train

    sub = dataclasses.replace(
        job.cfg, lr=spec.lr, max_steps=spec.steps, save_every=0, warmup_steps=None,
        warmup_ratio=0.0, keep_checkpoints=False, nll_check=False,
    )  # fmt: skip
    reinforced = copy.deepcopy(job.model)
    train(
        TrainJob(
            reinforced, FINETUNE, FinetuneParams(), job.forget, sub,
            job.output / "logs" / "reinforce", job.pad_id,
        )
    )  # fmt: skip
    batch = max(job.cfg.batch_size, 8)
    values = reference_values(reinforced, job.forget, job.pad_id, ("logits",), batch)
    del reinforced
    return values
