"""Batches cut for little padding, and the counts that say how much of the compute was real work.

Sequences are sorted by length and cut by a row and a token budget, so a batch pads only to its
own longest member; left padding (for prompts that continue into generation) and the counters in
`PassStats` are here too. Masks are built from lengths, never by comparing ids with the pad id:
a model whose pad token is also its end-of-turn token (SmolLM2) must still see every real one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class PassStats:
    """How much of the compute went to real tokens, and what had to be cut.

    `truncated` counts scored items and generation prompts cut to `prompt.max_length`: a cut must
    never be silent, so callers print it.
    """

    real_tokens: int = 0
    padded_tokens: int = 0
    sequences: int = 0
    batches: int = 0
    generated: int = 0
    truncated: int = 0
    generation_seconds: float = 0.0

    @property
    def efficiency(self) -> float:
        return self.real_tokens / max(self.padded_tokens, 1)

    def add(self, other: PassStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def count(self, real: int, padded: int, sequences: int) -> None:
        """One forward batch of `padded` cells, `real` of them real tokens."""
        self.real_tokens += real
        self.padded_tokens += padded
        self.sequences += sequences
        self.batches += 1


def token_budget_batches(
    lengths: list[int],
    batch_size: int,
    max_tokens: int,
    min_efficiency: float = 0.0,
    min_tokens: int = 0,
) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most batch_size rows and max_tokens cells.

    With `min_efficiency`, a batch that already has `min_tokens` cells is also closed when the next
    (longer) item would pad it below that share of real tokens: few, wide-spread items (prefix
    trees of very different sizes) then go into several small batches, not one mostly-padding one.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        width = max(lengths[i], max((lengths[j] for j in current), default=0))
        cells = width * (len(current) + 1)
        if current and (
            len(current) >= batch_size
            or cells > max_tokens
            or (real >= min_tokens and real + lengths[i] < min_efficiency * cells)
        ):
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


def left_pad(prompts: list[tuple[int, ...]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) with each prompt right-aligned; the mask comes from the lengths."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def positions(mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Position ids counting real tokens only (padding gets 1, as `generate` gives it)."""
    pos = mask.long().cumsum(-1) - 1 + start
    return pos.masked_fill(mask == 0, 1)
