"""One optimizer step: the forget and retain passes of each micro-batch, their backward passes,
the gradient checks, the update, and the method's state update.

A method's `loss` returns its forget term only; the retain term it declares (`Needs.retain`) is
computed here, on its own batch and in a backward pass of its own, so the forget and retain
batches' activations are never in memory together.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import torch

from unlearn.methods.base import LossInputs, StepInfo
from unlearn.methods.retain import declared_value, declared_weight
from unlearn.train import deepspeed, gradients, optim, sharding
from unlearn.train.batches import forward, start_hidden, start_logits
from unlearn.train.reference import batch_values
from unlearn.train.schedule import shard
from unlearn.train.state import RunState


class Diverged(Exception):
    def __init__(self, step: int, reason: str) -> None:
        super().__init__(reason)
        self.step, self.reason = step, reason


def one_step(run: RunState, step: int) -> tuple[dict[str, float], float]:
    """Accumulate every micro-batch's gradients, check them, apply the update, update the state."""
    micros = run.steps[step]
    retain_idx = (
        [run.retain_plan[run.offsets[step] + j] for j in range(len(micros))]
        if run.retain is not None
        else []
    )
    bad: list[str] = []
    sums = gradients.COMBINE[run.needs.gradients](run, step, micros, retain_idx, bad)
    grad_norm = finish_gradients(run, step, bad)
    optim.apply_update(run)
    if run.method.update_state is not None:
        info = StepInfo(step=step + 1, total=run.total, logs=_mean_over_processes(run, sums))
        run.state = dict(run.method.update_state(dict(run.state), info, run.params))
    return sums, grad_norm


def _mean_over_processes(run: RunState, sums: dict[str, float]) -> dict[str, float]:
    """Each process's loss terms are of its own shard; a state rule (a dual variable) must see
    the global batch's, or the processes' states drift apart."""
    if run.accelerator.num_processes == 1 or not sums:
        return dict(sums)
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], device=run.accelerator.device)
    values = run.accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist(), strict=True))


def add(sums: dict[str, float], terms: dict[str, float], n_micro: int) -> None:
    for k, v in terms.items():
        sums[k] = sums.get(k, 0.0) + float(v) / n_micro


def forget_loss(
    run: RunState, mine: list[int], probe: bool = False
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
    """The method's forget loss on this process's rows (plus UOE's anchor), not yet backpropagated,
    and with `probe` the method's probe loss on the same forward (`Method.probe`)."""
    needs, device = run.needs, run.accelerator.device
    unwrapped = run.accelerator.unwrap_model(run.model) if run.anchor is not None else None
    with (
        run.anchor.capture(unwrapped)
        if run.anchor is not None
        else contextlib.nullcontext({}) as routed
    ):
        p = forward(run, run.forget, mine, needs.hidden_layers)
    ref = batch_values(run.start.forget, mine, p.batch["input_ids"].shape[1], device, p.kept)
    inputs = LossInputs(
        forget_logits=p.logits,
        forget_labels=p.labels,
        ref_forget=ref,
        ref_forget_logp=ref.get("sequence_logp"),
        forget_hidden=p.hidden,
        ref_forget_hidden=start_hidden(run, p.batch, "forget"),
        state=dict(run.state),
        prepared=run.prepared,
    )
    if needs.second_target and run.second is not None:
        s = forward(run, run.second, mine, ())
        inputs.second_logits, inputs.second_labels = s.logits, s.labels
        width = s.batch["input_ids"].shape[1]
        inputs.ref_second = batch_values(run.start.second, mine, width, device, s.kept)
    loss, terms = run.method.loss(inputs, run.params)
    if run.anchor is not None:  # UOE: keep the router sending forget tokens to the chosen expert
        anchor = run.anchor.loss(unwrapped, routed, p.batch["attention_mask"].bool(), p.labels)
        terms["anchor_loss"] = float(anchor.detach())
        loss = loss + anchor
    probed = run.method.probe(inputs, run.params) if probe and run.method.probe else None
    if probed is not None:
        terms["probe_loss"] = float(probed.detach())
    return loss, {"loss": float(loss.detach()), **terms}, probed


def retain_loss(run: RunState, mine: list[int], logs: dict) -> torch.Tensor:
    """weight * the declared retain term on this process's retain rows (unweighted in `logs`)."""
    term = run.needs.retain
    assert term is not None and run.retain is not None
    p = forward(run, run.retain, mine, run.needs.hidden_layers)
    inputs = LossInputs(
        forget_logits=p.logits,
        forget_labels=p.labels,
        retain_logits=p.logits,
        retain_labels=p.labels,
        retain_hidden=p.hidden,
        ref_retain_hidden=start_hidden(run, p.batch, "retain"),
        state=dict(run.state),
    )
    if term.kind == "kl":
        inputs.ref_retain_logits = start_logits(run, p)
    value = declared_value(term, inputs)
    logs["retain_loss"] = float(value.detach())
    return declared_weight(term, run.state) * value


def forget_pass(run: RunState, idx, n_micro: int, bad: list[str], sync: bool) -> dict[str, float]:
    """Forward the forget (and second-answer) batch, backpropagate the method's forget loss."""
    acc = run.accelerator
    mine, weight = shard(idx, acc.process_index, acc.num_processes, run.forget_sizes)
    loss, terms, _ = forget_loss(run, mine)
    check_finite(loss, "loss", bad)
    backward(run, loss * (weight / n_micro), sync, bad)
    return terms


def retain_pass(
    run: RunState, r_idx, n_micro: int, logs: dict, bad: list[str], sync: bool
) -> float:
    """weight * the declared retain term on its own batch, in a backward pass of its own."""
    acc = run.accelerator
    mine, share = shard(r_idx, acc.process_index, acc.num_processes, run.retain_sizes)
    loss = retain_loss(run, mine, logs)
    check_finite(loss, "retain loss", bad)
    backward(run, loss * (share / n_micro), sync, bad)
    return float(loss.detach())


def check_finite(value: torch.Tensor, name: str, bad: list[str]) -> None:
    if not torch.isfinite(value.detach()):
        bad.append(f"{name} is {float(value.detach())}")


def backward(run: RunState, loss: torch.Tensor, sync: bool, bad: list[str] | None = None) -> None:
    """Backward, letting DDP all-reduce gradients only on the last pass of an optimizer step
    (under DeepSpeed that pass also steps the optimizer: `unlearn.train.deepspeed`)."""
    acc = run.accelerator
    if run.cfg.sharding == "deepspeed":
        deepspeed.backward(run, loss, sync, bad if bad is not None else [])
        return
    with contextlib.nullcontext() if sync else acc.no_sync(run.model):
        acc.backward(loss)


def finish_gradients(run: RunState, step: int, bad: list[str]) -> float:
    """Mask, measure (one fused norm, clipped if asked) and refuse non-finite gradients.

    Every process reaches the same verdict: the norm is of the all-reduced gradients, and a
    non-finite loss on any process is summed across processes before anyone raises.
    """
    if run.cfg.sharding == "deepspeed":  # it has clipped and stepped already (its backward)
        grad_norm = deepspeed.grad_norm(run)
        if not torch.isfinite(torch.tensor(grad_norm)):
            raise Diverged(step, f"gradient norm is {grad_norm}")
        return grad_norm
    optim.mask_gradients(run)
    params = [p for p in run.model.parameters() if p.grad is not None]
    if run.cfg.max_grad_norm > 0:
        norm = run.accelerator.clip_grad_norm_(params, run.cfg.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    flag = torch.tensor([float(bool(bad))], device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        flag = run.accelerator.reduce(flag, reduction="sum")
    grad_norm = float(sharding.full(norm))  # a sharded run's norm is a DTensor
    if bad or flag.item() > 0 or not torch.isfinite(torch.tensor(grad_norm)):
        run.optimizer.zero_grad(set_to_none=True)
        raise Diverged(step, bad[0] if bad else f"gradient norm is {grad_norm}")
    return grad_norm


def log_step(run: RunState, completed: int, sums: dict, grad_norm: float, t0: float) -> dict:
    cfg = run.cfg
    logs: dict[str, Any] = {"step": completed}
    if cfg.max_steps is None:
        logs["epoch"] = round(completed / run.total * max(cfg.epochs, 1), 4)
    logs.update({"lr": run.scheduler.get_last_lr()[0], **sums, "grad_norm": grad_norm})
    logs.update({f"state.{k}": v for k, v in run.state.items()})
    logs["seconds"] = round(time.time() - t0, 3)
    due = completed % max(cfg.log_every, 1) == 0 or completed == run.total
    if run.accelerator.is_main_process and due:
        with run.log_path.open("a") as fh:
            fh.write(json.dumps(logs) + "\n")
    return logs
