"""Greedy decoding in which a finished answer stops costing compute (continuous batching).

`model.generate` keeps every row of a batch until the longest answer is done: with TOFU's 200 new
tokens and answers of very different lengths, most of the batch's work goes to rows that already
stopped. `Decoder` instead drops a row (from the ids, attention mask, positions and every layer
of the KV cache) as soon as it emits end-of-turn or EOS, and takes newly prefilled prompts into
the freed rows, keeping the batch near `capacity`. Greedy choices are those of `model.generate`
(same prefill, same positions and masks, argmax with the same tie rule; tested), and it stops at
the template's end-of-turn token or EOS as `generate` is told to. Caches other than a plain
`DynamicCache` cannot be compacted: they go through `model.generate` (`hf_greedy`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Hashable

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from unlearn.eval.records.batching import PassStats, left_pad, positions, token_budget_batches
from unlearn.eval.records.prefix import _keep_last, shareable
from unlearn.forward import cache_of, past
from unlearn.prompts import PromptFormatter

# Rows decoded together. Measured on SmolLM2-135M, 2-core CPU, 200 new tokens, 128 TOFU retain
# questions: 167 tokens/s with 32 rows, 206 with 64, 264 with 128 (identical answers).
GENERATION_BATCH = 128


def stop_ids(formatter: PromptFormatter) -> list[int]:
    """Generation stops at the template's end-of-turn token, EOS, or a one-token stop string."""
    tok = formatter.tokenizer
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return sorted({*formatter.end_ids[:1], *eos, *formatter.stop_token_ids})


def decode_text(tok, new: list[int], stop: list[int]) -> tuple[str, int]:
    """(text up to the first stop token, how many tokens that is)."""
    cut = next((k for k, t in enumerate(new) if t in stop), len(new))
    return tok.decode(new[:cut], skip_special_tokens=True).strip(), cut


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros added before the first entry along `dim` up to `width` entries."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim)


class _RoomyLayer(DynamicLayer):
    """A cache layer with spare positions at its end: each step writes into them in place.

    A plain DynamicLayer concatenates at every step, copying the whole cache: measured on SmolLM2
    at 32 rows and ~200 cached positions, that copy was over a third of a decode step. `keys` and
    `values` are views of the first positions of the buffers `_k` and `_v`.
    """

    _k: torch.Tensor
    _v: torch.Tensor

    def reserve(self, room: int) -> None:
        """Copy the current keys/values into buffers with `room` spare positions."""
        b, h, n, d = self.keys.shape
        k = self.keys.new_empty((b, h, n + room, d))
        v = self.values.new_empty((b, h, n + room, d))
        k[..., :n, :] = self.keys
        v[..., :n, :] = self.values
        self._k, self._v = k, v
        self.keys, self.values = k[..., :n, :], v[..., :n, :]

    def select(self, rows: torch.Tensor, start: int) -> None:
        """Keep batch `rows` and positions from `start` on; the spare room comes along."""
        n = self.keys.shape[-2]
        self._k = self._k.index_select(0, rows)[..., start:, :]
        self._v = self._v.index_select(0, rows)[..., start:, :]
        self.keys, self.values = self._k[..., : n - start, :], self._v[..., : n - start, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if n + m > self._k.shape[-2]:  # out of room (a Decoder reserves enough): grow
            self.reserve(max(m, n))
        self._k[..., n : n + m, :] = key_states
        self._v[..., n : n + m, :] = value_states
        self.keys, self.values = self._k[..., : n + m, :], self._v[..., : n + m, :]
        return self.keys, self.values


def _with_room(cache: DynamicCache, room: int) -> DynamicCache:
    """A copy of a plain DynamicCache whose layers write new positions in place."""
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        c = copy.copy(layer)
        c.__class__ = _RoomyLayer
        c.reserve(room)
        new.layers.append(c)
    return new


class Decoder:
    """Rows being decoded greedily, compacted as they finish, refilled from `add`.

    `add` takes prompts already run (their cache, mask, lengths and last logits); `run(keep)` steps
    until at most `keep` rows are left; `texts` maps each key given to `add` to its answer.
    """

    def __init__(self, model, formatter: PromptFormatter, max_new_tokens: int, stats: PassStats):
        self.model = model
        self.tok = formatter.tokenizer
        self.stop = stop_ids(formatter)
        self.max_new = max_new_tokens
        self.stats = stats
        self.keep_last = _keep_last(model)
        self.texts: dict[Hashable, str] = {}
        self.keys: list[Hashable] = []
        self.new: list[list[int]] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.pos = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.keys)

    def add(
        self,
        keys: list[Hashable],
        cache: DynamicCache,
        mask: torch.Tensor,
        lengths: torch.Tensor,
        last: torch.Tensor,
    ) -> None:
        """Take prompts that have been run: their first token is the argmax of `last` [n, V]."""
        t0 = time.perf_counter()
        first = last.argmax(-1).tolist()
        self.keys += keys
        self.new += [[t] for t in first]
        if self.cache is None:
            self.cache, self.mask, self.pos = cache, mask, lengths.clone()
        else:  # merge: the narrower side is padded on the left (masked out)
            width = max(self.mask.shape[1], mask.shape[1])
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat(
                    [_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)]
                )
                mine.values = torch.cat(
                    [_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)]
                )
            self.pos = torch.cat([self.pos, lengths])
        # room for the most steps a row may still take: no step copies the cache
        self.cache = _with_room(self.cache, self.max_new - min(len(n) for n in self.new))
        self._retire()
        self.stats.generation_seconds += time.perf_counter() - t0

    def run(self, keep: int = 0) -> None:
        """Decode until at most `keep` rows are left (all finished with keep=0)."""
        t0 = time.perf_counter()
        while len(self.keys) > max(keep, 0):
            self._step()
        self.stats.generation_seconds += time.perf_counter() - t0

    def _step(self) -> None:
        device = self.mask.device
        fed = torch.tensor([n[-1] for n in self.new], dtype=torch.long, device=device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.keys), 1))], 1)
        logits = self.model(
            input_ids=fed[:, None],
            attention_mask=self.mask,
            position_ids=self.pos[:, None],
            **past(self.model, self.cache),
            use_cache=True,
            **self.keep_last,
        ).logits
        self.pos = self.pos + 1
        for n, t in zip(self.new, logits[:, -1].argmax(-1).tolist(), strict=True):
            n.append(t)
        self._retire()

    def _retire(self) -> None:
        """Finish rows that emitted a stop token or reached max_new_tokens; compact the rest."""
        done = [k for k, n in enumerate(self.new) if n[-1] in self.stop or len(n) >= self.max_new]
        if not done:
            return
        for k in done:
            text, cut = decode_text(self.tok, self.new[k], self.stop)
            self.texts[self.keys[k]] = text
            self.stats.generated += cut
        left = [k for k in range(len(self.keys)) if k not in set(done)]
        self.keys = [self.keys[k] for k in left]
        self.new = [self.new[k] for k in left]
        if not left:
            self.cache, self.mask = None, self.mask[:0, :0]
            self.pos = self.pos[:0]
            return
        rows = torch.tensor(left, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, rows)
        # columns no remaining row attends to (left padding of rows that are gone) go too
        start = int((mask.sum(0) > 0).long().argmax())
        self.mask = mask[:, start:]
        self.pos = self.pos.index_select(0, rows)
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.select(rows, start)  # type: ignore[attr-defined]


def hf_greedy(
    model, formatter: PromptFormatter, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
    stats: PassStats,
) -> list[str]:  # fmt: skip
    """Greedy continuations of left-padded prompts through `model.generate` (the reference, and
    the path for caches that cannot be compacted)."""
    t0 = time.perf_counter()
    stop = stop_ids(formatter)
    gen = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stop,
        pad_token_id=formatter.tokenizer.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    out = []
    for row in range(ids.shape[0]):
        text, cut = decode_text(formatter.tokenizer, gen[row, ids.shape[1] :].tolist(), stop)
        out.append(text)
        stats.generated += cut
    stats.generation_seconds += time.perf_counter() - t0
    return out


def greedy(
    model,
    formatter: PromptFormatter,
    prompts: list[tuple[int, ...]],
    max_new_tokens: int,
    batch_size: int = GENERATION_BATCH,
    stats: PassStats | None = None,
) -> list[str]:
    """Greedy answers to prompts (token ids), continuously batched: prompts are prefilled in
    length-sorted batches as decoding rows free up."""
    stats = stats if stats is not None else PassStats()
    out: list[str] = [""] * len(prompts)
    if max_new_tokens <= 0 or not prompts:
        return out
    device = next(model.parameters()).device
    pad = formatter.tokenizer.pad_token_id
    decoder = Decoder(model, formatter, max_new_tokens, stats)
    for idx in token_budget_batches([len(p) for p in prompts], batch_size, 1 << 30):
        ids, mask = left_pad([prompts[i] for i in idx], pad)
        ids, mask = ids.to(device), mask.to(device)
        decoder.run(keep=batch_size - len(idx))
        t0 = time.perf_counter()
        res = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions(mask),
            use_cache=True,
            **decoder.keep_last,
        )
        stats.generation_seconds += time.perf_counter() - t0
        if not shareable(cache_of(res)):
            for i, text in zip(
                idx, hf_greedy(model, formatter, ids, mask, max_new_tokens, stats), strict=True
            ):
                out[i] = text
            continue
        decoder.add(list(idx), cache_of(res), mask, mask.sum(-1), res.logits[:, -1])
    decoder.run()
    for i, text in decoder.texts.items():
        out[i] = text  # type: ignore[index]
    return out
