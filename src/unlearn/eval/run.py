"""`unlearn eval`: run the model once per dataset, save records, score every metric from them.

Output folder:
  results.json         metrics, skipped metrics with reasons, per-example values, dataset ids/hashes,
                       the resolved evaluation settings, and (only with `examples=N`) N examples'
                       text per set for `unlearn report --show-examples`
  records/<set>.jsonl  per-example records (ids, hashes, scores, generations) for re-scoring and
                       for use as another model's `--reference`
Scoring is `unlearn.eval.scoring.score_suite`, a pure function of records; a comparison with a
reference model reads the reference's saved records and never runs that model again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from unlearn.config import EvalConfig, PromptConfig, to_dict
from unlearn.data import content_hash
from unlearn.errors import UnlearnError
from unlearn.eval.scoring import score_suite
from unlearn.eval.suites.builders import EvalSet, Suite
from unlearn.eval.suites.catalog import build_suite
from unlearn.metrics.registry import RETAIN, SUITE_METRICS
from unlearn.outputs import atomic_write_json, atomic_write_text

__all__ = ["build_suite", "check_reference", "load_records", "rescore", "run_evaluation"]
__all__ += ["run_records", "score_suite"]

RESULTS = "results.json"
RECORDS = "records"


# ---------------------------------------------------------------------------- running the model
def set_formatter(base, s: EvalSet):
    """The formatter a set is asked with: `base` (the model's prompt) unless the set declares
    another prompt style, few-shot examples or stop strings."""
    from unlearn.prompts import PromptFormatter

    plain = s.prompt == "model" and not s.stop and s.template is None
    if plain and (s.max_length is None or s.max_length == base.cfg.max_length):
        return base
    cfg = (
        base.cfg if s.max_length is None else dataclasses.replace(base.cfg, max_length=s.max_length)
    )
    return PromptFormatter(base.tokenizer, cfg, s.prompt, s.shots, s.stop, s.template)


def truth_chars(tokenizer, answer: str, n_tokens: int) -> int:
    """How many characters of `answer` its first `n_tokens` tokens cover, counted as MUSE does
    (tokenized with special tokens, so a BOS counts, cut, decoded without them). MUSE also asks
    for clean_up_tokenization_spaces, which only moves spaces around punctuation: ROUGE's
    tokenizer drops punctuation, so the scores are the same without it."""
    ids = tokenizer(answer, add_special_tokens=True)["input_ids"][:n_tokens]
    kept = tokenizer.decode(ids, skip_special_tokens=True)
    return len(os.path.commonprefix([answer, kept]))  # noqa: RUF071 (characters, not paths)


def run_records(
    model,
    formatter,
    suite: Suite,
    max_new_tokens: int = 200,
    batch_size: int = 32,
    progress: bool = True,
    mia_gradnorm: bool = False,
    score_end: bool = True,
    generation_batch: int | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """Per dataset, one pass over its prompts serves teacher forcing and generation -> records.

    Each set is asked as it declares (prompt style, generation length, stop strings, whether
    end-of-turn tokens are scored); `max_new_tokens` and `score_end` are the defaults of sets that
    declare none. `mia_gradnorm` adds each membership-inference example's gradient norm (one
    backward pass each).
    """
    from tqdm.auto import tqdm

    from unlearn.eval.gradnorm import grad_norms
    from unlearn.eval.records import PassStats, ScoreItem, score, score_and_generate

    gen_batch = {"generation_batch": generation_batch} if generation_batch else {}
    stats = PassStats()
    out: dict[str, list[dict[str, Any]]] = {}
    bar = tqdm(suite.sets, desc="eval", unit="set", disable=not progress)
    for s in bar:
        bar.set_postfix_str(s.name)
        fmt = set_formatter(formatter, s)
        end = score_end if s.score_end is None else s.score_end
        new_tokens = max_new_tokens if s.max_new_tokens is None else s.max_new_tokens
        detail: bool | str = True if s.moments else "tokens"
        if s.kind == "text":
            docs = [ScoreItem(None, r["text"], detail=detail) for r in s.rows]
            scores = score(model, fmt, docs, batch_size=batch_size, stats=stats)
            out[s.name] = [
                {"id": r["id"], "sha256": r["sha256"], "answer": sc.to_dict()}
                for r, sc in zip(s.rows, scores, strict=True)
            ]
            if mia_gradnorm and s.mia:
                for rec, g in zip(out[s.name], grad_norms(model, fmt, docs), strict=True):
                    rec["grad_norm"] = g
            continue
        if s.kind == "choice":
            out[s.name] = _choice_records(model, fmt, s, batch_size, stats)
            continue
        if s.kind == "probe":
            out[s.name] = _probe_records(
                model, fmt, s, new_tokens if s.generates else 0, batch_size, stats, end, gen_batch
            )
            continue
        items: list[ScoreItem] = []
        layout: list[tuple[int, str, int]] = []  # (row, variant, index within variant)
        for i, r in enumerate(s.rows):
            items.append(ScoreItem(r["question"], r["answer"], detail=detail))
            layout.append((i, "answer", 0))
            if r.get("paraphrased_answer"):
                items.append(ScoreItem(r["question"], r["paraphrased_answer"]))
                layout.append((i, "paraphrased", 0))
            for k, p in enumerate(r.get("perturbed_answer") or []):
                items.append(ScoreItem(r["question"], p))
                layout.append((i, "perturbed", k))
        questions = [r["question"] for r in s.rows] if s.generates and new_tokens > 0 else []
        scores, gens = score_and_generate(
            model, fmt, items, questions, new_tokens, batch_size, stats=stats, score_end=end,
            **gen_batch,
        )  # fmt: skip
        recs: list[dict[str, Any]] = [{"id": r["id"], "sha256": r["sha256"]} for r in s.rows]
        for (i, variant, _k), sc in zip(layout, scores, strict=True):
            d = sc.to_dict()
            if variant == "perturbed":
                recs[i].setdefault("perturbed", []).append(d)
            else:
                recs[i][variant] = d
        for rec, g in zip(recs if questions else [], gens, strict=True):
            rec["generation"] = g
        if s.truth_tokens is not None:
            for rec, r in zip(recs, s.rows, strict=True):
                rec["truth_chars"] = truth_chars(fmt.tokenizer, r["answer"], s.truth_tokens)
        if mia_gradnorm and s.mia:
            answers = [ScoreItem(r["question"], r["answer"]) for r in s.rows]
            norms = grad_norms(model, fmt, answers, score_end=end)
            for rec, g in zip(recs, norms, strict=True):
                rec["grad_norm"] = g
        out[s.name] = recs
    info = {
        "padding_efficiency": round(stats.efficiency, 4),
        "scored_sequences": stats.sequences,
        "forward_batches": stats.batches,
        "forward_tokens": stats.padded_tokens,
        "generated_tokens": stats.generated,
        "truncated": stats.truncated,
    }
    return out, info


def _choice_records(model, fmt, s: EvalSet, batch_size: int, stats) -> list[dict[str, Any]]:
    """Each option's summed log-likelihood as a continuation of the question's prompt (the
    lm-evaluation-harness protocol): the options share the prompt, so it runs once per question
    and the options are scored off its KV cache."""
    from unlearn.eval.records import ScoreItem, score

    items = [ScoreItem(r["question"], label) for r in s.rows for label in r["labels"]]
    scores = score(model, fmt, items, batch_size=batch_size, stats=stats, score_end=False)
    recs, k = [], 0
    for r in s.rows:
        n = len(r["labels"])
        mine = scores[k : k + n]
        k += n
        recs.append(
            {
                "id": r["id"],
                "sha256": r["sha256"],
                "choice_logprobs": [sc.logprob_sum for sc in mine],
                "choice_tokens": [sc.n_tokens for sc in mine],
                "target": r["target"],
            }
        )
    return recs


def _probe_records(
    model, fmt, s: EvalSet, new_tokens: int, batch_size: int, stats, end: bool, gen_batch: dict
) -> list[dict[str, Any]]:
    """Per row, the greedy answer and each probe kind's mean per-token log-probability (averaged
    over that kind's answers), all off one pass of the row's prompt. Rows of one `prompt_group`
    run as one call: their common start (e.g. shared in-context examples) runs once."""
    from unlearn.eval.records import ScoreItem, score_and_generate

    groups: dict[str, list[int]] = {}
    for i, r in enumerate(s.rows):
        groups.setdefault(str(r.get("prompt_group", i)), []).append(i)
    recs: list[dict[str, Any]] = [{} for _ in s.rows]
    for idx in groups.values():
        items: list[ScoreItem] = []
        spans: list[dict[str, slice]] = []
        for i in idx:
            span = {}
            for kind, texts in s.rows[i]["probes"].items():
                span[kind] = slice(len(items), len(items) + len(texts))
                items += [ScoreItem(s.rows[i]["question"], t) for t in texts]
            spans.append(span)
        questions = [s.rows[i]["question"] for i in idx] if new_tokens > 0 else []
        scores, gens = score_and_generate(
            model, fmt, items, questions, new_tokens, batch_size, stats=stats, score_end=end,
            **gen_batch,
        )  # fmt: skip
        for k, (i, span) in enumerate(zip(idx, spans, strict=True)):
            r = s.rows[i]
            recs[i] = {
                "id": r["id"],
                "sha256": r["sha256"],
                "entity": r.get("entity"),
                "answers": list(r["answers"]),
                "probe": {
                    kind: sum(sc.logprob_sum / max(sc.n_tokens, 1) for sc in scores[sl])
                    / (sl.stop - sl.start)
                    for kind, sl in span.items()
                },
                "probe_answers": {kind: sl.stop - sl.start for kind, sl in span.items()},
            }
            if questions:
                recs[i]["generation"] = gens[k]
    return recs


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


def check_reference(
    suite: Suite, ref_dir: str | Path, name: str = "reference"
) -> dict[str, list[dict[str, Any]]]:
    """Load a comparison model's evaluation and make sure it scored exactly the same examples of
    every set a comparison is read on (forget sets, membership-inference sides, probe sets)."""
    results, records = load_records(ref_dir)
    for s in suite.sets:
        if s.role != "forget" and s.mia is None and s.kind != "probe":
            continue
        theirs = records.get(s.name)
        if theirs is None:
            raise UnlearnError(
                f"{name} {ref_dir} has no '{s.name}' records; evaluate it on the same benchmark"
            )
        mine = list(zip(s.ids, s.hashes, strict=True))
        if [(r["id"], r["sha256"]) for r in theirs] != mine:
            raise UnlearnError(
                f"{name} {ref_dir} was evaluated on different '{s.name}' data (ids/hashes differ: "
                f"{results.get('benchmark')}/{results.get('split')}); evaluate it on the same split"
            )
    return records


def comparisons_of(cfg: EvalConfig) -> dict[str, str]:
    """The named comparison evaluations: `compare` entries NAME=DIR, and `reference` as "retain"."""
    out: dict[str, str] = {}
    for entry in cfg.compare or []:
        name, sep, folder = str(entry).partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise UnlearnError(
                f"--compare '{entry}' must be NAME=EVAL_DIR, e.g. --compare retain=evals/retain"
            )
        out[name.strip()] = folder.strip()
    if cfg.reference:
        if out.get(RETAIN, cfg.reference) != cfg.reference:
            raise UnlearnError("--reference and --compare retain=... name different folders")
        out[RETAIN] = str(cfg.reference)
    return out


def check_output(out: Path, overwrite: bool) -> None:
    """An evaluation goes into an empty (or new) folder; a non-empty one needs `overwrite`."""
    if out.exists() and not out.is_dir():
        raise UnlearnError(f"--output {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "an evaluation" if (out / RESULTS).is_file() else "files"
        raise UnlearnError(
            f"--output {out} already holds {what}; pass --overwrite to replace the evaluation "
            "there, or choose another folder"
        )


def _write_outputs(out: Path, records: dict[str, list[dict[str, Any]]], results: dict) -> None:
    """Records and results.json; records of sets this evaluation did not score are removed, so a
    folder never mixes two evaluations."""
    out.mkdir(parents=True, exist_ok=True)
    for set_name, recs in records.items():
        atomic_write_text(
            out / RECORDS / f"{set_name}.jsonl", "".join(json.dumps(r) + "\n" for r in recs)
        )
    for stale in (out / RECORDS).glob("*.jsonl"):
        if stale.stem not in records:
            stale.unlink()
    atomic_write_json(out / RESULTS, results)


def _examples(suite: Suite, records: dict[str, list[dict[str, Any]]], n: int) -> dict:
    """The first `n` rows of each generated set, with text: only when the user asked (privacy)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for s in suite.sets:
        recs = records.get(s.name, [])
        if n <= 0 or s.kind != "qa" or not recs or "generation" not in recs[0]:
            continue
        out[s.name] = [
            {"id": r["id"], "question": r["question"], "answer": r["answer"], "generation": g}
            for r, g in zip(s.rows[:n], (rec["generation"] for rec in recs[:n]), strict=True)
        ]
    return out


def run_evaluation(
    cfg: EvalConfig,
    suite: Suite | None = None,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate `cfg.model` as `cfg` says; write results.json and records to `cfg.output`.

    `suite` overrides the benchmark settings with a prebuilt suite (the demo uses its own sizes,
    RESTOR its facts); `extra` fields are written into results.json beside the engine's (what the
    caller needs to know about the run, e.g. RESTOR's role of the model). Returns the results.
    """
    t0 = time.time()
    if not cfg.model.name:
        raise UnlearnError("no model to evaluate; pass --model (a folder, hub id, .gguf or alias)")
    if not cfg.output:
        raise UnlearnError("no output folder; pass --output FOLDER")
    suite = suite or build_suite(cfg)
    if not cfg.privleak:
        names = suite.metrics or tuple(m.name for m in SUITE_METRICS)
        suite = dataclasses.replace(
            suite, metrics=tuple(n for n in names if n != "privleak"), retrain_auc=None
        )
    compared = comparisons_of(cfg)
    comparison_records = {n: check_reference(suite, d, n) for n, d in compared.items()}
    retrain_auc = _retrain_auc(cfg, suite, compared)
    out = Path(cfg.output)
    from unlearn.models import (
        hash_model_files,
        load_model_and_tokenizer,
        local_folder,
        resolve_model,
    )
    from unlearn.prompts import PromptFormatter

    mcfg = cfg.model
    resolved = resolve_model(mcfg)
    if resolved.kind == "local" and out.resolve() == Path(resolved.path).resolve():
        raise UnlearnError("--output must not be the model folder itself")
    check_output(out, cfg.overwrite)
    lm, tok, resolved = load_model_and_tokenizer(mcfg)
    prompt = cfg.prompt.resolve(_prompt_for(resolved))
    formatter = PromptFormatter(tok, prompt)
    records, info = run_records(
        lm,
        formatter,
        suite,
        cfg.generation.max_new_tokens,
        cfg.score.batch_size,
        progress,
        cfg.mia_gradnorm,
        cfg.score.end_of_turn,
        generation_batch=cfg.generation.batch_size,
    )
    notes: dict[str, str] = {}
    metrics, skipped, per_example = score_suite(
        dataclasses.replace(suite, retrain_auc=retrain_auc), records, comparison_records,
        notes=notes,
    )  # fmt: skip
    folder = local_folder(resolved, mcfg)
    model_path = folder if resolved.kind in ("local",) else None
    results: dict[str, Any] = {
        "name": cfg.name or out.name,
        "model": {
            "spec": mcfg.name,
            "kind": resolved.kind,
            "sha256": hash_model_files(folder) if resolved.kind != "hub" else None,
        },
        "model_path": model_path,
        "benchmark": suite.benchmark,
        "split": suite.split,
        "reference": compared.get(RETAIN),
        "comparisons": compared,
        "headline": list(suite.headline),
        "notes": notes,
        "settings": {
            "prompt": to_dict(prompt),
            "generation": to_dict(cfg.generation),
            "score": to_dict(cfg.score),
            "sets": {s.name: _declaration(s) for s in suite.sets},
            "model": {"dtype": mcfg.dtype, "device": mcfg.device},
        },
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
        "output": str(out),
    }
    if cfg.examples:
        results["examples"] = _examples(suite, records, cfg.examples)
    results.update(extra or {})
    _write_outputs(out, records, results)
    return results


def rescore(
    eval_dir: str | Path,
    suite: Suite,
    compare: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score a finished evaluation's saved records again, against the named comparison
    evaluations `compare` (NAME -> folder), without running any model; results.json is rewritten
    (atomically, with `extra` fields updated) and returned. Models that are each other's
    comparisons (RESTOR's clean and corrupted baselines) are evaluated first, then scored against
    each other this way."""
    root = Path(eval_dir)
    results, records = load_records(root)
    check_reference(suite, root, "evaluation")
    comparison_records = {n: check_reference(suite, d, n) for n, d in compare.items()}
    notes: dict[str, str] = {}
    metrics, skipped, per_example = score_suite(suite, records, comparison_records, notes=notes)
    results.update(
        metrics=metrics, skipped=skipped, per_example=per_example, notes=notes,
        comparisons=dict(compare), reference=compare.get(RETAIN), **(extra or {}),
    )  # fmt: skip
    atomic_write_json(root / RESULTS, results)
    return results


def _declaration(s: EvalSet) -> dict[str, Any]:
    """What a set was declared as (its rows and few-shot text stay out: ids and hashes say which)."""
    return {
        "role": s.role, "kind": s.kind, "prompt": s.prompt, "max_new_tokens": s.max_new_tokens,
        "stop": list(s.stop), "truth": s.truth, "mia": s.mia,
        "rouge_stem": s.rouge_stem, "shots_sha256": content_hash(s.shots) if s.shots else None,
        **({"judge": getattr(s.judge, "__name__", s.judge)} if s.kind == "probe" else {}),
    }  # fmt: skip


def _retrain_auc(
    cfg: EvalConfig, suite: Suite, compared: dict[str, str]
) -> tuple[float, str] | None:
    """Privleak's reference AUC when no retain comparison is given: the user's `retrain_auc`, else
    the suite's published one (only on the whole published data). A suite that reports privleak
    as a headline refuses to run without one, before the model loads."""
    if RETAIN in compared:
        return None
    if cfg.retrain_auc is not None:
        # the setting is in MUSE's orientation (forget labelled 0); ours is 1 - that
        return (1.0 - float(cfg.retrain_auc), f"retrain_auc setting ({cfg.retrain_auc})")
    if suite.retrain_auc is not None and not cfg.limit:
        return suite.retrain_auc
    if suite.retrain_auc is not None:  # published for the whole data only
        raise UnlearnError(
            "privleak needs the retrained model's Min-K AUC; the published value is for the whole "
            "data, not --limit: pass --reference RETRAIN_EVAL or retrain_auc=AUC"
        )
    return None


def _ids_hash(s: EvalSet) -> str:
    return content_hash(*(f"{i}:{h}" for i, h in zip(s.ids, s.hashes, strict=True)))


def _prompt_for(resolved) -> PromptConfig | None:
    """The prompt format the model was trained with, when its manifest says so (else None)."""
    manifest = Path(resolved.path) / "unlearn.json"
    if resolved.kind == "local" and manifest.is_file():
        cfg = json.loads(manifest.read_text()).get("config", {}).get("prompt")
        if cfg:
            return PromptConfig(**cfg)
    return None
