"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`): each process holds
a 1/N slice of every parameter, its gradient and its optimizer state.

`train.sharding=fsdp2` under a multi-process launch (torchrun) shards the model block by block
(each decoder block, then the root for the embeddings and the head), after the starting model's
values are taken and before the optimizer is built. The loop is the one data-parallel runs use:
each process runs its shard of every global batch, the forget and retain terms are backpropagated
separately (FSDP2 reduce-scatters, i.e. averages across processes, each backward's gradients into
the sharded gradients, which accumulate) and the optimizer steps once. Frozen copies (a KL retain
term's reference, RMU's truncated reference) are sharded the same way; a localization mask is
laid out like the parameter it masks. Checkpoints go through `torch.distributed.checkpoint`
(each process writes its shards); the final model is gathered into one state dict for saving.
Nothing here is a distributed layer of our own: torch shards, gathers and reduces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unlearn.errors import UnlearnError

DCP_DIR = "dcp"


def check(cfg, accelerator, anchor) -> None:
    """Refuse a sharded run that cannot work, in one line, before anything is sharded."""
    if cfg.sharding != "fsdp2":
        return
    if accelerator.num_processes < 2:
        raise UnlearnError(
            "train.sharding=fsdp2 splits the model over several processes; launch it with "
            "`torchrun --nproc_per_node N -m unlearn.cli forget ...` (or accelerate launch on GPUs)"
        )
    if anchor is not None:
        raise UnlearnError("UOE's router anchor is not supported with train.sharding=fsdp2")


def _shard_blocks(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    from unlearn.train.hidden import decoder_blocks

    for block in decoder_blocks(model):
        if any(True for _ in block.parameters()):
            fully_shard(block)
    fully_shard(model)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """Shard the model in place (its parameters become DTensors); returns it."""
    _shard_blocks(getattr(model, "module", model))
    return model


def is_dtensor(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def like(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full-shape tensor (a mask, a starting weight) laid out (sharded) as `param` is."""
    if not is_dtensor(param):
        return mask
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(mask, DTensor):
        return mask
    return distribute_tensor(mask.to(param.device), param.device_mesh, param.placements)


def full(x: Any) -> Any:
    """A DTensor's full value (a collective: every process calls it), else `x`."""
    return x.full_tensor() if is_dtensor(x) else x


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer gathered whole, on CPU (a collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(getattr(model, "module", model), options=options)


def save(run, folder: Path) -> None:
    """The model's and the optimizer's shards, each process its own, into `folder`/dcp."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = getattr(run.model, "module", run.model)
    msd, osd = get_state_dict(model, _optimizer(run))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / DCP_DIR))


def load(run, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = getattr(run.model, "module", run.model)
    optimizer = _optimizer(run)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder / DCP_DIR))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def _optimizer(run) -> torch.optim.Optimizer:
    return getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper, if any
