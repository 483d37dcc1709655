"""The run's quick "did it forget" numbers: mean answer-token NLL on (at most) the first
`NLL_CHECK_SEQUENCES` forget and retain sequences, before and after training.

`unlearn eval` is the full measurement; this check is cheap by construction and, where the loop's
reference pass already scored the same sequences on the starting model, reads "before" off it.
"""

from __future__ import annotations

from typing import Any

import torch

from unlearn.forward import MIN_SHARED, cache_of, past, takes_cache, takes_logits_to_keep
from unlearn.losses import IGNORE_INDEX, token_logprobs
from unlearn.methods.base import Method
from unlearn.prompts import Tokenized, collate

#: How many forget and retain sequences the before/after NLL check uses at most (the first ones):
#: its cost stays bounded for large forget sets; `unlearn eval` is the full measurement.
NLL_CHECK_SEQUENCES = 64


@torch.no_grad()
def mean_nll(
    model: torch.nn.Module, items: list[Tokenized], pad_id: int, batch_size: int = 8
) -> float:
    """Mean per-token NLL of the labelled tokens: the quick "did it forget" number in the manifest.

    Cheap by construction: sequences are batched in length order (little padding), the vocabulary
    projection runs only from the first position that predicts a labelled token
    (`logits_to_keep`), not over system prompt and question, and the tokens every sequence starts
    with (chat template, system prompt: 24 of SmolLM2's ~80 on TOFU) run once for the whole call,
    their keys/values reused by every batch.
    """

    if not items:
        return 0.0
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    trims = takes_logits_to_keep(model)
    order = sorted(items, key=lambda t: len(t.input_ids))
    head = shared_head(model, order, device) if trims else None
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(order[start : start + batch_size], pad_id).items()
        }
        labels = batch.pop("labels")
        first = 0
        if trims:
            labelled = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
            first = int(labelled.min()) if len(labelled) else 0
            batch["logits_to_keep"] = labels.size(1) - first
        shared = head is not None and first >= head[0]  # else this batch has no labels at all
        logits = after_head(model, batch, head) if shared else model(**batch).logits
        logp, mask = token_logprobs(logits, labels[:, first:])
        total -= float(logp.sum())
        count += int(mask.sum())
    model.train(was)
    return total / max(count, 1)


def shared_head(model: torch.nn.Module, items: list[Tokenized], device: torch.device):
    """(n, KV cache) of the first n tokens every item starts with, run once; None if not worth it.

    n stops before the first position whose logits predict a labelled token (those must come out of
    the batch's own forward), so documents, labelled from their first token, share nothing.
    """
    from unlearn.eval.records.prefix import shareable

    if not items or not takes_cache(model):
        return None
    first = items[0].input_ids
    limit = min(len(first), *(_first_scored(t) - 1 for t in items))
    n = 0
    while n < limit and all(len(t.input_ids) > n and t.input_ids[n] == first[n] for t in items):
        n += 1
    if n < MIN_SHARED:
        return None
    out = model(input_ids=torch.tensor([first[:n]], device=device), use_cache=True)
    cache = cache_of(out)
    return (n, cache) if shareable(cache) else None


def _first_scored(item: Tokenized) -> int:
    """Index of the first labelled token after position 0 (its logits sit one position earlier)."""

    for j in range(1, len(item.labels)):
        if item.labels[j] != IGNORE_INDEX:
            return j
    return len(item.labels)


def after_head(model: torch.nn.Module, batch: dict[str, torch.Tensor], head) -> torch.Tensor:
    """Logits of a collated batch whose rows all start with the head's n tokens: only the rest
    runs, after a per-batch copy of the head's cache (the forward appends to the copy)."""
    from unlearn.eval.records.prefix import cache_rows

    n, cache = head
    ids = batch["input_ids"]
    rows, width = ids.shape
    zeros = torch.zeros(rows, dtype=torch.long, device=ids.device)
    positions = torch.arange(n, width, device=ids.device).expand(rows, -1)
    return model(
        input_ids=ids[:, n:],
        attention_mask=batch["attention_mask"],
        position_ids=positions,
        use_cache=True,
        logits_to_keep=batch["logits_to_keep"],
        **past(model, cache_rows(cache, zeros)),
    ).logits


def nll_pair(
    model: torch.nn.Module, forget: list[Tokenized], retain: list[Tokenized], pad_id: int
) -> dict[str, float]:
    values = {"forget_nll": mean_nll(model, forget, pad_id)} if forget else {}
    if retain:
        values["retain_nll"] = mean_nll(model, retain, pad_id)
    return values


#: Reference values (`Method.needs().reference`) from which a sequence's answer NLL can be read.
_NLL_KINDS = ("sequence_logp", "token_logp", "logits")


def reference_covers(
    method: Method, params: Any, new_answers: bool, noised_reference: bool
) -> bool:
    """Whether the loop's reference pass gives the before-training forget NLL of the check.

    It must score the check's own sequences (the data's answers, not refusal targets) on the model
    as loaded (not on a model whose references are taken after localization noise).
    """
    if new_answers or noised_reference:
        return False
    return any(k in _NLL_KINDS for k in method.needs(params).reference)


def reference_nll(values: dict[str, list[torch.Tensor]], items: list[Tokenized]) -> float | None:
    """Mean NLL over the labelled tokens of `items` (the first forget sequences) from the starting
    model's cached values: what `mean_nll` measures, up to float rounding."""
    from unlearn.train.reference import LOGITS_START

    kind = next((k for k in _NLL_KINDS if len(values.get(k, ())) >= len(items)), None)
    if kind is None or not items:
        return None
    total = 0.0
    for i, item in enumerate(items):
        value = values[kind][i]
        if kind == "logits":  # [T', V] from position `start` on: they predict labels start+1...
            start = int(values[LOGITS_START][i]) if LOGITS_START in values else 0
            labels = torch.tensor([item.labels[start:]], device=value.device)
            value = token_logprobs(value[None], labels)[0]
        total -= float(value.sum())
    count = sum(sum(1 for x in t.labels[1:] if x != IGNORE_INDEX) for t in items)
    return total / max(count, 1)
