"""The one-pass records engine (`unlearn.eval.records`) on the tiny random Llama of conftest.

`score` is checked against a plain loop over one unbatched sequence at a time (no attention mask at
all), so length bucketing, padding, prefix sharing and trees cannot change a number; `generate`
against `model.generate` and one-question-at-a-time generation, so compaction, refilling and left
padding cannot either. The tiny tokenizer's pad token IS its end-of-turn token (as SmolLM2's is),
so every test here would catch a mask built by comparing ids with the pad id.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unlearn import metrics as M
from unlearn.config import PromptConfig
from unlearn.eval.gradnorm import grad_norms
from unlearn.eval.records import (
    PassStats,
    ScoreItem,
    decode,
    generate,
    prefix,
    score,
    score_and_generate,
)
from unlearn.eval.records.batching import left_pad, token_budget_batches
from unlearn.prompts import PromptFormatter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


QUESTIONS = [
    "Where?",
    "Where was Maren Hollister born, and what does she write about in her books?",
    "What is the capital of France?",
]


# ---------------------------------------------------------------------------- records.score
def _scored_ids(formatter, item: ScoreItem, score_end: bool = True) -> tuple[list[int], int]:
    """(whole sequence, where the scored tokens start), written out independently of the engine."""
    tok = formatter.tokenizer
    if item.question is None:
        body = tok(item.answer, add_special_tokens=False)["input_ids"]
        return [tok.bos_token_id, *body], 1
    p_ids = tok(formatter.prompt_text(item.question), add_special_tokens=False)["input_ids"]
    a_ids = tok(item.answer.strip(), add_special_tokens=False)["input_ids"]
    if score_end:
        # TOFU/OpenUnlearning: every label token after the prompt -- the template's rendering of
        # the answer turn ("answer<|im_end|>\n"), then EOS since that does not end with EOS
        full = tok.apply_chat_template(
            [
                {"role": "user", "content": item.question},
                {"role": "assistant", "content": item.answer},
            ],
            tokenize=False,
        )
        assert full.endswith("<|im_end|>\n")
        a_ids = a_ids + tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
        a_ids = [*a_ids, tok.eos_token_id]
    return p_ids + a_ids, len(p_ids)


def _hand_score(model, formatter, item: ScoreItem, score_end: bool = True):
    """One unbatched sequence, no attention mask: (scored token ids, log-softmax rows predicting
    them, logits rows)."""
    ids, start = _scored_ids(formatter, item, score_end)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    rows = logits[start - 1 : len(ids) - 1]
    return ids[start:], F.log_softmax(rows, dim=-1), rows


def _items() -> list[ScoreItem]:
    return [
        ScoreItem(QUESTIONS[1], "Maren Hollister was born in Port Selwyn in 1961.", detail=True),
        ScoreItem(QUESTIONS[0], "Paris."),
        ScoreItem(QUESTIONS[2], "The capital of France is Paris.", detail=True),
        ScoreItem(
            QUESTIONS[1],
            "She writes books about rivers, mountains and old cities; Bob plays the cello and "
            "the quick brown fox jumps over the lazy dog.",
        ),
        ScoreItem(None, "Alice writes books about rivers.", detail=True),
        ScoreItem(QUESTIONS[0], "I do not know.", detail=True),
    ]


MODES = {  # how `score` may run the model; every mode must give the hand loop's numbers
    "trees": {},
    "shared-prompts": {"tree_answers": False},
    "flat": {"share_prompts": False},
    "trees-eager": {"eager": True},
}


@pytest.fixture
def mode_model(tiny, request):
    """(model, formatter, score kwargs) for a mode; eager attention takes a float 4D mask."""
    model, formatter = tiny
    kwargs = dict(MODES[request.param])
    if kwargs.pop("eager", False):
        model.set_attn_implementation("eager")
    yield model, formatter, kwargs
    model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("mode_model", list(MODES), indirect=True)
def test_score_matches_unbatched_hand_loop(mode_model, request):
    model, formatter, kwargs = mode_model
    mode = request.node.callspec.id
    items = _items()
    stats = PassStats()
    # batch_size=2: several length buckets, each padded; results must not depend on it.
    scores = score(model, formatter, items, batch_size=2, stats=stats, **kwargs)
    assert len(scores) == len(items)
    assert stats.sequences == len(items)
    # flat: 6 sequences in 3 batches of 2. shared: the prompts' common start (chat template) once,
    # the 3 distinct prompts in 2 batches of <= 2, their 3 + 2 answers in chunks of <= 2 (2 + 1),
    # and the document in a flat batch of its own. trees: one tree chunk per prompt batch.
    assert stats.batches == {"flat": 3, "shared-prompts": 7}.get(mode, 6)
    lengths = set()
    for item, s in zip(items, scores, strict=True):
        target, logp, _ = _hand_score(model, formatter, item)
        lengths.add(len(target))
        assert s.n_tokens == len(target) > 0
        expected = float(logp[torch.arange(len(target)), torch.tensor(target)].sum())
        assert s.logprob_sum == pytest.approx(expected, abs=1e-4)
    assert len(lengths) >= 4  # really different lengths were batched together
    # the same numbers in one big batch and one sequence per batch
    for bs in (1, 64):
        again = score(model, formatter, items, batch_size=bs, **kwargs)
        for a, b in zip(scores, again, strict=True):
            assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
            assert a.n_tokens == b.n_tokens


@pytest.mark.parametrize("mode_model", list(MODES), indirect=True)
def test_score_token_level_fields_only_for_detail_items(mode_model):
    model, formatter, kwargs = mode_model
    items = _items()
    scores = score(model, formatter, items, batch_size=3, **kwargs)
    for item, s in zip(items, scores, strict=True):
        d = s.to_dict()
        if not item.detail:
            assert set(d) == {"logprob_sum", "n_tokens"}
            assert s.token_logprobs == s.top1 == s.vocab_mu == s.vocab_sigma == []
            continue
        detail = ("token_logprobs", "top1", "vocab_mu", "vocab_sigma", "tokens")
        assert set(d) == {"logprob_sum", "n_tokens", *detail}
        for key in detail:
            assert len(d[key]) == s.n_tokens, key
        assert sum(s.token_logprobs) == pytest.approx(s.logprob_sum, abs=1e-3)
        target, logp, rows = _hand_score(model, formatter, item)
        tok_lp = logp[torch.arange(len(target)), torch.tensor(target)]
        np.testing.assert_allclose(s.token_logprobs, tok_lp.numpy(), atol=1e-4)
        # top-1 flags are argmax matches
        assert s.top1 == (rows.argmax(-1) == torch.tensor(target)).tolist()
        # vocabulary moments at one position, computed directly over the vocabulary
        t = len(target) // 2
        row = logp[t].double()
        p = row.exp()
        mu = float((p * row).sum())
        sigma = math.sqrt(float((p * (row - mu) ** 2).sum()))
        assert s.vocab_mu[t] == pytest.approx(mu, abs=1e-4)
        assert s.vocab_sigma[t] == pytest.approx(sigma, abs=1e-4)
        ref_mu, ref_sigma = M.vocab_logprob_moments(logp.numpy())
        np.testing.assert_allclose(s.vocab_mu, ref_mu, atol=1e-4)
        np.testing.assert_allclose(s.vocab_sigma, ref_sigma, atol=1e-4)
        # the scored pieces, end-of-turn tokens included, for word-level metrics
        assert s.tokens == formatter.tokenizer.convert_ids_to_tokens(target)
        if item.question is not None:
            assert s.tokens[-3:] == ["<|im_end|>", "Ċ", "<|im_end|>"]


# ---------------------------------------------------------------------------- PassStats
def _padding_efficiency(lengths: list[int], batches: list[list[int]]) -> float:
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return real / padded


def test_padding_efficiency_of_bucketing_beats_unsorted_order(tiny):
    model, formatter = tiny
    short, long = "Paris.", " ".join(["Alice writes books about rivers and mountains."] * 4)
    items = [ScoreItem(QUESTIONS[2], a) for a in (short, long, short, long, short, long)]
    stats = PassStats()
    score(model, formatter, items, batch_size=2, stats=stats, share_prompts=False)
    assert 0 < stats.efficiency <= 1
    # scored sequences are prompt + answer + the end-of-turn tokens
    lengths = [len(_scored_ids(formatter, it)[0]) for it in items]
    assert stats.real_tokens == sum(lengths)
    bucketed = _padding_efficiency(lengths, [[0, 2], [4, 1], [3, 5]])
    assert stats.efficiency == pytest.approx(bucketed)
    in_given_order = _padding_efficiency(lengths, [[0, 1], [2, 3], [4, 5]])
    assert in_given_order < 0.75 < stats.efficiency
    # stats accumulate
    total = PassStats()
    total.add(stats)
    total.add(stats)
    assert total.real_tokens == 2 * stats.real_tokens
    assert total.efficiency == pytest.approx(stats.efficiency)
    assert PassStats().efficiency == 0.0


def test_shared_prompts_run_each_prompt_once(tiny):
    model, formatter = tiny
    answers = ["Paris.", "Lyon, on the Rhone.", "I do not know which city it is.", "Rome."]
    items = [ScoreItem(q, a) for q in QUESTIONS for a in answers]
    flat, shared = PassStats(), PassStats()
    a = score(model, formatter, items, batch_size=4, stats=flat, share_prompts=False)
    b = score(model, formatter, items, batch_size=4, stats=shared)
    for x, y in zip(a, b, strict=True):
        assert x.n_tokens == y.n_tokens
        assert x.logprob_sum == pytest.approx(y.logprob_sum, abs=1e-4)
    tok = formatter.tokenizer
    prompts = [formatter.encode_qa(q, "x")[0] for q in QUESTIONS]
    prompt_tokens = sum(map(len, prompts))
    common = next(k for k in range(99) if len({tuple(p[: k + 1]) for p in prompts}) > 1)
    assert common > 3  # the chat template's opening, shared by every prompt
    # each answer is fed without its last token: the prompt's last position predicts its first
    end = len(formatter.label_end_ids)
    fed = sum(len(tok(x, add_special_tokens=False)["input_ids"]) + end - 1 for x in answers)
    assert shared.real_tokens == common + (prompt_tokens - 3 * common) + len(QUESTIONS) * fed
    assert flat.real_tokens == len(answers) * prompt_tokens + len(QUESTIONS) * (fed + len(answers))
    assert flat.truncated == shared.truncated == 0
    assert shared.real_tokens < flat.real_tokens / 2


@pytest.mark.parametrize("shareable_calls", [0, 2])
def test_caches_that_cannot_be_shared_fall_back_to_whole_sequences(
    tiny, monkeypatch, shareable_calls
):
    """A cache kind prefix sharing cannot copy: from then on, every sequence runs whole."""
    model, formatter = tiny
    calls = []

    def shareable(cache):
        calls.append(cache)
        return len(calls) <= shareable_calls  # 2: the common start and the first prompt batch

    items = _items()
    expected = score(model, formatter, items, batch_size=2, share_prompts=False)
    expected_gens = generate(model, formatter, QUESTIONS, max_new_tokens=6)
    monkeypatch.setattr(prefix, "shareable", shareable)
    got, gens = score_and_generate(model, formatter, items, QUESTIONS, 6, batch_size=2)
    assert len(calls) == shareable_calls + 1  # it stops trying at the first refusal
    assert gens == expected_gens
    for a, b in zip(expected, got, strict=True):
        assert a.n_tokens == b.n_tokens
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)


def test_batches_closed_before_padding_takes_over():
    sizes = [300, 100, 310, 110]
    assert token_budget_batches(sizes, 16, 4096) == [[1, 3, 0, 2]]  # 59% real tokens
    assert token_budget_batches(sizes, 16, 4096, 0.9, 150) == [[1, 3], [0, 2]]
    # below min_tokens a batch is never closed for padding alone
    assert token_budget_batches(sizes, 16, 4096, 0.9, 10_000) == [[1, 3, 0, 2]]
    assert token_budget_batches(sizes, 3, 4096) == [[1, 3, 0], [2]]
    assert token_budget_batches(sizes, 16, 620) == [[1, 3], [0, 2]]


# ---------------------------------------------------------------------------- records.generate
def test_generate_is_deterministic_and_independent_of_batch(tiny):
    model, formatter = tiny
    tok = formatter.tokenizer
    prompt_lengths = {len(tok(formatter.prompt_text(q))["input_ids"]) for q in QUESTIONS}
    assert len(prompt_lengths) == 3  # the batch really is left-padded
    stats = PassStats()
    together = generate(model, formatter, QUESTIONS, max_new_tokens=6, stats=stats)
    assert all(isinstance(g, str) for g in together) and len(together) == 3
    assert any(together)
    assert 0 < stats.generated <= 18
    assert generate(model, formatter, QUESTIONS, max_new_tokens=6) == together
    alone = [generate(model, formatter, [q], max_new_tokens=6)[0] for q in QUESTIONS]
    assert alone == together
    # order of the questions does not matter either
    assert generate(model, formatter, QUESTIONS[::-1], max_new_tokens=6) == together[::-1]


@pytest.mark.parametrize("mode_model", ["trees", "trees-eager"], indirect=True)
def test_answers_sharing_their_start_are_fed_once(mode_model):
    """A prompt's answers become one prefix tree: shared beginnings run once, numbers unchanged."""
    model, formatter, kwargs = mode_model
    answers = [
        "The capital is Paris.",
        "The capital is Rome.",
        "The capital is",  # a prefix of the others
        "The capital city is Lyon.",
        "Paris.",
    ]
    items = [ScoreItem(q, a, detail=(k == 0)) for q in QUESTIONS for k, a in enumerate(answers)]
    tree_stats, flat_stats = PassStats(), PassStats()
    trees = score(model, formatter, items, batch_size=2, stats=tree_stats, **kwargs)
    flat = score(model, formatter, items, batch_size=2, stats=flat_stats, share_prompts=False)
    for a, b in zip(flat, trees, strict=True):
        assert a.n_tokens == b.n_tokens
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
        assert a.top1 == b.top1 and a.tokens == b.tokens
        np.testing.assert_allclose(a.vocab_sigma, b.vocab_sigma, atol=1e-4)
    # fed per prompt: every distinct proper prefix of the answers' tokens, once
    tok = formatter.tokenizer
    end = formatter.label_end_ids
    ids = [tok(a, add_special_tokens=False)["input_ids"] + end for a in answers]
    prefixes = {tuple(t[:k]) for t in ids for k in range(1, len(t))}
    assert len(prefixes) < sum(len(t) - 1 for t in ids)  # the answers do share beginnings
    prompts = [formatter.encode_qa(q, "x")[0] for q in QUESTIONS]
    common = next(k for k in range(99) if len({tuple(p[: k + 1]) for p in prompts}) > 1)
    prompt_tokens = common + sum(len(p) - common for p in prompts)
    assert tree_stats.real_tokens == prompt_tokens + len(QUESTIONS) * len(prefixes)


def test_generation_off_the_scoring_prompt_pass_matches_generate(tiny):
    """`score_and_generate` continues from the prompts' cache; the answers must not change."""
    model, formatter = tiny
    items = [ScoreItem(q, a, detail=True) for q in QUESTIONS for a in ("Paris.", "Rome, Italy.")]
    stats = PassStats()
    scores, gens = score_and_generate(
        model, formatter, items, QUESTIONS, max_new_tokens=6, batch_size=2, stats=stats
    )
    assert gens == generate(model, formatter, QUESTIONS, max_new_tokens=6)
    assert any(gens) and 0 < stats.generated <= 18
    alone = score(model, formatter, items, batch_size=2, share_prompts=False)
    for a, b in zip(alone, scores, strict=True):
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)
    # a question with no scored answer is still generated for; flat mode gives the same answers
    _, more = score_and_generate(model, formatter, items[:1], QUESTIONS[::-1], max_new_tokens=6)
    assert more == gens[::-1]
    _, flat = score_and_generate(
        model, formatter, items, QUESTIONS, max_new_tokens=6, share_prompts=False
    )
    assert flat == gens


def test_grad_norms_by_hand_and_model_left_as_it_was(tiny):
    model, formatter = tiny
    items = [*_items()[:3], _items()[4]]  # QA answers and a document
    flags = [p.requires_grad for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    norms = grad_norms(model, formatter, items)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    params = list(model.parameters())
    for item, norm in zip(items, norms, strict=True):
        target, _, _ = _hand_score(model, formatter, item)
        ids, _ = _scored_ids(formatter, item)
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            logits = model(torch.tensor([ids])).logits[0, len(ids) - len(target) - 1 : -1]
            loss = F.cross_entropy(logits.float(), torch.tensor(target))
            grads = torch.autograd.grad(loss, params)
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
        expected = math.sqrt(sum(float(g.square().sum()) for g in grads))
        assert norm == pytest.approx(expected, rel=1e-4)
    assert len(set(norms)) == len(norms)


@pytest.mark.parametrize("mode_model", list(MODES), indirect=True)
def test_score_end_false_scores_the_answer_text_only(mode_model):
    model, formatter, kwargs = mode_model
    items = _items()
    scores = score(model, formatter, items, batch_size=2, score_end=False, **kwargs)
    for item, s in zip(items, scores, strict=True):
        target, logp, _ = _hand_score(model, formatter, item, score_end=False)
        if item.question is not None:
            assert target == formatter.tokenizer(item.answer, add_special_tokens=False)["input_ids"]
        assert s.n_tokens == len(target)
        expected = float(logp[torch.arange(len(target)), torch.tensor(target)].sum())
        assert s.logprob_sum == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("mode_model", list(MODES), indirect=True)
def test_end_of_turn_token_that_is_also_padding_is_never_hidden(mode_model):
    """SmolLM2's pad token is its end-of-turn token; a mask built by id would hide every real one.

    Here the pad id is the EOS id is `<|im_end|>`, which appears mid-sequence in every prompt (end
    of the user turn), in every scored answer (followed by the newline and EOS) and inside a
    document and a question; batches of different lengths are padded with that same id.
    """
    model, formatter, kwargs = mode_model
    tok = formatter.tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    items = [
        *_items(),
        ScoreItem(None, "Alice writes<|im_end|> books about rivers.<|im_end|> Bob plays.", True),
        ScoreItem("Where?<|im_end|> Really?", "Paris.<|im_end|> Or Rome.", detail=True),
    ]
    scores = score(model, formatter, items, batch_size=3, **kwargs)
    for item, s in zip(items, scores, strict=True):
        target, logp, _ = _hand_score(model, formatter, item)
        if item.question is not None or "<|im_end|>" in item.answer:
            assert tok.eos_token_id in target[:-1]  # a real end-of-turn token, not the last
        expected = logp[torch.arange(len(target)), torch.tensor(target)]
        assert s.n_tokens == len(target)
        assert s.logprob_sum == pytest.approx(float(expected.sum()), abs=1e-4)
        if item.detail:
            np.testing.assert_allclose(s.token_logprobs, expected.numpy(), atol=1e-4)


def test_truncation_is_counted_never_silent(tiny):
    model, tiny_formatter = tiny
    formatter = PromptFormatter(tiny_formatter.tokenizer, PromptConfig(max_length=28))
    items = [
        ScoreItem(QUESTIONS[0], "Paris."),  # fits
        ScoreItem(QUESTIONS[0], " ".join(["Alice writes books about rivers."] * 3)),  # cut
        ScoreItem(None, " ".join(["Bob plays the cello."] * 8)),  # a document, cut
    ]
    lengths = [len(_scored_ids(formatter, it)[0]) for it in items]
    assert lengths[0] <= 28 < min(lengths[1:])
    assert len(formatter.encode_qa(QUESTIONS[1], "")[0]) > 28
    for kwargs in ({}, {"share_prompts": False}):
        stats = PassStats()
        scores, _ = score_and_generate(
            model, formatter, items, [QUESTIONS[1]], 2, stats=stats, **kwargs
        )
        # the long answer, the document, and the question's prompt (over 28 tokens by itself)
        assert stats.truncated == 3, kwargs
        assert scores[0].n_tokens == lengths[0] - len(formatter.encode_qa(QUESTIONS[0], "")[0])
    assert PassStats(truncated=1).truncated == 1


# ---------------------------------------------------------------------------- the decode loop
def _stop_token_that_ends_rows_at_different_steps(model, formatter, prompts) -> int:
    """A token the random model emits at different first steps in different rows, to stand in for
    end-of-turn (a random model rarely emits the real one)."""
    ids, mask = left_pad(prompts, formatter.tokenizer.pad_token_id)
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
            pad_token_id=formatter.tokenizer.pad_token_id, eos_token_id=None,
        )[:, ids.shape[1] :].tolist()  # fmt: skip
    best, spread = -1, 0
    for t in {t for row in gen for t in row}:
        firsts = {row.index(t) if t in row else 99 for row in gen}
        if len(firsts) > spread:
            best, spread = t, len(firsts)
    assert spread >= 3
    return best


def test_decoder_gives_model_generate_answers_while_rows_finish_and_refill(tiny, monkeypatch):
    """Rows leave the batch at different steps and waiting prompts take their place: the answers
    must be exactly `model.generate`'s, together and one prompt at a time."""
    model, formatter = tiny
    questions = [*QUESTIONS, "Who?", "What does Alice write about, and where does Bob play?"]
    prompts = [tuple(formatter.encode_qa(q, "")[0]) for q in questions]
    assert len({len(p) for p in prompts}) == len(prompts)  # every row padded differently
    stop = _stop_token_that_ends_rows_at_different_steps(model, formatter, prompts)
    monkeypatch.setattr(decode, "stop_ids", lambda formatter: [stop])
    ref_stats = PassStats()
    ids, mask = left_pad(prompts, formatter.tokenizer.pad_token_id)
    with torch.no_grad():
        reference = decode.hf_greedy(model, formatter, ids, mask, 10, ref_stats)
    lengths = {len(formatter.tokenizer(t)["input_ids"]) for t in reference}
    assert len(lengths) >= 3  # rows really finish at different steps
    for batch_size in (1, 2, 3, 32):  # 2 and 3: finished rows are refilled from waiting prompts
        stats = PassStats()
        assert generate(model, formatter, questions, 10, batch_size, stats) == reference
        assert stats.generated == ref_stats.generated
    alone = [decode.hf_greedy(model, formatter, torch.tensor([p]),
                                       torch.ones((1, len(p)), dtype=torch.long), 10, PassStats())[0]
             for p in prompts]  # fmt: skip
    assert alone == reference
    # off the scoring pass's prompt cache, too
    items = [ScoreItem(q, "Paris.") for q in questions]
    _, gens = score_and_generate(model, formatter, items, questions, 10, batch_size=2)
    assert gens == reference


def test_caches_that_cannot_be_compacted_generate_through_model_generate(tiny, monkeypatch):
    model, formatter = tiny
    expected = generate(model, formatter, QUESTIONS, max_new_tokens=6)
    calls = []
    real = decode.hf_greedy

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "shareable", lambda cache: False)
    monkeypatch.setattr(decode, "hf_greedy", spy)
    assert generate(model, formatter, QUESTIONS, max_new_tokens=6) == expected
    assert calls
