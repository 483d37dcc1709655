"""Everything before the first step: check the method's declarations against the data and the
process layout, take the starting model's values, freeze and mask, build the optimizer, and
restore a checkpoint on `--resume`."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any

import torch

from unlearn import adapters
from unlearn import forward as fwd
from unlearn.errors import UnlearnError
from unlearn.methods.base import Method, Needs
from unlearn.train import checkpoint as ckpt_io
from unlearn.train import deepspeed, optim, sharding
from unlearn.train import hidden as hidden_io
from unlearn.train.checkpoint import latest_checkpoint
from unlearn.train.job import LOG_FILE, TrainJob
from unlearn.train.reference import frozen_copy, reference_values
from unlearn.train.reinforce import reinforced_logits
from unlearn.train.schedule import mean_sizes, plan_steps, retain_stream
from unlearn.train.state import RunState, StartValues

log = logging.getLogger("unlearn")


def build(job: TrainJob) -> RunState:
    """The run's state, ready for its first step (or its first step after a checkpoint)."""
    from accelerate import Accelerator

    model, method, cfg = job.model, job.method, job.cfg
    first = next(model.parameters())
    ds = cfg.sharding == "deepspeed"
    deepspeed.preload()
    bf16 = autocasts(cfg, first.device)
    deepspeed.fresh_state(ds, "bf16" if bf16 and not ds else "no")
    extra: dict[str, Any]
    if ds:  # DeepSpeed's own bf16 mode (bf16 weights, float32 master copy) stands for autocast
        if first.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        extra = {"deepspeed_plugin": deepspeed.plugin(cfg, first.dtype, world, bf16)}
    else:
        extra = {"cpu": first.device.type == "cpu", "mixed_precision": "bf16" if bf16 else "no"}
    # Every process runs every step (the loop shards each global batch itself), so the scheduler
    # steps once per optimizer step; accelerate's default steps it once per process.
    accelerator = Accelerator(step_scheduler_with_optimizer=False, **extra)
    refuse_unsupported(accelerator, cfg)
    needs = method.needs(job.params)
    check_data(method, needs, job.forget, job.retain, job.second)
    check_needs(method, needs, model, accelerator)
    softcap = check_head(model, job.forget, cfg.logits_chunk) if cfg.logits_chunk else None
    sharded = cfg.sharding == "fsdp2"
    sharding.check(cfg, accelerator, job.anchor)
    perturbed = None
    if job.perturb is not None and job.reference == "after":
        perturbed = job.perturb(model)
    start = start_values(job, needs, accelerator)
    if job.perturb is not None and job.reference != "after":
        perturbed = job.perturb(model)
    torch.manual_seed(cfg.seed)
    uses_retain = needs.retain is not None and needs.retain.weight != 0
    steps = plan_steps(len(job.forget), cfg)
    offsets = [0]
    for s in steps:
        offsets.append(offsets[-1] + len(s))
    retain_plan = (
        retain_stream(len(job.retain), offsets[-1], cfg.batch_size, cfg.seed)
        if uses_retain and job.retain
        else []
    )
    # adapters go where a method that chooses its parameters would train (`adapters.wrap`)
    adapted = adapters.is_adapted(model)
    if cfg.gradient_checkpointing:
        checkpointing(model, True)
    if sharded:  # after the starting model's values: they were taken from the whole model
        sharding.shard(model)
    masked, frozen = ([], []) if adapted else optim.masks(method, job.params, model, job.mask)
    if ds:  # a whole-tensor mask only freezes; a partial one DeepSpeed cannot apply
        partial = any(not bool(m.mask.all()) for m in masked)
        deepspeed.check(partial, job.anchor)
        masked = []
    opt = optim.optimizer(model, cfg, masked)
    sched = optim.scheduler(opt, cfg, len(steps))
    if sharded:  # torch shards and reduces; accelerate places nothing and wraps nothing
        prepared_model = model
    else:
        prepared_model, opt, sched = accelerator.prepare(model, opt, sched)
    ckpt_io.register_hooks(accelerator)
    for m in masked:
        m.mask = m.mask.to(m.param.device)
    data = {
        "forget": ckpt_io.items_hash(job.forget),
        "retain": ckpt_io.items_hash(job.retain) if uses_retain else None,
        "second": ckpt_io.items_hash(job.second),
        "mask": optim.mask_digest(job.mask),
        "anchor": repr(job.anchor) if job.anchor is not None else None,
    }
    fingerprint = ckpt_io.run_fingerprint(cfg, method.name, job.params, data)
    fingerprint.update(json.loads(json.dumps(job.settings, default=str)))
    job.output.mkdir(parents=True, exist_ok=True)
    log_path = job.output / LOG_FILE
    log_path.parent.mkdir(parents=True, exist_ok=True)
    unwrapped = accelerator.unwrap_model(prepared_model)
    one = accelerator.num_processes == 1
    share = (
        job.anchor is None
        and one
        and fwd.takes_cache(unwrapped)
        and not cfg.gradient_checkpointing  # checkpointed blocks take no cache in training
    )
    return RunState(
        accelerator=accelerator,
        model=prepared_model,
        optimizer=opt,
        scheduler=sched,
        method=method,
        params=job.params,
        needs=needs,
        cfg=cfg,
        pad_id=job.pad_id,
        forget=job.forget,
        retain=job.retain if uses_retain else None,
        second=job.second,
        steps=steps,
        retain_plan=retain_plan,
        offsets=offsets,
        start=start,
        masks=masked,
        frozen=frozen,
        fingerprint=fingerprint,
        output=job.output,
        log_path=log_path,
        anchor=job.anchor,
        prepared=job.prepared,
        state=dict(method.init_state(job.params)) if method.init_state is not None else {},
        keep_logits=fwd.takes_logits_to_keep(unwrapped),
        share_prefix=share,
        pack=share and fwd.uses_sdpa(unwrapped),
        softcap=softcap,
        perturbed=perturbed,
        forget_sizes=mean_sizes(job.forget, method.mean_over, job.params) if not one else None,
        retain_sizes=(
            mean_sizes(job.retain, needs.retain.mean_over, job.params)
            if uses_retain and not one and needs.retain is not None
            else None
        ),
    )


def autocasts(cfg, device: torch.device) -> bool:
    """Whether this run's forward passes run under bfloat16 autocast (`train.autocast`)."""
    if cfg.autocast == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return cfg.autocast == "bf16"


def check_head(model: Any, items: list, chunk: int) -> float | None:
    """The model's soft-capping, after checking that logits projected outside the model
    (`train.logits_chunk`) equal the model's own on a few tokens of the first example: a model
    that scales or otherwise post-processes its logits is refused, not trained on other values."""
    from unlearn.losses import HeadLogits

    softcap = fwd.logit_softcap(model)
    ids = torch.tensor([items[0].input_ids[:16]], device=next(model.parameters()).device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            whole = model(input_ids=ids).logits.float()
            with fwd.HeadCapture(model) as head:
                model(input_ids=ids)
            assert head.hidden is not None
            parts = HeadLogits(head.hidden, head.head, chunk, softcap).project(head.hidden)
    finally:
        model.train(was)
    if not torch.allclose(whole, parts, rtol=1e-4, atol=1e-4 * float(whole.abs().max())):
        raise UnlearnError(
            f"train.logits_chunk: {type(model).__name__}'s logits are not its output layer on its "
            "last hidden states (it post-processes them), so the chunked loss would differ; set "
            "train.logits_chunk=0"
        )
    return softcap


def start_values(job: TrainJob, needs: Needs, accelerator) -> StartValues:
    """The starting model's values the method compares against, all taken from the model as it is
    now: cached values on the forget items (one pass), WHP's reinforced logits, and the frozen
    copies a KL retain term or reference hidden states need."""
    model, cfg = job.model, job.cfg
    out = StartValues()
    reinforced = reinforced_logits(job, needs)
    adapted = adapters.is_adapted(model)
    if adapted and (needs.reference_model or needs.reference_hidden_layers):
        # the starting model is the same network with its adapters off: no second copy
        view = adapters.DisabledAdapters(model)
        out.model = view if needs.reference_model else None
        out.hidden = view if needs.reference_hidden_layers else None
    sharded = cfg.sharding == "fsdp2"
    if needs.reference_model and not adapted:
        out.model = (
            sharding.shard(copy.deepcopy(model).eval().requires_grad_(False))
            if sharded
            else frozen_copy(model, accelerator)
        )
    if needs.reference_hidden_layers and not adapted:
        truncated = hidden_io.truncated_copy(model, max(needs.reference_hidden_layers))
        out.hidden = (
            sharding.shard(truncated)
            if sharded
            else accelerator.prepare_model(truncated, evaluation_mode=True)
        )
    if job.method.finalize is not None:
        # with adapters, the delta's negation is the B matrices' (see `unlearn.adapters`)
        names = set(adapters.delta_names(model)) if adapted else None
        out.weights = {
            n: p.detach().to("cpu", copy=True)
            for n, p in model.named_parameters()
            if p.requires_grad and (names is None or n in names)
        }
    t0 = time.time()
    kinds = tuple(k for k in needs.reference if k != "reinforced_logits")
    batch = max(cfg.batch_size, 8)
    chunked = {"chunk": cfg.logits_chunk, "softcap": fwd.logit_softcap(model)}
    with accelerator.autocast():  # the values the loss compares against, computed as it runs
        out.forget = reference_values(model, job.forget, job.pad_id, kinds, batch, **chunked)
        out.second = reference_values(model, job.second or [], job.pad_id, kinds, batch, **chunked)
    if reinforced is not None:
        out.forget["reinforced_logits"] = reinforced["logits"]
        out.forget["reinforced_logits:start"] = reinforced["logits:start"]
    out.seconds = time.time() - t0
    return out


def checkpointing(model, on: bool) -> None:
    """Turn gradient checkpointing on (non-reentrant: no inputs that require grad are needed, so
    adapters behind a frozen embedding get gradients; tested) or off again after training."""
    inner = getattr(model, "module", model)
    if not on:
        if hasattr(inner, "gradient_checkpointing_disable"):
            inner.gradient_checkpointing_disable()
        return
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise UnlearnError(
            f"{type(inner).__name__} does not support gradient checkpointing; set "
            "train.gradient_checkpointing=false"
        )
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_needs(method: Method, needs: Needs, model, accelerator) -> None:
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


def refuse_unsupported(accelerator, cfg) -> None:
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED and cfg.sharding != "deepspeed":
        raise UnlearnError(
            "this launch enables accelerate's DeepSpeed plugin; set train.sharding=deepspeed (and "
            "train.deepspeed=zero2|zero3|FILE.json) instead of the launcher's DeepSpeed config"
        )
    if kind == DistributedType.FSDP:
        raise UnlearnError(
            f"accelerate's {kind.value} plugin is not supported; for sharded training launch "
            "plain processes (`torchrun --nproc_per_node N -m unlearn.cli forget ...` or "
            "`accelerate launch --multi_gpu`) with train.sharding=fsdp2"
        )


def check_data(method: Method, needs: Needs, forget, retain, second) -> None:
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
    if needs.gradients == "pcgrad" and (needs.retain is None or needs.retain.weight == 0):
        raise UnlearnError(
            f"method '{method.name}' combines the forget gradient with the retain gradient "
            f"(gradients={needs.gradients}), so it needs a retain term; set method.alpha > 0 and "
            "pass --retain FILE"
        )
    if needs.gradients in ("uno", "uno_s") and method.probe is None:
        raise UnlearnError(
            f"method '{method.name}' declares gradients={needs.gradients} but has no probe loss "
            "(Method.probe) whose gradient the descent is kept orthogonal to"
        )


def restore(run: RunState, resume: bool) -> tuple[int, int | None, list[dict[str, Any]]]:
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
    if run.cfg.sharding == "fsdp2":
        sharding.load(run, ckpt)
        for _ in range(step):  # the plain scheduler (not accelerate's) restarts from its lambda
            run.scheduler.step()
    if "method_state" in progress:
        run.state = {k: float(v) for k, v in progress["method_state"].items()}
    ckpt_io.apply_allowed(changes, run.optimizer, run.scheduler)
    # one process rewrites the log (the others would race on its temporary file), then all read it
    if run.accelerator.is_main_process:
        ckpt_io.truncate_log(run.log_path, step)
    run.accelerator.wait_for_everyone()
    history = ckpt_io.read_log(run.log_path, step)
    if changes:
        note = ", ".join(f"{k}={v!r}" for k, v in changes.items())
        log.warning("resuming from step %d with changed settings: %s", step, note)
        if run.accelerator.is_main_process:
            with run.log_path.open("a") as fh:
                fh.write(
                    json.dumps({"event": "resume", "from_step": step, "changed": changes}) + "\n"
                )
    return step, step, history
