"""The one training loop that fine-tuning and every unlearning method go through.

Built on `accelerate`, so the same loop runs on a CPU laptop and under `accelerate launch` with
DDP, DeepSpeed or FSDP; device placement, gradient sync and checkpoint state are accelerate's.
What is ours:

* the batch schedule, a pure function of (seed, step): forget micro-batches walk a seeded
  permutation per epoch and each is paired with the next retain micro-batch of a seeded retain
  stream, so a resumed run sees exactly the batches an uninterrupted run would;
* reference values: methods that need log pi_ref(y|x) on the forget set get it from one pass over
  the forget set before the first step, so no second model sits in memory for them; only a KL
  retain term (which needs reference logits on changing retain batches) keeps a frozen copy;
* checkpoints written atomically every `save_every` steps, on Ctrl-C, and just before a step whose
  loss or gradient is NaN/inf (the weights are still the last good ones then), so `--resume`
  always has a consistent state to continue from;
* a jsonl log with every loss term per step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from unlearn.config import TrainConfig
from unlearn.errors import TrainingDiverged, UnlearnError
from unlearn.losses import sequence_logprob
from unlearn.methods.base import LossInputs, Method
from unlearn.methods.retain import weighted_retain
from unlearn.prompts import Tokenized, collate

CHECKPOINTS = "checkpoints"
LOG_FILE = "logs/train.jsonl"
StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    steps: int
    final_logs: dict[str, float]
    wall_seconds: float
    resumed_from: int | None = None
    log_path: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------- batch schedule
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def plan_steps(n_forget: int, cfg: TrainConfig) -> list[list[list[int]]]:
    """The whole run's forget batches: steps -> micro-batches -> example positions.

    An epoch is one pass over the forget set; with `max_steps` the epochs repeat as needed.
    """
    micro: list[list[int]] = []
    steps: list[list[list[int]]] = []
    epoch = 0
    target = cfg.max_steps
    while True:
        order = _epoch_order(n_forget, cfg.seed, epoch)
        micro = [order[i : i + cfg.batch_size] for i in range(0, n_forget, cfg.batch_size)]
        for i in range(0, len(micro), cfg.grad_accum):
            steps.append(micro[i : i + cfg.grad_accum])
            if target is not None and len(steps) >= target:
                return steps
        epoch += 1
        if target is None and epoch >= cfg.epochs:
            return steps


def retain_stream(n_retain: int, count: int, size: int, seed: int) -> list[list[int]]:
    """`count` retain micro-batches of `size`, cycling through seeded permutations."""
    out: list[list[int]] = []
    buffer: list[int] = []
    cycle = 0
    while len(out) < count:
        while len(buffer) < size:
            buffer += _epoch_order(n_retain, seed + 7919, cycle)
            cycle += 1
        out.append(buffer[:size])
        buffer = buffer[size:]
    return out


# ---------------------------------------------------------------------------- reference values
@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, items: list[Tokenized], pad_id: int, batch_size: int = 8
) -> torch.Tensor:
    """log pi_ref(y|x) of every item under the model as it is now, summed over answer tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.empty(len(items), dtype=torch.float32)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits
        logp, _ = sequence_logprob(logits, labels)
        out[start : start + len(chunk)] = logp.float().cpu()
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------- checkpoints
def latest_checkpoint(output: Path) -> tuple[Path, int] | None:
    root = output / CHECKPOINTS
    if not root.is_dir():
        return None
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and (d / "progress.json").is_file():
            found.append((int(d.name.split("-", 1)[1]), d))
    if not found:
        return None
    step, path = max(found)
    return path, step


def _save_checkpoint(accelerator, output: Path, step: int, keep: int = 1) -> Path:
    root = output / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    if final.exists():
        return final
    staging = root / f".tmp-step-{step}"
    if staging.exists():
        shutil.rmtree(staging)
    accelerator.save_state(str(staging), safe_serialization=False)
    if accelerator.is_main_process:
        (staging / "progress.json").write_text(json.dumps({"step": step}))
        os.replace(staging, final)
        older = sorted(
            (d for d in root.iterdir() if d.name.startswith("step-") and d != final),
            key=lambda d: int(d.name.split("-", 1)[1]),
        )
        for d in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(d, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _truncate_log(path: Path, step: int) -> list[dict[str, Any]]:
    """On resume, drop log lines past the checkpoint so the log reads like one clean run."""
    if not path.is_file():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in kept if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept


# ---------------------------------------------------------------------------- the loop
def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train(
    model: torch.nn.Module,
    method: Method,
    params: Any,
    forget: list[Tokenized],
    cfg: TrainConfig,
    output: Path,
    pad_id: int,
    retain: list[Tokenized] | None = None,
    resume: bool = False,
    callbacks: list[StepCallback] | None = None,
) -> TrainResult:
    """Run `method` on `model` in place (the caller passes a model it owns, never the input's files).

    Returns when all steps are done; raises TrainingDiverged (after checkpointing the last good
    state) on a NaN/inf loss or gradient, and UnlearnError (after checkpointing) on Ctrl-C.
    """
    from accelerate import Accelerator
    from transformers import get_scheduler

    t0 = time.time()
    accelerator = Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    needs_retain = method.needs_retain(params)
    if needs_retain and not retain:
        raise UnlearnError(
            f"method '{method.name}' has a retain term, but no retain data was given; pass "
            "--retain FILE, or set method.alpha=0 to train without one"
        )
    torch.manual_seed(cfg.seed)

    ref_model = None
    if method.needs_reference_model(params):
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    ref_logp = None
    if method.needs_reference_logp:
        ref_logp = reference_logps(model, forget, pad_id, batch_size=max(cfg.batch_size, 8))

    steps = plan_steps(len(forget), cfg)
    total = len(steps)
    n_micro = sum(len(s) for s in steps)
    retain_plan = (
        retain_stream(len(retain), n_micro, cfg.batch_size, cfg.seed)
        if needs_retain and retain
        else []
    )
    micro_offsets = [0]
    for s in steps:
        micro_offsets.append(micro_offsets[-1] + len(s))

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    scheduler = get_scheduler(
        cfg.scheduler,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total),
        num_training_steps=total,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    device = accelerator.device

    output.mkdir(parents=True, exist_ok=True)
    log_path = output / LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start_step, resumed_from, history = 0, None, []
    if resume:
        found = latest_checkpoint(output)
        if found is not None:
            ckpt, start_step = found
            accelerator.load_state(str(ckpt))
            resumed_from = start_step
            history = _truncate_log(log_path, start_step)
    elif log_path.exists():
        log_path.unlink()

    model.train()
    bar = tqdm(
        total=total,
        initial=start_step,
        desc=method.name,
        disable=not cfg.progress or not accelerator.is_local_main_process,
        unit="step",
    )
    logs: dict[str, float] = {}
    step = start_step
    try:
        for step in range(start_step, total):
            micros = steps[step]
            sums: dict[str, float] = {}
            for j, idx in enumerate(micros):
                m = micro_offsets[step] + j
                mine = idx[rank::world] or idx[:1]
                f_batch = _to(collate([forget[i] for i in mine], pad_id), device)
                f_labels = f_batch.pop("labels")
                last = j == len(micros) - 1
                inputs = LossInputs(
                    forget_logits=model(**f_batch).logits,
                    forget_labels=f_labels,
                    defer_retain=needs_retain,
                )
                if ref_logp is not None:
                    inputs.ref_forget_logp = ref_logp[mine].to(device)
                loss, terms = method.loss(inputs, params)
                terms = dict(terms)
                _check_finite(loss, step)
                # Forget and retain are backpropagated in separate passes: peak memory is the
                # larger of the two batches' activations, not their sum.
                _backward(accelerator, model, loss / len(micros), sync=last and not needs_retain)
                step_loss = float(loss.detach())
                del inputs, loss
                if needs_retain and retain:
                    r_idx = retain_plan[m][rank::world] or retain_plan[m][:1]
                    r_batch = _to(collate([retain[i] for i in r_idx], pad_id), device)
                    r_labels = r_batch.pop("labels")
                    ref_logits = None
                    if ref_model is not None:
                        with torch.no_grad():
                            ref_logits = ref_model(**r_batch).logits
                    r_loss = _retain_loss(
                        params, model(**r_batch).logits, r_labels, ref_logits, terms
                    )
                    _check_finite(r_loss, step)
                    _backward(accelerator, model, r_loss / len(micros), sync=last)
                    step_loss += float(r_loss.detach())
                    del r_loss, ref_logits
                for k, v in {"loss": step_loss, **terms}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(micros)
            grad_norm = None
            if cfg.max_grad_norm > 0:
                grad_norm = float(
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                )
                if not math.isfinite(grad_norm):
                    optimizer.zero_grad(set_to_none=True)
                    raise _Diverged(step, f"gradient norm is {grad_norm}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            logs = {
                "step": step + 1,
                "epoch": round((step + 1) / total * max(cfg.epochs, 1), 4)
                if cfg.max_steps is None
                else None,
                "lr": scheduler.get_last_lr()[0],
                **sums,
            }
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            logs["seconds"] = round(time.time() - t0, 3)
            logs = {k: v for k, v in logs.items() if v is not None}
            history.append(logs)
            if accelerator.is_main_process and (
                (step + 1) % max(cfg.log_every, 1) == 0 or step + 1 == total
            ):
                with log_path.open("a") as fh:
                    fh.write(json.dumps(logs) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{sums.get('loss', float('nan')):.4f}")
            for cb in callbacks or []:
                cb(step + 1, logs)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
                _save_checkpoint(accelerator, output, step + 1)
    except _Diverged as exc:
        bar.close()
        ckpt = _save_checkpoint(accelerator, output, exc.step)
        raise TrainingDiverged(
            f"training stopped at step {exc.step + 1}: {exc.reason}; the last good state (after "
            f"step {exc.step}) is saved in {ckpt}; lower train.lr or check the data, then rerun "
            "with --resume"
        ) from None
    except KeyboardInterrupt:
        bar.close()
        ckpt = _save_checkpoint(accelerator, output, _completed(history, start_step))
        raise UnlearnError(
            f"interrupted after step {_completed(history, start_step)} of {total}; state saved in "
            f"{ckpt}; rerun the same command with --resume to continue"
        ) from None
    bar.close()
    model = accelerator.unwrap_model(model)
    return TrainResult(
        steps=total,
        final_logs={k: v for k, v in logs.items() if k not in ("step", "epoch", "seconds", "lr")},
        wall_seconds=time.time() - t0,
        resumed_from=resumed_from,
        log_path=str(log_path),
        history=history,
    )


def _check_finite(loss: torch.Tensor, step: int) -> None:
    if not torch.isfinite(loss):
        raise _Diverged(step, f"loss is {loss.item()}")


def _backward(accelerator, model, loss: torch.Tensor, sync: bool) -> None:
    """Backward, letting DDP all-reduce gradients only on the last pass of an optimizer step."""
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        accelerator.backward(loss)


def _retain_loss(
    params: Any,
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor | None,
    logs: dict[str, float],
) -> torch.Tensor:
    """alpha * the method's retain term, on its own batch (records the unweighted term in logs)."""
    inputs = LossInputs(
        forget_logits=logits,
        forget_labels=labels,
        retain_logits=logits,
        retain_labels=labels,
        ref_retain_logits=ref_logits,
    )
    return weighted_retain(params.retain_loss, params.alpha, inputs, logs)


def _completed(history: list[dict[str, Any]], start: int) -> int:
    return int(history[-1]["step"]) if history else start


class _Diverged(Exception):
    def __init__(self, step: int, reason: str) -> None:
        super().__init__(reason)
        self.step, self.reason = step, reason
