"""`unlearn eval`: run the model once per dataset, save records, score every metric from them.

Output folder:
  results.json         metrics, skipped metrics with reasons, per-example values, dataset ids/hashes
  records/<set>.jsonl  per-example records (ids, hashes, scores, generations) for re-scoring and
                       for use as another model's `--reference`
Scoring is `score_suite`, a pure function of records; a comparison with a reference model reads the
reference's saved records and never runs that model again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from unlearn import metrics as M
from unlearn.config import ModelConfig, PromptConfig
from unlearn.errors import UnlearnError
from unlearn.eval.suites.builders import (
    BENCHMARKS,
    EvalSet,
    Suite,
    custom_suite,
    people_suite,
    tofu_suite,
)
from unlearn.outputs import atomic_write_json, atomic_write_text

RESULTS = "results.json"
RECORDS = "records"


# ---------------------------------------------------------------------------- running the model
def run_records(
    model,
    formatter,
    suite: Suite,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    progress: bool = True,
    mia_gradnorm: bool = False,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """Per dataset, one pass over its prompts serves teacher forcing and generation -> records.

    `mia_gradnorm` adds each forget/holdout example's gradient norm (one backward pass each).
    """
    from tqdm.auto import tqdm

    from unlearn.eval.records import PassStats, ScoreItem, grad_norms, score, score_and_generate

    stats = PassStats()
    out: dict[str, list[dict[str, Any]]] = {}
    bar = tqdm(suite.sets, desc="eval", unit="set", disable=not progress)
    for s in bar:
        bar.set_postfix_str(s.name)
        if s.kind == "text":
            docs = [ScoreItem(None, r["text"], detail=True) for r in s.rows]
            scores = score(model, formatter, docs, batch_size=batch_size, stats=stats)
            out[s.name] = [
                {"id": r["id"], "sha256": r["sha256"], "answer": sc.to_dict()}
                for r, sc in zip(s.rows, scores, strict=True)
            ]
            if mia_gradnorm and s.name in ("forget", "holdout"):
                for rec, g in zip(out[s.name], grad_norms(model, formatter, docs), strict=True):
                    rec["grad_norm"] = g
            continue
        items: list[ScoreItem] = []
        layout: list[tuple[int, str, int]] = []  # (row, variant, index within variant)
        for i, r in enumerate(s.rows):
            items.append(ScoreItem(r["question"], r["answer"], detail=True))
            layout.append((i, "answer", 0))
            if r.get("paraphrased_answer"):
                items.append(ScoreItem(r["question"], r["paraphrased_answer"]))
                layout.append((i, "paraphrased", 0))
            for k, p in enumerate(r.get("perturbed_answer") or []):
                items.append(ScoreItem(r["question"], p))
                layout.append((i, "perturbed", k))
        # holdout sets only feed membership inference: no generation
        questions = [r["question"] for r in s.rows] if s.role != "holdout" else []
        scores, gens = score_and_generate(
            model, formatter, items, questions, max_new_tokens, batch_size, stats=stats
        )
        recs: list[dict[str, Any]] = [{"id": r["id"], "sha256": r["sha256"]} for r in s.rows]
        for (i, variant, _k), sc in zip(layout, scores, strict=True):
            d = sc.to_dict()
            if variant == "perturbed":
                recs[i].setdefault("perturbed", []).append(d)
            else:
                recs[i][variant] = d
        for rec, g in zip(recs if questions else [], gens, strict=True):
            rec["generation"] = g
        if mia_gradnorm and s.name in ("forget", "holdout"):
            answers = [ScoreItem(r["question"], r["answer"]) for r in s.rows]
            for rec, g in zip(recs, grad_norms(model, formatter, answers), strict=True):
                rec["grad_norm"] = g
        out[s.name] = recs
    info = {
        "padding_efficiency": round(stats.efficiency, 4),
        "scored_sequences": stats.sequences,
        "forward_batches": stats.batches,
        "forward_tokens": stats.padded_tokens,
        "generated_tokens": stats.generated,
    }
    return out, info


# ---------------------------------------------------------------------------- scoring (pure)
def _mean(x) -> float:
    """Mean over defined values; NaN (dropped later as skipped) when none is defined."""
    arr = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def _json_safe(values: list[float]) -> list[float | None]:
    return [None if not np.isfinite(v) else v for v in values]


def _mean_lp(d: dict[str, Any]) -> float:
    return d["logprob_sum"] / max(d["n_tokens"], 1)


def set_metrics(
    s: EvalSet, recs: list[dict[str, Any]]
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, str]]:
    """Metrics of one dataset from its records: (aggregates, per-example values, skipped)."""
    name = s.name
    agg: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    answer = [r["answer"] for r in recs]
    lp = M.mean_logprob([a["logprob_sum"] for a in answer], [a["n_tokens"] for a in answer])
    per["mean_nll"] = (-lp).tolist()
    agg[f"{name}_mean_nll"] = _mean(-lp)
    per["exact_memorization"] = M.exact_memorization([a["top1"] for a in answer]).tolist()
    agg[f"{name}_exact_memorization"] = _mean(per["exact_memorization"])
    per["extraction_strength"] = M.extraction_strength([a["top1"] for a in answer]).tolist()
    agg[f"{name}_extraction_strength"] = _mean(per["extraction_strength"])
    if s.kind == "text":
        return agg, per, skipped
    if s.has_truth_ratio:
        true_key = "paraphrased" if s.has_paraphrase and name in ("forget", "retain") else "answer"
        true_lp = np.array([_mean_lp(r[true_key]) for r in recs])
        false_lp = np.array([[_mean_lp(p) for p in r["perturbed"]] for r in recs])
        prob = M.normalized_probability(lp, false_lp) if s.role == "utility" else M.probability(lp)
        tr = M.truth_ratio(true_lp, false_lp)
        per["truth_ratio"] = tr.tolist()
        agg[f"{name}_truth_ratio"] = (
            M.closer_to_1_better(tr) if s.role == "forget" else M.true_better(tr)
        )
    else:
        prob = M.probability(lp)
        skipped[f"{name}_truth_ratio"] = "the data has no perturbed_answer column"
    per["probability"] = prob.tolist()
    agg[f"{name}_probability"] = _mean(prob)
    if any("generation" not in r for r in recs):
        return agg, per, skipped
    gens = [r["generation"] for r in recs]
    refs = [row["answer"] for row in s.rows]
    rouge = M.rouge(gens, refs)
    for key, values in rouge.items():
        per[key] = values.tolist()
    for key, value in M.mean_rouge(rouge).items():
        agg[f"{name}_{key}"] = value
    kw_acc = M.keyword_accuracy(gens, refs)
    per["keyword_accuracy"] = kw_acc.tolist()
    agg[f"{name}_keyword_accuracy"] = _mean(kw_acc)
    conf = []
    for a in answer:
        mask = np.asarray(a["keyword_mask"], dtype=bool)
        conf.append(
            float(np.exp(np.asarray(a["token_logprobs"])[mask]).mean()) if mask.any() else np.nan
        )
    per["keyword_confidence"] = conf
    agg[f"{name}_keyword_confidence"] = _mean(conf)
    return agg, per, skipped


def _mia_scores(recs: list[dict[str, Any]], texts: list[str], k: float) -> dict[str, np.ndarray]:
    tok = [r["answer"]["token_logprobs"] for r in recs]
    return {
        "loss": M.loss_score(tok),
        "zlib": M.zlib_score(tok, texts),
        "min_k": M.min_k_score(tok, k),
        "min_k_plus_plus": M.min_k_plus_plus_score(
            tok,
            [r["answer"]["vocab_mu"] for r in recs],
            [r["answer"]["vocab_sigma"] for r in recs],
            k,
        ),
    }


def _texts(s: EvalSet) -> list[str]:
    return [r["answer"] if s.kind == "qa" else r["text"] for r in s.rows]


def score_suite(
    suite: Suite,
    records: dict[str, list[dict[str, Any]]],
    reference: dict[str, list[dict[str, Any]]] | None = None,
    min_k: float = M.MIN_K_DEFAULT,
) -> tuple[dict[str, float], dict[str, str], dict[str, dict[str, list[float]]]]:
    """Every metric that applies, from records alone: (metrics, skipped with reasons, per-example)."""
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    per_example: dict[str, dict[str, list[float]]] = {}
    for s in suite.sets:
        agg, per, skip = set_metrics(s, records[s.name])
        metrics.update(agg)
        skipped.update(skip)
        per_example[s.name] = {k: _json_safe(v) for k, v in per.items()}
    forget, holdout = suite.get("forget"), suite.get("holdout")
    no_ref = "needs the reference (retain) model's evaluation; pass --reference EVAL_DIR"
    # forget quality: KS test of forget-set truth ratios against the retain model's
    if forget is not None and forget.has_truth_ratio:
        if reference is None:
            skipped["forget_quality"] = no_ref
        else:
            ref_tr = _truth_ratios(forget, reference["forget"])
            metrics["forget_quality"] = M.forget_quality(
                per_example["forget"]["truth_ratio"], ref_tr
            )
    elif forget is not None:
        skipped["forget_quality"] = (
            "the forget data has no perturbed_answer column (no truth ratio)"
        )
    # model utility: TOFU's harmonic mean of 9 values
    missing = [k for k in M.MODEL_UTILITY_KEYS if k not in metrics]
    if missing:
        skipped["model_utility"] = (
            f"needs {', '.join(missing)} (TOFU-style retain/real_authors/world_facts sets)"
        )
    else:
        metrics["model_utility"] = M.model_utility(metrics)
    # membership inference: forget (members) vs holdout (non-members)
    if forget is None or holdout is None:
        skipped["mia"] = "needs both a forget and a holdout set (--holdout FILE)"
    else:
        fs = _mia_scores(records["forget"], _texts(forget), min_k)
        hs = _mia_scores(records["holdout"], _texts(holdout), min_k)
        for key in fs:
            metrics[f"mia_{key}_auc"] = M.auc(fs[key], hs[key])
        if all("grad_norm" in r for r in records["forget"] + records["holdout"]):
            metrics["mia_gradnorm_auc"] = M.auc(
                M.gradnorm_score([r["grad_norm"] for r in records["forget"]]),
                M.gradnorm_score([r["grad_norm"] for r in records["holdout"]]),
            )
        else:
            skipped["mia_gradnorm_auc"] = (
                "needs per-example gradient norms (one backward pass each); pass --mia-gradnorm"
            )
        if reference is None:
            skipped["mia_reference_auc"] = no_ref
            skipped["privleak"] = no_ref
        else:

            def tok(recs):
                return [r["answer"]["token_logprobs"] for r in recs]

            metrics["mia_reference_auc"] = M.auc(
                M.reference_score(tok(records["forget"]), tok(reference["forget"])),
                M.reference_score(tok(records["holdout"]), tok(reference["holdout"])),
            )
            rf = _mia_scores(reference["forget"], _texts(forget), min_k)
            rh = _mia_scores(reference["holdout"], _texts(holdout), min_k)
            ref_auc = M.auc(rf["min_k"], rh["min_k"])
            metrics["reference_mia_min_k_auc"] = ref_auc
            try:
                metrics["privleak"] = M.privleak(metrics["mia_min_k_auc"], ref_auc)
            except UnlearnError as exc:  # e.g. a reference AUC of exactly 1: undefined, not fatal
                skipped["privleak"] = str(exc)
    for key in [k for k, v in metrics.items() if not np.isfinite(v)]:
        del metrics[key]
        skipped[key] = "undefined on this data (e.g. no answer has key words)"
    return metrics, skipped, per_example


def _truth_ratios(s: EvalSet, recs: list[dict[str, Any]]) -> np.ndarray:
    true_key = "paraphrased" if s.has_paraphrase else "answer"
    true_lp = np.array([_mean_lp(r[true_key]) for r in recs])
    false_lp = np.array([[_mean_lp(p) for p in r["perturbed"]] for r in recs])
    return M.truth_ratio(true_lp, false_lp)


# ---------------------------------------------------------------------------- files
def load_records(eval_dir: str | Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """A finished evaluation's results.json and its records."""
    root = Path(eval_dir)
    res = root / RESULTS
    if not res.is_file():
        raise UnlearnError(f"{root} has no {RESULTS}; run `unlearn eval ... --output {root}` first")
    results = json.loads(res.read_text())
    records = {}
    for f in sorted((root / RECORDS).glob("*.jsonl")):
        records[f.stem] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return results, records


def check_reference(suite: Suite, ref_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Load a reference evaluation and make sure it scored exactly the same examples."""
    results, records = load_records(ref_dir)
    for s in suite.sets:
        if s.name not in ("forget", "holdout"):
            continue
        theirs = records.get(s.name)
        if theirs is None:
            raise UnlearnError(
                f"reference {ref_dir} has no '{s.name}' records; evaluate it on the same benchmark"
            )
        mine = list(zip(s.ids, s.hashes, strict=True))
        if [(r["id"], r["sha256"]) for r in theirs] != mine:
            raise UnlearnError(
                f"reference {ref_dir} was evaluated on different '{s.name}' data (ids/hashes differ: "
                f"{results.get('benchmark')}/{results.get('split')}); evaluate the reference on the same split"
            )
    return records


def evaluate(
    model: str,
    output: str,
    benchmark: str = "tofu",
    split: str | None = None,
    data_dir: str | None = None,
    forget: str | None = None,
    retain: str | None = None,
    holdout: str | None = None,
    reference: str | None = None,
    name: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    limit: int | None = None,
    prompt: PromptConfig | None = None,
    model_config: ModelConfig | None = None,
    overwrite: bool = True,
    progress: bool = True,
    suite: Suite | None = None,
    mia_gradnorm: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` on a benchmark; write results.json and records to `output`; return results.

    `suite` overrides the benchmark arguments with a prebuilt suite (the demo uses its own sizes).
    """
    t0 = time.time()
    suite = suite or build_suite(benchmark, split, data_dir, forget, retain, holdout, limit)
    ref_records = check_reference(suite, reference) if reference else None
    out = Path(output)
    if out.exists() and (out / RESULTS).is_file() and not overwrite:
        raise UnlearnError(f"{out} already holds an evaluation; pass --overwrite")
    from unlearn.models import (
        hash_model_files,
        load_model_and_tokenizer,
        local_folder,
        resolve_model,
    )
    from unlearn.prompts import PromptFormatter

    mcfg = model_config or ModelConfig(name=model)
    resolved = resolve_model(mcfg)
    if resolved.kind == "local" and out.resolve() == Path(resolved.path).resolve():
        raise UnlearnError("--output must not be the model folder itself")
    lm, tok, resolved = load_model_and_tokenizer(mcfg)
    formatter = PromptFormatter(tok, prompt or _prompt_for(resolved))
    records, info = run_records(
        lm, formatter, suite, max_new_tokens, batch_size, progress, mia_gradnorm
    )
    metrics, skipped, per_example = score_suite(suite, records, ref_records)
    folder = local_folder(resolved, mcfg)
    model_path = folder if resolved.kind in ("local",) else None
    results = {
        "name": name or out.name,
        "model": {
            "spec": model,
            "kind": resolved.kind,
            "sha256": hash_model_files(folder) if resolved.kind != "hub" else None,
        },
        "model_path": model_path,
        "benchmark": suite.benchmark,
        "split": suite.split,
        "reference": str(reference) if reference else None,
        "metrics": metrics,
        "skipped": skipped,
        "per_example": per_example,
        "datasets": {
            s.name: {
                "source": s.source,
                "n": len(s.rows),
                "kind": s.kind,
                "ids_sha256": _ids_hash(s),
            }
            for s in suite.sets
        },
        "pass": info,
        "seconds": round(time.time() - t0, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    for set_name, recs in records.items():
        atomic_write_text(
            out / RECORDS / f"{set_name}.jsonl", "".join(json.dumps(r) + "\n" for r in recs)
        )
    atomic_write_json(out / RESULTS, results)
    return results


def _ids_hash(s: EvalSet) -> str:
    from unlearn.data import content_hash

    return content_hash(*(f"{i}:{h}" for i, h in zip(s.ids, s.hashes, strict=True)))


def _prompt_for(resolved) -> PromptConfig:
    """Evaluate with the prompt format the model was trained with, when its manifest says so."""
    manifest = Path(resolved.path) / "unlearn.json"
    if resolved.kind == "local" and manifest.is_file():
        cfg = json.loads(manifest.read_text()).get("config", {}).get("prompt")
        if cfg:
            return PromptConfig(**cfg)
    return PromptConfig()


def build_suite(
    benchmark: str,
    split: str | None = None,
    data_dir: str | None = None,
    forget: str | None = None,
    retain: str | None = None,
    holdout: str | None = None,
    limit: int | None = None,
) -> Suite:
    """The suite for a benchmark name; custom files are used when --forget is given."""
    if forget is not None:
        return custom_suite(forget, retain, holdout)
    if benchmark == "tofu":
        return tofu_suite(split or "forget01", data_dir, limit)
    if benchmark == "people":
        return people_suite()
    if benchmark == "custom":
        raise UnlearnError(
            "benchmark 'custom' needs --forget FILE (and optionally --retain, --holdout)"
        )
    raise UnlearnError(f"unknown benchmark '{benchmark}'; choose one of {', '.join(BENCHMARKS)}")
