"""Prompt KV sharing: each prompt runs once, and its answers are scored off a copy of its cache.

A TOFU row has 5-7 answer variants (answer, paraphrase, perturbations) behind one prompt, and the
prompt (chat template, system prompt, question) is most of each sequence. So: the prompts' common
start runs once (`run_prompts`), each prompt once after it (length-bucketed, left-padded, KV cache
kept, `PromptBatch`), and each prompt's answers either as one prefix tree off that cache
(`score_trees`: tree attention with a custom 4D mask, for sdpa/eager attention) or one sequence per
answer off it (`score_chunks`, for attention implementations that take no custom mask). An
answer's last token is never fed: nothing reads its prediction. docs/eval_speed.md has the design.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from unlearn.eval.records.batching import PassStats, left_pad, positions, token_budget_batches
from unlearn.eval.records.scores import Score, ScoreItem, flat_scores, token_scores
from unlearn.forward import cache_of, past, takes_logits_to_keep
from unlearn.losses import IGNORE_INDEX

Group = list[tuple[int, list[int]]]  # a prompt's answers: (item index, scored token ids)


@dataclass
class PromptBatch:
    """Prompts run once, and what their answers and generations continue from.

    `cache` holds every prompt position; `mask` [n, W] marks real tokens (from lengths, never by
    id); `lengths` [n] counts them (the position of the next token); `last` [n, V] are the logits
    at the last prompt position, which predict every answer's first token (and the first generated
    one); `groups[row]` lists the answers to score after prompt `row`.
    """

    prompts: list[tuple[int, ...]]
    cache: DynamicCache
    mask: torch.Tensor
    lengths: torch.Tensor
    last: torch.Tensor
    groups: list[Group]


def shareable(cache) -> bool:
    """Prefix sharing copies rows of a plain DynamicCache; other cache kinds take the flat path."""
    return isinstance(cache, DynamicCache) and all(type(x) is DynamicLayer for x in cache.layers)


def cache_rows(cache: DynamicCache, rows: torch.Tensor) -> DynamicCache:
    """A new cache holding the given batch rows; the original is left as it is."""
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        c = copy.copy(layer)
        c.keys = layer.keys.index_select(0, rows)
        c.values = layer.values.index_select(0, rows)
        new.layers.append(c)
    return new


def common_prefix(prompts: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The tokens every prompt starts with, leaving each prompt at least one token of its own."""
    if len(prompts) < 2:
        return ()
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    k = 0
    while k < n and all(p[k] == first[k] for p in prompts):
        k += 1
    return first[:k]


def tree_mask_kind(model) -> str | None:
    """How a custom 4D attention mask must look for this model, or None if it takes none."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return {"sdpa": "bool", "eager": "float"}.get(impl)


def _keep_last(model) -> dict:
    """Ask for the last position's logits only, where the model can."""
    return {"logits_to_keep": 1} if takes_logits_to_keep(model) else {}


def run_prompts(
    model,
    prompts: list[tuple[int, ...]],
    groups: list[Group],
    pad: int,
    batch_size: int,
    max_tokens: int,
    stats: PassStats,
) -> Iterator[PromptBatch]:
    """Run the prompts' common start once, then each prompt once after it, batched by length.

    Stops at the first cache that cannot be shared (not a plain DynamicCache): the caller takes
    the prompts it was not given down the flat path.
    """
    device = next(model.parameters()).device
    keep = _keep_last(model)
    common = common_prefix(prompts)
    head = None
    if len(common) >= 2:
        head = model(input_ids=torch.tensor([common], device=device), use_cache=True, **keep)
        if not shareable(cache_of(head)):
            return
        stats.count(len(common), len(common), 0)
    else:
        common = ()
    c = len(common)
    for pidx in token_budget_batches([len(p) for p in prompts], batch_size, max_tokens):
        tails, tmask = left_pad([prompts[j][c:] for j in pidx], pad)
        tails, tmask = tails.to(device), tmask.to(device)
        n = len(pidx)
        # After the common part, a row's own tokens are left-padded: the padding sits in between,
        # masked out, and positions count real tokens only.
        mask = torch.cat([torch.ones((n, c), dtype=torch.long, device=device), tmask], 1)
        past_cache = None
        if head is not None:
            past_cache = cache_rows(cache_of(head), torch.zeros(n, dtype=torch.long, device=device))
        res = model(
            input_ids=tails,
            attention_mask=mask,
            position_ids=positions(tmask, c),
            **past(model, past_cache),
            use_cache=True,
            **keep,
        )
        if not shareable(cache_of(res)):
            return
        stats.count(int(tmask.sum()), tails.numel(), 0)
        yield PromptBatch(
            prompts=[prompts[j] for j in pidx],
            cache=cache_of(res),
            mask=mask,
            lengths=mask.sum(-1),
            last=res.logits[:, -1],
            groups=[groups[j] for j in pidx],
        )


def build_trie(
    answers: list[list[int]],
) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """The prefixes to feed for a prompt's answers, each once: (token, parent, depth) per node,
    parent -1 meaning the prompt, and per answer the node whose output predicts each token.

    Token k of an answer is predicted by the node of its first k tokens (the prompt for k = 0), so
    an answer's last token is never fed unless it starts another answer.
    """
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    sources: list[list[int]] = []
    for a in answers:
        src, node = [-1], -1
        for k, t in enumerate(a[:-1]):
            key = (node, t)
            if key not in index:
                index[key] = len(tokens)
                tokens.append(t)
                parents.append(node)
                depths.append(k)
            node = index[key]
            src.append(node)
        sources.append(src[: len(a)])
    return tokens, parents, depths, sources


def _tree_mask(pb: PromptBatch, chunk: list[int], tries, q: int, kind: str, dtype) -> torch.Tensor:
    """[n, 1, q, W + q] attention of the tree nodes: the prompt's real tokens and the node's own
    ancestors (padding nodes see themselves only); bool for sdpa, additive float for eager."""
    width = pb.mask.shape[1]
    allowed = torch.zeros((len(chunk), q, width + q), dtype=torch.bool)
    allowed[:, :, width:] = torch.eye(q, dtype=torch.bool)
    for k, r in enumerate(chunk):
        _, parents, _, _ = tries[r]
        allowed[k, : len(parents), :width] = pb.mask[r].bool().cpu()
        for j, parent in enumerate(parents):  # a node sees its parent's ancestors plus itself
            if parent >= 0:
                allowed[k, j, width:] |= allowed[k, parent, width:]
    mask4 = allowed[:, None].to(pb.mask.device)
    if kind == "float":
        zeros = torch.zeros(mask4.shape, dtype=dtype, device=mask4.device)
        mask4 = zeros.masked_fill(~mask4, torch.finfo(dtype).min)
    return mask4


def score_trees(
    model,
    pb: PromptBatch,
    items: list[ScoreItem],
    batch_size: int,
    max_tokens: int,
    stats: PassStats,
    tok,
    kind: str = "bool",
) -> dict[int, Score]:
    """Score every answer of a prompt batch with one prefix tree per prompt (tree attention).

    A prompt's answers often share their first words (TOFU's perturbed answers rephrase one
    sentence), so they are merged into a prefix tree: each node is fed once, attends to the
    prompt's cache and to its own ancestors, and sits at position prompt length + depth.
    """
    device = pb.mask.device
    tries = [build_trie([a for _, a in g]) for g in pb.groups]
    sizes = [len(t[0]) for t in tries]
    out: dict[int, Score] = {}
    # Trees differ in size far more than sequences do: keep each chunk >= 90% real tokens.
    for chunk in token_budget_batches(sizes, batch_size, max_tokens, 0.9, 128):
        rows = torch.tensor(chunk, device=device)
        q = max(sizes[r] for r in chunk)
        item_ids = [i for r in chunk for i, _ in pb.groups[r]]
        head = pb.last.index_select(0, rows)  # [n, V]: predicts each answer's first token
        flat = head
        if q == 0:  # one-token answers only: the prompts' last logits are all there is
            stats.sequences += len(item_ids)
        else:
            ids = torch.full((len(chunk), q), tok.pad_token_id, dtype=torch.long)
            pos = torch.zeros((len(chunk), q), dtype=torch.long)
            for k, r in enumerate(chunk):
                tokens, _, depths, _ = tries[r]
                ids[k, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                pos[k, : len(tokens)] = int(pb.lengths[r]) + torch.tensor(depths)
            stats.count(sum(sizes[r] for r in chunk), ids.numel(), len(item_ids))
            logits = model(
                input_ids=ids.to(device),
                attention_mask=_tree_mask(pb, chunk, tries, q, kind, pb.last.dtype),
                position_ids=pos.to(device),
                **past(model, cache_rows(pb.cache, rows)),
                use_cache=True,
            ).logits
            flat = torch.cat([head, logits.reshape(-1, logits.shape[-1]).to(head.dtype)], 0)
        # rows of [head; tree outputs] in the order of the answer tokens they predict
        index = [
            k if s < 0 else len(chunk) + k * q + s
            for k, r in enumerate(chunk)
            for src in tries[r][3]
            for s in src
        ]
        scores = flat_scores(
            flat.index_select(0, torch.tensor(index, dtype=torch.long, device=device)),
            torch.tensor([t for r in chunk for _, a in pb.groups[r] for t in a], device=device),
            [len(a) for r in chunk for _, a in pb.groups[r]],
            [items[i].detail for i in item_ids],
            tok,
        )
        out.update(zip(item_ids, scores, strict=True))
    return out


def score_chunks(
    model,
    pb: PromptBatch,
    items: list[ScoreItem],
    batch_size: int,
    max_tokens: int,
    stats: PassStats,
    tok,
) -> dict[int, Score]:
    """Score every answer of a prompt batch as its own sequence off its prompt's cache rows.

    The path for attention implementations that take no custom 4D mask (`score_trees` is the
    default).
    """
    device = pb.mask.device
    seqs = [(row, i, a) for row, g in enumerate(pb.groups) for i, a in g]
    fed_len = [max(len(a) - 1, 0) for _, _, a in seqs]
    out: dict[int, Score] = {}
    for chunk in token_budget_batches(fed_len, batch_size, max_tokens):
        rows = torch.tensor([seqs[k][0] for k in chunk], device=device)
        fw = max(fed_len[k] for k in chunk)
        target = torch.full((len(chunk), fw + 1), IGNORE_INDEX, dtype=torch.long)
        fmask = torch.zeros((len(chunk), fw), dtype=torch.long)
        for r, k in enumerate(chunk):
            target[r, : len(seqs[k][2])] = torch.tensor(seqs[k][2], dtype=torch.long)
            fmask[r, : fed_len[k]] = 1
        logits = pb.last.index_select(0, rows)[:, None]
        if fw > 0:
            fed = target[:, :fw].masked_fill(fmask == 0, tok.pad_token_id).to(device)
            fmask = fmask.to(device)
            stats.count(int(fmask.sum()), fed.numel(), len(chunk))
            more = model(
                input_ids=fed,
                attention_mask=torch.cat([pb.mask.index_select(0, rows), fmask], dim=1),
                position_ids=pb.lengths.index_select(0, rows)[:, None]
                + torch.arange(fw, device=device),
                **past(model, cache_rows(pb.cache, rows)),
                use_cache=True,
            ).logits
            logits = torch.cat([logits, more.to(logits.dtype)], dim=1)
        else:
            stats.sequences += len(chunk)
        item_ids = [seqs[k][1] for k in chunk]
        scores = token_scores(logits, target.to(device), [items[i].detail for i in item_ids], tok)
        out.update(zip(item_ids, scores, strict=True))
    return out
