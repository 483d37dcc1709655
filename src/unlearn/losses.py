"""Loss pieces that several unlearning methods combine.

Labels follow the Hugging Face convention: `labels[b, t]` is the token at position t, or -100 where
no loss is taken (prompt, padding). Logits at position t predict the token at t+1, so every piece
here shifts once. Methods build on these rather than inheriting from each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


@dataclass
class HeadLogits:
    """Logits not yet computed: the last hidden states [B, T, H] and the output layer that turns
    them into [B, T, V] (`train.logits_chunk`).

    The losses here project only the answer positions, `chunk` of them at a time, each chunk under
    activation checkpointing: the forward pass keeps no logits and the backward pass recomputes one
    chunk's. With a vocabulary of 50k-150k, full float32 logits of a batch of 2k-token documents
    (and the log-softmax and gradient of the same size that cross-entropy adds) outweigh a small
    model's activations; chunked, they cost chunk x V floats at a time. `softcap` is Gemma's final
    logit soft-capping (cap * tanh(z / cap)), applied as the model would.
    """

    hidden: torch.Tensor
    head: Any
    chunk: int
    softcap: float | None = None
    frozen: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.hidden.shape[:2], self.head.weight.shape[0])

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def detach(self) -> HeadLogits:
        """The same logits outside the graph (for logged values)."""
        return HeadLogits(self.hidden.detach(), self.head, self.chunk, self.softcap, True)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of some hidden rows [..., H] -> [..., V]."""
        with torch.no_grad() if self.frozen else torch.enable_grad():
            z = self.head(hidden).float()
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def rows(self, mask: torch.Tensor) -> torch.Tensor:
        """The hidden states at the positions `mask` [B, T] selects, [N, H]."""
        return self.hidden[:, : mask.shape[1]][mask]


Logits = torch.Tensor | HeadLogits


def _shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits[:, :-1, :], labels[:, 1:]


def _chunked(fn, rows: list[torch.Tensor], size: int, grad: bool) -> list[torch.Tensor]:
    """fn over `size`-row chunks of the given [N, ...] tensors, each under non-reentrant
    checkpointing when gradients are on (its intermediates, the chunk's logits, are recomputed in
    the backward pass instead of kept)."""
    n = rows[0].shape[0]
    out = []
    for start in range(0, n, size):
        part = [r[start : start + size] for r in rows]
        if grad and torch.is_grad_enabled():
            out.append(checkpoint(fn, *part, use_reentrant=False))
        else:
            out.append(fn(*part))
    return out


def answer_logits(logits: Logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits at the positions that predict an answer token, [N, V], and the mask [B, T-1]
    that selected them (methods whose loss needs every token's whole distribution)."""
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    if isinstance(logits, HeadLogits):
        return logits.project(logits.rows(mask)), mask
    return logits[:, :-1, :][mask].float(), mask


def token_logprobs(logits: Logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi(y_t | y_<t, x) and the mask of positions that count, both [B, T-1].

    Uses cross_entropy rather than log_softmax + gather so that no second [B, T, V] tensor is kept.
    """
    if isinstance(logits, HeadLogits):
        return _head_token_logprobs(logits, labels)
    # Labels move left rather than logits: a [B, T-1, V] slice of the logits would be copied to
    # flatten it, and its backward would allocate another [B, T, V] of zeros; the last position's
    # loss, computed against an ignored label, costs 1/T of the work instead.
    shift_labels = torch.cat(
        [labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], 1
    )
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),  # a view of contiguous logits
        shift_labels.view(-1),
        reduction="none",
    ).view_as(shift_labels)[:, :-1]
    mask = labels[:, 1:] != IGNORE_INDEX
    return (-nll) * mask, mask


def _head_token_logprobs(logits: HeadLogits, labels: torch.Tensor):
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    h, target = logits.rows(mask), shift_labels[mask]

    def piece(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(logits.project(h), target, reduction="none")

    parts = _chunked(piece, [h, target], logits.chunk, not logits.frozen)
    logp = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(mask.shape, dtype=torch.float32, device=h.device)
    return out.masked_scatter(mask, logp), mask


def sequence_logprob(logits: Logits, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probability log pi(y|x) per sequence [B], and the answer length |y| [B]."""
    logp, mask = token_logprobs(logits, labels)
    return logp.sum(-1), mask.sum(-1)


def nll(logits: Logits, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over every answer token in the batch (what HF's `loss` is)."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum() / mask.sum().clamp(min=1)


def kl_to_reference(logits: Logits, ref_logits: Logits, labels: torch.Tensor) -> torch.Tensor:
    """KL(pi_ref || pi_theta) per answer token, averaged over the batch's answer tokens.

    The direction (reference first) matches GradDiff-KL in TOFU and OpenUnlearning: it penalises the
    model for dropping probability mass where the starting model had it.
    """
    if isinstance(logits, HeadLogits) or isinstance(ref_logits, HeadLogits):
        return _chunked_kl(logits, ref_logits, labels)
    shift_logits, shift_labels = _shift(logits, labels)
    shift_ref, _ = _shift(ref_logits, labels)
    mask = shift_labels != IGNORE_INDEX
    logp = F.log_softmax(shift_logits.float(), dim=-1)
    ref_logp = F.log_softmax(shift_ref.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def _chunked_kl(logits: Logits, ref_logits: Logits, labels: torch.Tensor) -> torch.Tensor:
    mask = labels[:, 1:] != IGNORE_INDEX
    chunk = next(x.chunk for x in (logits, ref_logits) if isinstance(x, HeadLogits))
    grad = not (isinstance(logits, HeadLogits) and logits.frozen)

    def rows(x: Logits) -> torch.Tensor:
        return x.rows(mask) if isinstance(x, HeadLogits) else x[:, :-1, :][mask]

    def logp(x: Logits, r: torch.Tensor) -> torch.Tensor:
        z = x.project(r) if isinstance(x, HeadLogits) else r.float()
        return F.log_softmax(z, dim=-1)

    def piece(r: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        ref_logp = logp(ref_logits, ref).detach()
        return (ref_logp.exp() * (ref_logp - logp(logits, r))).sum()

    mine, theirs = rows(logits), rows(ref_logits).detach()
    total = sum(
        _chunked(piece, [mine, theirs], chunk, grad), mine.new_zeros((), dtype=torch.float32)
    )
    return total / mask.sum().clamp(min=1)
