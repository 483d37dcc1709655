"""Hidden states of decoder blocks, read by forward hooks, and models that stop at a block.

Activation-based methods (RMU) read the output of one decoder block and nothing after it. Running
the rest of the network, and keeping a whole frozen copy of it as the reference, would cost a full
forward pass and a second model for values nobody reads. Here a forward hook on the block records
its output and, when nothing later is needed, stops the forward pass right there; the frozen
reference is a copy of the embeddings and the blocks up to the deepest one read, with no later
blocks and no output head.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from unlearn.errors import UnlearnError

_BLOCK_LISTS = ("layers", "h", "blocks", "layer")


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks (`model.layers` in Llama, `transformer.h` in GPT-2...).

    The longest ModuleList whose attribute name is one of the usual ones; a one-line error names
    the model class when there is none, so a method needing blocks fails before training starts.
    """
    best: torch.nn.ModuleList | None = None
    for name, module in model.named_modules():
        named = isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS
        if named and (best is None or len(module) > len(best)):
            best = module
    if best is None or not len(best):
        raise UnlearnError(
            f"cannot find the decoder blocks of {type(model).__name__} (no ModuleList named "
            f"{'/'.join(_BLOCK_LISTS)}); methods that read hidden states need a standard "
            "Hugging Face decoder"
        )
    return best


def check_layers(model: torch.nn.Module, layers: tuple[int, ...], what: str) -> None:
    """One line naming the valid range when a block index is past the model's depth."""
    n = len(decoder_blocks(model))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise UnlearnError(
            f"{what}: block {bad[0]} is past the model's {n} decoder blocks; choose a block "
            f"between 0 and {n - 1}"
        )


class _Stop(Exception):
    """Raised by the hook on the deepest block read, when nothing after it is needed."""


@contextlib.contextmanager
def capture(
    model: torch.nn.Module, layers: tuple[int, ...], stop: bool
) -> Iterator[dict[int, torch.Tensor]]:
    """Record {block: output hidden state} during the forward passes inside the block; with
    `stop`, end the forward pass after the deepest block (call it through `run`)."""
    blocks = decoder_blocks(model)
    seen: dict[int, torch.Tensor] = {}
    last = max(layers)

    def hook(index: int):
        def record(module, args, output):
            seen[index] = output[0] if isinstance(output, tuple) else output
            if stop and index == last:
                raise _Stop

        return record

    handles = [blocks[i].register_forward_hook(hook(i)) for i in layers]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def run(model: Any, batch: dict[str, torch.Tensor], layers: tuple[int, ...], stop: bool, **kw):
    """(model output or None when stopped early, {block: hidden state})."""
    inner = getattr(model, "module", model)  # DDP keeps the hooks on the wrapped module
    with capture(inner, layers, stop) as seen:
        try:
            out = model(**batch, **kw)
        except _Stop:
            out = None
    return out, dict(seen)


def truncated_copy(model: torch.nn.Module, last: int) -> torch.nn.Module:
    """A frozen eval-mode copy holding the embeddings and blocks 0..`last` only.

    The later blocks and an untied output head are replaced by empty modules in the copy (through
    deepcopy's memo, so they are never copied); the copy's forward must be stopped at block
    `last` (`run(..., stop=True)`). On SmolLM2 with block 7 this is 8 of 30 blocks.
    """
    blocks = decoder_blocks(model)
    memo: dict[int, Any] = {id(b): torch.nn.Identity() for b in list(blocks)[last + 1 :]}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and (inputs is None or head.weight is not inputs.weight):
        memo[id(head)] = torch.nn.Identity()
    ref = copy.deepcopy(model, memo)
    return ref.eval().requires_grad_(False)
