"""How much faster is "run the model once per dataset, score many times" than one pass per metric?

Times the TOFU forget01 evaluation suite (forget, retain, real_authors, world_facts, holdout) on one
model object, two ways in the same run:

(a) ours: `run_records` (per dataset, each prompt runs once; its answer variants -- answer,
    paraphrase, perturbations -- are scored off its KV cache as one prefix tree, and generation
    continues from the same cache; see docs/eval_speed.md) and then `score_suite`, a pure function
    of those records.
(b) a naive baseline with OpenUnlearning's structure: every metric runs the model itself, batches
    in fixed dataset order (no length bucketing), right-padded for teacher forcing, the full
    [B, L, V] log-softmax per batch as its `evaluate_probability` / `tokenwise_logprobs` do, and
    generation left-padded in dataset order. Pre-computes shared by name are reused, as
    OpenUnlearning's cache does (e.g. `ra_Q_A_Prob` serves both normalised probability and truth
    ratio). Passes: probability (answers); truth ratio (paraphrases, perturbations); ROUGE
    (generation); exact memorisation; extraction strength; LOSS, zlib, Min-K% and Min-K%++ on forget
    and on holdout, each its own pass.

Both sides use the same tokens and the same pure metric functions, so the numbers should agree; the
script prints a few side by side. Padding efficiency = real tokens / padded tokens over the
teacher-forced passes. Model loading is not timed.

    python benchmarks/eval_speed.py [--limit 16] [--batch-size 16] [--max-new-tokens 32] [--threads 1]

--limit 16 (the default: the first 16 rows of each set, one generation batch per set) takes about
4 minutes on one core of a shared 2-core CPU; --limit 40 is the whole forget01/holdout01 split
(about 2.5x longer). One torch thread by default, because two threads on a 2-core machine that
also runs other jobs made generation ~20x slower (spinning OpenMP threads). Results:
docs/eval_speed.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from unlearn import metrics as M
from unlearn.config import EvalConfig, ModelConfig, PromptConfig
from unlearn.eval import records as records_module
from unlearn.eval.records import PassStats
from unlearn.eval.records.batching import left_pad
from unlearn.eval.records.decode import greedy, hf_greedy
from unlearn.eval.records.scores import answer_ids
from unlearn.eval.run import build_suite, run_records, score_suite
from unlearn.losses import IGNORE_INDEX
from unlearn.prompts import PromptFormatter, Tokenized, collate

TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


class Naive:
    """One model pass per metric, in dataset order, with OpenUnlearning's per-batch computations."""

    def __init__(self, model, formatter: PromptFormatter, batch_size: int, max_new_tokens: int):
        self.model, self.fmt = model, formatter
        self.tok = formatter.tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.stats = PassStats()
        self.passes = 0  # dataset passes (teacher-forced + generation)
        self.generate_seconds = 0.0

    # ------------------------------------------------------------------ model passes
    def _pair(self, question: str, answer: str) -> Tokenized:
        """Prompt + answer, loss on the answer and its end-of-turn tokens (as ours does)."""
        p_ids, a_ids = answer_ids(self.fmt, question, answer)
        n = self.fmt.cfg.max_length
        return Tokenized((p_ids + a_ids)[:n], ([IGNORE_INDEX] * len(p_ids) + a_ids)[:n], 0)

    def _forward(self, pairs: list[tuple[str, str]]):
        """Right-padded batches in the given order; yields (logits [B, L-1, V], targets [B, L-1])."""
        self.passes += 1
        seqs = [self._pair(q, a) for q, a in pairs]
        for start in range(0, len(seqs), self.batch_size):
            batch = collate(seqs[start : start + self.batch_size], self.tok.pad_token_id)
            labels = batch.pop("labels")
            self.stats.real_tokens += int(batch["attention_mask"].sum())
            self.stats.padded_tokens += batch["input_ids"].numel()
            self.stats.sequences += len(labels)
            self.stats.batches += 1
            yield self.model(**batch).logits[:, :-1].float(), labels[:, 1:]

    def mean_logprob(self, pairs) -> np.ndarray:
        """OpenUnlearning `evaluate_probability`: CE over the whole batch, / answer tokens."""
        out: list[float] = []
        for logits, target in self._forward(pairs):
            nll = F.cross_entropy(
                logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
            ).sum(-1)
            out += (-nll / (target != IGNORE_INDEX).sum(-1)).tolist()
        return np.array(out)

    def token_logprobs(self, pairs) -> list[np.ndarray]:
        """OpenUnlearning `tokenwise_logprobs`: full log-softmax, then each answer's tokens."""
        out = []
        for logits, target in self._forward(pairs):
            logp = F.log_softmax(logits, dim=-1)
            for row in range(len(target)):
                m = target[row] != IGNORE_INDEX
                out.append(logp[row][m].gather(-1, target[row][m][:, None])[:, 0].numpy())
        return out

    def vocab_logprobs(self, pairs):
        """OpenUnlearning `tokenwise_vocab_logprobs`: per example ([T, V] log-probs, targets [T])."""
        for logits, target in self._forward(pairs):
            logp = F.log_softmax(logits, dim=-1)
            for row in range(len(target)):
                m = target[row] != IGNORE_INDEX
                yield logp[row][m], target[row][m]

    def generate(self, questions: list[str]) -> list[str]:
        """Greedy, left-padded, batched in dataset order, the prompt run by generate() itself;
        the same generation call and stopping rule as ours."""
        self.passes += 1
        t0 = time.perf_counter()
        prompts = [
            tuple(self.tok(self.fmt.prompt_text(q), add_special_tokens=False)["input_ids"])
            for q in questions
        ]
        out = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = left_pad(prompts[start : start + self.batch_size], self.tok.pad_token_id)
            out += hf_greedy(self.model, self.fmt, ids, mask, self.max_new_tokens, PassStats())
        self.generate_seconds += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ metrics, each its own pass
    @staticmethod
    def _qa(rows, key="answer"):
        return [(r["question"], r[key]) for r in rows]

    def _perturbed(self, rows) -> np.ndarray:
        flat = [(r["question"], p) for r in rows for p in r["perturbed_answer"]]
        lp = self.mean_logprob(flat)
        k = len(rows[0]["perturbed_answer"])
        return lp.reshape(len(rows), k)

    def _rouge(self, rows) -> tuple[dict[str, float], list[str]]:
        gens = self.generate([r["question"] for r in rows])
        return M.mean_rouge(M.rouge(gens, [r["answer"] for r in rows])), gens

    def run(self, suite) -> dict[str, float]:
        out: dict[str, float] = {}
        self.gens: dict[str, list[str]] = {}
        for name in ("forget", "retain", "real_authors", "world_facts"):
            rows = suite.get(name).rows
            answer_lp = self.mean_logprob(self._qa(rows))  # {name}_Q_A_Prob
            if name in ("forget", "retain"):
                out[f"{name}_probability"] = float(np.mean(M.probability(answer_lp)))
                true_lp = self.mean_logprob(self._qa(rows, "paraphrased_answer"))  # PARA_Prob
                tr = M.truth_ratio(true_lp, self._perturbed(rows))  # PERT_Prob
                agg = M.closer_to_1_better if name == "forget" else M.true_better
                out[f"{name}_truth_ratio"] = agg(tr)
            else:  # Q_A_Prob and Q_A_PERT_Prob serve both (OpenUnlearning's cache)
                false_lp = self._perturbed(rows)
                prob = M.normalized_probability(answer_lp, false_lp)
                out[f"{name}_probability"] = float(np.mean(prob))
                out[f"{name}_truth_ratio"] = M.true_better(M.truth_ratio(answer_lp, false_lp))
            rouge, self.gens[name] = self._rouge(rows)
            out[f"{name}_rouge_l_recall"] = rouge["rouge_l_recall"]
        out["model_utility"] = M.model_utility(out)
        forget, holdout = suite.get("forget").rows, suite.get("holdout").rows
        # exact memorisation and extraction strength: one pass each
        for key, fn in (
            ("exact_memorization", M.exact_memorization),
            ("extraction_strength", M.extraction_strength),
        ):
            flags = [
                (lp.argmax(-1) == t).numpy() for lp, t in self.vocab_logprobs(self._qa(forget))
            ]
            out[f"forget_{key}"] = float(np.mean(fn(flags)))
        # membership inference: each attack runs forget and holdout itself
        k = M.MIN_K_DEFAULT
        attacks = {
            "loss": lambda rows: M.loss_score(self.token_logprobs(self._qa(rows))),
            "zlib": lambda rows: M.zlib_score(
                self.token_logprobs(self._qa(rows)), [r["answer"] for r in rows]
            ),
            "min_k": lambda rows: M.min_k_score(self.token_logprobs(self._qa(rows)), k),
            "min_k_plus_plus": lambda rows: self._min_k_plus_plus(rows, k),
        }
        for key, attack in attacks.items():
            out[f"mia_{key}_auc"] = M.auc(attack(forget), attack(holdout))
        return out

    def _min_k_plus_plus(self, rows, k: float) -> np.ndarray:
        lps, mus, sigmas = [], [], []
        for logp, target in self.vocab_logprobs(self._qa(rows)):
            p = logp.exp()
            mu = (p * logp).sum(-1)
            sigma = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
            lps.append(logp.gather(-1, target[:, None])[:, 0].numpy())
            mus.append(mu.numpy())
            sigmas.append(sigma.numpy())
        return M.min_k_plus_plus_score(lps, mus, sigmas, k)


def _warm_up(model, formatter: PromptFormatter) -> None:
    """One tiny forward and generate so neither timed side pays one-off setup costs."""
    tok = formatter.tokenizer
    ids = torch.tensor(
        [tok(formatter.prompt_text("Hello?"), add_special_tokens=False)["input_ids"]]
    )
    model(input_ids=ids)
    model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)


class _Recorded(PassStats):
    """PassStats that remembers its instances, to read `run_records`' generation time."""

    made: ClassVar[list[PassStats]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _Recorded.made.append(self)


def compare_generation(model, formatter: PromptFormatter, questions: list[str], args) -> None:
    """The decode loop against `model.generate` (batches of --batch-size in dataset order, as
    before), same prompts, same run: time, tokens/s and whether every answer is identical."""
    tok = formatter.tokenizer
    prompts = [tuple(formatter.encode_qa(q, "")[0]) for q in questions]
    old, new = PassStats(), PassStats()
    t0 = time.perf_counter()
    before = []
    for start in range(0, len(prompts), args.batch_size):
        ids, mask = left_pad(prompts[start : start + args.batch_size], tok.pad_token_id)
        before += hf_greedy(model, formatter, ids, mask, args.max_new_tokens, old)
    t_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    after = greedy(model, formatter, prompts, args.max_new_tokens, args.gen_batch, new)
    t_new = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(before, after, strict=True))
    print(
        f"generation of {len(prompts)} forget01 answers, max_new_tokens={args.max_new_tokens}, "
        f"{old.generated} tokens:\n"
        f"  model.generate, batches of {args.batch_size}: {t_old:7.1f} s "
        f"({old.generated / t_old:.1f} tokens/s)\n"
        f"  decode loop, up to {args.gen_batch} rows:    {t_new:7.1f} s "
        f"({new.generated / t_new:.1f} tokens/s)\n"
        f"  speed-up {t_old / t_new:.2f}x; identical answers {same}/{len(prompts)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=16, help="rows per dataset (default 16)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="200: the full protocol")
    ap.add_argument(
        "--system-prompt",
        default="default",
        help='the full protocol: "You are a helpful assistant." (OpenUnlearning\'s for SmolLM2)',
    )
    ap.add_argument("--max-length", type=int, default=512, help="prompt.max_length")
    ap.add_argument(
        "--generation-only",
        action="store_true",
        help="only time the decode loop against model.generate on --limit forget01 questions",
    )
    ap.add_argument("--gen-batch", type=int, default=32, help="decode loop rows (default 32)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(TOFU))
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: a shared 2-core box)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from unlearn.models import load_model_and_tokenizer

    suite = build_suite(
        EvalConfig(benchmark="tofu", split="forget01", data_dir=args.data_dir, limit=args.limit)
    )
    model, tok, _ = load_model_and_tokenizer(ModelConfig(name=args.model))
    model.eval()
    formatter = PromptFormatter(
        tok, PromptConfig(system_prompt=args.system_prompt, max_length=args.max_length)
    )
    if args.generation_only:
        with torch.inference_mode():
            _warm_up(model, formatter)
            compare_generation(
                model, formatter, [r["question"] for r in suite.get("forget").rows], args
            )
        return
    sizes = ", ".join(f"{s.name}={len(s.rows)}" for s in suite.sets)
    print(
        f"model={args.model} threads={torch.get_num_threads()} batch={args.batch_size} "
        f"max_new_tokens={args.max_new_tokens} system_prompt={args.system_prompt!r} rows: {sizes}"
    )
    with torch.inference_mode():
        _warm_up(model, formatter)
        records_module.PassStats = _Recorded  # type: ignore[misc]
        try:
            t0 = time.perf_counter()
            records, info = run_records(
                model, formatter, suite, args.max_new_tokens, args.batch_size, progress=False
            )
            ours, _, _ = score_suite(suite, records)
            t_ours = time.perf_counter() - t0
        finally:
            records_module.PassStats = PassStats  # type: ignore[misc]
        ours_gen = [sum(st.generation_seconds for st in _Recorded.made)]
        generated = sum(st.generated for st in _Recorded.made)

        naive = Naive(model, formatter, args.batch_size, args.max_new_tokens)
        t0 = time.perf_counter()
        base = naive.run(suite)
        t_base = time.perf_counter() - t0

    print(f"\n{'metric':<34} {'(a) ours':>10} {'(b) naive':>10} {'|diff|':>9}")
    for key in base:
        mine = ours.get(key, float("nan"))  # score_suite drops undefined (NaN) metrics
        print(f"{key:<34} {mine:>10.5f} {base[key]:>10.5f} {abs(mine - base[key]):>9.2e}")
    same_gens = sum(
        g == r["generation"]
        for name, gens in naive.gens.items()
        for g, r in zip(gens, records[name], strict=True)
    )
    total_gens = sum(len(g) for g in naive.gens.values())
    checks = ("forget_probability", "forget_rouge_l_recall")
    agree = all(abs(ours.get(k, float("nan")) - base[k]) <= 1e-4 for k in checks)
    print(
        f"agreement ({', '.join(checks)} within 1e-4): {'yes' if agree else 'NO'}; "
        f"identical generations {same_gens}/{total_gens}"
    )
    print(
        f"\n(a) ours : {t_ours:7.1f} s  {info['forward_batches']} teacher-forced batches, "
        f"{info['forward_tokens']} tokens, padding efficiency {info['padding_efficiency']:.1%}; "
        f"generation {ours_gen[0]:.1f} s ({generated} tokens, "
        f"{generated / max(ours_gen[0], 1e-9):.1f} tokens/s)"
    )
    print(
        f"(b) naive: {t_base:7.1f} s  {naive.stats.batches} teacher-forced batches, "
        f"{naive.stats.padded_tokens} tokens, padding efficiency {naive.stats.efficiency:.1%}; "
        f"generation {naive.generate_seconds:.1f} s ({naive.passes} dataset passes)"
    )
    print(f"speed-up (b)/(a): {t_base / t_ours:.2f}x")


if __name__ == "__main__":
    main()
