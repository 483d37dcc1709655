"""The gradient-norm membership attack's model pass: one backward pass per example.

Kept apart from `unlearn.eval.records` (forward passes only, batched): this one needs gradients,
one example at a time, and must leave the model exactly as it found it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearn.eval.records.scores import ScoreItem, scored_sequence
from unlearn.losses import IGNORE_INDEX
from unlearn.prompts import PromptFormatter


def grad_norms(
    model: torch.nn.Module,
    formatter: PromptFormatter,
    items: list[ScoreItem],
    score_end: bool = True,
) -> list[float]:
    """Per item, the 2-norm over all parameters of the gradient of its mean answer NLL.

    For the gradient-norm membership attack (Wang et al. 2024): training examples sit near a
    minimum, so their gradients are small. One forward and backward per item, since a batch would
    sum the items' gradients; a single unpadded sequence needs no attention mask, so no real token
    is ever hidden as padding. Parameters' `requires_grad` flags and `.grad` are restored.
    """
    model.eval()
    device = next(model.parameters()).device
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    max_len = formatter.cfg.max_length
    out: list[float] = []
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for it in items:
                seq = scored_sequence(formatter, it, score_end)
                ids = torch.tensor([seq.input_ids[:max_len]], device=device)
                target = torch.tensor([seq.labels[:max_len]], device=device)[:, 1:]
                if not (target != IGNORE_INDEX).any():
                    out.append(float("nan"))
                    continue
                logits = model(input_ids=ids).logits[:, :-1].float()
                F.cross_entropy(
                    logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX
                ).backward()
                sq = sum(float(p.grad.float().square().sum()) for p in params if p.grad is not None)
                out.append(sq**0.5)
                for p in params:
                    p.grad = None
    finally:
        for p, flag, g in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = g
    return out
