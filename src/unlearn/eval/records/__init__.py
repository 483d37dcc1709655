"""One model pass per dataset: teacher-forced scores and greedy generations as per-example records.

Every metric in `unlearn.metrics` is a pure function of what this package records, so the model is
run once per dataset however many metrics are asked for, and saved records can be re-scored (or
used as another model's reference) without running anything again.

- `batching`: length-bucketed batches under a token budget, left padding, `PassStats`.
- `scores`: which tokens an answer's score covers, and logits -> `Score`.
- `prefix`: each prompt runs once; its answers are scored off its KV cache (as a prefix tree).
- `decode`: greedy decoding that drops finished rows and refills them (continuous batching).

Here: `score_and_generate` wires them together, with the whole-sequence (flat) path for documents
and for models whose cache cannot be shared. The gradient-norm attack, which needs a backward pass,
lives in `unlearn.eval.gradnorm`.
"""

from __future__ import annotations

import torch

from unlearn.eval.records.batching import PassStats, token_budget_batches
from unlearn.eval.records.decode import GENERATION_BATCH, Decoder, greedy
from unlearn.eval.records.prefix import (
    Group,
    cache_rows,
    run_prompts,
    score_chunks,
    score_trees,
    tree_mask_kind,
)
from unlearn.eval.records.scores import Score, ScoreItem, answer_ids, scored_sequence, token_scores
from unlearn.prompts import PromptFormatter, Tokenized, collate

__all__ = ["PassStats", "Score", "ScoreItem", "generate", "score", "score_and_generate"]


def _prompt_ids(formatter: PromptFormatter, question: str) -> tuple[int, ...]:
    return tuple(formatter.encode_qa(question, "")[0][: formatter.cfg.max_length])


def _gen_prompts(
    formatter: PromptFormatter, questions: list[str], stats: PassStats
) -> list[tuple[int, ...]]:
    """The distinct prompts to generate for, in first-seen order; cut ones are counted."""
    out: dict[tuple[int, ...], None] = {}
    for q in questions:
        full = formatter.encode_qa(q, "")[0]
        p = tuple(full[: formatter.cfg.max_length])
        if p not in out and len(full) > len(p):
            stats.truncated += 1
        out.setdefault(p, None)
    return list(out)


def _score_flat(
    model,
    formatter: PromptFormatter,
    items: list[ScoreItem],
    item_ids: list[int],
    batch_size: int,
    max_tokens: int,
    stats: PassStats,
    score_end: bool,
) -> dict[int, Score]:
    """Each sequence whole (prompt + answer, or a document), length-bucketed, right-padded."""
    device = next(model.parameters()).device
    tok = formatter.tokenizer
    max_len = formatter.cfg.max_length
    seqs = []
    for i in item_ids:
        s = scored_sequence(formatter, items[i], score_end)
        stats.truncated += len(s.input_ids) > max_len
        seqs.append(Tokenized(s.input_ids[:max_len], s.labels[:max_len], 0))
    out: dict[int, Score] = {}
    for idx in token_budget_batches([len(s.input_ids) for s in seqs], batch_size, max_tokens):
        batch = collate([seqs[j] for j in idx], tok.pad_token_id)  # masks from lengths
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        stats.count(int(batch["attention_mask"].sum()), batch["input_ids"].numel(), len(idx))
        logits = model(**batch).logits[:, :-1]
        ids = [item_ids[j] for j in idx]
        scores = token_scores(logits, labels[:, 1:], [items[i].detail for i in ids], tok)
        out.update(zip(ids, scores, strict=True))
    return out


def _score_shared(
    model,
    formatter: PromptFormatter,
    items: list[ScoreItem],
    item_ids: list[int],
    prompts_to_generate: list[tuple[int, ...]],
    max_new_tokens: int,
    batch_size: int,
    max_tokens: int,
    stats: PassStats,
    trees: bool,
    score_end: bool,
    gen_batch: int = GENERATION_BATCH,
) -> tuple[dict[int, Score], dict[tuple[int, ...], str], list[int]]:
    """Answers scored off their prompt's KV cache, generations continued from it: each prompt runs
    once (`prefix`). Returns (scores, generations by prompt, items left for the flat path)."""
    tok = formatter.tokenizer
    max_len = formatter.cfg.max_length
    by_prompt: dict[tuple[int, ...], Group] = {}
    for i in item_ids:
        p_ids, a_ids = answer_ids(formatter, items[i].question or "", items[i].answer, score_end)
        prompt = tuple(p_ids[:max_len])
        stats.truncated += len(p_ids) + len(a_ids) > max_len
        by_prompt.setdefault(prompt, []).append((i, a_ids[: max_len - len(prompt)]))
    wanted = set(prompts_to_generate)
    for p in prompts_to_generate:
        by_prompt.setdefault(p, [])
    prompts = list(by_prompt)
    kind = tree_mask_kind(model) if trees else None
    decoder = Decoder(model, formatter, max_new_tokens, stats)
    scores: dict[int, Score] = {}
    seen: set[tuple[int, ...]] = set()
    pad = tok.pad_token_id
    for pb in run_prompts(
        model, prompts, list(by_prompt.values()), pad, batch_size, max_tokens, stats
    ):
        seen.update(pb.prompts)
        if kind is None:
            scores.update(score_chunks(model, pb, items, batch_size, max_tokens, stats, tok))
        else:
            scores.update(score_trees(model, pb, items, batch_size, max_tokens, stats, tok, kind))
        gen_rows = [r for r, p in enumerate(pb.prompts) if p in wanted]
        if gen_rows and max_new_tokens > 0:
            rows = torch.tensor(gen_rows, device=pb.mask.device)
            # decode until the new prompts fit next to the rows still running, then add them
            decoder.run(keep=gen_batch - len(gen_rows))
            decoder.add(
                [pb.prompts[r] for r in gen_rows],
                cache_rows(pb.cache, rows),
                pb.mask.index_select(0, rows),
                pb.lengths.index_select(0, rows),
                pb.last.index_select(0, rows),
            )
    decoder.run()
    gens = {p: t for p, t in decoder.texts.items() if isinstance(p, tuple)}
    if max_new_tokens <= 0:
        gens = {p: "" for p in seen if p in wanted}
    leftover = [i for p, g in by_prompt.items() if p not in seen for i, _ in g]
    return scores, gens, leftover


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
    score_end: bool = True,
    generation_batch: int = GENERATION_BATCH,
) -> tuple[list[Score], list[str]]:
    """Teacher-forced scores for `items` and greedy answers to `questions`, one prompt pass each.

    With `share_prompts` (the default) every distinct prompt runs once: its answers are scored off
    its KV cache and its generation continues from it; with `tree_answers` too, the answers to one
    prompt are fed as a prefix tree, so words they start with in common run once. Without sharing,
    every sequence runs whole and generation is separate. All give the same numbers up to float
    rounding (tested). `score_end` (the default, TOFU's and OpenUnlearning's protocol) scores the
    end-of-turn tokens after each answer too; False scores the answer text alone.
    `generation_batch` rows decode together (`decode.GENERATION_BATCH` was measured best on CPU).
    """
    model.eval()
    stats = stats if stats is not None else PassStats()
    qa = [i for i, it in enumerate(items) if it.question is not None]
    rest = [i for i, it in enumerate(items) if it.question is None]
    wanted = _gen_prompts(formatter, questions, stats)
    scores: dict[int, Score] = {}
    gens: dict[tuple[int, ...], str] = {}
    if share_prompts and (qa or wanted):
        scores, gens, left = _score_shared(
            model, formatter, items, qa, wanted, max_new_tokens, batch_size, max_tokens, stats,
            tree_answers, score_end, generation_batch,
        )  # fmt: skip
        rest += left
    else:
        rest += qa
    if rest:
        scores.update(
            _score_flat(
                model, formatter, items, sorted(rest), batch_size, max_tokens, stats, score_end
            )
        )
    todo = [p for p in wanted if p not in gens]
    if todo:
        texts = greedy(model, formatter, todo, max_new_tokens, generation_batch, stats)
        gens.update(zip(todo, texts, strict=True))
    return [scores[i] for i in range(len(items))], [
        formatter.cut(gens[_prompt_ids(formatter, q)]) for q in questions
    ]


def score(
    model: torch.nn.Module,
    formatter: PromptFormatter,
    items: list[ScoreItem],
    batch_size: int = 32,
    max_tokens: int = 4096,
    stats: PassStats | None = None,
    share_prompts: bool = True,
    tree_answers: bool = True,
    score_end: bool = True,
) -> list[Score]:
    """Teacher-forced answer scores for every item, in the items' order."""
    scores, _ = score_and_generate(
        model, formatter, items, [], 0, batch_size, max_tokens, stats, share_prompts,
        tree_answers, score_end,
    )  # fmt: skip
    return scores


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    formatter: PromptFormatter,
    questions: list[str],
    max_new_tokens: int = 64,
    batch_size: int = GENERATION_BATCH,
    stats: PassStats | None = None,
) -> list[str]:
    """Greedy answers, continuously batched (up to `batch_size` rows) off a left-padded prefill."""
    model.eval()
    stats = stats if stats is not None else PassStats()
    prompts = _gen_prompts(formatter, questions, stats)
    texts = dict(
        zip(
            prompts,
            greedy(model, formatter, prompts, max_new_tokens, batch_size, stats),
            strict=True,
        )
    )
    return [formatter.cut(texts[_prompt_ids(formatter, q)]) for q in questions]
