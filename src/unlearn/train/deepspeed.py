"""DeepSpeed ZeRO through accelerate (`train.sharding=deepspeed`, `train.deepspeed=zero2|zero3|
FILE.json`): DeepSpeed partitions optimizer state and gradients (ZeRO-2) and the parameters too
(ZeRO-3) over the processes of a launch; accelerate builds the engine from our model, optimizer and
scheduler.

One optimizer step runs several backward passes (each micro-batch's forget pass, then its retain
pass, each in a backward of its own). DeepSpeed steps the optimizer inside `backward` at a
gradient-accumulation boundary, so the boundary is set per pass: only the step's last backward is
one, and the optimizer (with DeepSpeed's clipping and our learning-rate schedule) steps once. The
configured accumulation is 1 and every loss is already weighted for its share of the global batch
(`schedule.shard`), so DeepSpeed divides by nothing; it averages gradients over the processes like
DDP. Because the step happens inside that last backward, a non-finite loss is agreed on by every
process before it, and the gradient norm is DeepSpeed's, read after the step.

Not supported (refused in one line): partial parameter masks (GRIN's; DeepSpeed owns the
gradients), methods that combine gradients themselves (PCGrad, UNO), UOE's anchor, chunked logits
under ZeRO-3 (the head's weights are partitioned outside the forward), and checkpoints: DeepSpeed's
own are pickles, which `--resume` must never unpickle, so a DeepSpeed run is not resumable (use
train.sharding=fsdp2 for that). Frozen copies (a KL retain term's starting model) are replicated.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from unlearn.errors import UnlearnError

SHIPPED = ("zero2", "zero3")


def config_file(name: str) -> dict[str, Any]:
    """A shipped config (`zero2`, `zero3`) or the user's JSON file, parsed."""
    if name in SHIPPED:
        text = (resources.files("unlearn") / "resources" / "deepspeed" / f"{name}.json").read_text()
        return json.loads(text)
    path = Path(name).expanduser()
    if not path.is_file():
        raise UnlearnError(
            f"train.deepspeed={name!r} is neither a shipped config ({', '.join(SHIPPED)}) nor a "
            "JSON file"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnlearnError(
            f"train.deepspeed: {path} is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None


def stage(cfg) -> int:
    return int(config_file(cfg.deepspeed).get("zero_optimization", {}).get("stage", 0))


def validate(cfg, method, params) -> None:
    """Refuse, in one line and before any model loads, a DeepSpeed run that cannot work."""
    train = cfg.train
    if "WORLD_SIZE" not in os.environ:
        raise UnlearnError(
            "train.sharding=deepspeed needs a launcher: `torchrun --nproc_per_node N -m "
            "unlearn.cli forget ...`, `accelerate launch` or `deepspeed` (N may be 1)"
        )
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UnlearnError(
            "train.sharding=deepspeed needs the deepspeed package: pip install deepspeed (on a "
            "machine without CUDA also set DS_ACCELERATOR=cpu)"
        ) from None
    zero = stage(train)  # a missing or malformed config fails here
    if cfg.resume or train.save_every:
        raise UnlearnError(
            f"{'--resume' if cfg.resume else 'train.save_every'} is not supported with "
            "train.sharding=deepspeed (DeepSpeed's checkpoints are pickles, which a resume would "
            "have to unpickle); use train.sharding=fsdp2 for resumable sharded runs"
        )
    if cfg.localize.active:
        raise UnlearnError(
            "a localize mask is not supported with train.sharding=deepspeed (DeepSpeed owns the "
            "gradients the mask would zero); use train.sharding=fsdp2"
        )
    gradients = method.needs(params).gradients
    if gradients != "sum":
        raise UnlearnError(
            f"method '{method.name}' combines gradients by hand (gradients={gradients}), which "
            "DeepSpeed's partitioned gradients do not allow; use train.sharding=fsdp2 or none"
        )
    if zero >= 3 and method.finalize is not None:
        raise UnlearnError(
            f"method '{method.name}' rewrites the trained weights at the end, which ZeRO-3's "
            "partitioned parameters do not allow; use train.deepspeed=zero2"
        )
    if zero >= 3 and train.logits_chunk:
        raise UnlearnError(
            "train.logits_chunk does not work with ZeRO-3 (the output layer's weights are "
            "partitioned outside the model's forward); set train.logits_chunk=0 or use zero2"
        )


def check(partial_mask: bool, anchor) -> None:
    """What only the loaded model shows: a method's own partial mask, UOE's router anchor."""
    if partial_mask:
        raise UnlearnError(
            "a partial parameter mask is not supported with train.sharding=deepspeed (DeepSpeed "
            "owns the gradients); use train.sharding=fsdp2"
        )
    if anchor is not None:
        raise UnlearnError("UOE's router anchor is not supported with train.sharding=deepspeed")


def preload() -> None:
    """Import deepspeed, where it is installed, before a multi-process launch's process group
    exists. accelerate imports it on first `unwrap_model` whenever it is installed; imported
    after the group's first collective it keeps the group's gloo threads alive past
    `destroy_process_group` (measured: 3 threads left, 0 when imported first), and a gloo thread
    alive at interpreter teardown can abort the process (tests/train/test_fsdp.py checks)."""
    import importlib.util

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or dist.is_initialized():
        return
    if importlib.util.find_spec("deepspeed") is not None:
        import deepspeed  # noqa: F401


def fresh_state(wanted: bool, mixed_precision: str) -> None:
    """accelerate keeps one AcceleratorState per process and refuses, for a second Accelerator, a
    DeepSpeed plugin or another mixed precision; a later run in the same process (the API, a
    sweep) may want another config, or none. The launch's process state (PartialState) is kept."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState._shared_state
    if not state:
        return
    was_ds = state.get("distributed_type") == DistributedType.DEEPSPEED
    if wanted or was_ds or state.get("_mixed_precision", "no") != mixed_precision:
        AcceleratorState._reset_state()
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        os.environ.pop("ACCELERATE_MIXED_PRECISION", None)


def plugin(cfg, dtype: torch.dtype, world: int, autocast: bool = False):
    """accelerate's DeepSpeedPlugin for this run: the chosen config with its "auto" values set
    (one sequence per micro-batch as DeepSpeed counts them, no accumulation of its own, our
    clipping, bf16 when the model is bf16 or the run autocasts)."""
    from accelerate.utils import DeepSpeedPlugin

    ds = config_file(cfg.deepspeed)
    auto = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in auto.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds["gradient_accumulation_steps"] != 1:
        raise UnlearnError(
            "train.deepspeed: gradient_accumulation_steps must be 1 or auto (use train.grad_accum)"
        )
    if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") == "auto":
        ds["bf16"]["enabled"] = dtype == torch.bfloat16 or autocast
    if dtype == torch.float16:
        raise UnlearnError(
            "train.sharding=deepspeed: use model.dtype=bfloat16 or float32, not float16"
        )
    return DeepSpeedPlugin(hf_ds_config=ds)


def backward(run, loss: torch.Tensor, sync: bool, bad: list[str]) -> None:
    """The pass's backward; the step's last (`sync`) also steps DeepSpeed's optimizer, after
    every process has agreed that no loss of this step was non-finite."""
    acc = run.accelerator
    if sync:
        flag = torch.tensor([float(bool(bad))], device=acc.device)
        if acc.reduce(flag, reduction="sum").item() > 0:
            from unlearn.train.step import Diverged

            raise Diverged(-1, bad[0] if bad else "a non-finite loss on another process")
    acc.deepspeed_engine_wrapped.backward(loss, sync_gradients=sync)


def grad_norm(run) -> float:
    """The step's gradient norm as DeepSpeed measured it (before clipping)."""
    value = run.accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
    return float("nan") if value is None else float(value)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's tensors on every process (ZeRO-3 gathers its partitions)."""
    import deepspeed

    inner = getattr(model, "module", model)
    params = list(inner.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}
