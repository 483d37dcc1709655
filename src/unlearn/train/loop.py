"""The one training loop that fine-tuning and every unlearning method go through.

Built on `accelerate`: the same loop runs on a CPU laptop and under `accelerate launch` /
torchrun with multi-process data parallelism (DDP; tests/test_distributed.py runs two gloo CPU
processes under torchrun and gets a one-process run's weights for the same global batch; note that
`accelerate launch --num_processes 2 --cpu` starts only one process without mpirun). DeepSpeed and FSDP are refused with a one-line error
until they are tested: the forget and retain terms are backpropagated in separate passes (see
below), and under DeepSpeed each `backward` would step the optimizer.

What is ours, each in a module of its own:

* the batch schedule (`schedule`), a pure function of (seed, step), sharded across processes so
  their average gradient is the global batch's;
* values of the starting model (`reference`): declared by the method (`Method.needs`), cached in one
  pass before the first step; only a KL retain term or reference hidden states keep a frozen copy;
* checkpoints (`checkpoint`) written atomically every `save_every` steps, on Ctrl-C, and before a
  step whose loss or gradient is NaN/inf (checked whether or not clipping is on), labelled with the
  completed step and the config, so `--resume` continues exactly or refuses a changed config;
* the method contract: retain term, cached reference values, a second answer per example, hidden
  states and a parameter mask are all the method's declarations, provided here;
* a jsonl log with every loss term per step.

Memory: forget and retain terms are backpropagated in separate passes, so peak activation memory is
the larger batch's, not their sum.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from unlearn.config import TrainConfig
from unlearn.errors import TrainingDiverged, UnlearnError
from unlearn.kvcache import cache_of, past
from unlearn.methods.base import LossInputs, Method, Needs, StepInfo
from unlearn.methods.retain import retain_term
from unlearn.prompts import Tokenized, collate
from unlearn.train import checkpoint as ckpt_io
from unlearn.train import hidden as hidden_io
from unlearn.train.checkpoint import CHECKPOINTS, latest_checkpoint
from unlearn.train.reference import (
    batch_values,
    frozen_copy,
    kept_positions,
    reference_values,
    takes_logits_to_keep,
)
from unlearn.train.schedule import plan_steps, retain_stream, shard

LOG_FILE = "logs/train.jsonl"
StepCallback = Callable[[int, dict[str, float]], None]
log = logging.getLogger("unlearn")

__all__ = [
    "CHECKPOINTS",
    "LOG_FILE",
    "StepCallback",
    "TrainResult",
    "latest_checkpoint",
    "plan_steps",
    "retain_stream",
    "train",
]


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


@dataclass
class _Run:
    """Everything one step needs, built once by `_setup`."""

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
    retain: list[Tokenized] | None
    second: list[Tokenized] | None
    steps: list[list[list[int]]]
    offsets: list[int]
    retain_plan: list[list[int]]
    ref_forget: dict[str, list[torch.Tensor]]
    ref_second: dict[str, list[torch.Tensor]]
    ref_model: torch.nn.Module | None
    masks: list[tuple[torch.nn.Parameter, torch.Tensor, float]]
    frozen: list[torch.nn.Parameter]
    fingerprint: dict[str, Any]
    output: Path
    log_path: Path
    anchor: Any = None  # UOE's router anchor (unlearn.localization.uoe.Anchor), or None
    prepared: Any = None  # what `Method.prepare` returned, handed to every loss call
    ref_hidden: torch.nn.Module | None = None  # the starting model's first blocks (`hidden`)
    state: dict[str, float] = field(default_factory=dict)  # the method's (`Method.init_state`)
    start: dict[str, torch.Tensor] | None = None  # start weights on the CPU, for `finalize`
    keep_logits: bool = False  # the model takes `logits_to_keep` (see `_forward`)
    share_prefix: bool = False  # run a batch's common first tokens once (see `_prefix_forward`)
    pack: bool = False  # and the rest without padding (see `_packed_forward`)
    reference_seconds: float = 0.0

    @property
    def total(self) -> int:
        return len(self.steps)


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
    second: list[Tokenized] | None = None,
    mask: dict[str, torch.Tensor] | None = None,
    anchor: Any = None,
    prepared: Any = None,
) -> TrainResult:
    """Run `method` on `model` in place (the caller passes a model it owns, never the input's files).

    `second` holds each forget example's second answer (same order) when the method declares one.
    `mask` ({parameter: bool tensor}, from `unlearn.localization`) restricts training to its selected
    entries, like a method's `parameter_mask`; `anchor` adds UOE's router anchor loss to the
    forget term (see `unlearn.localization.uoe`).
    Returns when all steps are done; raises TrainingDiverged (after checkpointing the last good
    state) on a NaN/inf loss or gradient, and UnlearnError (after checkpointing) on Ctrl-C.
    """
    t0 = time.time()
    run = _setup(
        model, method, params, forget, cfg, output, pad_id, retain, second, mask, anchor, prepared
    )
    start, resumed_from, history = _restore(run, resume)
    bar = tqdm(
        total=run.total,
        initial=start,
        desc=method.name,
        disable=not cfg.progress or not run.accelerator.is_local_main_process,
        unit="step",
    )
    logs: dict[str, Any] = {}
    completed = start  # optimizer steps applied: what a checkpoint is labelled with
    try:
        for step in range(start, run.total):
            sums, grad_norm = _one_step(run, step)
            completed = step + 1
            logs = _log_step(run, completed, sums, grad_norm, t0)
            history.append(logs)
            bar.update(1)
            bar.set_postfix(loss=f"{sums.get('loss', float('nan')):.4f}")
            for cb in callbacks or []:
                cb(completed, logs)
            if cfg.save_every and completed % cfg.save_every == 0 and completed < run.total:
                _save(run, completed)
    except _Diverged as exc:
        bar.close()
        ckpt = _save(run, completed)
        raise TrainingDiverged(
            f"training stopped at step {completed + 1}: {exc.reason}; the last good state (after "
            f"step {completed}) is saved in {ckpt}; rerun with --resume and a lower train.lr "
            "(the new lr is applied to the saved state), or check the data"
        ) from None
    except KeyboardInterrupt:
        bar.close()
        ckpt = _save(run, completed)
        raise UnlearnError(
            f"interrupted after step {completed} of {run.total}; state saved in {ckpt}; rerun "
            "the same command with --resume to continue"
        ) from None
    finally:
        for p in run.frozen:
            p.requires_grad_(True)
    bar.close()
    if run.method.finalize is not None and run.start is not None:
        _finalize(run)
    return TrainResult(
        steps=run.total,
        final_logs={k: v for k, v in logs.items() if k not in ("step", "epoch", "seconds", "lr")},
        wall_seconds=time.time() - t0,
        resumed_from=resumed_from,
        log_path=str(run.log_path),
        history=history,
        reference_seconds=run.reference_seconds,
        reference=run.ref_forget,
    )


# ---------------------------------------------------------------------------- setup
def _setup(
    model: torch.nn.Module,
    method: Method,
    params: Any,
    forget: list[Tokenized],
    cfg: TrainConfig,
    output: Path,
    pad_id: int,
    retain: list[Tokenized] | None,
    second: list[Tokenized] | None,
    mask: dict[str, torch.Tensor] | None = None,
    anchor: Any = None,
    prepared: Any = None,
) -> _Run:
    """Check the method's declared needs against the data, then build optimizer and references."""
    from accelerate import Accelerator

    # Every process runs every step (the loop shards each global batch itself), so the scheduler
    # steps once per optimizer step; accelerate's default steps it once per process.
    accelerator = Accelerator(
        cpu=next(model.parameters()).device.type == "cpu", step_scheduler_with_optimizer=False
    )
    _refuse_unsupported(accelerator)
    needs = method.needs(params)
    _check_data(method, needs, forget, retain, second)
    _check_needs(method, needs, model, accelerator)
    reinforced = _reinforced_logits(model, needs, forget, cfg, output, pad_id)
    torch.manual_seed(cfg.seed)
    uses_retain = needs.retain is not None and needs.retain.weight != 0
    ref_model = frozen_copy(model, accelerator) if needs.reference_model else None
    ref_hidden = None
    if needs.reference_hidden_layers:
        ref_hidden = hidden_io.truncated_copy(model, max(needs.reference_hidden_layers))
        ref_hidden = accelerator.prepare_model(ref_hidden, evaluation_mode=True)
    start = None
    if method.finalize is not None:
        start = {
            n: p.detach().to("cpu", copy=True)
            for n, p in model.named_parameters()
            if p.requires_grad
        }
    steps = plan_steps(len(forget), cfg)
    offsets = [0]
    for s in steps:
        offsets.append(offsets[-1] + len(s))
    retain_plan = (
        retain_stream(len(retain), offsets[-1], cfg.batch_size, cfg.seed)
        if uses_retain and retain
        else []
    )
    masks, frozen = _masks(method, params, model, mask)
    optimizer = _optimizer(model, cfg, masks)
    scheduler = _scheduler(optimizer, cfg, len(steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    masks = [(p, m.to(p.device), wd) for p, m, wd in masks]
    # One pass over the forget examples (and second answers) with the starting model.
    unwrapped = accelerator.unwrap_model(model)
    batch = max(cfg.batch_size, 8)
    t_ref = time.time()
    kinds = tuple(k for k in needs.reference if k != "reinforced_logits")
    ref_forget = reference_values(unwrapped, forget, pad_id, kinds, batch)
    ref_second = reference_values(unwrapped, second or [], pad_id, kinds, batch)
    if reinforced is not None:
        ref_forget["reinforced_logits"] = reinforced["logits"]
        ref_forget["reinforced_logits:start"] = reinforced["logits:start"]
    reference_seconds = time.time() - t_ref
    data = {
        "forget": ckpt_io.items_hash(forget),
        "retain": ckpt_io.items_hash(retain) if uses_retain else None,
        "second": ckpt_io.items_hash(second),
        "mask": _mask_digest(mask),
        "anchor": repr(anchor) if anchor is not None else None,
    }
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return _Run(
        accelerator, model, optimizer, scheduler, method, params, needs, cfg, pad_id, forget,
        retain if uses_retain else None, second, steps, offsets, retain_plan, ref_forget,
        ref_second, ref_model, masks, frozen, ckpt_io.run_fingerprint(cfg, method.name, params, data),
        output, log_path,
        keep_logits=takes_logits_to_keep(accelerator.unwrap_model(model)),
        share_prefix=anchor is None and _can_share_prefix(accelerator, model),
        pack=anchor is None and _can_pack(accelerator, model),
        reference_seconds=reference_seconds,
        anchor=anchor,
        prepared=prepared,
        ref_hidden=ref_hidden,
        state=dict(method.init_state(params)) if method.init_state is not None else {},
        start=start,
    )  # fmt: skip


def _check_needs(method: Method, needs: Needs, model, accelerator) -> None:
    """Declarations the model or the process layout cannot honour, refused before any work."""
    layers = tuple(needs.hidden_layers) + tuple(needs.reference_hidden_layers)
    if layers:
        hidden_io.check_layers(model, layers, f"method '{method.name}'")
    if needs.gradients != "sum" and accelerator.num_processes > 1:
        raise UnlearnError(
            f"method '{method.name}' combines the forget and retain gradients itself "
            f"(gradients={needs.gradients}), which is implemented for one process only; run it "
            "without `accelerate launch`/torchrun"
        )


def _reinforced_logits(
    model: torch.nn.Module,
    needs: Needs,
    forget: list[Tokenized],
    cfg: TrainConfig,
    output: Path,
    pad_id: int,
) -> dict[str, list[torch.Tensor]] | None:
    """WHP's reinforced model: a copy of the start fine-tuned on the forget data with plain NLL,
    run through this same loop (its log in OUT/logs/reinforce/), its forget logits cached, freed."""
    spec = needs.reinforce
    if spec is None:
        return None
    from unlearn.methods.finetune import METHOD as FINETUNE
    from unlearn.methods.finetune import FinetuneParams

    sub = dataclasses.replace(
        cfg, lr=spec.lr, max_steps=spec.steps, save_every=0, warmup_steps=None, warmup_ratio=0.0,
        keep_checkpoints=False, nll_check=False,
    )  # fmt: skip
    reinforced = copy.deepcopy(model)
    train(
        reinforced, FINETUNE, FinetuneParams(), forget, sub, output / "logs" / "reinforce", pad_id
    )
    values = reference_values(reinforced, forget, pad_id, ("logits",), max(cfg.batch_size, 8))
    del reinforced
    return values


def _can_share_prefix(accelerator, model) -> bool:
    """Prefix sharing needs a model that takes a KV cache, one process (DDP expects one forward
    per backward) and a model whose keys/values the cache holds as plain tensors."""
    params = inspect.signature(accelerator.unwrap_model(model).forward).parameters
    return accelerator.num_processes == 1 and ("cache" in params or "past_key_values" in params)


def _can_pack(accelerator, model) -> bool:
    """Packing needs what prefix sharing needs, and SDPA attention, which takes a boolean 4D mask
    as given (Hugging Face's eager attention wants an additive float mask instead)."""
    config = getattr(accelerator.unwrap_model(model), "config", None)
    sdpa = getattr(config, "_attn_implementation", None) == "sdpa"
    return sdpa and _can_share_prefix(accelerator, model)


def _refuse_unsupported(accelerator) -> None:
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise UnlearnError(
            f"training under {kind.value} is not supported yet (untested: the forget and retain "
            "terms are backpropagated separately); run `accelerate launch` with plain "
            "multi-GPU/CPU data parallelism (DDP) instead"
        )


def _check_data(method, needs: Needs, forget, retain, second) -> None:
    if needs.retain is not None and needs.retain.weight != 0 and not retain:
        raise UnlearnError(
            f"method '{method.name}' has a retain term, but no retain data was given; pass "
            "--retain FILE, or set method.alpha=0 to train without one"
        )
    if needs.second_target and (second is None or len(second) != len(forget)):
        raise UnlearnError(
            f"method '{method.name}' needs a second answer for each of the {len(forget)} forget "
            f"sequences, got {0 if second is None else len(second)}; use question/answer forget "
            "data and give the method a second_targets hook"
        )
    if needs.gradients != "sum" and (needs.retain is None or needs.retain.weight == 0):
        raise UnlearnError(
            f"method '{method.name}' combines the forget gradient with the retain gradient "
            f"(gradients={needs.gradients}), so it needs a retain term; set method.alpha > 0 and "
            "pass --retain FILE"
        )


def _mask_digest(mask: dict[str, torch.Tensor] | None) -> str | None:
    """A digest of which entries a mask selects (resume refuses a different mask)."""
    if mask is None:
        return None
    h = hashlib.sha256()
    for name in sorted(mask):
        h.update(name.encode())
        h.update(mask[name].to("cpu", torch.bool).numpy().tobytes())
    return h.hexdigest()[:16]


def _masks(
    method: Method, params: Any, model: torch.nn.Module, given: dict[str, torch.Tensor] | None
) -> tuple[list, list]:
    """(parameter, float mask, weight decay) for masked tensors, and the frozen rest."""
    if method.parameter_mask is None and given is None:
        return [], []
    if method.parameter_mask is not None and given is not None:
        raise UnlearnError(
            f"method '{method.name}' chooses its own parameters; it cannot be combined with a "
            "localize mask (set localize.method=none)"
        )
    source = f"method '{method.name}'" if given is None else "the localize mask"
    chosen = given if given is not None else method.parameter_mask(model, params)  # type: ignore[misc]
    named = dict(model.named_parameters())
    unknown = sorted(set(chosen) - set(named))
    if unknown:
        raise UnlearnError(f"{source} masks unknown parameter {unknown[0]!r}")
    out, frozen = [], []
    for name, p in named.items():
        mask = chosen.get(name)
        if mask is None or not bool(mask.any()):
            if p.requires_grad:
                p.requires_grad_(False)  # no gradient, no optimizer state
                frozen.append(p)
            continue
        if mask.shape != p.shape:
            raise UnlearnError(
                f"{source}: mask for {name} has shape {tuple(mask.shape)}, "
                f"the parameter {tuple(p.shape)}"
            )
        out.append((p, mask.to(device=p.device, dtype=p.dtype), 0.0))
    return out, frozen


def _decays(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and "norm" not in name.lower()


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, masks: list) -> torch.optim.Optimizer:
    """AdamW; masked tensors decay only on their selected entries (done by hand in `_apply`)."""
    masked = {id(p) for p, _, _ in masks}
    decay, no_decay, masked_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in masked and _decays(name, p):
            masked_decay.append(p)
        else:
            (decay if _decays(name, p) else no_decay).append(p)
    for i, (p, m, _) in enumerate(masks):
        if any(p is q for q in masked_decay):
            masks[i] = (p, m, cfg.weight_decay)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if masked_decay:
        groups.append({"params": masked_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=_fusable(model))


def _fusable(model: torch.nn.Module) -> bool:
    """PyTorch's fused AdamW kernel where it exists (CPU and CUDA floating point): on SmolLM2 on a
    2-core CPU a step of the default per-tensor loop took 434 ms, the fused kernel 107 ms."""
    return all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point()
        for p in model.parameters()
        if p.requires_grad
    )


def _scheduler(optimizer, cfg: TrainConfig, total: int):
    from transformers import get_scheduler

    warmup = cfg.num_warmup_steps(total)
    return get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total
    )


def _restore(run: _Run, resume: bool) -> tuple[int, int | None, list[dict[str, Any]]]:
    """(first step to run, step resumed from, log history so far); checks the saved config."""
    if not resume:
        if run.log_path.exists() and run.accelerator.is_main_process:
            run.log_path.unlink()
        return 0, None, []
    found = latest_checkpoint(run.output)
    if found is None:
        return 0, None, []
    ckpt, step = found
    progress = ckpt_io.read_progress(ckpt)
    changes = ckpt_io.check_resume(progress.get("config"), run.fingerprint, ckpt)
    run.accelerator.load_state(str(ckpt))
    if "method_state" in progress:
        run.state = {k: float(v) for k, v in progress["method_state"].items()}
    ckpt_io.apply_allowed(changes, run.optimizer, run.scheduler)
    history = ckpt_io.truncate_log(run.log_path, step)
    if changes:
        note = ", ".join(f"{k}={v!r}" for k, v in changes.items())
        log.warning("resuming from step %d with changed settings: %s", step, note)
        if run.accelerator.is_main_process:
            with run.log_path.open("a") as fh:
                fh.write(
                    json.dumps({"event": "resume", "from_step": step, "changed": changes}) + "\n"
                )
    return step, step, history


# ---------------------------------------------------------------------------- one step
def _one_step(run: _Run, step: int) -> tuple[dict[str, float], float]:
    """Accumulate every micro-batch's gradients, check them, apply the update, update the state."""
    micros = run.steps[step]
    sums: dict[str, float] = {}
    bad: list[str] = []
    mode = run.needs.gradients
    retain_idx = (
        [run.retain_plan[run.offsets[step] + j] for j in range(len(micros))]
        if run.retain is not None
        else []
    )
    if mode == "orthogonal":
        for idx, r_idx in zip(micros, retain_idx, strict=True):
            _add(sums, _orthogonal_micro(run, idx, r_idx, len(micros), bad), len(micros))
    elif mode == "project":
        for idx in micros:
            _add(sums, _forget_pass(run, idx, len(micros), bad, sync=True), len(micros))
        g_f = _take_grads(run)
        for r_idx in retain_idx:
            logs: dict[str, float] = {}
            value = _retain_pass(run, r_idx, len(micros), logs, bad, sync=True)
            _add(sums, {**logs, "loss": value}, len(micros))
        sums["grad_cos"] = _project(run, g_f, always=run.needs.project_always)
    else:
        for j, idx in enumerate(micros):
            last = j == len(micros) - 1
            terms = _forget_pass(run, idx, len(micros), bad, sync=last and run.retain is None)
            if run.retain is not None:
                terms["loss"] += _retain_pass(
                    run, retain_idx[j], len(micros), terms, bad, sync=last
                )
            _add(sums, terms, len(micros))
    grad_norm = _finish_gradients(run, step, bad)
    _apply(run)
    if run.method.update_state is not None:
        info = StepInfo(step=step + 1, total=run.total, logs=_mean_over_processes(run, sums))
        run.state = dict(run.method.update_state(dict(run.state), info, run.params))
    return sums, grad_norm


def _mean_over_processes(run: _Run, sums: dict[str, float]) -> dict[str, float]:
    """Each process's loss terms are of its own shard; a state rule (a dual variable) must see
    the global batch's, or the processes' states drift apart."""
    if run.accelerator.num_processes == 1 or not sums:
        return dict(sums)
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], device=run.accelerator.device)
    values = run.accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist(), strict=True))


def _add(sums: dict[str, float], terms: dict[str, float], n_micro: int) -> None:
    for k, v in terms.items():
        sums[k] = sums.get(k, 0.0) + float(v) / n_micro


def _forward(run: _Run, model, items: list[Tokenized], idx: list[int], layers: tuple[int, ...]):
    """The model on a collated batch: (logits or None, {block: hidden}, labels, inputs, kept).

    Logits are computed only from the position before the batch's first scored token on
    (`logits_to_keep`), and labels are cut to match: prompt positions carry no loss, and with a
    vocabulary of ~50k the output layer and its softmax over every prompt position were a fifth of
    a fine-tuning step. `kept` (the positions kept, or None for all) lets the caller cut cached
    reference values and reference logits the same way. Methods reading hidden states get full
    sequences, and a method that reads no logits stops the model after its deepest block.
    """
    batch = collate([items[i] for i in idx], run.pad_id)
    batch = {k: v.to(run.accelerator.device) for k, v in batch.items()}
    labels = batch.pop("labels")
    if layers:
        stop = not run.needs.logits and run.accelerator.num_processes == 1
        out, seen = hidden_io.run(model, batch, layers, stop)
        logits = None if out is None or not run.needs.logits else out.logits
        return logits, seen, labels, batch, None
    flag: dict[str, Any] = {}
    kept = kept_positions(labels) if run.keep_logits else None
    if kept is not None:
        flag["logits_to_keep"] = kept
        labels = labels[:, -kept:]
    shared = _shared_prefix(batch, kept) if run.share_prefix else 0
    if run.pack and kept is not None and batch["input_ids"].shape[0] > 1:
        return _packed_forward(model, batch, shared, kept), {}, labels, batch, kept
    if shared:
        return _prefix_forward(model, batch, shared, flag).logits, {}, labels, batch, kept
    return model(**batch, **flag).logits, {}, labels, batch, kept


def _shared_prefix(batch: dict[str, torch.Tensor], kept: int | None) -> int:
    """How many leading tokens every row of the batch shares and that need no logits (0: none
    worth sharing). Chat templates open every sequence with the same system prompt and headers."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.shape[0] < 2 or kept is None:
        return 0
    same = ((ids == ids[:1]) & (mask == 1)).all(0)
    differs = (~same).nonzero()
    n = int(differs[0]) if len(differs) else ids.shape[1]
    n = min(n, ids.shape[1] - kept)  # every position whose logits are kept runs in the batch
    return n if n >= 4 else 0


def _packed_forward(model, batch: dict[str, torch.Tensor], n: int, kept: int) -> torch.Tensor:
    """The batch's rows without their padding, one after another in a single row, after their
    shared first `n` tokens run once; the logits of the last `kept` padded positions, [B, kept, V].

    A 4D mask lets each token see the shared prefix and the earlier tokens of its own row only,
    and position ids restart per row, so every row computes exactly what it computes alone (tested
    against the padded batch). On TOFU batches of 4 with SmolLM2's chat template, padding and the
    repeated system prompt were a quarter of the tokens a padded batch runs.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    lengths = [int(x) for x in mask.sum(1)]
    device = ids.device
    seq = torch.cat([torch.full((k - n,), i, device=device) for i, k in enumerate(lengths)])
    pos = torch.cat([torch.arange(n, k, device=device) for k in lengths])
    packed = torch.cat([ids[i, n:k] for i, k in enumerate(lengths)])[None]
    own = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
    allowed = torch.cat([own.new_ones(len(pos), n), own], dim=1)[None, None]
    # padded position p of row i (p >= width - kept, p < its length) is packed index off_i + p - n
    first = width - kept
    src, dst, off = [], [], 0
    for i, k in enumerate(lengths):
        span = torch.arange(max(first, n), k, device=device)
        src.append(off + span - n)
        dst.append(i * kept + span - first)
        off += k - n
    keep, into = torch.cat(src), torch.cat(dst)
    extra: dict[str, Any] = {}
    if n:
        head = model(input_ids=ids[:1, :n], use_cache=True)
        extra = {"use_cache": True, **past(model, cache_of(head))}
    else:
        extra = {"use_cache": False}
    logits = model(
        input_ids=packed, position_ids=pos[None], attention_mask=allowed, logits_to_keep=keep,
        **extra,
    ).logits[0]  # fmt: skip
    out = logits.new_zeros(rows * kept, logits.shape[-1]).index_copy(0, into, logits)
    return out.view(rows, kept, -1)


def _prefix_forward(model, batch: dict[str, torch.Tensor], n: int, flag: dict[str, Any]):
    """The model on a batch whose rows share their first `n` tokens: those run once (batch 1) and
    their keys/values are broadcast to every row, then the rest runs after them. Gradients flow
    through the shared part (the broadcast sums them), so loss and gradients are those of the
    whole batch up to float rounding (tested), at a fraction of the cost when, as in a chat
    template, a long system prompt opens every short question/answer pair."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    head = model(input_ids=ids[:1, :n], use_cache=True)
    cache = cache_of(head)
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    positions = torch.arange(n, width, device=ids.device).expand(rows, -1)
    return model(
        input_ids=ids[:, n:],
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **past(model, cache),
        **flag,
    )


def _ref_hidden(run: _Run, batch: dict[str, torch.Tensor], which: str) -> dict[int, torch.Tensor]:
    """The frozen starting model's block outputs (its truncated copy, stopped at the last one)."""
    layers = run.needs.reference_hidden_layers
    if not layers or run.ref_hidden is None or which not in run.needs.reference_hidden_on:
        return {}
    with torch.no_grad(), run.accelerator.autocast():
        return hidden_io.run(run.ref_hidden, batch, layers, stop=True)[1]


def _forget_loss(run: _Run, mine: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
    """The method's forget loss on this process's rows (plus UOE's anchor), not yet backpropagated."""
    needs, device = run.needs, run.accelerator.device
    unwrapped = run.accelerator.unwrap_model(run.model) if run.anchor is not None else None
    with (
        run.anchor.capture(unwrapped)
        if run.anchor is not None
        else contextlib.nullcontext({}) as routed
    ):
        logits, seen, labels, batch, kept = _forward(
            run, run.model, run.forget, mine, needs.hidden_layers
        )
    ref = batch_values(run.ref_forget, mine, batch["input_ids"].shape[1], device, kept)
    inputs = LossInputs(
        forget_logits=logits,
        forget_labels=labels,
        defer_retain=run.retain is not None,
        ref_forget=ref,
        ref_forget_logp=ref.get("sequence_logp"),
        forget_hidden=seen,
        ref_forget_hidden=_ref_hidden(run, batch, "forget"),
        state=dict(run.state),
        prepared=run.prepared,
    )
    if needs.second_target and run.second is not None:
        s_logits, _, s_labels, s_batch, s_kept = _forward(run, run.model, run.second, mine, ())
        inputs.second_logits, inputs.second_labels = s_logits, s_labels
        width = s_batch["input_ids"].shape[1]
        inputs.ref_second = batch_values(run.ref_second, mine, width, device, s_kept)
    loss, terms = run.method.loss(inputs, run.params)
    if run.anchor is not None:  # UOE: keep the router sending forget tokens to the chosen expert
        anchor = run.anchor.loss(unwrapped, routed, batch["attention_mask"].bool())
        terms["anchor_loss"] = float(anchor.detach())
        loss = loss + anchor
    return loss, {"loss": float(loss.detach()), **terms}


def _forget_pass(run: _Run, idx, n_micro: int, bad: list[str], sync: bool) -> dict[str, float]:
    """Forward the forget (and second-answer) batch, backpropagate the method's forget loss."""
    mine, weight = shard(idx, run.accelerator.process_index, run.accelerator.num_processes)
    loss, terms = _forget_loss(run, mine)
    if not torch.isfinite(loss.detach()):
        bad.append(f"loss is {float(loss.detach())}")
    _backward(run, loss * (weight / n_micro), sync)
    return terms


def _retain_loss(run: _Run, mine: list[int], logs: dict) -> torch.Tensor:
    """weight * the declared retain term on this process's retain rows (unweighted in `logs`)."""
    term = run.needs.retain
    assert term is not None and run.retain is not None
    layers = run.needs.hidden_layers
    logits, seen, labels, batch, kept = _forward(run, run.model, run.retain, mine, layers)
    inputs = LossInputs(
        forget_logits=logits,
        forget_labels=labels,
        retain_logits=logits,
        retain_labels=labels,
        retain_hidden=seen,
        ref_retain_hidden=_ref_hidden(run, batch, "retain"),
        state=dict(run.state),
    )
    if term.kind == "kl" and run.ref_model is not None:
        with torch.no_grad(), run.accelerator.autocast():
            keep = {"logits_to_keep": kept} if kept is not None else {}
            inputs.ref_retain_logits = run.ref_model(**batch, **keep).logits
    value = term.loss(inputs) if term.loss is not None else retain_term(term.kind, inputs)  # type: ignore[arg-type]
    logs["retain_loss"] = float(value.detach())
    weight = term.weight * (run.state[term.state_weight] if term.state_weight else 1.0)
    return weight * value


def _retain_pass(run: _Run, r_idx, n_micro: int, logs: dict, bad: list[str], sync: bool) -> float:
    """weight * the declared retain term on its own batch, in a backward pass of its own."""
    mine, share = shard(r_idx, run.accelerator.process_index, run.accelerator.num_processes)
    loss = _retain_loss(run, mine, logs)
    if not torch.isfinite(loss.detach()):
        bad.append(f"retain loss is {float(loss.detach())}")
    _backward(run, loss * (share / n_micro), sync)
    return float(loss.detach())


def _trainable(run: _Run) -> list[torch.nn.Parameter]:
    return [p for p in run.model.parameters() if p.requires_grad]


def _take_grads(run: _Run) -> list[torch.Tensor | None]:
    """The accumulated gradients, removed from the parameters (which start from zero again)."""
    out = []
    for p in _trainable(run):
        out.append(p.grad)
        p.grad = None
    return out


def _dot(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> torch.Tensor:
    terms = [
        (x.float() * y.float()).sum()
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _project(run: _Run, g_f: list[torch.Tensor | None], always: bool) -> float:
    """Gradient surgery: p.grad holds the retain gradient g_r; it becomes g_f' + g_r, where g_f'
    is g_f minus its component along g_r when they conflict (or always). Returns cos(g_f, g_r)."""
    params = _trainable(run)
    g_r = [p.grad for p in params]
    dot, nf, nr = _dot(g_f, g_r), _dot(g_f, g_f), _dot(g_r, g_r)
    cos = float(dot / (nf.sqrt() * nr.sqrt()).clamp(min=1e-30))
    coef = float(dot / nr) if float(nr) > 0 and (always or float(dot) < 0) else 0.0
    with torch.no_grad():
        for p, f, r in zip(params, g_f, g_r, strict=True):
            if f is None:
                continue
            if r is None:
                p.grad = f
                continue
            p.grad = (f - coef * r + r).to(p.grad.dtype) if coef else f + r
    return cos


def _orthogonal_micro(run: _Run, idx, r_idx, n_micro: int, bad: list[str]) -> dict[str, float]:
    """UNO on one micro-batch: the gradient of L_f + L_r + w * cos^2(g_f, g_r), where g_f and g_r
    are the forget and weighted retain gradients, by a double backward through both graphs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = _trainable(run)
    logs: dict[str, float] = {}
    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no second derivative
        loss_f, terms = _forget_loss(run, list(idx))
        loss_r = _retain_loss(run, list(r_idx), logs)
    for name, value in (("loss", loss_f), ("retain loss", loss_r)):
        if not torch.isfinite(value.detach()):
            bad.append(f"{name} is {float(value.detach())}")
    g_f = list(torch.autograd.grad(loss_f, params, create_graph=True, allow_unused=True))
    g_r = list(torch.autograd.grad(loss_r, params, create_graph=True, allow_unused=True))
    dot, nf, nr = _dot(g_f, g_r), _dot(g_f, g_f), _dot(g_r, g_r)
    penalty = dot.pow(2) / (nf * nr + 1e-12)
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
            total = torch.stack(parts).sum(0) / n_micro if len(parts) > 1 else parts[0] / n_micro
            p.grad = total if p.grad is None else p.grad + total
    cos = float(dot.detach() / (nf.detach().sqrt() * nr.detach().sqrt()).clamp(min=1e-30))
    total_loss = float(loss_f.detach() + loss_r.detach() + weight * penalty.detach())
    return {
        **terms,
        **logs,
        "loss": total_loss,
        "orthogonal_penalty": float(penalty.detach()),
        "grad_cos": cos,
    }


def _backward(run: _Run, loss: torch.Tensor, sync: bool) -> None:
    """Backward, letting DDP all-reduce gradients only on the last pass of an optimizer step."""
    acc = run.accelerator
    with contextlib.nullcontext() if sync else acc.no_sync(run.model):
        acc.backward(loss)


def _finish_gradients(run: _Run, step: int, bad: list[str]) -> float:
    """Mask, measure (one fused norm, clipped if asked) and refuse non-finite gradients.

    Every process reaches the same verdict: the norm is of the all-reduced gradients, and a
    non-finite loss on any process is summed across processes before anyone raises.
    """
    for p, mask, _ in run.masks:
        if p.grad is not None:
            p.grad.mul_(mask)
    params = [p for p in run.model.parameters() if p.grad is not None]
    if run.cfg.max_grad_norm > 0:
        norm = run.accelerator.clip_grad_norm_(params, run.cfg.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    flag = torch.tensor([float(bool(bad))], device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        flag = run.accelerator.reduce(flag, reduction="sum")
    grad_norm = float(norm)
    if bad or flag.item() > 0 or not torch.isfinite(torch.tensor(grad_norm)):
        run.optimizer.zero_grad(set_to_none=True)
        raise _Diverged(step, bad[0] if bad else f"gradient norm is {grad_norm}")
    return grad_norm


def _apply(run: _Run) -> None:
    """Weight decay on masked tensors' selected entries only, then the AdamW step."""
    lr = run.scheduler.get_last_lr()[0]
    with torch.no_grad():
        for p, mask, wd in run.masks:
            if wd:
                p.mul_(1 - lr * wd * mask)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _log_step(run: _Run, completed: int, sums: dict, grad_norm: float, t0: float) -> dict:
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


def _save(run: _Run, completed: int) -> Path:
    return ckpt_io.save_checkpoint(
        run.accelerator, run.output, completed, run.fingerprint, run.state or None
    )


def _finalize(run: _Run) -> None:
    """Replace the trained weights by the method's function of them and the start (task vectors)."""
    assert run.method.finalize is not None and run.start is not None
    named = dict(run.accelerator.unwrap_model(run.model).named_parameters())
    trained = {n: named[n].detach() for n in run.start}
    new = run.method.finalize(run.start, trained, run.params)
    with torch.no_grad():
        for name, weight in new.items():
            named[name].copy_(weight.to(named[name].device, named[name].dtype))


class _Diverged(Exception):
    def __init__(self, step: int, reason: str) -> None:
        super().__init__(reason)
        self.step, self.reason = step, reason
