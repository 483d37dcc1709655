"""One model pass per dataset: teacher-forced scores and greedy generations as per-example records.

Every metric in `unlearn.metrics` is a pure function of what this module records, so the model is
run once per dataset however many metrics are asked for, and saved records can be re-scored (or
used as another model's reference) without running anything again.

Teacher forcing: a dataset's (example, variant) sequences -- the answer, the paraphrased answer,
each perturbed answer -- mostly repeat their prompt, so no token runs twice: the prompts' common
start runs once, each prompt once (length-bucketed, KV cache kept), and each prompt's answers as
one prefix tree off that cache (`_score_trees`; docs/eval_speed.md). Per sequence we keep the summed
answer log-probability and the answer length; for the main answer also per-token
log-probabilities, top-1 match flags, the mean and std of the vocabulary log-probabilities at each
position (Min-K%++), and which tokens belong to key words.

Generation: greedy, continuing from the same prompt cache (batched, left padded), stopping at the
template's end-of-turn token or EOS.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from unlearn.losses import IGNORE_INDEX
from unlearn.metrics.keywords import keyword_token_mask
from unlearn.prompts import PromptFormatter, Tokenized, collate


@dataclass
class PassStats:
    """How much of the compute went to real tokens (the padding efficiency of length bucketing)."""

    real_tokens: int = 0
    padded_tokens: int = 0
    sequences: int = 0
    batches: int = 0
    generated: int = 0

    @property
    def efficiency(self) -> float:
        return self.real_tokens / max(self.padded_tokens, 1)

    def add(self, other: PassStats) -> None:
        for k in ("real_tokens", "padded_tokens", "sequences", "batches", "generated"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class ScoreItem:
    """An answer to score after its question; a document (question None) is scored whole."""

    question: str | None
    answer: str
    detail: bool = False  # keep token-level values (only the main answer needs them)


@dataclass
class Score:
    logprob_sum: float
    n_tokens: int
    token_logprobs: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    vocab_mu: list[float] = field(default_factory=list)
    vocab_sigma: list[float] = field(default_factory=list)
    keyword_mask: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {"logprob_sum": self.logprob_sum, "n_tokens": self.n_tokens}
        if self.token_logprobs:
            d.update(
                token_logprobs=self.token_logprobs,
                top1=self.top1,
                vocab_mu=self.vocab_mu,
                vocab_sigma=self.vocab_sigma,
                keyword_mask=self.keyword_mask,
            )
        return d


def _answer_only(formatter: PromptFormatter, question: str | None, answer: str) -> Tokenized:
    """Score the answer text itself, without the end-of-turn marker (as TOFU does).

    A document has no prompt: every token but the first (which nothing predicts) is scored, after
    BOS where the tokenizer has one.
    """
    if question is None:
        tok = formatter.tokenizer
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        head = [tok.bos_token_id] if tok.bos_token_id is not None else ids[:1]
        body = ids if tok.bos_token_id is not None else ids[1:]
        return Tokenized(head + body, [IGNORE_INDEX] * len(head) + body, 0)
    p_ids, a_ids = formatter.encode_qa(question, answer)
    a_ids = a_ids[: len(a_ids) - len(formatter.end_ids)] or a_ids
    ids = p_ids + a_ids
    labels = [IGNORE_INDEX] * len(p_ids) + a_ids
    return Tokenized(ids, labels, 0)


def _token_budget_batches(
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


def _to_scores(
    logits: torch.Tensor,
    target: torch.Tensor,
    item_ids: list[int],
    items: list[ScoreItem],
    tok,
    out: list[Score | None],
) -> None:
    """Fill out[item] from logits [n, T, V] predicting target [n, T] (IGNORE_INDEX where unscored)."""
    mask = target != IGNORE_INDEX
    # Only answer positions matter: take them out before the [*, V] softmax work.
    _flat_scores(logits[mask], target[mask], mask.sum(-1).tolist(), item_ids, items, tok, out)


def _flat_scores(
    sel_logits: torch.Tensor,
    sel_target: torch.Tensor,
    counts: list[int],
    item_ids: list[int],
    items: list[ScoreItem],
    tok,
    out: list[Score | None],
) -> None:
    """Fill out[item] from the logits [N, V] predicting each answer token [N], items one after
    another (`counts` tokens each)."""
    sel_logits = sel_logits.float()
    # log p(target) = logit - logsumexp: no [*, V] log-softmax for the many non-detailed answers
    lse = torch.logsumexp(sel_logits, dim=-1)
    tok_logp = (sel_logits.gather(-1, sel_target[:, None]).squeeze(-1) - lse).cpu()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    # Top-1 flags and vocabulary moments are read for detailed items only: compute them there.
    detail_rows = [row for row, i in enumerate(item_ids) if items[i].detail]
    if detail_rows:
        pos = torch.cat([torch.arange(offsets[r], offsets[r + 1]) for r in detail_rows]).to(
            sel_logits.device
        )
        lp_d = sel_logits.index_select(0, pos) - lse.index_select(0, pos)[:, None]
        top1 = (lp_d.argmax(-1) == sel_target.index_select(0, pos)).cpu()
        p = lp_d.exp()
        mu = (p * lp_d).sum(-1)
        # E[(log p - mu)^2], not E[log p^2] - mu^2: the latter cancels badly in float32
        sigma = (p * (lp_d - mu[:, None]).square()).sum(-1).sqrt()
        mu, sigma = mu.cpu(), sigma.cpu()
        target_d = sel_target.index_select(0, pos).cpu()
    d = 0  # offset into the detailed positions
    for row, i in enumerate(item_ids):
        a, b = offsets[row], offsets[row + 1]
        lp = tok_logp[a:b]
        s = Score(logprob_sum=float(lp.sum()), n_tokens=b - a)
        if items[i].detail:
            e = d + (b - a)
            s.token_logprobs = [round(float(x), 5) for x in lp]
            s.top1 = [bool(x) for x in top1[d:e]]
            s.vocab_mu = [round(float(x), 5) for x in mu[d:e]]
            s.vocab_sigma = [round(float(x), 5) for x in sigma[d:e]]
            pieces = tok.convert_ids_to_tokens(target_d[d:e].tolist())
            s.keyword_mask = [bool(x) for x in keyword_token_mask(pieces)]
            d = e
        out[i] = s


def _count(stats: PassStats | None, real: int, padded: int, sequences: int) -> None:
    if stats is not None:
        stats.real_tokens += real
        stats.padded_tokens += padded
        stats.sequences += sequences
        stats.batches += 1


def _score_flat(model, formatter, items, item_ids, batch_size, max_tokens, stats, out) -> None:
    """Each sequence whole (prompt + answer, or a document), length-bucketed, right-padded."""
    device = next(model.parameters()).device
    tok = formatter.tokenizer
    max_len = formatter.cfg.max_length
    seqs = []
    for i in item_ids:
        s = _answer_only(formatter, items[i].question, items[i].answer)
        seqs.append(Tokenized(s.input_ids[:max_len], s.labels[:max_len], 0))
    for idx in _token_budget_batches([len(s.input_ids) for s in seqs], batch_size, max_tokens):
        batch = collate([seqs[j] for j in idx], tok.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        _count(stats, int(batch["attention_mask"].sum()), batch["input_ids"].numel(), len(idx))
        logits = model(**batch).logits[:, :-1]
        _to_scores(logits, labels[:, 1:], [item_ids[j] for j in idx], items, tok, out)


def _shareable(cache) -> bool:
    """Prefix sharing copies rows of a plain DynamicCache; other cache kinds take the flat path."""
    return isinstance(cache, DynamicCache) and all(type(x) is DynamicLayer for x in cache.layers)


def _cache_rows(cache: DynamicCache, rows: torch.Tensor, drop_last: int = 0) -> DynamicCache:
    """A new cache holding the given batch rows (minus the last `drop_last` positions); the
    original is left as it is for later chunks."""
    new = copy.copy(cache)
    new.layers = []
    end = cache.get_seq_length() - drop_last
    for layer in cache.layers:
        c = copy.copy(layer)
        c.keys = layer.keys.index_select(0, rows)[..., :end, :]
        c.values = layer.values.index_select(0, rows)[..., :end, :]
        new.layers.append(c)
    return new


def _stop_ids(formatter: PromptFormatter) -> list[int]:
    tok = formatter.tokenizer
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return sorted({*formatter.end_ids[:1], *eos})


def _greedy(model, formatter, ids, mask, max_new_tokens, stats, cache=None) -> list[str]:
    """Greedy continuations of left-padded prompts, cut at end-of-turn/EOS.

    With `cache` (the prompts' KV cache without their last position) the prompts are not run again.
    """
    tok = formatter.tokenizer
    stop = _stop_ids(formatter)
    gen = model.generate(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stop,
        pad_token_id=tok.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    out = []
    for row in range(ids.shape[0]):
        new = gen[row, ids.shape[1] :].tolist()
        cut = next((k for k, t in enumerate(new) if t in stop), len(new))
        out.append(tok.decode(new[:cut], skip_special_tokens=True).strip())
        if stats is not None:
            stats.generated += cut
    return out


def _left_pad(prompts: list[tuple[int, ...]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def _common_prefix(prompts: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The tokens every prompt starts with, leaving each prompt at least one token of its own."""
    if len(prompts) < 2:
        return ()
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    k = 0
    while k < n and all(p[k] == first[k] for p in prompts):
        k += 1
    return first[:k]


def _prompt_ids(formatter: PromptFormatter, question: str) -> tuple[int, ...]:
    return tuple(formatter.encode_qa(question, "")[0][: formatter.cfg.max_length])


def _tree_mask_kind(model) -> str | None:
    """How a custom 4D attention mask must look for this model, or None if it takes none."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return {"sdpa": "bool", "eager": "float"}.get(impl)


def _build_trie(
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


def _score_trees(
    model, kind, cache, pmask, plen, last, groups, items, batch_size, max_tokens, stats, out, tok
) -> None:
    """Score every answer of a prompt batch with one tree per prompt (tree attention).

    A prompt's answers often share their first words (TOFU's perturbed answers rephrase one
    sentence), so its answers are merged into a prefix tree: each node is fed once, attends to the
    prompt's cache and to its own ancestors, and sits at position prompt length + depth.
    `groups[row]` lists (item, answer ids) for prompt row `row` of the batch.
    """
    device = pmask.device
    pad = tok.pad_token_id
    tries = [_build_trie([a for _, a in g]) for g in groups]
    sizes = [len(t[0]) for t in tries]
    width = pmask.shape[1]
    # Trees differ in size far more than sequences do: keep each chunk >= 90% real tokens.
    for chunk in _token_budget_batches(sizes, batch_size, max_tokens, 0.9, 128):
        rows = torch.tensor(chunk, device=device)
        q = max(sizes[r] for r in chunk)
        item_ids = [i for r in chunk for i, _ in groups[r]]
        targets = [t for r in chunk for _, a in groups[r] for t in a]
        counts = [len(a) for r in chunk for _, a in groups[r]]
        head = last.index_select(0, rows)[:, 0]  # [n, V]: predicts each answer's first token
        flat = head
        if q == 0:  # one-token answers only: the prompts' last logits are all there is
            if stats is not None:
                stats.sequences += len(item_ids)
        else:
            ids = torch.full((len(chunk), q), pad, dtype=torch.long)
            pos = torch.zeros((len(chunk), q), dtype=torch.long)
            allowed = torch.zeros((len(chunk), q, width + q), dtype=torch.bool)
            allowed[:, :, width:] = torch.eye(q, dtype=torch.bool)  # padding: itself only
            for k, r in enumerate(chunk):
                tokens, parents, depths, _ = tries[r]
                n = len(tokens)
                ids[k, :n] = torch.tensor(tokens)
                pos[k, :n] = int(plen[r]) + torch.tensor(depths)
                allowed[k, :n, :width] = pmask[r].bool().cpu()
                for j in range(n):  # a node sees its ancestors: its parent's row plus itself
                    if parents[j] >= 0:
                        allowed[k, j, width:] |= allowed[k, parents[j], width:]
            mask4 = allowed[:, None].to(device)
            if kind == "float":
                dtype = next(model.parameters()).dtype
                mask4 = torch.zeros(mask4.shape, dtype=dtype, device=device).masked_fill(
                    ~mask4, torch.finfo(dtype).min
                )
            _count(stats, sum(sizes[r] for r in chunk), ids.numel(), len(item_ids))
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask4,
                position_ids=pos.to(device),
                past_key_values=_cache_rows(cache, rows),
                use_cache=True,
            ).logits
            flat = torch.cat([head, logits.reshape(-1, logits.shape[-1]).to(head.dtype)], 0)
        # rows of [head; tree outputs] in the order of the answer tokens they predict
        index = []
        for k, r in enumerate(chunk):
            for src in tries[r][3]:
                index += [k if s < 0 else len(chunk) + k * q + s for s in src]
        _flat_scores(
            flat.index_select(0, torch.tensor(index, device=device)),
            torch.tensor(targets, device=device),
            counts,
            item_ids,
            items,
            tok,
            out,
        )


def _score_chunks(
    model, kind, cache, pmask, plen, last, groups, items, batch_size, max_tokens, stats, out, tok
) -> None:
    """Score every answer of a prompt batch as its own sequence off its prompt's cache rows.

    The path for attention implementations that take no custom 4D mask (`_score_trees` is the
    default); same arguments, `kind` unused.
    """
    device = pmask.device
    pad = tok.pad_token_id
    seqs = [(row, i, a) for row, g in enumerate(groups) for i, a in g]
    fed_len = [max(len(a) - 1, 0) for _, _, a in seqs]
    for chunk in _token_budget_batches(fed_len, batch_size, max_tokens):
        rows = torch.tensor([seqs[k][0] for k in chunk], device=device)
        fw = max(fed_len[k] for k in chunk)
        target = torch.full((len(chunk), fw + 1), IGNORE_INDEX, dtype=torch.long)
        fmask = torch.zeros((len(chunk), fw), dtype=torch.long)
        for r, k in enumerate(chunk):
            target[r, : len(seqs[k][2])] = torch.tensor(seqs[k][2], dtype=torch.long)
            fmask[r, : fed_len[k]] = 1
        logits = last.index_select(0, rows)
        if fw > 0:
            fed = target[:, :fw].masked_fill(fmask == 0, pad).to(device)
            fmask = fmask.to(device)
            _count(stats, int(fmask.sum()), fed.numel(), len(chunk))
            more = model(
                input_ids=fed,
                attention_mask=torch.cat([pmask.index_select(0, rows), fmask], dim=1),
                position_ids=plen.index_select(0, rows)[:, None] + torch.arange(fw, device=device),
                past_key_values=_cache_rows(cache, rows),
                use_cache=True,
            ).logits
            logits = torch.cat([logits, more.to(logits.dtype)], dim=1)
        elif stats is not None:
            stats.sequences += len(chunk)
        _to_scores(logits, target.to(device), [seqs[k][1] for k in chunk], items, tok, out)


def _score_shared(
    model,
    formatter,
    items,
    item_ids,
    questions,
    max_new_tokens,
    batch_size,
    max_tokens,
    stats,
    out,
    trees: bool = True,
) -> tuple[list[int], dict[tuple[int, ...], str]]:
    """Answers scored off their prompt's KV cache, and generations from it: each prompt runs once.

    A TOFU row has 5-7 answer variants (answer, paraphrase, perturbations) behind one prompt, and
    the prompt (chat template, system prompt, question) is most of each sequence. Prompts are
    batched by length with left padding and run once, keeping the KV cache and the last position's
    logits (which predict the first answer token). Every answer is then fed after a copy of its
    prompt's cache rows, without its last token (whose prediction nothing reads), and greedy
    generation for the batch's questions continues from the same cache. With `trees` (and an
    attention implementation that takes a custom mask) a prompt's answers also share their common
    beginnings, as one prefix tree (`_score_trees`). Returns the items and
    prompts it could not take (caches other than a plain DynamicCache) and the generations.
    """
    device = next(model.parameters()).device
    tok = formatter.tokenizer
    pad = tok.pad_token_id
    max_len = formatter.cfg.max_length
    by_prompt: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i in item_ids:
        p_ids, a_ids = formatter.encode_qa(items[i].question, items[i].answer)
        a_ids = a_ids[: len(a_ids) - len(formatter.end_ids)] or a_ids
        prompt = tuple(p_ids[:max_len])
        by_prompt.setdefault(prompt, []).append((i, a_ids[: max_len - len(prompt)]))
    wanted = {_prompt_ids(formatter, q) for q in questions}
    for p in wanted:
        by_prompt.setdefault(p, [])
    prompts = list(by_prompt)
    keep = (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(model.forward).parameters
        else {}
    )
    leftover: list[int] = []
    generations: dict[tuple[int, ...], str] = {}
    # The chat template and system prompt open every prompt: run that common part once, too.
    common = _common_prefix(prompts)
    head_cache = None
    if len(common) >= 2:
        head = model(input_ids=torch.tensor([common], device=device), use_cache=True, **keep)
        head_cache = head.past_key_values
        if not _shareable(head_cache):  # other cache kinds: everything takes the flat path
            return list(item_ids), generations
        _count(stats, len(common), len(common), 0)
    else:
        common = ()
    c = len(common)
    tree_kind = _tree_mask_kind(model) if trees else None
    batches = _token_budget_batches([len(p) for p in prompts], batch_size, max_tokens)
    for bi, pidx in enumerate(batches):
        tails, tmask = _left_pad([prompts[j][c:] for j in pidx], pad)
        tails, tmask = tails.to(device), tmask.to(device)
        n = len(pidx)
        # After the common part, a row's own tokens are left-padded: the padding sits in between,
        # masked out, and positions count real tokens only.
        ids = torch.cat([torch.tensor([common] * n, dtype=torch.long, device=device), tails], 1)
        pmask = torch.cat([torch.ones((n, c), dtype=torch.long, device=device), tmask], 1)
        plen = pmask.sum(-1)
        res = model(
            input_ids=tails,
            attention_mask=pmask,
            position_ids=c + (tmask.cumsum(-1) - 1).clamp(min=0),
            past_key_values=(
                _cache_rows(head_cache, torch.zeros(n, dtype=torch.long, device=device))
                if head_cache is not None
                else None
            ),
            use_cache=True,
            **keep,
        )
        cache = res.past_key_values
        if not _shareable(cache):  # other cache kinds: everything left takes the flat path
            done = {j for b in batches[:bi] for j in b}
            leftover = [i for j, p in enumerate(prompts) if j not in done for i, _ in by_prompt[p]]
            break
        _count(stats, int(tmask.sum()), tails.numel(), 0)
        score_answers = _score_chunks if tree_kind is None else _score_trees
        score_answers(
            model, tree_kind, cache, pmask, plen, res.logits[:, -1:],
            [by_prompt[prompts[j]] for j in pidx], items, batch_size, max_tokens, stats, out, tok,
        )  # fmt: skip
        gen_rows = [row for row, j in enumerate(pidx) if prompts[j] in wanted]
        if gen_rows:
            rows = torch.tensor(gen_rows, device=device)
            texts = _greedy(
                model,
                formatter,
                ids.index_select(0, rows),
                pmask.index_select(0, rows),
                max_new_tokens,
                stats,
                # generate() runs the tokens its cache lacks: leave it the last prompt position
                cache=_cache_rows(cache, rows, drop_last=1),
            )
            for row, text in zip(gen_rows, texts, strict=True):
                generations[prompts[pidx[row]]] = text
    return leftover, generations


@torch.no_grad()
def score_and_generate(
    model: torch.nn.Module,
    formatter: PromptFormatter,
    items: list[ScoreItem],
    questions: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    max_tokens: int = 4096,
    stats: PassStats | None = None,
    share_prompts: bool = True,
    tree_answers: bool = True,
) -> tuple[list[Score], list[str]]:
    """Teacher-forced scores for `items` and greedy answers to `questions`, one prompt pass each.

    With `share_prompts` (the default) every distinct prompt runs once: its answers are scored off
    its KV cache and its generation continues from it; with `tree_answers` too, the answers to
    one prompt are fed as a prefix tree, so words they start with in common run once. Without
    sharing, every sequence runs whole and generation is separate. All give the same numbers up to
    float rounding (tested).
    """
    model.eval()
    out: list[Score | None] = [None] * len(items)
    qa = [i for i, it in enumerate(items) if it.question is not None]
    rest = [i for i, it in enumerate(items) if it.question is None]
    gens: dict[tuple[int, ...], str] = {}
    todo = list(questions)
    if share_prompts and (qa or questions):
        left, gens = _score_shared(
            model,
            formatter,
            items,
            qa,
            questions,
            max_new_tokens,
            batch_size,
            max_tokens,
            stats,
            out,
            tree_answers,
        )
        rest += left
        todo = [q for q in questions if _prompt_ids(formatter, q) not in gens]
    else:
        rest += qa
    if rest:
        _score_flat(model, formatter, items, sorted(rest), batch_size, max_tokens, stats, out)
    if todo:
        for q, text in zip(
            todo, generate(model, formatter, todo, max_new_tokens, batch_size, stats), strict=True
        ):
            gens[_prompt_ids(formatter, q)] = text
    return [s for s in out if s is not None], [gens[_prompt_ids(formatter, q)] for q in questions]


def score(
    model: torch.nn.Module,
    formatter: PromptFormatter,
    items: list[ScoreItem],
    batch_size: int = 32,
    max_tokens: int = 4096,
    stats: PassStats | None = None,
    share_prompts: bool = True,
    tree_answers: bool = True,
) -> list[Score]:
    """Teacher-forced answer scores for every item, in the items' order."""
    scores, _ = score_and_generate(
        model, formatter, items, [], 0, batch_size, max_tokens, stats, share_prompts, tree_answers
    )
    return scores


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    formatter: PromptFormatter,
    questions: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    stats: PassStats | None = None,
) -> list[str]:
    """Greedy answers, batched by prompt length with left padding and the KV cache."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [_prompt_ids(formatter, q) for q in questions]
    out: list[str] = [""] * len(questions)
    for idx in _token_budget_batches([len(p) for p in prompts], batch_size, 1 << 30):
        ids, mask = _left_pad([prompts[i] for i in idx], formatter.tokenizer.pad_token_id)
        texts = _greedy(model, formatter, ids.to(device), mask.to(device), max_new_tokens, stats)
        for i, text in zip(idx, texts, strict=True):
            out[i] = text
    return out


def grad_norms(
    model: torch.nn.Module, formatter: PromptFormatter, items: list[ScoreItem]
) -> list[float]:
    """Per item, the 2-norm over all parameters of the gradient of its mean answer NLL.

    For the gradient-norm membership attack (Wang et al. 2024): training examples sit near a
    minimum, so their gradients are small. One forward and backward per item, since a batch would
    sum the items' gradients. Parameters' `requires_grad` flags and `.grad` are restored.
    """
    model.eval()
    device = next(model.parameters()).device
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    max_len = formatter.cfg.max_length
    out: list[float] = []
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for it in items:
                seq = _answer_only(formatter, it.question, it.answer)
                ids = torch.tensor([seq.input_ids[:max_len]], device=device)
                labels = torch.tensor([seq.labels[:max_len]], device=device)
                logits = model(input_ids=ids).logits[:, :-1].float()
                target = labels[:, 1:]
                if not (target != IGNORE_INDEX).any():
                    out.append(float("nan"))
                    continue
                F.cross_entropy(
                    logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX
                ).backward()
                sq = sum(float(p.grad.float().square().sum()) for p in params if p.grad is not None)
                out.append(sq**0.5)
                for p in params:
                    p.grad = None
    finally:
        for p, flag, g in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = g
    return out
