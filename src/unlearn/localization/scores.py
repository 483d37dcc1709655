"""Per-weight scores that say where the forget data lives: GRIN's gradient ratio and its controls.

GRIN (Anjarlekar & Pombra 2025, arXiv:2508.06467) scores every weight by

    GRI = |g_forget| / (|g_retain| + eps)

where g is the gradient of the mean NLL of the forget (retain) answers: large where the forget data
pulls a weight hard and the retain data barely does, so changing it should cost little utility.
`forget_grad` drops the denominator (what the ratio buys is then measurable), `random` gives
uniform scores (the control a localisation must beat).

Memory: gradients are never kept for the whole model at once. A hook on each scored parameter
folds its gradient into an accumulator as soon as autograd has produced it and frees it, so the
whole computation holds two float32 buffers the size of the scored parameters (forget and retain
accumulators; the score is computed in place of the forget one) plus one tensor's gradient at a
time. For SmolLM2-135M (106.2M scored weights) that is 2 x 425 MB.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Literal

import torch

from unlearn.errors import UnlearnError
from unlearn.forward import kept_positions, takes_logits_to_keep
from unlearn.losses import IGNORE_INDEX
from unlearn.prompts import Tokenized, collate

Accumulate = Literal["abs_sum", "sum_abs", "squared"]


def _linear_weight_names(model: torch.nn.Module) -> set[str]:
    """Weights of linear maps: nn.Linear, transformers' Conv1D (GPT-2), and fused expert tensors
    (3-D parameters of a mixture-of-experts block, one slice per expert)."""
    names = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        for p_name, p in module.named_parameters(recurse=False):
            if (is_linear and p_name == "weight") or (p.ndim == 3 and "expert" in mod_name):
                names.add(prefix + p_name)
    return names


def scored_parameters(
    model: torch.nn.Module, include: str | None, exclude: str | None
) -> dict[str, torch.nn.Parameter]:
    """The parameters a localisation ranks, in the model's order.

    include None: every linear weight (see `_linear_weight_names`); else the names `include`
    matches (re.search). exclude (re.search) removes names after that. Tied parameters appear once.
    """
    named = dict(model.named_parameters())  # tied weights appear under their first name only
    pool = set(named) if include is not None else _linear_weight_names(model)
    chosen = {}
    for name, p in named.items():
        if name not in pool:
            continue
        if include is not None and not re.search(include, name):
            continue
        if exclude and re.search(exclude, name):
            continue
        chosen[name] = p
    if not chosen:
        sample = ", ".join(list(named)[:4])
        raise UnlearnError(
            f"no parameter matches localize.include={include!r} / exclude={exclude!r}; "
            f"parameter names look like: {sample}"
        )
    return chosen


@contextlib.contextmanager
def _accumulating(
    params: dict[str, torch.nn.Parameter], into: dict[str, torch.Tensor], how: Accumulate
) -> Iterator[None]:
    """While inside, every backward adds f(grad) into `into[name]` and frees the gradient, and only
    `params` require gradients (no gradient memory for the rest of the model)."""
    handles = []

    def hook(name: str):
        def fold(p: torch.Tensor) -> None:
            g = p.grad
            assert g is not None
            acc = into[name]
            if how == "abs_sum":
                acc.add_(g.float())
            elif how == "sum_abs":
                acc.add_(g.float().abs())
            else:
                acc.add_(g.float().square())
            p.grad = None

        return fold

    for name, p in params.items():
        handles.append(p.register_post_accumulate_grad_hook(hook(name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _mean_nll_gradients(
    model: torch.nn.Module,
    items: list[Tokenized],
    pad_id: int,
    batch_size: int,
    params: dict[str, torch.nn.Parameter],
    how: Accumulate,
) -> dict[str, torch.Tensor]:
    """Accumulated gradients of the set's mean answer-token NLL (each batch's token sum divided by
    the whole set's token count, so batches add up to the gradient of one mean)."""
    device = next(model.parameters()).device
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    total = sum(sum(1 for x in t.labels[1:] if x != IGNORE_INDEX) for t in items)
    if total == 0:
        raise UnlearnError("localization needs answer tokens, but the data has none to score")
    trims = takes_logits_to_keep(model)
    with _accumulating(params, acc, how):
        for start in range(0, len(items), batch_size):
            batch = collate(items[start : start + batch_size], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            kept = kept_positions(labels) if trims else None
            if kept is not None:  # no logits over prompt positions: they carry no loss
                batch["logits_to_keep"] = kept
                labels = labels[:, -kept:]
            logits = model(**batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            if not torch.isfinite(loss):
                raise UnlearnError(
                    f"localization: the NLL of a scoring batch is {float(loss)}; the model "
                    "produces non-finite outputs on this data"
                )
            (loss / total).backward()
    if how == "abs_sum":
        for a in acc.values():
            a.abs_()
    return acc


def gradient_scores(
    model: torch.nn.Module,
    forget: list[Tokenized],
    retain: list[Tokenized] | None,
    pad_id: int,
    params: dict[str, torch.nn.Parameter],
    *,
    accumulate: Accumulate = "abs_sum",
    eps: float = 1e-8,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """GRI per scored weight (with `retain`), or |g_forget| alone (`retain` None).

    The model is put in eval mode (no dropout: a score must not depend on chance) and every
    parameter's requires_grad is restored afterwards; the weights are not changed.
    """
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None  # a stale gradient would be folded into the first batch's
        scores = _mean_nll_gradients(model, forget, pad_id, batch_size, params, accumulate)
        if retain is not None:
            denom = _mean_nll_gradients(model, retain, pad_id, batch_size, params, accumulate)
            for name, s in scores.items():
                s.div_(denom[name].add_(eps))
                del denom[name]  # free each retain buffer as soon as it is used
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(was_training)
    return scores


def random_scores(params: dict[str, torch.nn.Parameter], seed: int) -> dict[str, torch.Tensor]:
    """Uniform scores from a seeded CPU generator (the same on every device), for the control."""
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=gen, dtype=torch.float32).to(p.device)
        for n, p in params.items()
    }
