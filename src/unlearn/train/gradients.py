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

Combine = Callable[[RunState, int, list[list[int]], list[list[int]], list[str]], dict[str, float]]


def summed(run: RunState, step: int, micros, retain_idx, bad: list[str]) -> dict[str, float]:
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


def cosine(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    d, na, nb = dot(a, b), dot(a, a), dot(b, b)
    return float(d / (na.sqrt() * nb.sqrt()).clamp(min=1e-30))


def masked(run: RunState, params, grads) -> list[torch.Tensor | None]:
    """Gradients as the update will see them: entries outside a parameter mask are zero, so
    cosines and projections are of the gradients that can act."""
    masks = {id(m.param): m.mask for m in run.masks}
    return [
        g * masks[id(p)] if g is not None and id(p) in masks else g
        for p, g in zip(params, grads, strict=True)
    ]


def pcgrad(run: RunState, step: int, micros, retain_idx, bad: list[str]) -> dict[str, float]:
    """Gradient surgery on GradDiff (PCGrad, Yu et al. 2020): the forget gradient g_f and the
    retain gradient g_r accumulate apart; when they conflict g_f loses its component along g_r;
    the step follows the sum. Logs their cosine as `grad_cos`."""
    sums: dict[str, float] = {}
    n = len(micros)
    for idx in micros:
        steps.add(sums, steps.forget_pass(run, idx, n, bad, sync=True), n)
    g_f = take_grads(run)
    for r_idx in retain_idx:
        logs: dict[str, float] = {}
        value = steps.retain_pass(run, r_idx, n, logs, bad, sync=True)
        steps.add(sums, {**logs, "loss": value}, n)
    sums["grad_cos"] = project(run, g_f)
    return sums


def project(run: RunState, g_f: list[torch.Tensor | None]) -> float:
    """p.grad holds the retain gradient g_r; it becomes g_f' + g_r, where g_f' is g_f minus its
    component along g_r when they conflict. Returns cos(g_f, g_r), both masked."""
    params = run.trainable()
    g_f = masked(run, params, g_f)
    g_r = masked(run, params, [p.grad for p in params])
    d, nr = dot(g_f, g_r), dot(g_r, g_r)
    coef = float(d / nr) if float(nr) > 0 and float(d) < 0 else 0.0
    with torch.no_grad():
        for p, f, r in zip(params, g_f, g_r, strict=True):
            if f is None:
                continue
            p.grad = f if r is None else (f - coef * r + r).to(r.dtype)
    return cosine(g_f, g_r)


def uno(run: RunState, step: int, micros, retain_idx, bad: list[str]) -> dict[str, float]:
    """UNO (Mandal & Gottwald 2025): per micro-batch, with g_p = grad of the method's probe (the
    memorised forget answers' NLL) and g_d = grad of what is descended (the method's loss plus the
    retain term), the gradient of loss + retain + w * cos^2(g_p, g_d), by a double backward. The
    authors step on one batch; with grad_accum > 1 the penalty is per micro-batch."""
    sums: dict[str, float] = {}
    for j, idx in enumerate(micros):
        r_idx = retain_idx[j] if run.retain is not None else None
        steps.add(sums, _uno_micro(run, idx, r_idx, len(micros), bad), len(micros))
    return sums


def _uno_micro(run: RunState, idx, r_idx, n_micro: int, bad: list[str]) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = run.trainable()
    logs: dict[str, float] = {}
    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no second derivative
        loss_d, terms, probe = steps.forget_loss(run, list(idx), probe=True)
        if r_idx is not None:
            loss_d = loss_d + steps.retain_loss(run, list(r_idx), logs)
    assert probe is not None
    steps.check_finite(loss_d, "loss", bad)
    g_p = list(torch.autograd.grad(probe, params, create_graph=True, allow_unused=True))
    g_d = list(torch.autograd.grad(loss_d, params, create_graph=True, allow_unused=True))
    g_p, g_d = masked(run, params, g_p), masked(run, params, g_d)
    d, n_p, n_d = dot(g_p, g_d), dot(g_p, g_p), dot(g_d, g_d)
    penalty = d.pow(2) / (n_p * n_d + 1e-12)
    weight = run.needs.orthogonal_weight
    g_pen = (
        torch.autograd.grad(penalty, params, allow_unused=True) if weight else [None] * len(params)
    )
    with torch.no_grad():
        for p, g, q in zip(params, g_d, g_pen, strict=True):
            parts = ([g.detach()] if g is not None else []) + (
                [weight * q] if q is not None else []
            )
            if parts:
                total = sum(parts[1:], parts[0]) / n_micro
                p.grad = total if p.grad is None else p.grad + total
    cos = float(d.detach() / (n_p.detach().sqrt() * n_d.detach().sqrt()).clamp(min=1e-30))
    return {
        **terms,
        **logs,
        "loss": float(loss_d.detach() + weight * penalty.detach()),
        "orthogonal_penalty": float(penalty.detach()),
        "grad_cos": cos,
    }


def uno_s(run: RunState, step: int, micros, retain_idx, bad: list[str]) -> dict[str, float]:
    """UNO-S: UNO on odd steps (1, 3, ...); on even steps the descent gradient g_d (the method's
    loss plus the retain term, accumulated over the micro-batches) minus its component along the
    probe's gradient g_p, every time, and nothing else (the authors' "Gradient Surgery #2")."""
    if step % 2 == 0:
        return {**uno(run, step, micros, retain_idx, bad), "surgery": 0.0}
    sums: dict[str, float] = {}
    params = run.trainable()
    g_p: list[torch.Tensor | None] = [None] * len(params)
    n = len(micros)
    for j, idx in enumerate(micros):
        loss, terms, probe = steps.forget_loss(run, list(idx), probe=True)
        assert probe is not None
        steps.check_finite(loss, "loss", bad)
        grads = torch.autograd.grad(probe, params, retain_graph=True, allow_unused=True)
        g_p = [
            a if b is None else (b / n if a is None else a + b / n)
            for a, b in zip(g_p, grads, strict=True)
        ]
        steps.backward(run, loss / n, sync=True)
        if run.retain is not None:
            terms["loss"] += steps.retain_pass(run, retain_idx[j], n, terms, bad, sync=True)
        steps.add(sums, terms, n)
    g_p = masked(run, params, g_p)
    g_d = masked(run, params, [p.grad for p in params])
    d, n_p = dot(g_p, g_d), dot(g_p, g_p)
    coef = float(d / n_p) if float(n_p) > 0 else 0.0
    with torch.no_grad():
        for p, f, g in zip(params, g_p, g_d, strict=True):
            if g is not None and f is not None:
                p.grad = (g - coef * f).to(g.dtype)
    sums["grad_cos"] = cosine(g_p, g_d)
    sums["surgery"] = 1.0
    return sums


COMBINE: dict[str, Combine] = {"sum": summed, "pcgrad": pcgrad, "uno": uno, "uno_s": uno_s}
