"""Values of the starting model that methods compare against, computed once before training.

Methods that need log pi_ref on the forget set (NPO's sequence log-prob, per-token log-probs or
full logits for distillation-style methods) get them from one pass over the forget examples before
the first step, so no second model sits in memory for them. Only what depends on batches that
change during training (a KL retain term, reference hidden states) keeps a frozen copy, placed by
accelerate on this process's device.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from unlearn.forward import HeadCapture, kept_positions, takes_logits_to_keep
from unlearn.losses import IGNORE_INDEX, HeadLogits, token_logprobs
from unlearn.prompts import Tokenized, collate

LOGITS_START = "logits:start"


@torch.no_grad()
def reference_values(
    model: torch.nn.Module,
    items: list[Tokenized],
    pad_id: int,
    kinds: tuple[str, ...],
    batch_size: int = 8,
    chunk: int = 0,
    softcap: float | None = None,
) -> dict[str, list[torch.Tensor]]:
    """{kind: one CPU tensor per item} under the model as it is now, in a single pass.

    sequence_logp: log pi(y|x) summed over answer tokens (a scalar per item); token_logp: the
    per-token log-probs of `losses.token_logprobs` ([T-1], 0 off the answer); logits: [T', V] from
    the position before the first answer token on, with that position under "logits:start"
    (positions before it predict no answer token, and a 50k vocabulary makes every kept position
    cost 200 KB). With `chunk` (`train.logits_chunk`) and no "logits" asked for, the log-probs
    are projected `chunk` answer positions at a time (`losses.HeadLogits`).
    """
    out: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    if not kinds:
        return out
    if "logits" in kinds:
        out[LOGITS_START] = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(part, pad_id).items()}
        labels = batch.pop("labels")
        keep = kept_positions(labels) if takes_logits_to_keep(model) else None
        head = HeadCapture(model) if chunk and "logits" not in kinds else None
        with head or contextlib.nullcontext():
            if kinds == ("sequence_logp",) and keep is not None:
                # a sum over answer tokens needs no logits at prompt positions (see train.batches)
                logits = model(**batch, logits_to_keep=keep).logits
                labels = labels[:, -keep:]
            else:
                logits = model(**batch).logits
        if head is not None:
            assert head.hidden is not None, "the output layer did not run"
            logits = HeadLogits(head.hidden, head.head, chunk, softcap, frozen=True)
        logp, _ = token_logprobs(logits, labels)
        for row, item in enumerate(part):
            n = len(item.input_ids)
            if "sequence_logp" in kinds:
                out["sequence_logp"].append(logp[row].sum().float().cpu())
            if "token_logp" in kinds:
                out["token_logp"].append(logp[row, : n - 1].float().cpu())
            if "logits" in kinds:
                first = (labels[row, :n] != IGNORE_INDEX).nonzero()
                start = max(int(first[0]) - 1, 0) if len(first) else n
                out["logits"].append(logits[row, start:n].float().cpu())
                out[LOGITS_START].append(torch.tensor(start))
    model.train(was_training)
    return out


def reference_logps(
    model: torch.nn.Module, items: list[Tokenized], pad_id: int, batch_size: int = 8
) -> torch.Tensor:
    """log pi_ref(y|x) of every item [N], summed over answer tokens."""
    values = reference_values(model, items, pad_id, ("sequence_logp",), batch_size)
    return torch.stack(values["sequence_logp"])


def batch_values(
    values: dict[str, list[torch.Tensor]],
    idx: list[int],
    width: int,
    device: torch.device,
    kept: int | None = None,
) -> dict[str, torch.Tensor]:
    """The cached values of a micro-batch, right-padded with zeros to its collated `width`, and
    cut to the last `kept` positions when the batch's logits were (see `train.batches`)."""
    out: dict[str, torch.Tensor] = {}
    for kind, per_item in values.items():
        if kind.endswith(":start"):
            continue
        rows = [per_item[i] for i in idx]
        if kind == "sequence_logp":
            out[kind] = torch.stack(rows).to(device)
            continue
        if kind == "token_logp":
            padded = rows[0].new_zeros((len(rows), width - 1))
            for r, value in enumerate(rows):
                padded[r, : value.shape[0]] = value
            # token_logp has one entry fewer than positions: cut one fewer
            out[kind] = (padded[:, -(kept - 1) :] if kept is not None else padded).to(device)
            continue
        # logits-like: stored from each item's first useful position, zeros before it
        starts = [int(values[f"{kind}:start"][i]) for i in idx]
        offset = width - kept if kept is not None else 0
        padded = rows[0].new_zeros((len(rows), width - offset, *rows[0].shape[1:]))
        for r, (value, start) in enumerate(zip(rows, starts, strict=True)):
            padded[r, start - offset : start - offset + value.shape[0]] = value
        out[kind] = padded.to(device)
    return out


def frozen_copy(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """A frozen eval-mode copy of the starting model on this process's device (not DDP-wrapped)."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    return accelerator.prepare_model(ref, evaluation_mode=True)


def hidden(outputs, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """{layer: hidden state} picked from a model output run with output_hidden_states=True."""
    return {layer: outputs.hidden_states[layer] for layer in layers}
