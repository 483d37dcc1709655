"""How a step's forget and retain gradients combine (`Needs.gradients`), one function per mode.

Every function accumulates the step's gradients into `p.grad` over its micro-batches and returns
the step's loss terms averaged over them; the step then masks, checks and applies them. A method
declares its mode; it never calls autograd itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unlearn.train import step as steps
from unlearn.train.state import RunState

Combine = Callable[[RunState, list[list[int]], list[list[int]], list[str]], dict[str, float]]


def summed(run: RunState, micros, retain_idx, bad: list[str]) -> dict[str, float]:
    """The usual: forget and weighted retain gradients add up, each from a pass of its own."""
    sums: dict[str, float] = {}
    n = len(micros)
    for j, idx in enumerate(micros):
        last = j == n - 1
        terms = steps.forget_pass(run, idx, n, bad, sync=last and run.retain is None)
        if run.retain is not None:
            terms["loss"] += steps.retain_pass(run, retain_idx[j], n, terms, bad, sync=last)
        steps.add(sums, terms, n)
    return sums


def take_grads(run: RunState) -> list[torch.Tensor | None]:
    """The accumulated gradients, removed from the parameters (which start from zero again)."""
    out = []
    for p in run.trainable():
        out.append(p.grad)
        p.grad = None
    return out


def dot(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> torch.Tensor:
    terms = [
        (x.float() * y.float()).sum()
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def pcgrad(run: RunState, micros, retain_idx, bad: list[str]) -> dict[str, float]:
    """Gradient surgery (PCGrad, Yu et al. 2020): the forget gradient g_f and the retain gradient
    g_r accumulate apart; when they conflict g_f loses its component along g_r; the step follows
    the sum. Logs their cosine as `grad_cos`."""
    sums: dict[str, float] = {}
    n = len(micros)
    for idx in micros:
        steps.add(sums, steps.forget_pass(run, idx, n, bad, sync=True), n)
    g_f = take_grads(run)
    for r_idx in retain_idx:
        logs: dict[str, float] = {}
        value = steps.retain_pass(run, r_idx, n, logs, bad, sync=True)
        steps.add(sums, {**logs, "loss": value}, n)
    sums["grad_cos"] = project(run, g_f, always=run.needs.project_always)
    return sums


def project(run: RunState, g_f: list[torch.Tensor | None], always: bool) -> float:
    """p.grad holds the retain gradient g_r; it becomes g_f' + g_r, where g_f' is g_f minus its
    component along g_r when they conflict (or always). Returns cos(g_f, g_r), both masked."""
    params = run.trainable()
    g_f = _masked(run, params, g_f)
    g_r = _masked(run, params, [p.grad for p in params])
    d, nf, nr = dot(g_f, g_r), dot(g_f, g_f), dot(g_r, g_r)
    cos = float(d / (nf.sqrt() * nr.sqrt()).clamp(min=1e-30))
    coef = float(d / nr) if float(nr) > 0 and (always or float(d) < 0) else 0.0
    with torch.no_grad():
        for p, f, r in zip(params, g_f, g_r, strict=True):
            if f is None:
                continue
            if r is None:
                p.grad = f
                continue
            p.grad = (f - coef * r + r).to(p.grad.dtype) if coef else f + r
    return cos


def _masked(run: RunState, params, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Gradients as the update will see them: entries outside a parameter mask are zero, so
    cosines and projections are of the gradients that can act."""
    masks = {id(m.param): m.mask for m in run.masks}
    return [
        g * masks[id(p)] if g is not None and id(p) in masks else g
        for p, g in zip(params, grads, strict=True)
    ]


def orthogonal(run: RunState, micros, retain_idx, bad: list[str]) -> dict[str, float]:
    """Per micro-batch, the gradient of L_f + L_r + w * cos^2(g_f, g_r) by a double backward."""
    sums: dict[str, float] = {}
    for idx, r_idx in zip(micros, retain_idx, strict=True):
        steps.add(sums, _orthogonal_micro(run, idx, r_idx, len(micros), bad), len(micros))
    return sums


def _orthogonal_micro(run: RunState, idx, r_idx, n_micro: int, bad: list[str]) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = run.trainable()
    logs: dict[str, float] = {}
    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no second derivative
        loss_f, terms = steps.forget_loss(run, list(idx))
        loss_r = steps.retain_loss(run, list(r_idx), logs)
    steps.check_finite(loss_f, "loss", bad)
    steps.check_finite(loss_r, "retain loss", bad)
    g_f = list(torch.autograd.grad(loss_f, params, create_graph=True, allow_unused=True))
    g_r = list(torch.autograd.grad(loss_r, params, create_graph=True, allow_unused=True))
    g_f, g_r = _masked(run, params, g_f), _masked(run, params, g_r)
    d, nf, nr = dot(g_f, g_r), dot(g_f, g_f), dot(g_r, g_r)
    penalty = d.pow(2) / (nf * nr + 1e-12)
    weight = run.needs.orthogonal_weight
    g_p = (
        torch.autograd.grad(penalty, params, allow_unused=True) if weight else [None] * len(params)
    )
    with torch.no_grad():
        for p, f, r, q in zip(params, g_f, g_r, g_p, strict=True):
            parts = [x.detach() for x in (f, r) if x is not None]
            if q is not None:
                parts.append(weight * q)
            if not parts:
                continue
            total = torch.stack(parts).sum(0) / n_micro
            p.grad = total if p.grad is None else p.grad + total
    cos = float(d.detach() / (nf.detach().sqrt() * nr.detach().sqrt()).clamp(min=1e-30))
    return {
        **terms,
        **logs,
        "loss": float(loss_f.detach() + loss_r.detach() + weight * penalty.detach()),
        "orthogonal_penalty": float(penalty.detach()),
        "grad_cos": cos,
    }


COMBINE: dict[str, Combine] = {"sum": summed, "project": pcgrad, "orthogonal": orthogonal}
