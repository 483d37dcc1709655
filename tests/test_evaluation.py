"""Evaluation: the one-pass records, scoring from records alone, `evaluate` end to end, errors, CLI.

The model tests run the tiny random Llama of conftest. `records.score` is checked against a plain
loop over one unbatched sequence at a time, so length bucketing and padding cannot change a number;
`records.generate` against one-question-at-a-time generation, so left padding cannot either.
`score_suite` is checked on hand-made records with hand-computed expectations (no model).
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import hmean, ks_2samp

from conftest import TOFU, requires_tofu, write_jsonl
from unlearn import metrics as M
from unlearn.cli import main
from unlearn.config import ModelConfig, PromptConfig
from unlearn.data import content_hash
from unlearn.errors import UnlearnError
from unlearn.eval.records import (
    PassStats,
    ScoreItem,
    generate,
    grad_norms,
    score,
    score_and_generate,
)
from unlearn.eval.run import evaluate, score_suite
from unlearn.eval.suites.builders import EvalSet, Suite, people_suite
from unlearn.models import load_model_and_tokenizer
from unlearn.prompts import PromptFormatter

NO_REF = "--reference"
FAST = {"max_new_tokens": 4, "progress": False}


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices: with other jobs on a 2-core machine, extra threads only spin (20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, formatter) of the tiny model, loaded the way `evaluate` loads it."""
    model, tok, _ = load_model_and_tokenizer(ModelConfig(name=str(tiny_model_dir), device="cpu"))
    return model, PromptFormatter(tok, PromptConfig())


@pytest.fixture(scope="module")
def people_evals(tiny_model_dir, tmp_path_factory):
    """The tiny model on `people`: once as the reference, once compared with that reference."""
    root = tmp_path_factory.mktemp("people-evals")
    ref_dir, tgt_dir = root / "retain", root / "target"
    ref = evaluate(str(tiny_model_dir), str(ref_dir), benchmark="people", **FAST)
    tgt = evaluate(
        str(tiny_model_dir), str(tgt_dir), benchmark="people", reference=str(ref_dir), **FAST
    )
    return ref_dir, tgt_dir, ref, tgt


QUESTIONS = [
    "Where?",
    "Where was Maren Hollister born, and what does she write about in her books?",
    "What is the capital of France?",
]


# ---------------------------------------------------------------------------- records.score
def _hand_score(model, formatter, item: ScoreItem):
    """One unbatched sequence: (answer token ids, log-softmax rows predicting them, logits rows)."""
    tok = formatter.tokenizer
    if item.question is None:
        body = tok(item.answer, add_special_tokens=False)["input_ids"]
        ids, start = [tok.bos_token_id, *body], 1
    else:
        p_ids, a_ids = formatter.encode_qa(item.question, item.answer)
        a_ids = a_ids[: len(a_ids) - len(formatter.end_ids)]
        # The answer scored is the answer text itself, without the end-of-turn marker.
        assert a_ids == tok(item.answer.strip(), add_special_tokens=False)["input_ids"]
        ids, start = p_ids + a_ids, len(p_ids)
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
        detail = ("token_logprobs", "top1", "vocab_mu", "vocab_sigma", "keyword_mask")
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
    # key words of "The capital of France is Paris." are capital, france, paris
    capital = scores[2]
    assert any(capital.keyword_mask) and not all(capital.keyword_mask)


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
    # scored sequences are prompt + answer without the end-of-turn marker
    end = len(formatter.end_ids)
    lengths = [sum(map(len, formatter.encode_qa(it.question, it.answer))) - end for it in items]
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
    fed = sum(len(tok(x, add_special_tokens=False)["input_ids"]) - 1 for x in answers)
    assert shared.real_tokens == common + (prompt_tokens - 3 * common) + len(QUESTIONS) * fed
    assert flat.real_tokens == len(answers) * prompt_tokens + len(QUESTIONS) * (fed + len(answers))
    assert shared.real_tokens < flat.real_tokens / 2


@pytest.mark.parametrize("shareable_calls", [0, 2])
def test_caches_that_cannot_be_shared_fall_back_to_whole_sequences(
    tiny, monkeypatch, shareable_calls
):
    """A cache kind prefix sharing cannot copy: from then on, every sequence runs whole."""
    import unlearn.eval.records as R

    model, formatter = tiny
    calls = []

    def shareable(cache):
        calls.append(cache)
        return len(calls) <= shareable_calls  # 2: the common start and the first prompt batch

    items = _items()
    expected = score(model, formatter, items, batch_size=2, share_prompts=False)
    expected_gens = generate(model, formatter, QUESTIONS, max_new_tokens=6)
    monkeypatch.setattr(R, "_shareable", shareable)
    got, gens = score_and_generate(model, formatter, items, QUESTIONS, 6, batch_size=2)
    assert len(calls) == shareable_calls + 1  # it stops trying at the first refusal
    assert gens == expected_gens
    for a, b in zip(expected, got, strict=True):
        assert a.n_tokens == b.n_tokens
        assert a.logprob_sum == pytest.approx(b.logprob_sum, abs=1e-4)


def test_batches_closed_before_padding_takes_over():
    from unlearn.eval.records import _token_budget_batches

    sizes = [300, 100, 310, 110]
    assert _token_budget_batches(sizes, 16, 4096) == [[1, 3, 0, 2]]  # 59% real tokens
    assert _token_budget_batches(sizes, 16, 4096, 0.9, 150) == [[1, 3], [0, 2]]
    # below min_tokens a batch is never closed for padding alone
    assert _token_budget_batches(sizes, 16, 4096, 0.9, 10_000) == [[1, 3, 0, 2]]
    assert _token_budget_batches(sizes, 3, 4096) == [[1, 3, 0], [2]]
    assert _token_budget_batches(sizes, 16, 620) == [[1, 3], [0, 2]]


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
        assert a.top1 == b.top1 and a.keyword_mask == b.keyword_mask
        np.testing.assert_allclose(a.vocab_sigma, b.vocab_sigma, atol=1e-4)
    # fed per prompt: every distinct proper prefix of the answers' tokens, once
    tok = formatter.tokenizer
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
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
        tok = formatter.tokenizer
        if item.question is None:
            ids = [tok.bos_token_id, *target]
        else:
            ids = formatter.encode_qa(item.question, item.answer)[0] + target
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


def test_evaluate_gradient_norm_attack_on_request(people_evals, tiny_model_dir, tmp_path):
    _, _, _, without = people_evals
    assert "--mia-gradnorm" in without["skipped"]["mia_gradnorm_auc"]
    res = evaluate(
        str(tiny_model_dir), str(tmp_path / "ev"), benchmark="people", mia_gradnorm=True, **FAST
    )
    assert 0.0 <= res["metrics"]["mia_gradnorm_auc"] <= 1.0
    assert "mia_gradnorm_auc" not in res["skipped"]
    rec = json.loads((tmp_path / "ev" / "records" / "forget.jsonl").read_text().splitlines()[0])
    assert rec["grad_norm"] > 0
    retain = json.loads((tmp_path / "ev" / "records" / "retain.jsonl").read_text().splitlines()[0])
    assert "grad_norm" not in retain  # only forget and holdout feed the attack
    # the other metrics do not depend on it
    for k, v in without["metrics"].items():
        if k in res["metrics"] and "forget_quality" not in k and "privleak" not in k:
            assert res["metrics"][k] == pytest.approx(v, abs=1e-6), k


# ---------------------------------------------------------------------------- score_suite (no model)
def _rows(prefix: str, n: int, perturbed: bool = True, paraphrase: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = f"{prefix} question {i}?", f"{prefix} answer {i} is Paris."
        row = {"id": f"{prefix}-{i}", "question": q, "answer": a, "sha256": content_hash(q, a)}
        if paraphrase:
            row["paraphrased_answer"] = f"Paraphrase {i} of {prefix}: Paris."
        if perturbed:
            row["perturbed_answer"] = [f"{prefix} answer {i} is Rome.", f"It is Lyon {i}."]
        rows.append(row)
    return rows


def _score(mean_lp: float, n: int, detail: bool = False, shift: float = 0.0) -> dict:
    d = {"logprob_sum": mean_lp * n, "n_tokens": n}
    if detail:
        toks = [mean_lp + shift + 0.1 * (k - (n - 1) / 2) for k in range(n)]
        d.update(
            logprob_sum=sum(toks),
            token_logprobs=toks,
            top1=[k % 2 == 0 for k in range(n)],
            vocab_mu=[-3.0] * n,
            vocab_sigma=[1.0] * n,
            keyword_mask=[k >= n - 2 for k in range(n)],
        )
    return d


def _recs(rows, answer, paraphrased=None, perturbed=None, gens=None, shift=0.0) -> list[dict]:
    """Records as `run_records` writes them, from per-row mean log-probs."""
    out = []
    for i, row in enumerate(rows):
        rec = {"id": row["id"], "sha256": row["sha256"]}
        rec["answer"] = _score(answer[i], 4 + i, detail=True, shift=shift)
        if paraphrased is not None:
            rec["paraphrased"] = _score(paraphrased[i], 3 + i)
        if perturbed is not None:
            rec["perturbed"] = [_score(lp, 2 + i + k) for k, lp in enumerate(perturbed[i])]
        rec["generation"] = gens[i] if gens else "I do not know."
        out.append(rec)
    return out


FORGET_PARA = [-1.0, -2.0, -0.5]
FORGET_PERT = [[-2.0, -3.0], [-1.0, -1.5], [-0.5, -0.5]]


def _suite_and_records(holdout: bool = True, utility: bool = True):
    forget, retain = _rows("forget", 3), _rows("retain", 2)
    real, world = _rows("real", 2), _rows("world", 3)
    sets = [EvalSet("forget", "forget", forget, "mem"), EvalSet("retain", "retain", retain, "mem")]
    recs = {
        "forget": _recs(forget, [-1.5, -1.0, -2.5], FORGET_PARA, FORGET_PERT),
        "retain": _recs(
            retain,
            [-0.5, -0.7],
            [-0.4, -0.6],
            [[-2.0, -2.5], [-1.5, -3.0]],
            gens=[r["answer"] for r in retain],
        ),
    }
    if utility:
        sets += [
            EvalSet("real_authors", "utility", real, "mem"),
            EvalSet("world_facts", "utility", world, "mem"),
        ]
        recs["real_authors"] = _recs(
            real,
            [-1.0, -0.8],
            [-9.0, -9.0],  # paraphrases exist but utility sets use the answer as "true"
            [[-2.0, -3.0], [-1.2, -2.2]],
            gens=[r["answer"] for r in real],
        )
        recs["world_facts"] = _recs(
            world,
            [-0.3, -0.9, -0.4],
            None,
            [[-1.0, -2.0], [-2.0, -2.0], [-0.9, -3.0]],
            gens=["answer Paris", "world", "nothing"],
        )
    if holdout:
        hold = _rows("holdout", 3, perturbed=False, paraphrase=False)
        sets.append(EvalSet("holdout", "holdout", hold, "mem"))
        recs["holdout"] = _recs(hold, [-1.2, -2.0, -1.8])
    return Suite("synthetic", None, sets), recs


def _assert_no_none(metrics: dict) -> None:
    for key, value in metrics.items():
        assert value is not None, key
        assert isinstance(value, float), (key, value)


def test_score_suite_truth_ratios_and_utility_by_hand():
    suite, recs = _suite_and_records()
    metrics, skipped, per = score_suite(suite, recs)
    _assert_no_none(metrics)
    # forget truth ratio: paraphrased answer is "true", perturbed are "false", length-normalised
    tr = [math.exp(np.mean(f) - t) for t, f in zip(FORGET_PARA, FORGET_PERT, strict=True)]
    np.testing.assert_allclose(per["forget"]["truth_ratio"], tr)
    assert metrics["forget_truth_ratio"] == pytest.approx(np.mean([min(x, 1 / x) for x in tr]))
    # retain: paraphrased is "true" too; aggregate mean(max(0, 1 - tr))
    retain_tr = [math.exp(-2.25 + 0.4), math.exp(-2.25 + 0.6)]
    assert metrics["retain_truth_ratio"] == pytest.approx(np.mean([1 - x for x in retain_tr]))
    # real authors: the answer itself is "true" (not the paraphrase)
    real_tr = [math.exp(-2.5 + 1.0), math.exp(-1.7 + 0.8)]
    np.testing.assert_allclose(per["real_authors"]["truth_ratio"], real_tr)
    # utility probability is normalised over the true and perturbed answers
    p0 = math.exp(-1.0) / (math.exp(-1.0) + math.exp(-2.0) + math.exp(-3.0))
    assert per["real_authors"]["probability"][0] == pytest.approx(p0)
    assert metrics["retain_probability"] == pytest.approx(np.mean(np.exp([-0.5, -0.7])))
    assert metrics["retain_rouge_l_recall"] == pytest.approx(1.0)
    # model utility: harmonic mean of the 9 values
    assert all(k in metrics for k in M.MODEL_UTILITY_KEYS)
    nine = [metrics[k] for k in M.MODEL_UTILITY_KEYS]
    assert min(nine) > 0
    assert metrics["model_utility"] == pytest.approx(hmean(nine))
    assert "model_utility" not in skipped
    # without a reference, the reference metrics are skipped with a reason naming --reference
    for key in ("forget_quality", "privleak", "mia_reference_auc"):
        assert key not in metrics
        assert NO_REF in skipped[key], key
    assert "mia_gradnorm_auc" in skipped
    assert {"mia_loss_auc", "mia_zlib_auc", "mia_min_k_auc", "mia_min_k_plus_plus_auc"} <= set(
        metrics
    )
    # memorization from the top-1 flags
    assert metrics["forget_exact_memorization"] == pytest.approx(np.mean([2 / 4, 3 / 5, 3 / 6]))


def test_score_suite_with_reference_records():
    suite, recs = _suite_and_records()
    # A reference model that prefers the truth less on the forget set.
    ref = json.loads(json.dumps(recs))
    for rec, shift in zip(ref["forget"], (0.3, -0.4, 1.0), strict=True):
        rec["paraphrased"]["logprob_sum"] -= shift * rec["paraphrased"]["n_tokens"]
    for rec in ref["holdout"]:
        rec["answer"]["token_logprobs"] = [x - 0.05 for x in rec["answer"]["token_logprobs"]]
    metrics, skipped, per = score_suite(suite, recs, reference=ref)
    _assert_no_none(metrics)
    ref_metrics, _, ref_per = score_suite(suite, ref)
    expected = ks_2samp(per["forget"]["truth_ratio"], ref_per["forget"]["truth_ratio"]).pvalue
    assert metrics["forget_quality"] == pytest.approx(expected)
    assert metrics["reference_mia_min_k_auc"] == pytest.approx(ref_metrics["mia_min_k_auc"])
    assert metrics["privleak"] == pytest.approx(
        M.privleak(metrics["mia_min_k_auc"], ref_metrics["mia_min_k_auc"])
    )
    assert 0 <= metrics["mia_reference_auc"] <= 1
    for key in ("forget_quality", "privleak", "mia_reference_auc"):
        assert key not in skipped
    # the model as its own reference: indistinguishable, no leak
    same, _, _ = score_suite(suite, recs, reference=recs)
    assert same["forget_quality"] == pytest.approx(1.0)
    assert same["mia_reference_auc"] == pytest.approx(0.5)
    assert same["privleak"] == pytest.approx(0.0)


def test_score_suite_reference_with_perfect_auc_skips_privleak():
    suite, recs = _suite_and_records()
    ref = json.loads(json.dumps(recs))
    for rec in ref["forget"]:  # the reference separates forget from holdout perfectly
        rec["answer"]["token_logprobs"] = [-0.1] * rec["answer"]["n_tokens"]
    metrics, skipped, _ = score_suite(suite, recs, reference=ref)
    assert "privleak" in skipped and "privleak" not in metrics
    assert "forget_quality" in metrics


def test_score_suite_skips_what_the_sets_cannot_support():
    suite, recs = _suite_and_records(holdout=False, utility=False)
    metrics, skipped, _ = score_suite(suite, recs)
    _assert_no_none(metrics)
    assert "model_utility" not in metrics
    assert "real_authors_probability" in skipped["model_utility"]
    assert "holdout" in skipped["mia"]
    assert not any(k.startswith("mia_") for k in metrics)
    assert NO_REF in skipped["forget_quality"]
    # forget data without perturbed answers: no truth ratio, so no forget quality either
    bare = _rows("forget", 2, perturbed=False)
    bare_suite = Suite("custom", None, [EvalSet("forget", "forget", bare, "mem")])
    metrics, skipped, _ = score_suite(bare_suite, {"forget": _recs(bare, [-1.0, -2.0])})
    _assert_no_none(metrics)
    assert "perturbed_answer" in skipped["forget_truth_ratio"]
    assert "perturbed_answer" in skipped["forget_quality"]
    assert metrics["forget_probability"] == pytest.approx(np.mean(np.exp([-1.0, -2.0])))


# ---------------------------------------------------------------------------- evaluate end to end
def test_evaluate_people_with_reference(people_evals):
    ref_dir, tgt_dir, ref, tgt = people_evals
    for key in ("forget_quality", "model_utility", "privleak", "mia_reference_auc"):
        assert key in tgt["metrics"], key
    for key in ("forget_quality", "privleak", "mia_reference_auc"):
        assert NO_REF in ref["skipped"][key]
    assert "model_utility" in ref["metrics"]
    _assert_no_none(tgt["metrics"])
    _assert_no_none(ref["metrics"])
    # the same model as its own reference
    assert tgt["metrics"]["forget_quality"] == pytest.approx(1.0)
    assert tgt["metrics"]["privleak"] == pytest.approx(0.0)
    assert 0 < tgt["pass"]["padding_efficiency"] <= 1
    on_disk = json.loads((tgt_dir / "results.json").read_text())
    assert on_disk["metrics"] == tgt["metrics"]
    assert on_disk["reference"] == str(ref_dir)
    assert on_disk["benchmark"] == "people"
    suite = people_suite()
    for s in suite.sets:
        lines = (tgt_dir / "records" / f"{s.name}.jsonl").read_text().splitlines()
        recs = [json.loads(line) for line in lines]
        assert [(r["id"], r["sha256"]) for r in recs] == list(zip(s.ids, s.hashes, strict=True))
        if s.role == "holdout":  # holdout only feeds membership inference: nothing generated
            assert not any("generation" in r for r in recs)
        else:
            assert all(isinstance(r["generation"], str) for r in recs)
        assert on_disk["datasets"][s.name]["n"] == len(s.rows)


def test_evaluate_keeps_question_and_answer_text_out_of_results(people_evals):
    _, tgt_dir, _, _ = people_evals
    results = (tgt_dir / "results.json").read_text()
    records = "".join(p.read_text() for p in (tgt_dir / "records").glob("*.jsonl"))
    forget = people_suite().get("forget")
    assert forget is not None
    for row in forget.rows:
        assert row["question"] not in results
        assert row["answer"] not in results
        assert row["question"] not in records
        for p in row["perturbed_answer"]:
            assert p not in results


def test_evaluate_is_reproducible(people_evals):
    ref_dir, tgt_dir, ref, tgt = people_evals
    # the same model twice: identical metrics, per-example values and records
    assert {k: tgt["metrics"][k] for k in ref["metrics"]} == ref["metrics"]
    assert tgt["per_example"] == ref["per_example"]
    for f in (ref_dir / "records").glob("*.jsonl"):
        assert (tgt_dir / "records" / f.name).read_text() == f.read_text()


def test_evaluate_tokenizer_without_pad_token(tiny_model_dir, qa_files, tmp_path):
    from transformers import AutoTokenizer

    copy = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, copy)
    tok = AutoTokenizer.from_pretrained(copy)
    tok.pad_token = None
    tok.save_pretrained(copy)
    assert AutoTokenizer.from_pretrained(copy).pad_token_id is None
    forget, retain = qa_files
    res = evaluate(str(copy), str(tmp_path / "ev"), forget=str(forget), retain=str(retain), **FAST)
    _assert_no_none(res["metrics"])
    assert "forget_mean_nll" in res["metrics"]
    # the original tokenizer pads with its EOS, so the numbers are the same
    orig = evaluate(
        str(tiny_model_dir), str(tmp_path / "ev0"), forget=str(forget), retain=str(retain), **FAST
    )
    assert res["metrics"] == orig["metrics"]


def test_evaluate_custom_documents_and_holdout(tiny_model_dir, tmp_path):
    docs = [{"text": f"Alice writes books about rivers number {i}."} for i in range(3)]
    other = [{"text": f"Bob plays the cello in city {i} every year."} for i in range(3)]
    forget = write_jsonl(tmp_path / "docs.jsonl", docs)
    holdout = write_jsonl(tmp_path / "hold.jsonl", other)
    res = evaluate(
        str(tiny_model_dir), str(tmp_path / "ev"), forget=str(forget), holdout=str(holdout), **FAST
    )
    _assert_no_none(res["metrics"])
    assert "mia_min_k_auc" in res["metrics"]
    assert "perturbed_answer" in res["skipped"]["forget_quality"]
    assert NO_REF in res["skipped"]["privleak"]
    assert res["datasets"]["forget"]["kind"] == "text"


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def test_results_json_is_strict_json(people_evals):
    _, tgt_dir, _, _ = people_evals
    _strict_json((tgt_dir / "results.json").read_text())


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_set_without_key_words_skips_keyword_metrics(tiny_model_dir, tmp_path):
    rows = [{"question": f"Is {i} a number?", "answer": "Yes."} for i in range(3)]
    forget = write_jsonl(tmp_path / "yes.jsonl", rows)
    res = evaluate(str(tiny_model_dir), str(tmp_path / "ev"), forget=str(forget), **FAST)
    for key in ("forget_keyword_accuracy", "forget_keyword_confidence"):
        assert key not in res["metrics"] and key in res["skipped"], key
    _strict_json((tmp_path / "ev" / "results.json").read_text())


# ---------------------------------------------------------------------------- errors
def test_unknown_benchmark(tiny_model_dir, tmp_path):
    with pytest.raises(UnlearnError, match="unknown benchmark 'nope'") as err:
        evaluate(str(tiny_model_dir), str(tmp_path / "ev"), benchmark="nope", **FAST)
    assert "\n" not in str(err.value) and "people" in str(err.value)
    with pytest.raises(UnlearnError, match="--forget"):
        evaluate(str(tiny_model_dir), str(tmp_path / "ev"), benchmark="custom", **FAST)
    assert not (tmp_path / "ev").exists()


@requires_tofu
def test_tofu_split_that_does_not_exist(tiny_model_dir, tmp_path):
    for split in ("forget02", "forget20"):
        with pytest.raises(UnlearnError, match=f"no evaluation split '{split}'") as err:
            evaluate(
                str(tiny_model_dir),
                str(tmp_path / "ev"),
                benchmark="tofu",
                split=split,
                data_dir=str(TOFU),
                **FAST,
            )
        assert "forget01" in str(err.value) and "\n" not in str(err.value)


def test_tofu_data_dir_without_files(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnlearnError, match=r"forget01_perturbed\.json not found"):
        evaluate(
            str(tiny_model_dir), str(tmp_path / "ev"), benchmark="tofu", data_dir=str(empty), **FAST
        )


def test_reference_evaluated_on_different_data(tiny_model_dir, qa_files, tmp_path):
    forget, retain = qa_files
    ref_dir = tmp_path / "custom-ref"
    evaluate(str(tiny_model_dir), str(ref_dir), forget=str(forget), retain=str(retain), **FAST)
    with pytest.raises(UnlearnError, match="different 'forget' data") as err:
        evaluate(
            str(tiny_model_dir),
            str(tmp_path / "ev"),
            benchmark="people",
            reference=str(ref_dir),
            **FAST,
        )
    assert "ids/hashes differ" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ev").exists()


def test_reference_without_holdout_records(tiny_model_dir, tmp_path):
    # same forget rows (same ids and hashes) but no holdout set in the reference
    rows = people_suite().get("forget").rows
    forget = write_jsonl(
        tmp_path / "forget.jsonl",
        [{"id": r["id"], "question": r["question"], "answer": r["answer"]} for r in rows],
    )
    ref_dir = tmp_path / "ref"
    evaluate(str(tiny_model_dir), str(ref_dir), forget=str(forget), **FAST)
    with pytest.raises(UnlearnError, match="no 'holdout' records"):
        evaluate(
            str(tiny_model_dir),
            str(tmp_path / "ev"),
            benchmark="people",
            reference=str(ref_dir),
            **FAST,
        )


def test_reference_folder_without_results(tiny_model_dir, tmp_path):
    empty = tmp_path / "not-an-eval"
    empty.mkdir()
    with pytest.raises(UnlearnError, match=r"has no results\.json") as err:
        evaluate(
            str(tiny_model_dir),
            str(tmp_path / "ev"),
            benchmark="people",
            reference=str(empty),
            **FAST,
        )
    assert "unlearn eval" in str(err.value)


def test_output_must_not_be_the_model_folder(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    with pytest.raises(UnlearnError, match="must not be the model folder"):
        evaluate(str(copy), str(copy), benchmark="people", **FAST)
    assert not (copy / "results.json").exists()


def test_no_overwrite_refuses_existing_evaluation(people_evals, tiny_model_dir):
    ref_dir = people_evals[0]
    with pytest.raises(UnlearnError, match="--overwrite"):
        evaluate(str(tiny_model_dir), str(ref_dir), benchmark="people", overwrite=False, **FAST)


# ---------------------------------------------------------------------------- CLI
def test_cli_eval_prints_metrics(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "ev"
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--benchmark",
            "people",
            "--output",
            str(out),
            "--max-new-tokens",
            "4",
        ]
    )
    stdout, err = capsys.readouterr()
    assert code == 0, err
    lines = stdout.splitlines()
    assert any(line.startswith("model_utility: ") for line in lines)
    assert any(line.startswith("mia_min_k_auc: ") for line in lines)
    assert any(line.startswith("skipped forget_quality: ") and NO_REF in line for line in lines)
    assert f"saved: {out}" in lines
    assert (out / "results.json").is_file()


def test_cli_eval_unknown_benchmark_is_one_error_line(capsys, tiny_model_dir, tmp_path):
    code = main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--benchmark",
            "nope",
            "--output",
            str(tmp_path / "ev"),
        ]
    )
    stdout, err = capsys.readouterr()
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("unlearn: error: ") and "nope" in lines[0]
    assert "Traceback" not in err + stdout


def test_cli_report_over_two_evaluations(capsys, people_evals, tmp_path):
    ref_dir, tgt_dir, _, _ = people_evals
    out = tmp_path / "report"
    code = main(["report", str(ref_dir), str(tgt_dir), "--output", str(out)])
    _, err = capsys.readouterr()
    assert code == 0, err
    for name in ("report.html", "report.md", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"retain", "target"}
    assert summary["models"]["target"]["reference"] == "retain"
    assert summary["models"]["target"]["metrics"]["forget_quality"] == pytest.approx(1.0)
    forget = people_suite().get("forget")
    text = (out / "report.md").read_text() + (out / "report.html").read_text()
    for row in forget.rows:
        assert row["question"] not in text


# ---------------------------------------------------------------------------- TOFU
@requires_tofu
def test_tofu_forget01_small(tiny_model_dir, tmp_path):
    res = evaluate(
        str(tiny_model_dir),
        str(tmp_path / "ev"),
        benchmark="tofu",
        split="forget01",
        data_dir=str(TOFU),
        limit=4,
        max_new_tokens=2,
        progress=False,
    )
    for key in (
        "forget_truth_ratio",
        "retain_truth_ratio",
        "real_authors_probability",
        "world_facts_probability",
        "mia_min_k_auc",
        "model_utility",
    ):
        assert key in res["metrics"], key
    _assert_no_none(res["metrics"])
    assert res["benchmark"] == "tofu" and res["split"] == "forget01"
    assert all(d["n"] == 4 for d in res["datasets"].values())
    assert NO_REF in res["skipped"]["forget_quality"]
