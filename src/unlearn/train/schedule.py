"""The batch schedule: which examples every step sees, as a pure function of (seed, step).

Forget micro-batches walk a seeded permutation per epoch and each is paired with the next retain
micro-batch of a seeded retain stream, so a resumed run sees exactly the batches an uninterrupted
run would, and every process of a multi-process run agrees on the global batch without talking.
"""

from __future__ import annotations

from typing import Any

import torch

from unlearn.config import TrainConfig
from unlearn.losses import IGNORE_INDEX
from unlearn.prompts import Tokenized


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def plan_steps(n_forget: int, cfg: TrainConfig) -> list[list[list[int]]]:
    """The whole run's forget batches: steps -> micro-batches -> example positions.

    An epoch is one pass over the forget set; with `max_steps` the epochs repeat as needed.
    """
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


def shard(
    idx: list[int], rank: int, world: int, sizes: list[int] | None = None
) -> tuple[list[int], float]:
    """This process's part of a global micro-batch, and the weight that keeps the global mean.

    Data-parallel (and sharded) training averages the processes' gradients, so a process must
    weigh its part's mean loss by world * (its share of what the loss averages over): of the
    examples for a per-example mean (NPO), of the answer tokens for a per-token mean (NLL;
    `sizes[i]` = example i's answer tokens). Then the average is the whole micro-batch's loss, and
    the result does not depend on the number of processes. A process with no example (B < world)
    still runs one example, with weight 0, so that every process takes part in the reduction.
    """
    mine = idx[rank::world]
    if not mine:
        return idx[:1], 0.0
    if sizes is not None:
        total = sum(sizes[i] for i in idx)
        if total > 0:
            return mine, world * sum(sizes[i] for i in mine) / total
    return mine, world * len(mine) / len(idx)


def answer_tokens(items: list[Tokenized]) -> list[int]:
    """Each sequence's scored tokens (labels after the first position): what a token mean counts."""
    return [sum(1 for x in it.labels[1:] if x != IGNORE_INDEX) for it in items]


def mean_sizes(items: list[Tokenized] | None, mean_over: Any, params: Any) -> list[int] | None:
    """What each sequence counts for in a loss that averages over `mean_over` ("sequence": None,
    the default weighting; "token"; or a function (sequence, params) -> count), for `shard`."""
    if items is None or mean_over == "sequence":
        return None
    if mean_over == "token":
        return answer_tokens(items)
    return [int(mean_over(item, params)) for item in items]
