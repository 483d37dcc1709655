"""The model on one training micro-batch: collate, then the cheapest forward that gives the loss
the same values (logits only where a scored token is predicted, a shared prefix run once, rows
packed without padding), or block hidden states for activation-based methods."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from unlearn import forward as fwd
from unlearn.losses import HeadLogits, Logits
from unlearn.prompts import Tokenized, collate
from unlearn.train import hidden as hidden_io
from unlearn.train.state import RunState


@dataclass
class Pass:
    """One micro-batch's forward: logits [B, T', V] (None when the method reads none), block
    hidden states, labels cut like the logits, the collated inputs, and `kept` (the number of
    last positions kept, None for all) to cut cached reference values the same way."""

    logits: Logits | None
    hidden: dict[int, torch.Tensor]
    labels: torch.Tensor
    batch: dict[str, torch.Tensor]
    kept: int | None


def forward(run: RunState, items: list[Tokenized], idx: list[int], layers: tuple[int, ...]) -> Pass:
    """Logits are computed only from the position before the batch's first scored token on
    (`logits_to_keep`), and labels are cut to match: prompt positions carry no loss, and with a
    vocabulary of ~50k the output layer and its softmax over every prompt position were a fifth of
    a fine-tuning step. Methods reading hidden states get full sequences, and a method that reads
    no logits stops the model after its deepest block. With `train.logits_chunk` the logits are
    a `losses.HeadLogits`: the last hidden states, projected later by the loss, chunk by chunk."""
    head = fwd.HeadCapture(run.model) if run.cfg.logits_chunk and run.needs.logits else None
    with head or contextlib.nullcontext():
        p = _forward(run, items, idx, layers, head)
    if head is not None and p.logits is not None:
        hidden = p.logits if p.logits.shape[-1] else head.hidden  # packed rows come scattered
        assert hidden is not None, "the output layer did not run"
        p.logits = HeadLogits(hidden, head.head, run.cfg.logits_chunk, run.softcap)
    return p


def _forward(
    run: RunState,
    items: list[Tokenized],
    idx: list[int],
    layers: tuple[int, ...],
    head: fwd.HeadCapture | None,
) -> Pass:
    model = run.model
    batch = collate([items[i] for i in idx], run.pad_id)
    batch = {k: v.to(run.accelerator.device) for k, v in batch.items()}
    labels = batch.pop("labels")
    # checkpointed blocks keep no cache in training (transformers would warn and drop it)
    flag: dict[str, Any] = {"use_cache": False} if run.cfg.gradient_checkpointing else {}
    if layers:
        stop = not run.needs.logits and run.accelerator.num_processes == 1
        out, seen = hidden_io.run(model, batch, layers, stop, **flag)
        logits = None if out is None or not run.needs.logits else out.logits
        return Pass(logits, seen, labels, batch, None)
    kept = fwd.kept_positions(labels) if run.keep_logits else None
    if kept is not None:
        flag["logits_to_keep"] = kept
        labels = labels[:, -kept:]
    shared = fwd.shared_prefix(batch, kept) if run.share_prefix else 0
    if run.pack and kept is not None and batch["input_ids"].shape[0] > 1:
        packed = fwd.packed_forward(model, batch, shared, kept, head)
        return Pass(packed, {}, labels, batch, kept)
    if shared:
        logits = fwd.prefix_forward(model, batch, shared, flag).logits
        return Pass(logits, {}, labels, batch, kept)
    return Pass(model(**batch, **flag).logits, {}, labels, batch, kept)


def start_hidden(
    run: RunState, batch: dict[str, torch.Tensor], which: str
) -> dict[int, torch.Tensor]:
    """The frozen starting model's block outputs (its truncated copy, stopped at the last one)."""
    layers = run.needs.reference_hidden_layers
    if not layers or run.start.hidden is None or which not in run.needs.reference_hidden_on:
        return {}
    with torch.no_grad(), run.accelerator.autocast():
        return hidden_io.run(run.start.hidden, batch, layers, stop=True)[1]


def start_logits(run: RunState, p: Pass) -> Logits | None:
    """The frozen starting model's logits on the same batch (a KL retain term), left to the loss
    to project chunk by chunk when the model's are (`train.logits_chunk`)."""
    if run.start.model is None:
        return None
    head = fwd.HeadCapture(run.start.model) if isinstance(p.logits, HeadLogits) else None
    with torch.no_grad(), run.accelerator.autocast(), head or contextlib.nullcontext():
        keep = {"logits_to_keep": p.kept} if p.kept is not None else {}
        logits = run.start.model(**p.batch, **keep).logits
    if head is None:
        return logits
    assert head.hidden is not None, "the output layer did not run"
    return HeadLogits(head.hidden, head.head, run.cfg.logits_chunk, run.softcap, frozen=True)
